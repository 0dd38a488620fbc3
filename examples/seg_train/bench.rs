//! `seg_train bench`: the training step alone, timed on one fixed batch (no data loading,
//! no logging), optionally side by side with the PyTorch eager twin (`torch_twin.py`, beside
//! this file). The step is the one a run takes: [`Net::build`] and [`micro_loss`] through
//! keel-train's `TrainState::step` (forward, loss, backward, unscale, clip, optimizer step),
//! or with `--log-every N > 1` (the CUDA default, 20) `TrainState::launch` in windows of N
//! steps read once: the timing is then of whole windows (synchronized after each), divided
//! by N. With `--accum-steps k`, the `--amp` copy is cast once per step for its k
//! micro-batches.
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context};
use clap::Args;
use keel::norm::NormKind;
use keel::optim::{OptimizerKind, Precision};
use keel::train::bench::{run_twin_checked, time_steps, Timing};
use keel::train::cli::TwinArgs;
use keel::train::mem::CountingAlloc;

use super::cli::{parse_norm, CommonArgs};
use super::data::{eval_batches, Shapes, SHAPES_TRAIN_SEED};
use super::train::{amp_label, micro_loss, Net};
use candle::Device;
use keel::models::backbone::BackboneChoice;
use keel::models::seg_model::SegModelConfig;

/// `seg_train bench` flags: the model/batch flags of a run plus the timing ones.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Norm: bn, frozen-bn, gn, gn:G, ws-gn, ws-gn:G.
    #[arg(long, value_parser = parse_norm, default_value = "gn")]
    pub norm: NormKind,
    /// Images per step.
    #[arg(long, default_value_t = 2)]
    pub batch_size: usize,
    /// Untimed steps first (allocator, caches, cuDNN algorithm search).
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[command(flatten)]
    pub twin: TwinArgs,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// What `bench` measured.
pub use keel::train::bench::BenchReport;

/// seg_train's global allocator: counts heap bytes for `bench`'s peak memory (two relaxed
/// atomics per allocation).
#[global_allocator]
pub static ALLOC: CountingAlloc = CountingAlloc::new();

/// Times keel's step: `warmup` untimed steps, then `steps` timed ones.
fn time_keel(args: &BenchArgs, dev: &Device) -> anyhow::Result<(Timing, String, usize)> {
    let c = &args.common;
    let (warmup, steps) = bench_steps(args, dev);
    let mut cfg = args
        .common
        .config(args.norm, args.batch_size, warmup + steps, 0);
    cfg.train.warmup_steps = 0;
    cfg.validate()?;
    let (mut net, _) = Net::build(&cfg, dev)?;
    let schedule = cfg.recipe().schedule()?;
    let shapes = Shapes::generate(cfg.batch_size, cfg.image_size, SHAPES_TRAIN_SEED);
    let batch = eval_batches(&shapes, cfg.batch_size, cfg.image_size)
        .next()
        .context("bench: the synthetic batch is empty")??;
    let (x, t) = batch.to_tensors(dev)?;
    // --log-every N > 1: time windows of N launched steps and one read (per step: / N).
    let window = c.log_every(dev);
    net.state.set_read_every(window)?;
    let windows = |steps: usize| steps.div_ceil(window); // whole windows: bench_steps
    let (model, dtype) = (cfg.seg_model(), cfg.train.amp.compute_dtype());
    let mut timing = time_steps(
        dev,
        windows(args.warmup),
        windows(args.steps),
        Some(&ALLOC),
        |_| {
            for _ in 0..window {
                let lr = schedule.lr(net.state.step);
                let step_net = net.master.for_step(&model, &net.vm, dtype, dev)?;
                let micro = |_| micro_loss(&step_net, &x, &t);
                if window == 1 {
                    check_finite(&[net.state.step(lr, cfg.train.clip_grad, micro)?])?;
                } else if net.state.launch(lr, cfg.train.clip_grad, micro)? {
                    check_finite(&net.state.flush()?)?;
                }
            }
            Ok(())
        },
    )?;
    timing.median_ms /= window as f64;
    timing.min_ms /= window as f64;
    let label = format!(
        "{}{} width {} fpn {} classes {} batch {} {}x{} amp {}{} {} device {:?} threads {}",
        match cfg.seg_model() {
            SegModelConfig::Twin(_) => String::new(),
            SegModelConfig::ResNet(m) => format!(
                "{} backbone {} freeze_at {}, head ",
                m.depth, m.backbone_norm, m.freeze_at
            ),
        },
        cfg.norm,
        cfg.width,
        cfg.fpn,
        cfg.num_classes(),
        cfg.batch_size,
        cfg.image_size,
        cfg.image_size,
        amp_label(cfg.train.amp),
        if c.dev.tf32 && dev.is_cuda() {
            " tf32"
        } else {
            ""
        },
        cfg.train.optimizer,
        dev.location(),
        candle::utils::get_num_threads(),
    );
    Ok((timing, label, keel::models::seg::count_params(&net.vm)))
}

/// The (warm-up, timed) steps the bench runs: `--warmup` and `--steps` rounded up to whole
/// windows of `--log-every` steps (one host read each).
pub fn bench_steps(args: &BenchArgs, dev: &candle::Device) -> (usize, usize) {
    let window = args.common.log_every(dev);
    (
        args.warmup.div_ceil(window) * window,
        args.steps.div_ceil(window) * window,
    )
}

/// Fails when a step read by the bench has a non-finite loss (its timing would not be of a
/// training step).
fn check_finite(outs: &[keel::train::StepOutcome]) -> candle::Result<()> {
    match outs.iter().find(|o| !o.loss.is_finite()) {
        Some(o) => candle::bail!(
            "bench: the loss became {} at step {}; the timing would not be of a training step",
            o.loss,
            o.step
        ),
        None => Ok(()),
    }
}

/// The twin's settings for this config; an error names what the twin cannot mirror.
fn twin_args(args: &BenchArgs, cuda: bool) -> anyhow::Result<Vec<String>> {
    let c = &args.common;
    if c.backbone.backbone != BackboneChoice::Twin {
        bail!(
            "--vs-torch: the PyTorch twin mirrors keel's twin network only, not --backbone {}",
            c.backbone.backbone
        )
    }
    let norm = match args.norm {
        NormKind::GroupNorm { groups: None } => "gn",
        NormKind::BatchNorm => "bn",
        other => bail!("--vs-torch: the PyTorch twin has GroupNorm(min(32, C)) and BatchNorm only, not --norm {other}"),
    };
    if c.train.optimizer != OptimizerKind::Sgd {
        bail!("--vs-torch: the twin steps SGD (momentum 0.9); use --optimizer sgd")
    }
    if c.train.accum_steps != 1 || c.train.ema_decay != 0.0 {
        bail!("--vs-torch: the twin has no accumulation or EMA; use --accum-steps 1 --ema-decay 0")
    }
    let amp = match c.train.amp {
        Precision::F32 if c.dev.tf32 && cuda => "tf32",
        Precision::F32 => "off",
        Precision::F16 if cuda => "f16",
        Precision::Bf16 if cuda => "bf16",
        p => bail!("--vs-torch: the CPU twin runs f32 only, not --amp {p}"),
    };
    let threads = args.twin.threads();
    let classes = args.common.config(args.norm, 1, 2, 0).num_classes();
    let v = [
        ("--width", c.width.to_string()),
        ("--fpn", c.fpn.to_string()),
        ("--classes", classes.to_string()),
        ("--batch", args.batch_size.to_string()),
        ("--size", c.image_size.to_string()),
        ("--norm", norm.into()),
        ("--device", if cuda { "cuda" } else { "cpu" }.into()),
        ("--amp", amp.into()),
        ("--threads", threads.to_string()),
        ("--warmup", args.warmup.to_string()),
        ("--steps", args.steps.to_string()),
    ];
    Ok(v.into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .collect())
}

/// Runs the PyTorch twin script with `twin` arguments and reads its JSON line.
fn time_torch(
    python: &str,
    script: &std::path::Path,
    twin: &[String],
    params: usize,
) -> anyhow::Result<Timing> {
    let model = "keel::models::seg::SegNet";
    let out = run_twin_checked(python, script, twin, params, model)
        .map_err(|e| anyhow!("--vs-torch: {e}"))?;
    Ok(out.timing)
}

/// `--twin-script`, or `torch_twin.py` beside this example's source.
fn twin_script(args: &BenchArgs) -> PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    args.twin
        .script(&dir.join("examples/seg_train/torch_twin.py"))
}

/// `seg_train bench`.
pub fn run(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    if args.steps == 0 {
        bail!("bench --steps must be at least 1 (got 0)")
    }
    // Check the twin can mirror the config before spending time on keel's side.
    // The device once, for both sides (a CUDA device is a context: not made twice).
    let c = &args.common;
    let dev = c.dev.setup("seg_train")?;
    let twin = args
        .twin
        .vs_torch
        .then(|| twin_args(args, dev.is_cuda()))
        .transpose()?;
    let (keel, config, params) = time_keel(args, &dev)?;
    let torch = twin
        .map(|t| time_torch(&args.twin.python, &twin_script(args), &t, params))
        .transpose()?;
    let report = BenchReport::new(config, params, args.batch_size, keel, torch);
    let (warmup, steps) = bench_steps(args, &dev);
    println!("{}", report.to_text(warmup, steps));
    if let Some(path) = &args.twin.json {
        keel::train::write_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    Ok(report)
}
