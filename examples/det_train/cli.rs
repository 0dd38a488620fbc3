//! Command line: `det_train [flags]`, `det_train --resume DIR`, and the [`DetConfig`] a
//! run is defined by. Flags mean what seg_train's flags of the same name mean.
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, ValueEnum};
use keel::data::DET_SHAPE_CLASSES;
use keel::norm::NormKind;
use keel::optim::{OptimizerKind, Precision};
use keel::train::{
    changed_fields, load_latest_checkpoint, FieldChange, GuardPolicy, OptimRecipe, Resume,
};
use serde::{Deserialize, Serialize};

use super::bench::{self, BenchArgs};
use super::model::DetModelConfig;
use super::train::{self, RunOpts};

/// `--format` of a `--data-dir`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// Pascal VOC: `Annotations/*.xml`, `JPEGImages/*.jpg`, `ImageSets/Main/<split>.txt`.
    Voc,
    /// COCO: `annotations/instances_<split>.json` with images in `<split>/`.
    Coco,
}

/// `--device`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DeviceChoice {
    Cpu,
    Cuda,
}

#[derive(Parser, Debug)]
#[command(
    name = "det_train",
    after_help = "det_train bench [flags] [--bench-warmup N] [--bench-steps N]: time the training step on one fixed batch",
    about = "FCOS object detection training with keel (synthetic shapes, Pascal VOC or COCO)"
)]
pub struct Cli {
    /// Backbone norm: bn, frozen-bn, gn, gn:G, ws-gn, ws-gn:G (the FCOS head is always GN).
    #[arg(long, value_parser = parse_norm, default_value = "gn")]
    pub norm: NormKind,
    /// Images per micro-batch.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Optimizer steps.
    #[arg(long, default_value_t = 700)]
    pub steps: usize,
    /// Seed of the weights init and the sample order / augmentation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory (logs, checkpoints, health report).
    #[arg(long, default_value = "runs/det_train")]
    pub out: PathBuf,
    /// Continue the run in DIR from its newest valid checkpoint with its saved config (other
    /// flags must match it, except --steps, which may extend the run).
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Optimizer: sgd (momentum 0.9, poly 0.9) or adamw (cosine).
    #[arg(long, value_enum, default_value_t = OptimizerKind::AdamW)]
    pub optimizer: OptimizerKind,
    /// Base learning rate (default: sgd 0.05, adamw 1e-3).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Weight decay on conv weights (default: sgd 1e-4, adamw 0.05); norms and biases get none.
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Linear warmup steps (0 = off); must be below --steps.
    #[arg(long, default_value_t = 50)]
    pub warmup_steps: usize,
    /// Clip gradients to this global L2 norm (0 = off).
    #[arg(long, default_value_t = 5.0)]
    pub clip_grad: f64,
    /// Mixed precision: off (f32), f16 (with a GradScaler) or bf16 (CUDA only).
    #[arg(long, value_enum, default_value = "off")]
    pub amp: Precision,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub accum_steps: usize,
    /// Base width w of the encoder (C3-C5: 2w, 4w, 8w channels).
    #[arg(long, default_value_t = 16)]
    pub width: usize,
    /// Width of the FPN levels and of the head towers.
    #[arg(long, default_value_t = 32)]
    pub fpn: usize,
    /// Conv blocks per head tower (FCOS: 4).
    #[arg(long, default_value_t = 2)]
    pub head_convs: usize,
    /// Image side: synthetic images are this size, dataset images are resized to it (square).
    #[arg(long, default_value_t = 128)]
    pub image_size: usize,
    /// Upper object size (max of l, t, r, b, pixels) of P3; P4 takes up to twice that, P5
    /// the rest (default image-size / 8: FCOS's 64 at 512 pixels).
    #[arg(long)]
    pub soi_base: Option<f32>,
    /// A dataset folder (see --format); default: the synthetic shapes.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The layout of --data-dir.
    #[arg(long, value_enum, default_value_t = DataFormat::Voc)]
    pub format: DataFormat,
    /// The training split of --data-dir.
    #[arg(long, default_value = "train")]
    pub train_split: String,
    /// The validation split of --data-dir.
    #[arg(long, default_value = "val")]
    pub val_split: String,
    /// Synthetic training images.
    #[arg(long, default_value_t = 2000)]
    pub train_size: usize,
    /// Synthetic validation images.
    #[arg(long, default_value_t = 200)]
    pub val_size: usize,
    /// Evaluate every N steps (and at the end).
    #[arg(long, default_value_t = 350)]
    pub eval_every: usize,
    /// Checkpoint every N steps (default: --eval-every; and at the end).
    #[arg(long)]
    pub ckpt_every: Option<usize>,
    /// Checkpoints kept (plus the best).
    #[arg(long, default_value_t = 2)]
    pub keep_last: usize,
    /// EMA of the weights with this decay, evaluated at the end (0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub ema_decay: f64,
    /// On divergence: off, skip (non-finite steps) or rollback (see seg_train --help).
    #[arg(long, default_value_t = GuardPolicy::Rollback)]
    pub guard: GuardPolicy,
    /// cpu or cuda (default: cuda when compiled in and usable, else cpu).
    #[arg(long, value_enum)]
    pub device: Option<DeviceChoice>,
    /// Inject a fault (the guard's tests): none, lr-burst@STEP[*F], nan-batch@STEP,
    /// poison-labels@STEP[*F], huge-lr[*F] (keel::train::fault). Not part of the config.
    #[arg(long, hide = true, value_name = "SPEC")]
    pub fault: Option<keel::train::fault::FaultPlan>,
}

/// `--norm`: NormKind's text form.
fn parse_norm(s: &str) -> Result<NormKind, String> {
    s.parse().map_err(|e: candle::Error| e.to_string())
}

/// Everything that defines a run; saved as `config.json` and in every checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DetConfig {
    pub norm: NormKind,
    pub batch_size: usize,
    pub steps: usize,
    pub seed: u64,
    pub optimizer: OptimizerKind,
    pub lr: Option<f64>,
    pub weight_decay: Option<f64>,
    pub warmup_steps: usize,
    pub clip_grad: Option<f64>,
    pub amp: Precision,
    pub accum_steps: usize,
    pub width: usize,
    pub fpn: usize,
    pub head_convs: usize,
    pub image_size: usize,
    pub soi_base: Option<f32>,
    pub data_dir: Option<PathBuf>,
    pub format: DataFormat,
    pub train_split: String,
    pub val_split: String,
    pub train_size: usize,
    pub val_size: usize,
    pub eval_every: usize,
    pub ckpt_every: usize,
    pub keep_last: usize,
    pub ema_decay: f64,
    pub guard: GuardPolicy,
}

impl Cli {
    /// The run config these flags define.
    pub fn config(&self) -> DetConfig {
        DetConfig {
            norm: self.norm,
            batch_size: self.batch_size,
            steps: self.steps,
            seed: self.seed,
            optimizer: self.optimizer,
            lr: self.lr,
            weight_decay: self.weight_decay,
            warmup_steps: self.warmup_steps,
            clip_grad: (self.clip_grad != 0.0).then_some(self.clip_grad),
            amp: self.amp,
            accum_steps: self.accum_steps,
            width: self.width,
            fpn: self.fpn,
            head_convs: self.head_convs,
            image_size: self.image_size,
            soi_base: self.soi_base,
            data_dir: self.data_dir.clone(),
            format: self.format,
            train_split: self.train_split.clone(),
            val_split: self.val_split.clone(),
            train_size: self.train_size,
            val_size: self.val_size,
            eval_every: self.eval_every,
            ckpt_every: self.ckpt_every.unwrap_or(self.eval_every),
            keep_last: self.keep_last,
            ema_decay: self.ema_decay,
            guard: self.guard,
        }
    }
}

impl DetConfig {
    /// The optimizer and schedule: the kind's defaults unless --lr / --weight-decay.
    pub fn recipe(&self) -> OptimRecipe {
        let r = OptimRecipe::new(self.optimizer, self.steps).with_warmup(self.warmup_steps);
        OptimRecipe {
            lr: self.lr.unwrap_or(r.lr),
            weight_decay: self.weight_decay.unwrap_or(r.weight_decay),
            ..r
        }
    }

    /// The detector's shape for `num_classes` classes.
    pub fn model(&self, num_classes: usize) -> DetModelConfig {
        DetModelConfig {
            width: self.width,
            fpn: self.fpn,
            head_convs: self.head_convs,
            num_classes,
            norm: self.norm,
        }
    }

    /// P3's upper object size (see `--soi-base`).
    pub fn soi_base(&self) -> f32 {
        self.soi_base.unwrap_or(self.image_size as f32 / 8.0)
    }

    /// Checks every setting before anything is created or written.
    pub fn validate(&self) -> anyhow::Result<()> {
        let at_least_1 = [
            ("--batch-size", self.batch_size),
            ("--steps", self.steps),
            ("--accum-steps", self.accum_steps),
            ("--eval-every", self.eval_every),
            ("--ckpt-every", self.ckpt_every),
            ("--keep-last", self.keep_last),
            ("--head-convs", self.head_convs),
        ];
        for (flag, v) in at_least_1 {
            if v == 0 {
                bail!("{flag} must be at least 1 (got 0)")
            }
        }
        if self.image_size < 32 {
            bail!(
                "--image-size {} is too small: the encoder downsamples by 32",
                self.image_size
            )
        }
        if self.warmup_steps >= self.steps {
            bail!(
                "--warmup-steps {} must be smaller than --steps {}",
                self.warmup_steps,
                self.steps
            )
        }
        let r = self.recipe();
        if !(r.lr > 0.0 && (r.lr as f32).is_finite()) {
            bail!("--lr {}: must be a positive number that fits an f32", r.lr)
        }
        if !(r.weight_decay >= 0.0 && (r.weight_decay as f32).is_finite()) {
            bail!(
                "--weight-decay {}: must be a non-negative number that fits an f32",
                r.weight_decay
            )
        }
        if let Some(c) = self.clip_grad.filter(|c| !(c.is_finite() && *c > 0.0)) {
            bail!("--clip-grad {c}: must be a positive number (0 = off)")
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            bail!(
                "--ema-decay {}: must lie in [0, 1) (0 = off)",
                self.ema_decay
            )
        }
        if let Some(b) = self.soi_base.filter(|b| !(b.is_finite() && *b > 0.0)) {
            bail!("--soi-base {b}: must be a positive number of pixels")
        }
        if self.data_dir.is_none() && (self.train_size == 0 || self.val_size == 0) {
            bail!("--train-size and --val-size must be at least 1")
        }
        if self.amp == Precision::Bf16 && !candle::utils::cuda_is_available() {
            bail!("--amp bf16 needs --device cuda: candle 0.11's CPU backend has no bf16 matmul/conv (use --amp f16 or off on CPU)")
        }
        let n = if self.data_dir.is_some() {
            2
        } else {
            DET_SHAPE_CLASSES.len()
        };
        self.model(n).norm.groups_for(self.fpn).context("--fpn")?;
        Ok(())
    }
}

/// `--device`: cpu, cuda, or cuda when compiled in and usable.
pub fn pick_device(want: Option<DeviceChoice>) -> anyhow::Result<candle::Device> {
    let dev = match want {
        Some(DeviceChoice::Cpu) => candle::Device::Cpu,
        Some(DeviceChoice::Cuda) => candle::Device::new_cuda(0)
            .context("--device cuda: no usable CUDA device (built with --features cuda?)")?,
        None if candle::utils::cuda_is_available() => {
            candle::Device::new_cuda(0).unwrap_or(candle::Device::Cpu)
        }
        None => candle::Device::Cpu,
    };
    keel::kernels::prepare_device(&dev)?;
    Ok(dev)
}

/// Flags that drive a run without being part of its config.
const NOT_CONFIG: [&str; 4] = ["resume", "quiet", "device", "out"];

/// The config and checkpoint `--resume DIR` continues: the run's `config.json` (recovered
/// from the checkpoint when missing), flags the user gave checked against it (only
/// `--steps` may change, to extend the run).
fn resume_plan(
    cli: &Cli,
    dir: &std::path::Path,
    m: &ArgMatches,
    dev: &candle::Device,
) -> anyhow::Result<(DetConfig, Resume)> {
    let shown = dir.display();
    let ckpts = dir.join("checkpoints");
    let found = load_latest_checkpoint(&ckpts, dev)
        .with_context(|| format!("--resume {shown}"))?
        .with_context(|| format!("--resume {shown}: no checkpoint in {}", ckpts.display()))?;
    for (bad, why) in found.skipped.iter().zip(&found.skip_reasons) {
        eprintln!(
            "warning: skipping {} ({why}); resuming from {}",
            bad.display(),
            found.path.display()
        );
    }
    let mut cfg = run_config(dir, &found)?;
    let explicit = |id: &str| m.value_source(id) == Some(ValueSource::CommandLine);
    let differ: Vec<String> = changed_fields(&cli.config(), &cfg)?
        .into_iter()
        .filter(|c| explicit(&c.key) && c.key != "steps" && !NOT_CONFIG.contains(&c.key.as_str()))
        .map(|c| {
            format!(
                "--{} {} (the run has {})",
                c.key.replace('_', "-"),
                FieldChange::show(&c.a),
                FieldChange::show(&c.b)
            )
        })
        .collect();
    if !differ.is_empty() {
        bail!("--resume {shown}: {} differ from the run's config; a resumed run keeps its settings (only --steps may change): drop them, or start a new run with another --out", differ.join(", "))
    }
    let at = found.checkpoint.step;
    if explicit("steps") {
        cfg.steps = cli.steps;
    }
    if at >= cfg.steps {
        bail!("--resume {shown}: the checkpoint is at step {at} and the run has {} steps; extend it with --steps N (N > {at})", cfg.steps)
    }
    Ok((cfg, found))
}

/// The config of the run in `dir`: its `config.json`, which must be the config stored in
/// the checkpoint (a larger `steps`, an extension, aside), or, when missing, the stored one.
fn run_config(dir: &std::path::Path, found: &Resume) -> anyhow::Result<DetConfig> {
    let (shown, ckpt) = (dir.display(), found.path.display());
    let stored: DetConfig = serde_json::from_value(found.checkpoint.meta["user"]["config"].clone())
        .with_context(|| format!("--resume {shown}: {ckpt} holds no det_train config"))?;
    let path = dir.join("config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        eprintln!(
            "warning: --resume {shown}: no config.json; recovered the run's config from {ckpt}"
        );
        return Ok(stored);
    };
    let file: DetConfig = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a det_train config", path.display()))?;
    let differ: Vec<String> = changed_fields(&file, &stored)?
        .into_iter()
        .filter(|c| !(c.key == "steps" && file.steps > stored.steps))
        .map(|c| {
            format!(
                "{} (config.json {}, checkpoint {})",
                c.key,
                FieldChange::show(&c.a),
                FieldChange::show(&c.b)
            )
        })
        .collect();
    if !differ.is_empty() {
        bail!("--resume {shown}: config.json differs from the config stored in {ckpt} in: {}; the checkpoint is what the run trained with: restore config.json (or delete it, and it is recovered from the checkpoint)", differ.join(", "))
    }
    Ok(file)
}

/// Parses `args` (program name first) and runs.
pub fn run(args: Vec<String>) -> anyhow::Result<()> {
    if args.get(1).is_some_and(|a| a == "bench") {
        let rest = std::iter::once(args[0].clone()).chain(args[2..].iter().cloned());
        let b = BenchArgs::try_parse_from(rest).map_err(|e| anyhow::anyhow!("{e}"))?;
        return bench::run(&b).map(drop);
    }
    let matches = Cli::command().try_get_matches_from(args).map_err(|e| {
        use clap::error::ErrorKind;
        if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
            let _ = e.print();
            std::process::exit(0);
        }
        anyhow::anyhow!("{e}")
    })?;
    let cli = Cli::from_arg_matches(&matches).map_err(|e| anyhow::anyhow!("{e}"))?;
    let opts = RunOpts {
        device: pick_device(cli.device)?,
        progress: !cli.quiet,
        fault: cli.fault.unwrap_or_default(),
    };
    let (cfg, out, resume) = match &cli.resume {
        Some(dir) => {
            let (cfg, found) = resume_plan(&cli, dir, &matches, &opts.device)?;
            (cfg, dir.clone(), Some(found))
        }
        None => (cli.config(), cli.out.clone(), None),
    };
    let s = train::run(&cfg, &out, resume, &opts)?;
    if let Some(step) = s.run.guard_stopped_at {
        bail!("the guard stopped the run at step {step}: it kept diverging (see health.json); lower --lr")
    }
    Ok(())
}
