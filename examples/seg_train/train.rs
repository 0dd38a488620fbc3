//! One training run, wired from keel's parts: the model, a [`TrainState`] (optimizer,
//! scaler, EMA, monitor, accumulation) stepped once per optimizer step, an [`OptimRecipe`]
//! schedule, JSONL logs, checkpoints with exact resume, evaluation and the health report.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use candle::{Device, Tensor};
use candle_nn::VarMap;
use keel::kernels::{cross_entropy, CrossEntropyConfig, PinnedUpload};
use keel::models::seg::count_params;
use keel::models::seg_model::{SegModel, SegModelStep};
use keel::optim::{LrSchedule, Precision};
use keel::train::run_dir::RunDir;
use keel::train::{
    named_vars, progress_bar, write_atomic, CheckpointManager, EvalLog, EvalRecord, Flushed, Guard,
    GuardAction, GuardConfig, GuardLog, GuardSummary, HealthReport, Interrupt, Intervention,
    JsonlLogger, MonitorConfig, Resume, RunContext, SegEval, StepLog, StepOutcome, StopSignal,
    TrainState,
};
use serde::{Deserialize, Serialize};

use super::cli::RunConfig;
use super::data::{self, HostBatch, Loader, LoaderConfig, Sources, IGNORE};
use super::model;
use super::output;
use keel::train::cli::advice_flags;

/// How a run is driven (not part of its identity).
pub struct RunOpts {
    pub device: Device,
    pub progress: bool,
    /// Print the health report and per-eval lines.
    pub verbose: bool,
    /// Sleep after every step (tests kill a run mid-way with it).
    pub step_delay: Option<Duration>,
    /// The fault to inject (`--fault`; none by default).
    pub fault: keel::train::fault::FaultPlan,
    /// Steps per host read of the loss and grad norm (`--log-every`; 1 reads every step).
    pub log_every: usize,
}

/// The outcome of a run (summary.json), for the `compare` grid.
pub use keel::train::RunSummary;

/// A run stopped by SIGINT or SIGTERM: the step it finished, its checkpoint and the health
/// report are written; the process exits with [`StopSignal::exit_code`] (130 / 143).
#[derive(Debug)]
pub struct Interrupted {
    pub signal: StopSignal,
    /// Steps done (the checkpoint's step).
    pub step: usize,
    pub checkpoint: PathBuf,
    pub out: PathBuf,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "stopped by {} after step {}: checkpoint {} and health.json written; continue with --resume {}",
            self.signal,
            self.step,
            self.checkpoint.display(),
            self.out.display()
        )
    }
}

impl std::error::Error for Interrupted {}

/// The process exit code for a run's error: the signal's code (130 / 143) when a signal
/// stopped it, else 1.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    err.downcast_ref::<Interrupted>()
        .map_or(1, |i| i.signal.exit_code())
}

/// The user meta of seg_train's checkpoints (beside TrainState's own).
#[derive(Serialize, Deserialize)]
struct CkptMeta {
    format: String,
    config: RunConfig,
    summary: RunSummary,
    /// All randomness derives from `(seed, step)` (see keel::data): the step restored by
    /// TrainState is the RNG position.
    rng: serde_json::Value,
}

/// The run's data; a `--data-dir` set is validated in full first (in parallel, with a
/// progress bar), before anything is written, failing with all bad files named at once.
fn sources(cfg: &RunConfig, progress: bool) -> anyhow::Result<Sources> {
    let Some(dir) = &cfg.data_dir else {
        return Ok(Sources::shapes(
            cfg.train_size,
            cfg.val_size,
            cfg.image_size,
        ));
    };
    let pb = progress_bar(progress, 0, 0);
    pb.set_message("checking --data-dir");
    let tick = |total: usize| {
        pb.set_length(total as u64);
        pb.inc(1)
    };
    let res = Sources::voc(dir, cfg.num_classes(), Some(&tick));
    pb.finish_and_clear();
    res.with_context(|| format!("--data-dir {}", dir.display()))
}

/// Everything a run holds: its config, data, model and train state.
struct Run<'a> {
    cfg: &'a RunConfig,
    opts: &'a RunOpts,
    data: Sources,
    vm: VarMap,
    master: SegModel,
    state: TrainState,
    schedule: Box<dyn LrSchedule + Send + Sync>,
    summary: RunSummary,
    init_msg: Option<String>,
    uploads: Uploads,
}

/// A run's batch uploads: through page-locked buffers on CUDA ([`PinnedUpload`]).
#[derive(Default)]
struct Uploads {
    images: PinnedUpload<f32>,
    targets: PinnedUpload<u32>,
}

impl Uploads {
    /// `(images (n, 3, s, s) f32, targets (n, s, s) u32)` on `dev`, as
    /// `HostBatch::to_tensors`.
    fn batch(&mut self, b: &HostBatch, dev: &Device) -> candle::Result<(Tensor, Tensor)> {
        let (n, s) = (b.n, b.size);
        let x = self.images.upload(&b.images, (n, 3, s, s), dev)?;
        Ok((x, self.targets.upload(&b.targets, (n, s, s), dev)?))
    }
}

impl<'a> Run<'a> {
    /// Builds the parts; everything that can fail on bad input fails here, before the
    /// first file is written.
    fn new(cfg: &'a RunConfig, opts: &'a RunOpts) -> anyhow::Result<Self> {
        cfg.validate()?;
        let data = sources(cfg, opts.progress)?;
        let (net, init_msg) = Net::build(cfg, &opts.device)?;
        Ok(Self {
            cfg,
            opts,
            data,
            vm: net.vm,
            master: net.master,
            state: net.state,
            schedule: cfg.recipe().schedule()?,
            summary: RunSummary::default(),
            init_msg,
            uploads: Uploads::default(),
        })
    }

    /// Checks the weights after `step` and tells the monitor (non-finite weights are a
    /// divergence: the report then advises a checkpoint from before this step).
    fn check_weights(&mut self, step: usize, say: &dyn Fn(String)) -> anyhow::Result<bool> {
        let finite = self.state.weights_finite()?;
        for alarm in self.state.monitor.record_weights_finite(step, finite) {
            say(format!("monitor: {alarm}"));
        }
        Ok(finite)
    }

    /// Evaluates the current weights on the validation set. Non-finite weights are not a
    /// model: their metrics are NaN (the argmax of NaN logits would score a few percent
    /// mIoU), so they are never the best.
    fn evaluate(&self) -> candle::Result<SegEval> {
        let (cfg, dev) = (self.cfg, &self.opts.device);
        if !self.state.weights_finite()? {
            return Ok(SegEval::nan(cfg.num_classes()));
        }
        let cast = SegModel::cast_copy(
            &cfg.seg_model(),
            &self.vm,
            cfg.train.amp.compute_dtype(),
            dev,
        )?;
        let model = cast.as_ref().unwrap_or(&self.master);
        let val = self.data.val.as_ref();
        let batches = data::eval_batches(val, cfg.batch_size.max(8), cfg.image_size)
            .map(|b| b?.to_tensors(dev));
        SegEval::evaluate(batches, cfg.num_classes(), Some(IGNORE as u32), |x| {
            model.forward(&x.to_dtype(cfg.train.amp.compute_dtype())?, false)
        })
    }

    fn snapshot_meta(&self) -> CkptMeta {
        CkptMeta {
            format: "keel seg_train checkpoint v2".into(),
            config: self.cfg.clone(),
            summary: self.summary.clone(),
            rng: serde_json::json!({ "seed": self.cfg.seed, "step": self.state.step, "scheme": "ChaCha8 per (seed, epoch) sample order and per (seed, sample) augmentation" }),
        }
    }

    /// Opens the output directory (see [`output::claim`]: lock, stale temp files, no
    /// overwriting): a fresh run writes its config; a resumed one restores the checkpoint
    /// `cli` chose and verified, and rewrites `config.json` when it changed (recovered, or
    /// `--steps` extended the run). The lock is held while the returned guard lives.
    fn open_output(
        &mut self,
        out: &Path,
        resume: Option<Resume>,
    ) -> anyhow::Result<(CheckpointManager, JsonlLogger, RunDir)> {
        let lock = output::claim(out, resume.is_some())?;
        let mut manager =
            CheckpointManager::new(out.join("checkpoints"), self.cfg.train.keep_last)?;
        manager.set_write_pause(output::save_pause()?);
        let log_path = out.join("log.jsonl");
        lock.write_config(self.cfg)?;
        let Some(found) = resume else {
            return Ok((manager, JsonlLogger::create(&log_path)?, lock));
        };
        let meta: CkptMeta = self
            .state
            .restore(&found.checkpoint)
            .with_context(|| format!("restoring {}", found.path.display()))?;
        self.summary = meta.summary;
        if self.opts.verbose {
            eprintln!(
                "resumed from {} at step {}",
                found.path.display(),
                self.state.step
            );
        }
        let logger = JsonlLogger::resume(&log_path, self.state.step)?;
        Ok((manager, logger, lock))
    }

    fn banner(&self) {
        let (cfg, r) = (self.cfg, self.cfg.recipe());
        let p = count_params(&self.vm);
        eprintln!(
            "seg_train: norm {}, width {}, fpn {}, {:.2} M params, {} classes, batch {} x accum {}, {} steps, {} {} lr {}, amp {}, device {:?}",
            cfg.norm, cfg.width, cfg.fpn, p as f64 / 1e6, cfg.num_classes(), cfg.batch_size, cfg.train.accum_steps, cfg.steps, cfg.train.optimizer,
            r.decay_name(), r.lr, amp_label(cfg.train.amp), self.opts.device.location()
        );
        if let Some(m) = &self.init_msg {
            eprintln!("{m}");
        }
    }

    /// One optimizer step through the TrainState: the micro-batches come from `loader`, and
    /// all of them run one network cast once for the step (`--amp`). Read at once, or
    /// launched into the window of `--log-every` steps (`launch`).
    fn step(
        &mut self,
        loader: &mut Loader,
        guard: &Guard,
        launch: bool,
    ) -> anyhow::Result<Stepped> {
        let (step, fault) = (self.state.step, self.opts.fault);
        let lr = guard.lr(self.schedule.lr(step) * fault.lr_factor(step));
        let (dev, cfg) = (&self.opts.device, self.cfg);
        let net = self.master.for_step(
            &cfg.seg_model(),
            &self.vm,
            cfg.train.amp.compute_dtype(),
            dev,
        )?;
        let uploads = &mut self.uploads;
        let mut micro = |_| -> candle::Result<Tensor> {
            let batch = loader
                .next()
                .ok_or_else(|| candle::Error::Msg("data loader ended early".into()))?;
            let (x, t) = uploads.batch(&batch?, dev)?;
            let x = fault.poison_inputs(step, &x)?;
            fault.poison_loss(step, &micro_loss(&net, &x, &t)?)
        };
        Ok(match launch {
            true => Stepped::Launched(self.state.launch(lr, cfg.train.clip_grad, &mut micro)?),
            false => Stepped::Read(self.state.step(lr, cfg.train.clip_grad, &mut micro)?),
        })
    }

    /// Runs the next step; returns the steps read and what the guard did with them, `None`
    /// while a window of `--log-every` steps is open. `due`: the step ends an eval or
    /// checkpoint interval, the run, or a signal asked to stop: its window is read now.
    /// After a rollback that discarded launched steps, `loader` moves back to the step
    /// after the alarm, so every step draws the batches of its position.
    fn advance(
        &mut self,
        loader: &mut Loader,
        guard: &mut Guard,
        due: bool,
    ) -> anyhow::Result<Option<Flushed>> {
        let full = match self.step(loader, guard, self.state.read_every() > 1)? {
            Stepped::Read(out) => {
                let action = guard.after_step(&mut self.state, &out)?;
                return Ok(Some(Flushed {
                    outcomes: vec![out],
                    action,
                    discarded: 0,
                }));
            }
            Stepped::Launched(full) => full,
        };
        if !(full || due) {
            return Ok(None);
        }
        let flushed = guard.flush(&mut self.state)?;
        if flushed.discarded > 0 {
            *loader = self.loader_at(self.state.step);
        }
        Ok(Some(flushed))
    }

    /// The training data loader from optimizer step `step` on.
    fn loader_at(&self, step: usize) -> Loader {
        let cfg = self.cfg;
        Loader::new(
            self.data.train.clone(),
            LoaderConfig {
                batch: cfg.batch_size,
                size: cfg.image_size,
                seed: cfg.seed,
                start: step * cfg.train.accum_steps,
                end: cfg.steps * cfg.train.accum_steps,
                workers: cfg.workers,
                prefetch: cfg.prefetch,
            },
        )
    }
}

/// What [`Run::step`] did: a step read at once, or a launched one (true: its window is full).
enum Stepped {
    Read(StepOutcome),
    Launched(bool),
}

/// The trainable parts of a config: variables, the f32 master model and the train state.
/// A run and `seg_train bench` build them the same way.
pub struct Net {
    pub vm: VarMap,
    pub master: SegModel,
    pub state: TrainState,
}

impl Net {
    /// Builds the model (seeded init, then `--init` weights if any) and its train state;
    /// returns the `--init` message to print.
    pub fn build(cfg: &RunConfig, dev: &Device) -> anyhow::Result<(Self, Option<String>)> {
        if cfg.train.amp == Precision::Bf16 && dev.is_cpu() {
            bail!("--amp bf16 needs --device cuda: candle 0.11's CPU backend has no bf16 matmul/conv (use --amp f16 or off on CPU)")
        }
        let vm = VarMap::new();
        let (master, init_msg) = model::build(cfg, &vm, dev)?;
        // A uniform prediction's cross-entropy: the monitor's reference for divergence.
        let train_cfg = cfg.train.train_config(MonitorConfig {
            reference_loss: Some((cfg.num_classes() as f64).ln()),
            ..Default::default()
        });
        let groups = master.param_groups(&vm, cfg.backbone_lr_mult())?;
        let optimizer = cfg.recipe().optimizer(groups)?;
        let state = TrainState::new(named_vars(&vm), optimizer, &train_cfg)?;
        Ok((Self { vm, master, state }, init_msg))
    }
}

/// Forward and loss of one micro-batch through the step's network ([`SegModel::for_step`]:
/// the f32 master model, or for mixed precision a copy cast from it once per optimizer
/// step, whose BatchNorm running statistics are written back to the master).
pub fn micro_loss(net: &SegModelStep, x: &Tensor, t: &Tensor) -> candle::Result<Tensor> {
    let logits = net.forward(x, true)?;
    let ignore = CrossEntropyConfig {
        ignore_index: Some(IGNORE as i64),
        weight: None,
    };
    cross_entropy(&logits, t, &ignore)
}

/// `--amp`'s label in logs and the report ("off" for f32, as the flag reads).
pub fn amp_label(p: Precision) -> String {
    match p {
        Precision::F32 => "off".into(),
        p => p.to_string(),
    }
}

/// Trains (or resumes) a run in `out`. With `resume` (the checkpoint to continue from,
/// see `cli::resume_plan`), `cfg` is the run's saved config.
pub fn run(
    cfg: &RunConfig,
    out: &Path,
    resume: Option<Resume>,
    opts: &RunOpts,
) -> anyhow::Result<RunSummary> {
    let mut run = Run::new(cfg, opts)?;
    let (mut manager, mut logger, _lock) = run.open_output(out, resume)?;
    if opts.verbose {
        run.banner();
    }
    let pb = progress_bar(opts.progress, cfg.steps, run.state.step);
    let start = run.state.step;
    run.state.set_read_every(opts.log_every)?;
    let mut loader = run.loader_at(start);
    let say = |msg: String| {
        if opts.verbose {
            pb.suspend(|| eprintln!("{msg}"));
        }
    };
    // From here a first SIGINT/SIGTERM stops after the current step (a second exits at once).
    let (stop, out_dir) = (Interrupt::install()?, out);
    let guard_cfg = GuardConfig {
        policy: cfg.train.guard,
        ..GuardConfig::for_run(cfg.steps)
    };
    let mut guard = Guard::new(guard_cfg, &mut run.state)?;
    if opts.fault != Default::default() {
        say(format!("seg_train: injecting fault {}", opts.fault));
    }
    if let Some(earlier) = &run.summary.guard {
        guard.continue_history(earlier)?;
    }
    let t_run = Instant::now();
    let mut window_losses = Vec::new();
    let mut window_start = None;
    'steps: while run.state.step < cfg.steps {
        let t0 = *window_start.get_or_insert_with(Instant::now);
        let next = run.state.step + 1;
        let due = next.is_multiple_of(cfg.train.eval_every)
            || next.is_multiple_of(cfg.train.ckpt_every)
            || next == cfg.steps
            || stop.requested().is_some();
        let Some(flushed) = run.advance(&mut loader, &mut guard, due)? else {
            pb.inc(1); // a launched step: the bar moves, its loss shows at the read
            if let Some(d) = opts.step_delay {
                std::thread::sleep(d);
            }
            continue;
        };
        window_start = None;
        // The window's wall time per step (the step's own time when every step is read).
        let seconds = || t0.elapsed().as_secs_f64() / flushed.outcomes.len().max(1) as f64;
        let Some(out) = flushed.outcomes.last().cloned() else {
            continue;
        };
        for out in &flushed.outcomes[..flushed.outcomes.len() - 1] {
            run.record_read_step(out, seconds(), &mut logger, &say)?;
            window_losses.push(out.loss);
        }
        run.summary.guard = Some(guard.summary());
        if let Some(i) = run.log_intervention(&flushed.action, &mut logger, &pb)? {
            if i.action == keel::train::InterventionKind::Stopped {
                break 'steps;
            }
        }
        run.summary.record_step(&out);
        for alarm in &out.alarms {
            say(format!("monitor: {alarm}"));
        }
        if let Some(d) = opts.step_delay {
            std::thread::sleep(d);
        }
        let step = out.step;
        logger.log(&StepLog::new(&out, seconds()))?;
        window_losses.push(out.loss);
        pb.set_message(format!("loss {:.4} lr {:.2e}", out.loss, out.lr));
        pb.set_position(run.state.step as u64);
        let last = step + 1 == cfg.steps;
        let signal = stop.requested();
        let eval_due = (step + 1) % cfg.train.eval_every == 0 || last;
        let ckpt_due = (step + 1) % cfg.train.ckpt_every == 0 || last || signal.is_some();
        let mut metric = None;
        if eval_due || ckpt_due {
            run.check_weights(step, &say)?;
        }
        if eval_due {
            let train_loss = (!window_losses.is_empty())
                .then(|| window_losses.iter().sum::<f64>() / window_losses.len() as f64);
            window_losses.clear();
            metric = Some(run.eval_and_log(step, train_loss, &mut logger, &say)?);
        }
        if ckpt_due {
            // A NaN metric (non-finite weights) is never a candidate for the best.
            let best_candidate = metric.filter(|m| m.is_finite());
            let path = manager.save(&run.state.snapshot(&run.snapshot_meta())?, best_candidate)?;
            if let Some(signal) = signal {
                pb.finish_and_clear();
                return Err(run.stop(signal, path, out_dir, &guard.summary())?.into());
            }
        }
    }
    drop((loader, stop)); // after the last step, a signal stops the process at once again
    if guard.stopped() {
        // The final metrics of the weights the guard restored (no eval ran since).
        run.eval_and_log(run.state.step - 1, None, &mut logger, &say)?;
    }
    pb.finish_and_clear();
    let ran = run.state.step.min(cfg.steps) - start;
    run.summary.seconds_per_step = if ran > 0 {
        t_run.elapsed().as_secs_f64() / ran as f64
    } else {
        0.0
    };
    run.finish(out, &mut logger, &guard.summary())?;
    Ok(run.summary)
}

impl Run<'_> {
    /// The evaluation after `step`: logged, recorded in the monitor and the summary;
    /// returns the mIoU.
    fn eval_and_log(
        &mut self,
        step: usize,
        train_loss: Option<f64>,
        logger: &mut JsonlLogger,
        say: &dyn Fn(String),
    ) -> anyhow::Result<f64> {
        let e = self.evaluate()?;
        logger.log(&EvalLog {
            step,
            miou: e.miou,
            pixel_acc: e.pixel_acc,
            iou: &e.iou,
            classes: &self.data.classes,
            ema: false,
        })?;
        let rec = EvalRecord {
            step,
            miou: e.miou,
            pixel_acc: e.pixel_acc,
            train_loss,
        };
        for alarm in self.state.monitor.record_eval(&rec) {
            say(format!("monitor: {alarm}"));
        }
        say(format!(
            "step {:>6}: val mIoU {:.4}, pixel acc {:.4}",
            step + 1,
            e.miou,
            e.pixel_acc
        ));
        self.summary.record_eval(step, e.miou, e.pixel_acc);
        Ok(e.miou)
    }

    /// The monitor's health report: written to `out/health.json` and, when verbose,
    /// printed with the seg_train flags of its advice.
    fn write_health(&self, out: &Path, guard: &GuardSummary) -> anyhow::Result<HealthReport> {
        let cfg = self.cfg;
        let ctx = RunContext {
            norm: cfg.norm,
            batch_size: cfg.batch_size,
            pretrained: cfg.init.is_some(),
            lr: cfg.recipe().lr,
            clip_grad: cfg.train.clip_grad,
            precision: cfg.train.amp,
            steps: cfg.steps,
            backbone_norm: cfg.backbone_norm(),
        };
        let report = self.state.monitor.report(&ctx).with_guard(guard);
        write_atomic(
            out.join("health.json"),
            serde_json::to_string_pretty(&report)?.as_bytes(),
        )?;
        if self.opts.verbose {
            println!("{}", report.to_text());
            for (a, flags) in report
                .advice
                .iter()
                .filter_map(|a| Some((a, advice_flags(a)?)))
            {
                println!("seg_train flags for \"{a}\": {flags}");
            }
        }
        Ok(report)
    }

    /// A signal stopped the run after its checkpoint at `checkpoint` was written: writes the
    /// health report and returns the error that makes the process exit with the signal's code.
    fn stop(
        &self,
        signal: StopSignal,
        checkpoint: PathBuf,
        out: &Path,
        guard: &GuardSummary,
    ) -> anyhow::Result<Interrupted> {
        self.write_health(out, guard)?;
        Ok(Interrupted {
            signal,
            step: self.state.step,
            checkpoint,
            out: out.to_path_buf(),
        })
    }

    /// After the last step: evaluates the EMA weights (if any), writes health.json and
    /// summary.json, and prints the report.
    fn finish(
        &mut self,
        out: &Path,
        logger: &mut JsonlLogger,
        guard: &GuardSummary,
    ) -> anyhow::Result<()> {
        let cfg = self.cfg;
        // Evaluate the averaged weights too (the training weights are restored after).
        if let Some(ev) = self.state.with_ema_weights(|| self.evaluate())? {
            logger.log(&EvalLog {
                step: cfg.steps - 1,
                miou: ev.miou,
                pixel_acc: ev.pixel_acc,
                iou: &ev.iou,
                classes: &self.data.classes,
                ema: true,
            })?;
            if self.opts.verbose {
                eprintln!(
                    "EMA weights: val mIoU {:.4}, pixel acc {:.4}",
                    ev.miou, ev.pixel_acc
                );
            }
        }
        let report = self.write_health(out, guard)?;
        let s = &mut self.summary;
        s.finish(report.verdict, guard);
        if self.opts.verbose {
            println!(
                "final val mIoU {:.4}, pixel accuracy {:.4}; {:.3} s/step; artifacts in {}",
                s.final_miou,
                s.final_pixel_acc,
                s.seconds_per_step,
                out.display()
            );
        }
        write_atomic(
            out.join("summary.json"),
            serde_json::to_string_pretty(s)?.as_bytes(),
        )?;
        Ok(())
    }
}

impl Run<'_> {
    /// A step of a window read before its last one: recorded in the summary, its alarms
    /// said, its line logged (`seconds`: the window's time per step).
    fn record_read_step(
        &mut self,
        out: &StepOutcome,
        seconds: f64,
        logger: &mut JsonlLogger,
        say: &dyn Fn(String),
    ) -> anyhow::Result<()> {
        self.summary.record_step(out);
        for alarm in &out.alarms {
            say(format!("monitor: {alarm}"));
        }
        logger.log(&StepLog::new(out, seconds))?;
        Ok(())
    }

    /// Logs a rollback or stop of the guard (log.jsonl and stderr); returns it.
    fn log_intervention<'i>(
        &mut self,
        action: &'i GuardAction,
        logger: &mut JsonlLogger,
        pb: &indicatif::ProgressBar,
    ) -> anyhow::Result<Option<&'i Intervention>> {
        let i = match action {
            GuardAction::Continue => return Ok(None),
            GuardAction::RolledBack(i) | GuardAction::Stop(i) => i,
        };
        logger.log(&GuardLog::new(i))?;
        pb.suspend(|| eprintln!("guard ({}): {i}", self.cfg.train.guard));
        Ok(Some(i))
    }
}
