//! # keel-train: the reusable parts of a small-batch training loop
//!
//! - [`StabilityMonitor`]: "is my training going haywire?" Robust loss-spike detection,
//!   gradient-norm explosions, NaN/Inf, skipped steps, loss-scale collapses, eval regressions
//!   and the train-vs-eval gap. [`StabilityMonitor::summary`] returns what it saw as data
//!   ([`MonitorSummary`]); [`HealthReport::from_summary`] judges it into a [`Verdict`],
//!   findings and typed [`Advice`] from keel's decision table (plain words, no command-line
//!   flags: a program renders the advice as its own options).
//! - [`ConfusionMatrix`]: per-class IoU, mIoU and pixel accuracy with an ignore index.
//! - [`CheckpointManager`] and [`load_checkpoint`]: atomic, checksummed safetensors
//!   checkpoints, keep-last-K plus the best, resume from the latest.
//! - [`JsonlLogger`]: one JSON record per line, flushed, resumable.
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
//!                        precision: Precision::F32, steps: 100 };
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
mod checkpoint;
mod ckpt_file;
mod config;
mod divergence;
mod log;
mod metrics;
mod monitor;
mod report;
mod stats;
mod summary;

pub use advice::{Advice, Bf16Cause, LrCause};
pub use checkpoint::{Checkpoint, CheckpointManager};
pub use ckpt_file::{load_checkpoint, CHECKPOINT_FORMAT, CHECKPOINT_VERSION};
pub use config::MonitorConfig;
pub use divergence::{DivergenceCause, DivergenceEvent};
pub use log::JsonlLogger;
pub use metrics::ConfusionMatrix;
pub use monitor::{Alarm, EvalRecord, StabilityMonitor, StepRecord};
pub use report::{HealthReport, RunContext, Verdict};
pub use summary::{EventSteps, MonitorSummary, ReportStats};
