//! `det_train bench`: the training step alone, timed on one fixed batch of the synthetic
//! set (no data loading, evaluation or logging): [`Net::build`] and [`micro_loss`] through
//! keel-train's `TrainState::step` (forward, FCOS targets and loss, backward, unscale,
//! clip, optimizer step), timed by `keel::train::bench::time_steps`. The PyTorch twin and
//! the GPU bundle's side-by-side are later work.
use clap::Parser;
use keel::data::{DetHostBatch, DetShapes, DetSource, SHAPES_TRAIN_SEED};
use keel::train::bench::{time_steps, Timing};

use super::cli::Cli;
use super::data::{augment, PAD};
use super::train::{micro_loss, Net};

/// `det_train bench` flags: a run's flags (model, batch, image size, amp, device) plus the
/// timing ones.
#[derive(Parser, Debug)]
#[command(
    name = "det_train bench",
    about = "Time det_train's training step on one fixed batch"
)]
pub struct BenchArgs {
    #[command(flatten)]
    pub run: Cli,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3)]
    pub bench_warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    pub bench_steps: usize,
}

/// Times the step; prints and returns the timing.
pub fn run(args: &BenchArgs) -> anyhow::Result<Timing> {
    let dev = args.run.dev.setup("det_train")?;
    let mut cfg = args.run.config();
    cfg.steps = args.bench_warmup + args.bench_steps;
    cfg.train.warmup_steps = 0;
    cfg.data_dir = None;
    cfg.validate()?;
    let set = DetShapes::generate(cfg.batch_size, cfg.image_size, SHAPES_TRAIN_SEED);
    let samples = (0..set.len())
        .map(|i| set.load(i, &augment(&cfg, false), None))
        .collect::<candle::Result<Vec<_>>>()?;
    let batch = DetHostBatch::collate(&samples, PAD)?;
    let classes = set.class_names().len();
    let Net { vm, net, mut state } = Net::build(&cfg, classes, &dev)?;
    let schedule = cfg.recipe().schedule()?;
    let t = time_steps(&dev, args.bench_warmup, args.bench_steps, None, |i| {
        let loss = |_| micro_loss(&cfg, &net, &vm, classes, &batch, &dev);
        state
            .step(schedule.lr(i), cfg.train.clip_grad, loss)
            .map(drop)
    })?;
    println!(
        "det_train bench: batch {} x {}px, width {}, fpn {}, head convs {}, amp {}, {:?}: median {:.1} ms/step, min {:.1} ms ({} timed steps after {} warm-up)",
        cfg.batch_size, cfg.image_size, cfg.width, cfg.fpn, cfg.head_convs, cfg.train.amp,
        dev.location(), t.median_ms, t.min_ms, args.bench_steps, args.bench_warmup
    );
    Ok(t)
}
