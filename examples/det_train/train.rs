//! One training run, wired from keel's parts: the FCOS detector, a [`TrainState`]
//! (optimizer, f16 scaler, accumulation, EMA, monitor), the [`OptimRecipe`] schedule, the
//! [`Guard`], [`DetBatches`] (batches per `(seed, position)`), JSONL logs, checkpoints with
//! exact resume, COCO evaluation and the health report.
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use candle::{Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use keel::data::{DetBatches, DetHostBatch};
use keel::det::coco_eval::CocoGt;
use keel::det::fcos::{fcos_loss, prepare_targets, FcosLossConfig, FcosTargetConfig, GtBoxes};
use keel::models::seg::count_params;
use keel::optim::{split_no_decay, LrSchedule, Precision};
use keel::train::run_dir::{check_writable, DirState, RunDir};
use keel::train::{
    named_vars, progress_bar, write_atomic, CheckpointManager, EvalRecord, Guard, GuardAction,
    GuardConfig, GuardLog, HealthReport, Interrupt, InterventionKind, JsonlLogger, Resume,
    RunContext, RunSummary, StepLog, StepOutcome, TrainState,
};
use serde::{Deserialize, Serialize};

use super::cli::DetConfig;
use super::data::{augment, DetData, PAD};
use super::eval::{evaluate, ground_truth, DetMetrics};
use super::model::{FcosNet, STRIDES};

/// How a run is driven (not part of its identity).
pub struct RunOpts {
    pub device: Device,
    pub progress: bool,
    /// The fault to inject (`--fault`; none by default).
    pub fault: keel::train::fault::FaultPlan,
}

/// A run stopped by SIGINT or SIGTERM after its checkpoint and health report were written;
/// the process exits with `code` (130 / 143).
#[derive(Debug)]
pub struct Interrupted {
    pub code: i32,
    pub message: String,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Interrupted {}

/// The process exit code of a run's error: the signal's (130 / 143), else 1.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    err.downcast_ref::<Interrupted>().map_or(1, |i| i.code)
}

/// The outcome of a run (summary.json): the loop's [`RunSummary`] (losses, grad norms,
/// alarms, guard; its `evals` and `final_miou` hold mAP@.5, `final_pixel_acc` mAP) and the
/// final evaluation.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DetSummary {
    /// Flattened: summary.json reads as a [`RunSummary`] too (the compare grid's children).
    #[serde(flatten)]
    pub run: RunSummary,
    /// The last evaluation's mAP @[.5:.95] and mAP @.5.
    #[serde(with = "keel::train::lossless_f64")]
    pub final_map: f64,
    #[serde(with = "keel::train::lossless_f64")]
    pub final_map50: f64,
    /// Wall time of the whole run (this session), seconds.
    pub seconds: f64,
}

/// The user meta of det_train's checkpoints (beside TrainState's own).
#[derive(Serialize, Deserialize)]
struct CkptMeta {
    format: String,
    config: DetConfig,
    summary: DetSummary,
    /// The next micro-batch to draw: batches depend only on `(seed, position)`, and a
    /// rollback of the guard moves past the batches that led to it, so the position is
    /// saved, not derived from the step.
    next_batch: usize,
}

/// The JSONL record of one evaluation.
#[derive(Serialize)]
struct DetEvalLog<'a> {
    kind: &'static str,
    step: usize,
    ema: bool,
    #[serde(flatten)]
    metrics: &'a DetMetrics,
}

/// Everything a run holds.
struct Run<'a> {
    cfg: &'a DetConfig,
    opts: &'a RunOpts,
    data: DetData,
    gt: CocoGt,
    vm: VarMap,
    net: FcosNet,
    state: TrainState,
    schedule: Box<dyn LrSchedule + Send + Sync>,
    summary: DetSummary,
    next_batch: usize,
}

impl<'a> Run<'a> {
    /// Builds the parts; bad input fails here, before the first file is written.
    fn new(cfg: &'a DetConfig, opts: &'a RunOpts) -> anyhow::Result<Self> {
        cfg.validate()?;
        let data = DetData::new(cfg, opts.progress)?;
        let gt = ground_truth(data.val.as_ref(), cfg, &data.classes)?;
        let Net { vm, net, state } = Net::build(cfg, data.classes.len(), &opts.device)?;
        Ok(Self {
            cfg,
            opts,
            data,
            gt,
            vm,
            net,
            state,
            schedule: cfg.recipe().schedule()?,
            summary: DetSummary::default(),
            next_batch: 0,
        })
    }

    fn meta(&self) -> CkptMeta {
        CkptMeta {
            format: "keel det_train checkpoint v1".into(),
            config: self.cfg.clone(),
            summary: self.summary.clone(),
            next_batch: self.next_batch,
        }
    }

    /// Takes `out` (lock; a fresh run refuses a directory holding a run), writes the config,
    /// and for a resume restores the checkpoint.
    fn open_output(
        &mut self,
        out: &Path,
        resume: Option<Resume>,
    ) -> anyhow::Result<(CheckpointManager, JsonlLogger, RunDir)> {
        let shown = out.display();
        check_writable(out).map_err(|e| anyhow::anyhow!("--out {e}"))?;
        let dir = RunDir::lock(out).with_context(|| format!("--out {shown}"))?;
        if let Some(pid) = dir.taken_over() {
            eprintln!("warning: {shown} held a stale lock of process {pid}, which no longer runs; taking the directory over");
        }
        if resume.is_none() {
            match dir.state().with_context(|| format!("--out {shown}"))? {
                DirState::Free | DirState::FailedStart => {}
                DirState::HoldsRun => bail!("--out {shown} already holds a run; continue it with --resume {shown} or pick another --out"),
                DirState::LostConfig => bail!("--out {shown} holds checkpoints or a log.jsonl but no config.json; continue it with --resume {shown} or pick another --out"),
            }
        }
        dir.remove_stale_temps()?;
        let manager = CheckpointManager::new(out.join("checkpoints"), self.cfg.train.keep_last)?;
        dir.write_config(self.cfg)?;
        let log_path = out.join("log.jsonl");
        let Some(found) = resume else {
            return Ok((manager, JsonlLogger::create(&log_path)?, dir));
        };
        let meta: CkptMeta = self
            .state
            .restore(&found.checkpoint)
            .with_context(|| format!("restoring {}", found.path.display()))?;
        (self.summary, self.next_batch) = (meta.summary, meta.next_batch);
        eprintln!(
            "resumed from {} at step {}",
            found.path.display(),
            self.state.step
        );
        Ok((
            manager,
            JsonlLogger::resume(&log_path, self.state.step)?,
            dir,
        ))
    }

    /// One optimizer step: forward, FCOS targets and loss per micro-batch.
    fn step(&mut self, batches: &mut DetBatches, guard: &Guard) -> anyhow::Result<StepOutcome> {
        let (step, fault) = (self.state.step, self.opts.fault);
        let lr = guard.lr(self.schedule.lr(step) * fault.lr_factor(step));
        let (cfg, dev) = (self.cfg, &self.opts.device);
        let (net, vm, next) = (&self.net, &self.vm, &mut self.next_batch);
        let classes = self.data.classes.len();
        let micro = |_| -> candle::Result<Tensor> {
            let hb = batches.batch(*next)?;
            *next += 1;
            let loss = micro_loss(cfg, net, vm, classes, &hb, dev)?;
            // A NaN batch poisons the loss it leads to (the FCOS loss is no cross-entropy of
            // the inputs: NaN inputs and a NaN loss both make every gradient NaN).
            fault.poison_loss(step, &fault.poison_inputs(step, &loss)?)
        };
        Ok(self.state.step(lr, cfg.train.clip_grad, micro)?)
    }

    /// Evaluates the weights on the val split (NaN metrics for non-finite weights).
    fn evaluate(&self) -> candle::Result<DetMetrics> {
        if !self.state.weights_finite()? {
            return Ok(DetMetrics::nan(&self.data.classes));
        }
        let val = self.data.val.as_ref();
        evaluate(
            &self.net,
            &self.vm,
            self.cfg,
            val,
            &self.gt,
            &self.opts.device,
        )
    }

    /// The evaluation after `step`: logged, told to the monitor, recorded; returns mAP@.5.
    fn eval_and_log(
        &mut self,
        step: usize,
        train_loss: Option<f64>,
        logger: &mut JsonlLogger,
        say: &dyn Fn(String),
    ) -> anyhow::Result<f64> {
        let m = self.evaluate()?;
        logger.log(&DetEvalLog {
            kind: "eval",
            step,
            ema: false,
            metrics: &m,
        })?;
        // The monitor's eval-regression test reads `miou` as "the metric": mAP@.5 here.
        let rec = EvalRecord {
            step,
            miou: m.map50,
            pixel_acc: m.map,
            train_loss,
        };
        for alarm in self.state.monitor.record_eval(&rec) {
            say(format!("monitor: {alarm}"));
        }
        say(format!(
            "step {:>6}: val mAP@.5 {:.4}, mAP@[.5:.95] {:.4}",
            step + 1,
            m.map50,
            m.map
        ));
        self.summary.run.record_eval(step, m.map50, m.map);
        (self.summary.final_map, self.summary.final_map50) = (m.map, m.map50);
        Ok(m.map50)
    }

    /// The health report, written to `out/health.json` and printed.
    fn write_health(&self, out: &Path, guard: &Guard) -> anyhow::Result<HealthReport> {
        let cfg = self.cfg;
        let ctx = RunContext {
            norm: cfg.norm,
            batch_size: cfg.batch_size,
            pretrained: false,
            lr: cfg.recipe().lr,
            clip_grad: cfg.train.clip_grad,
            precision: cfg.train.amp,
            steps: cfg.steps,
            backbone_norm: None,
        };
        let report = self.state.monitor.report(&ctx).with_guard(&guard.summary());
        write_atomic(
            out.join("health.json"),
            serde_json::to_string_pretty(&report)?.as_bytes(),
        )?;
        Ok(report)
    }

    fn banner(&self) {
        let (cfg, r) = (self.cfg, self.cfg.recipe());
        eprintln!(
            "det_train: FCOS P3-P5, backbone norm {}, width {}, fpn {}, head convs {}, {:.2} M params, {} classes, {} train / {} val images of {}px, batch {} x accum {}, {} steps, {} {} lr {}, amp {}, device {:?}",
            cfg.norm, cfg.width, cfg.fpn, cfg.head_convs, count_params(&self.vm) as f64 / 1e6, self.data.classes.len(),
            self.data.train.len(), self.data.val.len(), cfg.image_size, cfg.batch_size, cfg.train.accum_steps, cfg.steps,
            cfg.train.optimizer, r.decay_name(), r.lr, cfg.train.amp, self.opts.device.location()
        );
    }
}

/// The trainable parts of a config: variables, the f32 master model and the train state.
/// A run and `det_train bench` build them the same way.
pub struct Net {
    pub vm: VarMap,
    pub net: FcosNet,
    pub state: TrainState,
}

impl Net {
    /// The detector for `num_classes` classes (seeded init) and its train state.
    pub fn build(cfg: &DetConfig, num_classes: usize, dev: &Device) -> anyhow::Result<Self> {
        if cfg.norm == keel::norm::NormKind::BatchNorm
            && cfg.train.amp == Precision::F16
            && dev.is_cpu()
        {
            bail!("--norm bn --amp f16 needs --device cuda: candle 0.11's BatchNorm has no f16 path on the CPU (use --norm gn / frozen-bn, or --amp off)")
        }
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, candle::DType::F32, dev);
        let net = FcosNet::new(&cfg.model(num_classes), vb)?;
        FcosNet::init(&vm, cfg.seed)?;
        let train_cfg = cfg.train.train_config(Default::default());
        let optimizer = cfg.recipe().optimizer(split_no_decay(&vm))?;
        let state = TrainState::new(named_vars(&vm), optimizer, &train_cfg)?;
        Ok(Self { vm, net, state })
    }
}

/// The boxes FCOS's targets are built from, per image of `hb`: ignored objects (VOC
/// difficult, COCO crowd) left out.
pub fn gt_boxes(hb: &DetHostBatch) -> Vec<GtBoxes> {
    (0..hb.n)
        .map(|k| {
            let idx: Vec<usize> = (0..hb.boxes[k].len())
                .filter(|&i| !hb.ignore[k][i])
                .collect();
            GtBoxes {
                boxes: idx.iter().map(|&i| hb.boxes[k][i]).collect(),
                classes: idx.iter().map(|&i| hb.classes[k][i]).collect(),
            }
        })
        .collect()
}

/// The FCOS loss of one micro-batch: forward (in the config's compute dtype), targets
/// (ignored objects, VOC difficult / COCO crowd, left out), focal + GIoU + centerness.
pub fn micro_loss(
    cfg: &DetConfig,
    net: &FcosNet,
    vm: &VarMap,
    num_classes: usize,
    hb: &DetHostBatch,
    dev: &Device,
) -> candle::Result<Tensor> {
    let gts = gt_boxes(hb);
    let x = Tensor::from_slice(&hb.images, (hb.n, 3, hb.height, hb.width), dev)?;
    let model = cfg.model(num_classes);
    let out = net.forward_in(&model, vm, &x, cfg.train.amp.compute_dtype(), true)?;
    let targets_cfg = FcosTargetConfig::with_base(&STRIDES, cfg.soi_base());
    let targets = prepare_targets(&out.feature_sizes()?, &gts, &targets_cfg, dev)?;
    fcos_loss(&out, &targets, &FcosLossConfig::default())?.total()
}

/// Trains (or resumes) a run in `out`.
pub fn run(
    cfg: &DetConfig,
    out: &Path,
    resume: Option<Resume>,
    opts: &RunOpts,
) -> anyhow::Result<DetSummary> {
    let t_run = Instant::now();
    let mut run = Run::new(cfg, opts)?;
    let (mut manager, mut logger, _lock) = run.open_output(out, resume)?;
    run.banner();
    let mut batches = DetBatches::new(
        run.data.train.clone(),
        augment(cfg, true),
        PAD,
        cfg.seed,
        cfg.batch_size,
    )?;
    let pb = progress_bar(opts.progress, cfg.steps, run.state.step);
    let say = |msg: String| pb.suspend(|| eprintln!("{msg}"));
    let stop = Interrupt::install()?;
    let guard_cfg = GuardConfig {
        policy: cfg.train.guard,
        ..GuardConfig::for_run(cfg.steps)
    };
    let mut guard = Guard::new(guard_cfg, &mut run.state)?;
    if opts.fault != Default::default() {
        say(format!("det_train: injecting fault {}", opts.fault));
    }
    if let Some(earlier) = &run.summary.run.guard {
        guard.continue_history(earlier)?;
    }
    let mut window = Vec::new();
    while run.state.step < cfg.steps {
        let t0 = Instant::now();
        let o = run.step(&mut batches, &guard)?;
        let action = guard.after_step(&mut run.state, &o)?;
        run.summary.run.guard = Some(guard.summary());
        if let GuardAction::RolledBack(i) | GuardAction::Stop(i) = &action {
            logger.log(&GuardLog::new(i))?;
            say(format!("guard ({}): {i}", cfg.train.guard));
            if i.action == InterventionKind::Stopped {
                break;
            }
        }
        run.summary.run.record_step(&o);
        for alarm in &o.alarms {
            say(format!("monitor: {alarm}"));
        }
        logger.log(&StepLog::new(&o, t0.elapsed().as_secs_f64()))?;
        window.push(o.loss);
        pb.set_message(format!("loss {:.4} lr {:.2e}", o.loss, o.lr));
        pb.inc(1);
        let last = o.step + 1 == cfg.steps;
        let signal = stop.requested();
        let eval_due = (o.step + 1) % cfg.train.eval_every == 0 || last;
        let ckpt_due = (o.step + 1) % cfg.train.ckpt_every == 0 || last || signal.is_some();
        if eval_due || ckpt_due {
            let finite = run.state.weights_finite()?;
            for alarm in run.state.monitor.record_weights_finite(o.step, finite) {
                say(format!("monitor: {alarm}"));
            }
        }
        let mut metric = None;
        if eval_due {
            let mean =
                (!window.is_empty()).then(|| window.iter().sum::<f64>() / window.len() as f64);
            window.clear();
            metric = Some(run.eval_and_log(o.step, mean, &mut logger, &say)?);
        }
        if ckpt_due {
            let path = manager.save(
                &run.state.snapshot(&run.meta())?,
                metric.filter(|m| m.is_finite()),
            )?;
            if let Some(signal) = signal {
                pb.finish_and_clear();
                run.write_health(out, &guard)?;
                return Err(Interrupted {
                    code: signal.exit_code(),
                    message: format!("stopped by {signal} after step {}: checkpoint {} and health.json written; continue with --resume {}", run.state.step, path.display(), out.display()),
                }
                .into());
            }
        }
    }
    drop(stop);
    pb.finish_and_clear();
    finish(&mut run, out, &mut logger, &guard, t_run)
}

/// After the last step: the EMA weights' evaluation (if any), the report and summary.
fn finish(
    run: &mut Run,
    out: &Path,
    logger: &mut JsonlLogger,
    guard: &Guard,
    t_run: Instant,
) -> anyhow::Result<DetSummary> {
    let cfg = run.cfg;
    if guard.stopped() {
        run.eval_and_log(run.state.step.saturating_sub(1), None, logger, &|m| {
            eprintln!("{m}")
        })?;
    }
    let final_eval = run.evaluate()?;
    if let Some(ev) = run.state.with_ema_weights(|| run.evaluate())? {
        logger.log(&DetEvalLog {
            kind: "eval",
            step: cfg.steps - 1,
            ema: true,
            metrics: &ev,
        })?;
        eprintln!(
            "EMA weights: val mAP@.5 {:.4}, mAP@[.5:.95] {:.4}",
            ev.map50, ev.map
        );
    }
    let report = run.write_health(out, guard)?;
    println!("{}", report.to_text());
    let s = &mut run.summary;
    s.run.finish(report.verdict, &guard.summary());
    s.seconds = t_run.elapsed().as_secs_f64();
    let steps = s.run.losses.len().max(1);
    s.run.seconds_per_step = s.seconds / steps as f64;
    println!("{}", final_eval.summary);
    for (name, ap, ap50) in &final_eval.per_class {
        let show = |v: &Option<f64>| v.map_or("  n/a ".into(), |v| format!("{v:.4}"));
        println!("  {name:>12}: AP {} AP50 {}", show(ap), show(ap50));
    }
    println!(
        "final val mAP@.5 {:.4}, mAP@[.5:.95] {:.4}; {:.1} s; artifacts in {}",
        s.final_map50,
        s.final_map,
        s.seconds,
        out.display()
    );
    write_atomic(
        out.join("summary.json"),
        serde_json::to_string_pretty(s)?.as_bytes(),
    )?;
    Ok(s.clone())
}
