//! keel's run driver: the training loop of a keel trainer, with the trainer's model, data
//! and evaluation behind a small trait ([`Task`]).
//!
//! [`Run::open`] takes the output directory (lock, stale temp files, no overwriting of a
//! run), writes `config.json` and, for a resume, restores the checkpoint into the
//! [`TrainState`]; [`Run::train`] then runs the steps: the learning rate from the
//! [`LoopConfig`]'s recipe (scaled by the [`Guard`] and an injected
//! [`FaultPlan`](crate::fault::FaultPlan)), the step through [`TrainState::step`], or
//! launched into windows of [`RunOptions::log_every`] steps ([`TrainState::launch`]), the
//! guard's rollbacks, the JSONL log, the monitor's alarms, evaluation and checkpoint
//! cadence (a non-finite model is never the best), a graceful stop on SIGINT/SIGTERM
//! (checkpoint and health report written, then [`RunEnd::Interrupted`]), the EMA weights'
//! evaluation, `health.json` and `summary.json`. Every piece is a public keel-train part;
//! the driver is their order, written once for seg_train and det_train. A loop of one's own
//! takes the parts directly (see the crate docs' custom loop).
//!
//! The files of a run directory: `config.json` (the trainer's config), `log.jsonl` (a
//! [`StepLog`] per step, the [`Task`]'s evaluation records, [`GuardLog`]s),
//! `checkpoints/ckpt-<step>.safetensors` (the [`TrainState`] with the meta of [`CkptMeta`]),
//! `health.json` ([`HealthReport`]) and `summary.json` ([`RunSummary`], or the task's
//! [`Task::summary_record`]).
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle::Tensor;
use indicatif::ProgressBar;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use keel_norm::NormKind;
use keel_optim::LrSchedule;

use crate::fault::FaultPlan;
use crate::run_dir::{check_writable, DirState, RunDir};
use crate::{
    progress_bar, write_atomic, Advice, CheckpointManager, EvalRecord, Flushed, Guard, GuardAction,
    GuardConfig, GuardLog, GuardSummary, HealthReport, Interrupt, InterventionKind, JsonlLogger,
    LoopConfig, Resume, RunContext, RunSummary, StepLog, StepOutcome, StopSignal, TrainState,
};

/// The micro-batch losses of one optimizer step: `f(i)` runs the forward pass of micro-batch
/// `i` and returns its scalar loss ([`TrainState::step`]'s `micro_batch`).
pub type MicroBatches<'a> = Box<dyn FnMut(usize) -> candle::Result<Tensor> + 'a>;

/// Where an evaluation stands: after the 0-based `step`, of the EMA weights or the training
/// weights, and whether those weights are finite (a task returns NaN metrics when not: the
/// argmax of NaN outputs would score a few percent, and must never become the best model).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EvalAt {
    /// The 0-based step the evaluated weights are after.
    pub step: usize,
    /// The EMA weights are evaluated (the training weights otherwise).
    pub ema: bool,
    /// All evaluated weights are finite.
    pub weights_finite: bool,
}

/// One evaluation, as the driver records it.
#[derive(Clone, Debug)]
pub struct Evaluation {
    /// The run's metric, higher is better (mIoU, mAP@.5): the monitor's eval-regression
    /// test, the best checkpoint and [`RunSummary::evals`] read it. NaN for non-finite
    /// weights.
    pub metric: f64,
    /// A second metric kept in the summary (`final_pixel_acc`: pixel accuracy, mAP).
    pub secondary: f64,
    /// The record written to `log.jsonl` as the task serialized it
    /// ([`serde_json::value::to_raw_value`]; the task's own shape, with its step and `ema`).
    pub record: Box<serde_json::value::RawValue>,
    /// The metrics in words, e.g. `val mIoU 0.8086, pixel acc 0.9768`.
    pub line: String,
}

/// What a trainer gives the driver: its data, the step's micro-batch losses, evaluation
/// and the checkpoint meta of its own.
pub trait Task {
    /// The task's part of the checkpoint meta (flattened beside the format, config and
    /// summary): what a resume needs beyond the train state, e.g. a data position.
    type Extra: Serialize + DeserializeOwned;

    /// The task's checkpoint meta with `steps_done` optimizer steps done. Its fields are
    /// flattened beside `format`, `config` and `summary`: none may take those names.
    fn extra(&self, steps_done: usize) -> Self::Extra;

    /// Restores the task's checkpoint meta on resume (before [`Task::seek`]).
    fn restore_extra(&mut self, extra: Self::Extra) -> candle::Result<()>;

    /// Puts the training data at optimizer step `step`: called when training starts (0, or
    /// a resumed run's step) and after the guard discarded launched steps, so every step
    /// draws the batches of its position. A task whose data position is in its
    /// [`Task::Extra`] does nothing here; with [`RunOptions::log_every`] above 1 its
    /// discarded launched steps then stay drawn (a rollback moves past them), so such a
    /// windowed run is not the per-step run batch for batch.
    fn seek(&mut self, step: usize) -> candle::Result<()>;

    /// The micro-batches of optimizer step `step`; `fault` is the run's injected fault (the
    /// task poisons its inputs, [`FaultPlan::poison_inputs`]; the driver poisons the loss).
    fn micro_batches(&mut self, step: usize, fault: FaultPlan) -> candle::Result<MicroBatches<'_>>;

    /// Evaluates the weights now in the variables (see [`EvalAt`]).
    fn evaluate(&mut self, at: EvalAt) -> candle::Result<Evaluation>;

    /// The model and data as the health report judges them (the driver adds the loop's
    /// settings to make the report's [`RunContext`]).
    fn context(&self) -> TaskContext;

    /// What `summary.json` holds; by default the summary itself.
    fn summary_record(&self, summary: &RunSummary) -> candle::Result<serde_json::Value> {
        serde_json::to_value(summary).map_err(candle::Error::wrap)
    }
}

/// A task's part of the health report's [`RunContext`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TaskContext {
    /// The model's norm (its head's when it has a separate backbone).
    pub norm: NormKind,
    /// Images per micro-batch.
    pub batch_size: usize,
    /// Whether training started from pretrained weights.
    pub pretrained: bool,
    /// A separate backbone's norm ([`RunContext::backbone_norm`]).
    pub backbone_norm: Option<NormKind>,
}

/// How a run is driven; not part of its identity (a resume may change all of it).
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The trainer's name in messages (`seg_train`).
    pub name: String,
    /// Show a progress bar.
    pub progress: bool,
    /// Print the resume and evaluation lines, the monitor's alarms and the health report.
    pub verbose: bool,
    /// Steps per host read of the loss and grad norm ([`TrainState::set_read_every`]; 1
    /// reads every step).
    pub log_every: usize,
    /// The fault to inject ([`FaultPlan::none`] by default).
    pub fault: FaultPlan,
    /// Sleep after every step (tests stop a run part-way with it).
    pub step_delay: Option<Duration>,
    /// A pause inside every checkpoint save ([`CheckpointManager::set_write_pause`]; tests
    /// kill a process mid-save with it).
    pub save_pause: Option<Duration>,
    /// Renders an [`Advice`] as the trainer's flags (printed under the report), if given;
    /// by default keel's shared flags (`keel_train::cli::advice_flags`, feature `clap`).
    pub advice_flags: Option<fn(&Advice) -> Option<String>>,
}

impl RunOptions {
    /// Options for `name`: verbose, a progress bar, every step read, no fault, the advice
    /// as keel's shared flags (with the `clap` feature).
    pub fn new(name: impl Into<String>) -> Self {
        #[cfg(feature = "clap")]
        let advice_flags: Option<fn(&Advice) -> Option<String>> = Some(crate::cli::advice_flags);
        #[cfg(not(feature = "clap"))]
        let advice_flags = None;
        Self {
            name: name.into(),
            progress: true,
            verbose: true,
            log_every: 1,
            fault: FaultPlan::none(),
            step_delay: None,
            save_pause: None,
            advice_flags,
        }
    }
}

/// What a run is: its config (written to `config.json` and every checkpoint), the
/// checkpoints' format name, the steps and the loop settings.
#[derive(Clone, Copy, Debug)]
pub struct RunSpec<'a, C> {
    /// The trainer's config.
    pub config: &'a C,
    /// The checkpoint meta's `format`, e.g. `keel seg_train checkpoint v2`.
    pub format: &'a str,
    /// Optimizer steps of the run.
    pub steps: usize,
    /// The loop settings (recipe, cadence, clipping, guard).
    pub train: &'a LoopConfig,
}

/// The meta a driven run's checkpoints carry beside the [`TrainState`]'s own.
#[derive(Serialize, Deserialize)]
pub struct CkptMeta<C, X> {
    /// The trainer's checkpoint format ([`RunSpec::format`]).
    pub format: String,
    /// The run's config.
    pub config: C,
    /// The summary so far.
    pub summary: RunSummary,
    /// The task's part ([`Task::Extra`]).
    #[serde(flatten)]
    pub extra: X,
}

/// A run stopped by SIGINT or SIGTERM after its checkpoint and health report were written;
/// the process should exit with [`StopSignal::exit_code`] (130 / 143).
#[derive(Debug)]
pub struct Interrupted {
    /// The signal.
    pub signal: StopSignal,
    /// Steps done (the checkpoint's step).
    pub step: usize,
    /// The checkpoint written.
    pub checkpoint: PathBuf,
    /// The run directory.
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

/// The exit code of a trainer whose run failed with `err`: the signal's code (130 / 143)
/// when an [`Interrupted`] is in its chain of sources, else 1.
pub fn exit_code(err: &(dyn std::error::Error + 'static)) -> i32 {
    std::iter::successors(Some(err), |e| e.source())
        .find_map(|e| e.downcast_ref::<Interrupted>())
        .map_or(1, |i| i.signal.exit_code())
}

/// How [`Run::train`] ended.
#[derive(Debug)]
pub enum RunEnd {
    /// All steps ran (or the guard stopped the run): the final summary.
    Finished(RunSummary),
    /// A signal stopped the run after a checkpoint.
    Interrupted(Interrupted),
}

/// A run: its task, train state and summary, in its claimed output directory.
pub struct Run<'a, C, T: Task> {
    spec: RunSpec<'a, C>,
    opts: RunOptions,
    /// The trainer's model, data and evaluation.
    pub task: T,
    /// The optimizer, scaler, EMA, monitor and step.
    pub state: TrainState,
    /// The summary (restored on resume).
    pub summary: RunSummary,
    schedule: Box<dyn LrSchedule + Send + Sync>,
    out: PathBuf,
    manager: CheckpointManager,
    logger: JsonlLogger,
    _dir: RunDir,
}

impl<'a, C: Serialize + DeserializeOwned, T: Task> Run<'a, C, T> {
    /// Claims `out` (see [`claim`]), writes `config.json`, and for a resume restores the
    /// checkpoint `resume` into `state`, the summary and the task's meta. The directory's
    /// lock is held while the run lives.
    pub fn open(
        spec: RunSpec<'a, C>,
        mut task: T,
        mut state: TrainState,
        out: &Path,
        resume: Option<Resume>,
        opts: RunOptions,
    ) -> candle::Result<Self> {
        let schedule = spec.train.recipe(spec.steps).schedule()?;
        let dir = claim(out, resume.is_some(), &opts.name)?;
        let mut manager = CheckpointManager::new(out.join("checkpoints"), spec.train.keep_last)?;
        manager.set_write_pause(opts.save_pause);
        dir.write_config(spec.config)?;
        let log_path = out.join("log.jsonl");
        let mut summary = RunSummary::default();
        let logger = match resume {
            None => JsonlLogger::create(&log_path)?,
            Some(found) => {
                let shown = found.path.display();
                let meta: CkptMeta<serde_json::Value, T::Extra> = state
                    .restore(&found.checkpoint)
                    .map_err(|e| candle::Error::Msg(format!("restoring {shown}: {e}")))?;
                if state.step > spec.steps {
                    candle::bail!(
                        "restoring {shown}: the checkpoint is at step {}, beyond the run's {} steps; resume with more steps",
                        state.step,
                        spec.steps
                    )
                }
                summary = meta.summary;
                task.restore_extra(meta.extra)?;
                if opts.verbose {
                    eprintln!(
                        "resumed from {} at step {}",
                        found.path.display(),
                        state.step
                    );
                }
                JsonlLogger::resume(&log_path, state.step)?
            }
        };
        Ok(Self {
            spec,
            opts,
            task,
            state,
            summary,
            schedule,
            out: out.to_path_buf(),
            manager,
            logger,
            _dir: dir,
        })
    }

    /// The run directory.
    pub fn out(&self) -> &Path {
        &self.out
    }

    /// Runs the remaining steps, then evaluates the EMA weights (if any) and writes
    /// `health.json` and `summary.json`. A SIGINT/SIGTERM stops it after the current step
    /// (its checkpoint and report written): [`RunEnd::Interrupted`].
    pub fn train(&mut self) -> candle::Result<RunEnd> {
        let (steps, train) = (self.spec.steps, self.spec.train);
        let pb = progress_bar(self.opts.progress, steps, self.state.step);
        let start = self.state.step;
        self.state.set_read_every(self.opts.log_every)?;
        self.task.seek(start)?;
        // From here a first SIGINT/SIGTERM stops after the current step (a second exits at once).
        let stop = Interrupt::install()?;
        let guard_cfg = GuardConfig {
            policy: train.guard,
            ..GuardConfig::for_run(steps)
        };
        let mut guard = Guard::new(guard_cfg, &mut self.state)?;
        if self.opts.fault != FaultPlan::none() {
            self.say(
                &pb,
                format!("{}: injecting fault {}", self.opts.name, self.opts.fault),
            );
        }
        if let Some(earlier) = &self.summary.guard {
            guard.continue_history(earlier)?;
        }
        let t_run = Instant::now();
        let mut looped = Looped {
            window_losses: Vec::new(),
            window_start: None,
        };
        while self.state.step < steps {
            if let Some(end) = self.loop_step(&mut guard, &mut looped, &pb, &stop)? {
                match end {
                    LoopEnd::GuardStopped => break,
                    LoopEnd::Interrupted(i) => {
                        pb.finish_and_clear();
                        return Ok(RunEnd::Interrupted(i));
                    }
                }
            }
        }
        drop(stop); // after the last step, a signal stops the process at once again
        if guard.stopped() {
            // The final metrics of the weights the guard restored (no eval ran since).
            self.eval_and_log(self.state.step.saturating_sub(1), None, &pb)?;
        }
        pb.finish_and_clear();
        let ran = self.state.step.min(steps) - start;
        self.summary.seconds_per_step = match ran {
            0 => 0.0,
            ran => t_run.elapsed().as_secs_f64() / ran as f64,
        };
        self.finish(&guard.summary())?;
        Ok(RunEnd::Finished(self.summary.clone()))
    }

    /// Prints `msg` above the progress bar when verbose.
    fn say(&self, pb: &ProgressBar, msg: String) {
        if self.opts.verbose {
            pb.suspend(|| eprintln!("{msg}"));
        }
    }

    /// One step of the loop: the step (or its window's read), its records, and the
    /// evaluation and checkpoint due after it (a stop requested through `stop` forces the
    /// checkpoint and ends the run). `Some` when the loop ends here.
    fn loop_step(
        &mut self,
        guard: &mut Guard,
        looped: &mut Looped,
        pb: &ProgressBar,
        stop: &Interrupt,
    ) -> candle::Result<Option<LoopEnd>> {
        let (steps, train) = (self.spec.steps, self.spec.train);
        let t0 = *looped.window_start.get_or_insert_with(Instant::now);
        let next = self.state.step + 1;
        let due = next.is_multiple_of(train.eval_every)
            || next.is_multiple_of(train.ckpt_every)
            || next == steps
            || stop.requested().is_some();
        let Some(flushed) = self.advance(guard, due)? else {
            pb.inc(1); // a launched step: the bar moves, its loss shows at the read
            self.delay();
            return Ok(None);
        };
        looped.window_start = None;
        // The window's wall time per step (the step's own time when every step is read).
        let seconds = t0.elapsed().as_secs_f64() / flushed.outcomes.len().max(1) as f64;
        let Some((out, earlier)) = flushed.outcomes.split_last() else {
            return Ok(None);
        };
        for o in earlier {
            self.record_step(o, seconds, pb)?;
            looped.window_losses.push(o.loss);
        }
        self.summary.guard = Some(guard.summary());
        if self.log_intervention(&flushed.action, pb)? == Some(InterventionKind::Stopped) {
            return Ok(Some(LoopEnd::GuardStopped));
        }
        self.delay();
        self.record_step(out, seconds, pb)?;
        looped.window_losses.push(out.loss);
        pb.set_message(format!("loss {:.4} lr {:.2e}", out.loss, out.lr));
        pb.set_position(self.state.step as u64);
        let step = out.step;
        let last = step + 1 == steps;
        // A signal during the step stops the run after it; after the last step the run
        // finishes instead (a stopped last step would leave a run with nothing to resume).
        let signal = stop.requested().filter(|_| !last);
        let eval_due = (step + 1).is_multiple_of(train.eval_every) || last;
        let ckpt_due = (step + 1).is_multiple_of(train.ckpt_every) || last || signal.is_some();
        let mut finite = true;
        if eval_due || ckpt_due {
            finite = self.state.weights_finite()?;
            for alarm in self.state.monitor.record_weights_finite(step, finite) {
                self.say(pb, format!("monitor: {alarm}"));
            }
        }
        let mut metric = None;
        if eval_due {
            let w = std::mem::take(&mut looped.window_losses);
            let train_loss = (!w.is_empty()).then(|| w.iter().sum::<f64>() / w.len() as f64);
            metric = Some(self.eval_and_log(step, train_loss, pb)?);
        }
        if !ckpt_due {
            return Ok(None);
        }
        // Non-finite weights (or a NaN metric) are never a candidate for the best.
        let ck = self.state.snapshot(&self.meta())?;
        let path = self
            .manager
            .save(&ck, metric.filter(|m| finite && m.is_finite()))?;
        let Some(signal) = signal else {
            return Ok(None);
        };
        self.write_health(&guard.summary())?;
        Ok(Some(LoopEnd::Interrupted(Interrupted {
            signal,
            step: self.state.step,
            checkpoint: path,
            out: self.out.clone(),
        })))
    }

    /// Runs the next step; returns the steps read and what the guard did with them, `None`
    /// while a window of [`RunOptions::log_every`] steps is open. `due`: the step ends an
    /// eval or checkpoint interval, the run, or a signal asked to stop: its window is read
    /// now. After a rollback that discarded launched steps, the task's data moves back to
    /// the step after the alarm ([`Task::seek`]).
    fn advance(&mut self, guard: &mut Guard, due: bool) -> candle::Result<Option<Flushed>> {
        let (step, fault) = (self.state.step, self.opts.fault);
        let lr = guard.lr(self.schedule.lr(step) * fault.lr_factor(step));
        let clip = self.spec.train.clip_grad;
        let launch = self.state.read_every() > 1;
        let mut batches = self.task.micro_batches(step, fault)?;
        let mut micro = |i| fault.poison_loss(step, &batches(i)?);
        if !launch {
            let out = self.state.step(lr, clip, &mut micro)?;
            drop(batches);
            let action = guard.after_step(&mut self.state, &out)?;
            return Ok(Some(Flushed {
                outcomes: vec![out],
                action,
                discarded: 0,
            }));
        }
        let full = self.state.launch(lr, clip, &mut micro)?;
        drop(batches);
        if !(full || due) {
            return Ok(None);
        }
        let flushed = guard.flush(&mut self.state)?;
        if flushed.discarded > 0 {
            self.task.seek(self.state.step)?;
        }
        Ok(Some(flushed))
    }

    fn delay(&self) {
        if let Some(d) = self.opts.step_delay {
            std::thread::sleep(d);
        }
    }

    /// A step read: recorded in the summary, its alarms said, its line logged (`seconds`:
    /// its window's time per step).
    fn record_step(
        &mut self,
        out: &StepOutcome,
        seconds: f64,
        pb: &ProgressBar,
    ) -> candle::Result<()> {
        self.summary.record_step(out);
        for alarm in &out.alarms {
            self.say(pb, format!("monitor: {alarm}"));
        }
        self.logger.log(&StepLog::new(out, seconds))
    }

    /// Logs a rollback or stop of the guard (log.jsonl and stderr); returns its kind.
    fn log_intervention(
        &mut self,
        action: &GuardAction,
        pb: &ProgressBar,
    ) -> candle::Result<Option<InterventionKind>> {
        let i = match action {
            GuardAction::Continue => return Ok(None),
            GuardAction::RolledBack(i) | GuardAction::Stop(i) => i,
        };
        self.logger.log(&GuardLog::new(i))?;
        pb.suspend(|| eprintln!("guard ({}): {i}", self.spec.train.guard));
        Ok(Some(i.action))
    }

    /// The checkpoint meta now.
    fn meta(&self) -> CkptMeta<&C, T::Extra> {
        CkptMeta {
            format: self.spec.format.to_string(),
            config: self.spec.config,
            summary: self.summary.clone(),
            extra: self.task.extra(self.state.step),
        }
    }

    /// Evaluates the training weights after `step`: logged, recorded in the monitor and the
    /// summary, said; returns the metric.
    fn eval_and_log(
        &mut self,
        step: usize,
        train_loss: Option<f64>,
        pb: &ProgressBar,
    ) -> candle::Result<f64> {
        let at = EvalAt {
            step,
            ema: false,
            weights_finite: self.state.weights_finite()?,
        };
        let e = self.task.evaluate(at)?;
        self.logger.log(&e.record)?;
        let rec = EvalRecord {
            step,
            miou: e.metric,
            pixel_acc: e.secondary,
            train_loss,
        };
        for alarm in self.state.monitor.record_eval(&rec) {
            self.say(pb, format!("monitor: {alarm}"));
        }
        self.say(pb, format!("step {:>6}: {}", step + 1, e.line));
        self.summary.record_eval(step, e.metric, e.secondary);
        Ok(e.metric)
    }

    /// The monitor's health report with the guard's history: written to `health.json` and,
    /// when verbose, printed with the trainer's flags for its advice.
    fn write_health(&self, guard: &GuardSummary) -> candle::Result<HealthReport> {
        let (t, train) = (self.task.context(), self.spec.train);
        let ctx = RunContext {
            norm: t.norm,
            batch_size: t.batch_size,
            pretrained: t.pretrained,
            lr: train.recipe(self.spec.steps).lr,
            clip_grad: train.clip_grad,
            precision: train.amp,
            steps: self.spec.steps,
            backbone_norm: t.backbone_norm,
        };
        let report = self.state.monitor.report(&ctx).with_guard(guard);
        let json = serde_json::to_string_pretty(&report).map_err(candle::Error::wrap)?;
        write_atomic(self.out.join("health.json"), json.as_bytes())?;
        if self.opts.verbose {
            println!("{}", report.to_text());
            let flags = self.opts.advice_flags;
            for (a, f) in report
                .advice
                .iter()
                .filter_map(|a| Some((a, flags.and_then(|render| render(a))?)))
            {
                println!("{} flags for \"{a}\": {f}", self.opts.name);
            }
        }
        Ok(report)
    }

    /// After the last step: evaluates the EMA weights (if any), writes `health.json` and
    /// `summary.json`.
    fn finish(&mut self, guard: &GuardSummary) -> candle::Result<()> {
        let step = self.spec.steps.saturating_sub(1);
        let (state, task) = (&self.state, &mut self.task);
        let ema = state.with_ema_weights(|| {
            let weights_finite = state.weights_finite()?;
            task.evaluate(EvalAt {
                step,
                ema: true,
                weights_finite,
            })
        })?;
        if let Some(ev) = ema {
            self.logger.log(&ev.record)?;
            if self.opts.verbose {
                eprintln!("EMA weights: {}", ev.line);
            }
        }
        let report = self.write_health(guard)?;
        self.summary.finish(report.verdict, guard);
        let record = self.task.summary_record(&self.summary)?;
        let json = serde_json::to_string_pretty(&record).map_err(candle::Error::wrap)?;
        write_atomic(self.out.join("summary.json"), json.as_bytes())
    }
}

/// The loop's running window: training losses since the last evaluation, and the start of
/// the open window of launched steps.
struct Looped {
    window_losses: Vec<f64>,
    window_start: Option<Instant>,
}

/// Why the loop ended before its last step.
enum LoopEnd {
    GuardStopped,
    Interrupted(Interrupted),
}

/// Makes `out` this process's run directory: creates it (checking it is writable), takes
/// its lock (warning when a dead run's lock is taken over), refuses a fresh run into a
/// directory that holds a run or its leftovers (naming `--resume` and `--out`), and removes
/// stale temp files. `name` is the trainer's, for messages. The lock is held until the
/// returned directory drops.
pub fn claim(out: &Path, resume: bool, name: &str) -> candle::Result<RunDir> {
    check_writable(out).map_err(|e| candle::Error::Msg(format!("--out {e}")))?;
    let shown = out.display();
    let dir = RunDir::lock(out).map_err(|e| candle::Error::Msg(format!("--out {shown}: {e}")))?;
    if let Some(pid) = dir.taken_over() {
        eprintln!(
            "warning: {shown} held a stale lock of process {pid}, which no longer runs (a crash?); \
             taking the directory over"
        );
    }
    let state = match resume {
        true => DirState::Free,
        false => dir
            .state()
            .map_err(|e| candle::Error::Msg(format!("--out {shown}: {e}")))?,
    };
    match state {
        DirState::Free => {}
        DirState::FailedStart => eprintln!(
            "{name}: --out {shown} holds a run that stopped before its first checkpoint; starting it afresh"
        ),
        DirState::HoldsRun => candle::bail!("--out {shown} already holds a run; continue it with --resume {shown} or pick another --out"),
        DirState::LostConfig => candle::bail!(
            "--out {shown} holds checkpoints or a log.jsonl but no config.json (a run whose \
             config was lost?); a fresh run would overwrite them: continue it with --resume \
             {shown} (the config is recovered from its newest checkpoint), or pick another --out"
        ),
    }
    for p in dir.remove_stale_temps()? {
        eprintln!(
            "note: removed the stale temp file {} (an interrupted write)",
            p.display()
        );
    }
    Ok(dir)
}
