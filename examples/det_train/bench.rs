//! `det_train bench`: the training step alone, timed on one fixed batch of the synthetic
//! set (no data loading, evaluation or logging): [`Net::build`] and [`micro_loss`] through
//! keel-train's `TrainState::step` (forward, FCOS targets and loss, backward, unscale,
//! clip, optimizer step), timed by `keel::train::bench::time_steps`; optionally side by side
//! with the PyTorch eager twin (`torch_twin.py`, beside this file), which loads keel's init
//! weights and batch (safetensors files in a temp folder), so its parameter count, its
//! names and the losses of its first two steps (the forward and loss, then the gradients,
//! clip and AdamW update too) are checked against keel's before its time is reported.
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail};
use candle::{Device, Tensor};
use clap::Parser;
use keel::data::{DetHostBatch, DetShapes, DetSource, SHAPES_TRAIN_SEED};
use keel::norm::NormKind;
use keel::optim::{OptimizerKind, Precision};
use keel::train::bench::{run_twin_checked, time_steps, BenchReport, Timing};
use keel::train::cli::TwinArgs;
use keel::train::mem::CountingAlloc;

use super::cli::{Cli, DetConfig};
use super::data::{augment, PAD};
use super::train::{gt_boxes, micro_loss, Net};

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
    /// Untimed steps first (with --vs-torch, the first two steps' losses are compared).
    #[arg(long, default_value_t = 3)]
    pub bench_warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    pub bench_steps: usize,
    #[command(flatten)]
    pub twin: TwinArgs,
}

/// det_train's global allocator: counts heap bytes for `bench`'s peak memory (two relaxed
/// atomics per allocation).
#[global_allocator]
pub static ALLOC: CountingAlloc = CountingAlloc::new();

/// The bench's config: the run's, with `warmup + steps` steps, no LR warmup, synthetic data.
fn bench_config(args: &BenchArgs) -> anyhow::Result<DetConfig> {
    if args.bench_steps == 0 {
        bail!("bench --bench-steps must be at least 1 (got 0)")
    }
    let mut cfg = args.run.config();
    cfg.steps = args.bench_warmup + args.bench_steps;
    cfg.train.warmup_steps = 0;
    cfg.data_dir = None;
    cfg.validate()?;
    Ok(cfg)
}

/// The fixed batch: the first `batch_size` synthetic training images, unaugmented.
fn fixed_batch(cfg: &DetConfig) -> candle::Result<(DetHostBatch, usize)> {
    let set = DetShapes::generate(cfg.batch_size, cfg.image_size, SHAPES_TRAIN_SEED);
    let samples = (0..set.len())
        .map(|i| set.load(i, &augment(cfg, false), None))
        .collect::<candle::Result<Vec<_>>>()?;
    Ok((
        DetHostBatch::collate(&samples, PAD)?,
        set.class_names().len(),
    ))
}

/// Writes the batch as the twin reads it: `images` (N, 3, H, W), `boxes` (M, 4) xyxy,
/// `box_image` and `box_class` (M) as i64; ignored objects left out, as keel's targets do.
fn save_batch(hb: &DetHostBatch, path: &Path) -> candle::Result<()> {
    let cpu = Device::Cpu;
    let (mut boxes, mut owner, mut class) = (vec![], vec![], vec![]);
    for (k, gt) in gt_boxes(hb).into_iter().enumerate() {
        for (b, c) in gt.boxes.iter().zip(&gt.classes) {
            boxes.extend_from_slice(b);
            owner.push(k as i64);
            class.push(i64::from(*c));
        }
    }
    let m = owner.len();
    let tensors = std::collections::HashMap::from([
        (
            "images".to_string(),
            Tensor::from_slice(&hb.images, (hb.n, 3, hb.height, hb.width), &cpu)?,
        ),
        ("boxes".into(), Tensor::from_vec(boxes, (m, 4), &cpu)?),
        ("box_image".into(), Tensor::from_vec(owner, m, &cpu)?),
        ("box_class".into(), Tensor::from_vec(class, m, &cpu)?),
    ]);
    candle::safetensors::save(&tensors, path)
}

/// What keel's side measured: the timing, the first two steps' losses, the parameter count.
struct KeelSide {
    timing: Timing,
    /// The losses of the first two steps (one when only one step runs).
    losses: Vec<f64>,
    params: usize,
}

/// Times keel's step; with `twin_dir`, first writes the init weights (`init.safetensors`)
/// and the batch (`batch.safetensors`) there for the twin.
fn time_keel(
    args: &BenchArgs,
    cfg: &DetConfig,
    dev: &Device,
    twin_dir: Option<&Path>,
) -> anyhow::Result<KeelSide> {
    let (batch, classes) = fixed_batch(cfg)?;
    let Net { vm, net, mut state } = Net::build(cfg, classes, dev)?;
    if let Some(dir) = twin_dir {
        vm.save(dir.join("init.safetensors"))?;
        save_batch(&batch, &dir.join("batch.safetensors"))?;
    }
    let schedule = cfg.recipe().schedule()?;
    let mut losses = Vec::with_capacity(2);
    let timing = time_steps(
        dev,
        args.bench_warmup,
        args.bench_steps,
        Some(&ALLOC),
        |i| {
            let loss = |_| micro_loss(cfg, &net, &vm, classes, &batch, dev);
            let o = state.step(schedule.lr(i), cfg.train.clip_grad, loss)?;
            if !o.loss.is_finite() {
                candle::bail!(
                    "bench: the loss became {} at step {}; the timing would not be of a training step",
                    o.loss,
                    o.step
                )
            }
            if i < 2 {
                losses.push(o.loss);
            }
            Ok(())
        },
    )?;
    let params = keel::models::seg::count_params(&vm);
    Ok(KeelSide {
        timing,
        losses,
        params,
    })
}

/// The twin's settings for this config (its files in `dir`); an error names what the twin
/// cannot mirror and the flag that fixes it.
fn twin_args(
    args: &BenchArgs,
    cfg: &DetConfig,
    cuda: bool,
    dir: &Path,
) -> anyhow::Result<Vec<String>> {
    if !cfg.backbone.backbone.is_twin() {
        bail!(
            "--vs-torch: the PyTorch twin has keel's twin encoder only, not --backbone {}; drop --backbone",
            cfg.backbone.backbone
        )
    }
    let norm = match cfg.norm {
        NormKind::GroupNorm { groups: None } => "gn",
        NormKind::BatchNorm => "bn",
        other => bail!("--vs-torch: the PyTorch twin's backbone has GroupNorm(group_count(C, 32)) and BatchNorm only, not --norm {other}; use --norm gn or bn"),
    };
    let t = &cfg.train;
    if t.optimizer != OptimizerKind::AdamW {
        bail!("--vs-torch: the twin steps AdamW (det_train's default); use --optimizer adamw")
    }
    if t.accum_steps != 1 || t.ema_decay != 0.0 {
        bail!("--vs-torch: the twin has no accumulation or EMA; use --accum-steps 1 --ema-decay 0")
    }
    let amp = match t.amp {
        Precision::F32 if args.run.dev.tf32 && cuda => "tf32",
        Precision::F32 => "off",
        Precision::F16 if cuda => "f16",
        Precision::Bf16 if cuda => "bf16",
        p => bail!("--vs-torch: the CPU twin runs f32 only, not --amp {p}; use --amp off"),
    };
    let recipe = cfg.recipe();
    let threads = args.twin.threads();
    let v = [
        ("--width", cfg.width.to_string()),
        ("--fpn", cfg.fpn.to_string()),
        ("--head-convs", cfg.head_convs.to_string()),
        ("--classes", keel::data::DET_SHAPE_CLASSES.len().to_string()),
        ("--soi-base", cfg.soi_base().to_string()),
        ("--norm", norm.into()),
        ("--init", dir.join("init.safetensors").display().to_string()),
        (
            "--batch-file",
            dir.join("batch.safetensors").display().to_string(),
        ),
        ("--lr", recipe.lr.to_string()),
        ("--weight-decay", recipe.weight_decay.to_string()),
        ("--clip", t.clip_grad.unwrap_or(0.0).to_string()),
        ("--device", if cuda { "cuda" } else { "cpu" }.into()),
        ("--amp", amp.into()),
        ("--threads", threads.to_string()),
        ("--warmup", args.bench_warmup.to_string()),
        ("--steps", args.bench_steps.to_string()),
    ];
    Ok(v.into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .collect())
}

/// How the twin's first losses are checked: the relative tolerance and how many steps.
/// f32 on the CPU: 1e-4 on both steps (the same arithmetic up to summation order; measured
/// 1e-7); f32 on CUDA: 1e-3 (other convolution algorithms); TF32 / f16 / bf16: 3e-2 on the
/// first step only (two loss scalers may skip different first steps).
fn loss_checks(cfg: &DetConfig, cuda: bool, tf32: bool) -> (f64, usize) {
    match cfg.train.amp {
        Precision::F32 if !cuda => (1e-4, 2),
        Precision::F32 if !tf32 => (1e-3, 2),
        _ => (3e-2, 1),
    }
}

/// Fails unless the twin's losses of the first steps agree with keel's within `tol`
/// (relative): the first step's loss checks the forward, the targets and the loss; the
/// second's (after one update from the same weights) the gradients, the clip and AdamW.
fn check_losses(keel: &[f64], torch: &[f64], tol: f64) -> anyhow::Result<()> {
    if torch.len() < keel.len() {
        bail!("--vs-torch: the twin reported {} step losses, keel {}; use examples/det_train/torch_twin.py", torch.len(), keel.len())
    }
    for (i, (&k, &t)) in keel.iter().zip(torch).enumerate() {
        let rel = (k - t).abs() / k.abs().max(1e-12);
        let which = ["first", "second"][i.min(1)];
        println!("{which}-step loss: keel {k:.6}, torch {t:.6} (relative difference {rel:.1e}, tolerance {tol:.0e})");
        if rel.is_nan() || rel > tol {
            bail!("--vs-torch: the twin's {which}-step loss {t} differs from keel's {k} by {rel:.1e} (relative, tolerance {tol:.0e}) from the same weights and batch: torch_twin.py no longer computes det_train's FCOS step")
        }
    }
    Ok(())
}

/// `--twin-script`, or `torch_twin.py` beside this example's source.
fn twin_script(args: &BenchArgs) -> PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    args.twin
        .script(&dir.join("examples/det_train/torch_twin.py"))
}

/// A temp folder for the twin's files, removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The configuration in words for the report.
fn label(cfg: &DetConfig, dev: &Device, tf32: bool) -> String {
    format!(
        "det FCOS P3-P5 {} width {} fpn {} head convs {} batch {} {}x{} amp {}{} {} device {:?} threads {}",
        cfg.norm,
        cfg.width,
        cfg.fpn,
        cfg.head_convs,
        cfg.batch_size,
        cfg.image_size,
        cfg.image_size,
        cfg.train.amp,
        if tf32 && dev.is_cuda() { " tf32" } else { "" },
        cfg.train.optimizer,
        dev.location(),
        candle::utils::get_num_threads(),
    )
}

/// `det_train bench`: times the step (and the twin's with `--vs-torch`); prints the report,
/// the keel / torch ratio last.
pub fn run(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    let cfg = bench_config(args)?;
    let dev = args.run.dev.setup("det_train")?;
    let (cuda, tf32) = (dev.is_cuda(), args.run.dev.tf32);
    // Check the twin can mirror the config before spending time on keel's side.
    let dir = TempDir(std::env::temp_dir().join(format!(
        "keel-det-twin-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    )));
    let twin = args
        .twin
        .vs_torch
        .then(|| twin_args(args, &cfg, cuda, &dir.0))
        .transpose()?;
    if twin.is_some() {
        std::fs::create_dir_all(&dir.0)?;
    }
    let keel = time_keel(args, &cfg, &dev, twin.as_ref().map(|_| dir.0.as_path()))?;
    let torch = match &twin {
        Some(t) => {
            let out = run_twin_checked(
                &args.twin.python,
                &twin_script(args),
                t,
                keel.params,
                "det_train's FcosNet",
            )
            .map_err(|e| anyhow!("--vs-torch: {e}"))?;
            let (tol, n) = loss_checks(&cfg, cuda, tf32);
            check_losses(&keel.losses[..n.min(keel.losses.len())], &out.losses, tol)?;
            Some(out.timing)
        }
        None => None,
    };
    let report = BenchReport::new(
        label(&cfg, &dev, tf32),
        keel.params,
        cfg.batch_size,
        keel.timing,
        torch,
    );
    println!("{}", report.to_text(args.bench_warmup, args.bench_steps));
    if let Some(path) = &args.twin.json {
        keel::train::write_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    Ok(report)
}
