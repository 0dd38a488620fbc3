//! # keel-train: the reusable parts of a small-batch training loop
//!
//! - [`TrainState`] and its [`TrainState::step`]: forward-loss-backward per micro-batch,
//!   loss unscaling, global-norm clipping, the optimizer step (skipped on inf/NaN), EMA
//!   update and monitor record, in one call; [`TrainState::snapshot`] and
//!   [`TrainState::restore`] to and from keel checkpoints, bit-exact on resume.
//!   [`TrainState::launch`] and [`TrainState::flush`] (with a guard, [`Guard::flush`]) are
//!   the same step for a GPU: no host read per step, one per window of
//!   [`TrainConfig::read_every`] steps ([`host_read`] counts them).
//! - [`OptimRecipe`]: the optimizer and LR schedule of an [`keel_optim::OptimizerKind`]
//!   (SGD + poly, AdamW + cosine, linear warmup); [`LoopConfig`]: a run's loop settings
//!   (recipe, precision, accumulation, clipping, EMA, cadence, guard), checked in one place,
//!   for a trainer's config to embed.
//! - `cli` (feature `clap`): the command-line parts every keel trainer shares: the loop
//!   flags (`LoopArgs` -> [`LoopConfig`]), `--device`/`--deterministic`/`--tf32`,
//!   `--resume DIR`/`--resume-from FILE` planned and checked against the run's config
//!   (`plan_resume`), and [`Advice`] rendered as those flags.
//! - [`StabilityMonitor`]: "is my training going haywire?" Robust loss-spike detection,
//!   gradient-norm explosions, NaN/Inf, skipped steps, loss-scale collapses, eval regressions
//!   and the train-vs-eval gap. [`StabilityMonitor::summary`] returns what it saw as data
//!   ([`MonitorSummary`]); [`HealthReport::from_summary`] judges it into a [`Verdict`],
//!   findings and typed [`Advice`] from keel's decision table (plain words, no command-line
//!   flags: a program renders the advice as its own options).
//! - [`Guard`]: acts on divergence by a [`GuardPolicy`] (default rollback): in-memory
//!   snapshots of the last good state, rollback past the batches that led to the divergence,
//!   a lower LR, a stop after a few interventions; [`HealthReport::with_guard`] lists them.
//! - [`ConfusionMatrix`]: per-class IoU, mIoU and pixel accuracy with an ignore index;
//!   [`SegEval::evaluate`] scores a model over evaluation batches with it.
//! - [`CheckpointManager`] and [`load_checkpoint`]: atomic, checksummed safetensors
//!   checkpoints, keep-last-K plus the best, resume from the latest.
//! - [`JsonlLogger`]: one JSON record per line, flushed, resumable; [`progress_bar`] for the
//!   terminal.
//! - [`write_atomic`]: the one atomic file write (temp, fsync, rename, fsync directory);
//!   [`remove_stale_temps`] clears what an interrupted one left.
//! - [`RunLock`]: one process per run directory (a pid lock file; a dead holder's lock is
//!   taken over); [`run_dir::RunDir`] adds the rest of a run directory's discipline (writable
//!   up front, never overwriting a run, failed-start leftovers, `config.json`).
//! - [`series`]: mean/std, percentiles, moving averages and seed means for comparing runs;
//!   [`bench::time_steps`] times a step (warm-up, synchronize, median/min), [`bench::run_twin`]
//!   runs its twin in another framework, [`bench::BenchReport`] sets them side by side, and
//!   [`mem::CountingAlloc`] counts the heap for its peak memory; with the `plot` feature,
//!   `plot` draws training curves as PNG.
//! - [`driver`]: the parts above in the order a trainer runs them, written once: a trainer
//!   implements [`driver::Task`] (data position, a step's micro-batch losses, evaluation,
//!   the report's context) and [`driver::Run`] claims the run directory, resumes exactly,
//!   steps (windowed, guarded), logs, evaluates and checkpoints on cadence, stops gracefully
//!   on a signal and writes the report and summary. seg_train and det_train are its tasks.
//! - [`RunSummary`]: a run's outcome in numbers (losses, evals, alarm counts, speed,
//!   verdict); [`grid`] groups many runs into a norm x batch table with statistics across
//!   seeds, their curves (feature `plot`), and runs a grid's jobs as child processes.
//!
//! A custom loop with keel's parts (a linear model learning `y = x0 + x1 + x2 + x3`,
//! SGD with warmup and clipping, a checkpoint, a resume that continues bit for bit):
//!
//! ```
//! use candle::{DType, Device, Module, Tensor};
//! use candle_nn::{linear, VarBuilder, VarMap};
//! use keel_optim::{split_no_decay, LrSchedule, OptimizerKind};
//! use keel_train::{named_vars, CheckpointManager, OptimRecipe, TrainConfig, TrainState};
//! # fn main() -> candle::Result<()> {
//! # let dir = std::env::temp_dir().join(format!("keel-train-loop-doc-{}", std::process::id()));
//! let dev = Device::Cpu;
//! let x = (Tensor::arange(0f32, 64.0, &dev)?.reshape((16, 4))? / 64.0)?.sin()?;
//! let y = x.sum_keepdim(1)?;
//! let build = || -> candle::Result<_> {
//!     let vm = VarMap::new();
//!     let model = linear(4, 1, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
//!     let recipe = OptimRecipe { lr: 0.1, ..OptimRecipe::new(OptimizerKind::Sgd, 60) }.with_warmup(5);
//!     let opt = recipe.optimizer(split_no_decay(&vm))?;
//!     let state = TrainState::new(named_vars(&vm), opt, &TrainConfig::default())?;
//!     Ok((model, state, recipe.schedule()?))
//! };
//! let (model, mut state, schedule) = build()?;
//! let mut ckpts = CheckpointManager::new(&dir, 2)?;
//! let mut losses = Vec::new();
//! while state.step < 60 {
//!     let lr = schedule.lr(state.step);
//!     let out = state.step(lr, Some(1.0), |_micro| (model.forward(&x)? - &y)?.sqr()?.mean_all())?;
//!     assert!(!out.skipped && out.grad_norm.is_finite());
//!     losses.push(out.loss);
//!     if state.step == 30 {
//!         ckpts.save(&state.snapshot(&"any serde meta")?, Some(-out.loss))?;
//!     }
//! }
//! assert!(losses[59] < 0.1 * losses[0], "{losses:?}");
//! // A new process: build the same parts, restore the newest checkpoint, continue.
//! let (model, mut resumed, schedule) = build()?;
//! let found = ckpts.load_latest(&dev)?.expect("a checkpoint");
//! let meta: String = resumed.restore(&found.checkpoint)?;
//! assert_eq!((meta.as_str(), resumed.step), ("any serde meta", 30));
//! while resumed.step < 60 {
//!     let (i, lr) = (resumed.step, schedule.lr(resumed.step));
//!     let out = resumed.step(lr, Some(1.0), |_| (model.forward(&x)? - &y)?.sqr()?.mean_all())?;
//!     assert_eq!(out.loss.to_bits(), losses[i].to_bits()); // bit for bit
//! }
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok(()) }
//! ```
//!
//! The stability monitor on its own:
//!
//! ```
//! use keel_norm::NormKind;
//! use keel_optim::Precision;
//! use keel_train::{Advice, MonitorConfig, RunContext, StabilityMonitor, StepRecord, Verdict};
//! let mut mon = StabilityMonitor::new(MonitorConfig::default());
//! for step in 0..100 {
//!     let loss = if step == 60 { 50.0 } else { 1.0 + 0.01 * (step % 5) as f64 };
//!     let alarms = mon.record_step(&StepRecord { step, loss, grad_norm: Some(1.0), loss_scale: None, skipped: false });
//!     assert_eq!(alarms.len(), usize::from(step == 60));
//! }
//! let ctx = RunContext { norm: NormKind::GroupNorm { groups: None }, batch_size: 2,
//!                        pretrained: false, lr: 0.02, clip_grad: None,
//!                        precision: Precision::F32, steps: 100, backbone_norm: None };
//! let report = mon.report(&ctx);
//! assert_eq!(report.verdict, Verdict::Warning);
//! assert!(matches!(report.advice[..], [Advice::LowerLr { to: 0.01, .. }]));
//! assert_eq!(report.advice[0].to_string(),
//!            "loss spikes: lower the LR (now 0.02, e.g. 0.01) or lengthen the warmup; at batch 2 \
//!             a step sees few images, accumulating the gradients of several batches per step \
//!             averages more");
//! ```
#![warn(missing_docs)]

mod advice;
pub mod bench;
mod checkpoint;
mod ckpt_file;
#[cfg(feature = "clap")]
pub mod cli;
mod config;
mod diff;
mod divergence;
pub mod driver;
pub mod fault;
mod fsio;
pub mod grid;
mod guard;
mod interrupt;
mod lock;
mod log;
mod loop_config;
pub mod mem;
mod metrics;
mod monitor;
#[cfg(feature = "plot")]
pub mod plot;
mod progress;
mod recipe;
mod report;
pub mod run_dir;
mod run_summary;
pub mod series;
mod state;
mod stats;
mod summary;
pub mod threads;

pub use advice::{Advice, Bf16Cause, LrCause};
pub use checkpoint::{load_latest_checkpoint, CheckpointManager, Resume};
pub use ckpt_file::{load_checkpoint, Checkpoint, CHECKPOINT_FORMAT, CHECKPOINT_VERSION};
pub use config::{GuardConfig, GuardPolicy, MonitorConfig};
pub use diff::{changed_fields, FieldChange};
pub use divergence::{DivergenceCause, DivergenceEvent};
pub use fsio::{remove_stale_temps, write_atomic};
pub use guard::{Flushed, Guard, GuardAction};
pub use interrupt::{Interrupt, StopSignal};
pub use keel_optim::host_read;
pub use lock::{RunLock, LOCK_FILE};
pub use log::{EvalLog, GuardLog, JsonlLogger, StepLog};
pub use loop_config::{check_at_least_1, LoopConfig};
pub use metrics::{ConfusionMatrix, SegEval};
pub use monitor::{Alarm, EvalRecord, StabilityMonitor, StepRecord};
pub use progress::progress_bar;
pub use recipe::{OptimRecipe, POLY_POWER, SGD_MOMENTUM, WARMUP_START_FACTOR};
pub use report::{HealthReport, RunContext, Verdict};
pub use run_summary::RunSummary;
pub use state::{named_vars, StepOutcome, TrainConfig, TrainState, TRAIN_STATE_FORMAT};
pub use stats::lossless_f64;
pub use summary::{
    EventSteps, GuardSummary, Intervention, InterventionCause, InterventionKind, MonitorSummary,
    ReportStats,
};
