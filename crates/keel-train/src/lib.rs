//! # keel-train: the reusable parts of a small-batch training loop
//!
//! - [`StabilityMonitor`]: "is my training going haywire?" Robust loss-spike detection,
//!   gradient-norm explosions, NaN/Inf, skipped steps, loss-scale collapses, eval regressions
//!   and the train-vs-eval gap, ending in a [`HealthReport`] with a [`Verdict`] and
//!   recommendations from keel's decision table.
//! - [`ConfusionMatrix`]: per-class IoU, mIoU and pixel accuracy with an ignore index.
//! - [`CheckpointManager`] and [`load_checkpoint`]: atomic, checksummed safetensors
//!   checkpoints, keep-last-K plus the best, resume from the latest.
//! - [`JsonlLogger`]: one JSON record per line, flushed, resumable.
//!
//! ```
//! use keel_train::{MonitorConfig, RunContext, StabilityMonitor, StepRecord, Verdict};
//! let mut mon = StabilityMonitor::new(MonitorConfig::default());
//! for step in 0..100 {
//!     let loss = if step == 60 { 50.0 } else { 1.0 + 0.01 * (step % 5) as f64 };
//!     let alarms = mon.record_step(&StepRecord { step, loss, grad_norm: Some(1.0), loss_scale: None, skipped: false });
//!     assert_eq!(alarms.len(), usize::from(step == 60));
//! }
//! let ctx = RunContext { norm: "gn".into(), batch_size: 2, pretrained: false, lr: 0.02,
//!                        clip_grad: None, amp: "off".into(), steps: 100 };
//! assert_eq!(mon.report(&ctx).verdict, Verdict::Warning);
//! ```
#![warn(missing_docs)]

mod checkpoint;
mod ckpt_file;
mod log;
mod metrics;
mod monitor;
mod report;
mod stats;

pub use checkpoint::{Checkpoint, CheckpointManager};
pub use ckpt_file::{load_checkpoint, CHECKPOINT_FORMAT, CHECKPOINT_VERSION};
pub use log::JsonlLogger;
pub use metrics::ConfusionMatrix;
pub use monitor::{Alarm, EvalRecord, MonitorConfig, StabilityMonitor, StepRecord};
pub use report::{HealthReport, ReportStats, RunContext, Verdict};
