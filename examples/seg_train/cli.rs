//! Command line: `seg_train [train flags]`, `seg_train --resume DIR`, `seg_train compare ...`.
use std::path::PathBuf;

use anyhow::{bail, Context};
use candle::Device;
use clap::{Args, Parser, Subcommand};

use super::compare::{self, CompareArgs};
use super::train::{self, RunConfig, RunOpts};

#[derive(Parser, Debug)]
#[command(
    name = "seg_train",
    about = "Semantic segmentation training with keel (synthetic shapes or Pascal VOC)"
)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub train: TrainArgs,
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // reason: parsed once per process
pub enum Command {
    /// Run the norm x batch-size x seed grid and write results.md and curves.png.
    Compare(CompareArgs),
    /// Run one saved RunConfig (JSON) into --out, quietly; used by `compare` for its jobs.
    #[command(hide = true)]
    RunConfig {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        device: Option<String>,
    },
}

/// Settings shared by a single run and the compare grid.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// Optimizer: sgd (momentum 0.9, poly 0.9) or adamw (cosine).
    #[arg(long, default_value = "sgd")]
    pub optimizer: String,
    /// Base learning rate (default: sgd 0.05, adamw 1e-3).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Weight decay on conv weights (default: sgd 1e-4, adamw 0.05); norms and biases get none.
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Linear warmup steps (0 = off).
    #[arg(long, default_value_t = 200)]
    pub warmup_steps: usize,
    /// Clip gradients to this global L2 norm (0 = off). The default 2.0 is about the p99 of
    /// the healthy grad norms of the default run, where the monitor saw batch-2 grad norms
    /// spike above 10x their median.
    #[arg(long, default_value_t = 2.0)]
    pub clip_grad: f64,
    /// Mixed precision: off, f16 (with a GradScaler) or bf16 (CUDA only).
    #[arg(long, default_value = "off")]
    pub amp: String,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub accum_steps: usize,
    /// Base width w of the encoder (stages w, 2w, 4w, 8w; the twin is 64).
    #[arg(long, default_value_t = 16)]
    pub width: usize,
    /// Width of the FPN decoder (the twin is 128).
    #[arg(long, default_value_t = 32)]
    pub fpn: usize,
    /// Training crop / synthetic image size.
    #[arg(long, default_value_t = 96)]
    pub image_size: usize,
    /// Pascal VOC layout root (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Number of classes of --data-dir (default 21; the synthetic set has 5).
    #[arg(long)]
    pub num_classes: Option<usize>,
    /// Synthetic training images.
    #[arg(long, default_value_t = 4000)]
    pub train_size: usize,
    /// Synthetic validation images.
    #[arg(long, default_value_t = 100)]
    pub val_size: usize,
    /// Data loader threads.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Batches queued per loader thread.
    #[arg(long, default_value_t = 4)]
    pub prefetch: usize,
    /// Evaluate every N steps (and at the end).
    #[arg(long, default_value_t = 2000)]
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
    /// cpu or cuda (default: cuda when compiled in and present, else cpu).
    #[arg(long)]
    pub device: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// Norm: bn, frozen-bn, gn, gn:G, ws-gn, ws-gn:G.
    #[arg(long, default_value = "gn")]
    pub norm: String,
    /// Images per micro-batch.
    #[arg(long, default_value_t = 2)]
    pub batch_size: usize,
    /// Optimizer steps.
    #[arg(long, default_value_t = 16000)]
    pub steps: usize,
    /// Seed of the weights init and the sample order / augmentation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory (logs, checkpoints, health report).
    #[arg(long, default_value = "runs/seg_train")]
    pub out: PathBuf,
    /// Continue the run in DIR (its saved config) from its latest checkpoint.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Pretrained weights (safetensors, twin names); BatchNorms are converted to --norm.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub common: CommonArgs,
}

impl CommonArgs {
    /// A run config with these settings and the run-specific ones.
    pub fn config(
        &self,
        norm: &str,
        batch_size: usize,
        steps: usize,
        seed: u64,
        init: Option<PathBuf>,
    ) -> RunConfig {
        RunConfig {
            norm: norm.to_string(),
            batch_size,
            steps,
            seed,
            optimizer: self.optimizer.to_ascii_lowercase(),
            lr: self.lr,
            weight_decay: self.weight_decay,
            warmup_steps: self.warmup_steps.min(steps.saturating_sub(1)),
            clip_grad: (self.clip_grad != 0.0).then_some(self.clip_grad),
            amp: self.amp.to_ascii_lowercase(),
            accum_steps: self.accum_steps,
            eval_every: self.eval_every,
            ckpt_every: self.ckpt_every.unwrap_or(self.eval_every),
            keep_last: self.keep_last,
            width: self.width,
            fpn: self.fpn,
            image_size: self.image_size,
            num_classes: self.num_classes,
            data_dir: self.data_dir.clone(),
            train_size: self.train_size,
            val_size: self.val_size,
            workers: self.workers,
            prefetch: self.prefetch,
            ema_decay: self.ema_decay,
            init,
        }
    }

    pub fn device(&self) -> anyhow::Result<Device> {
        pick_device(self.device.as_deref())
    }
}

/// `--device`: cpu, cuda (an error without CUDA), or the default (cuda when compiled in
/// and present, else cpu).
pub fn pick_device(want: Option<&str>) -> anyhow::Result<Device> {
    match want.map(str::to_ascii_lowercase).as_deref() {
        Some("cpu") => Ok(Device::Cpu),
        Some("cuda") => {
            if !candle::utils::cuda_is_available() {
                bail!("--device cuda: this binary was built without CUDA; rebuild with --features cuda")
            }
            Device::new_cuda(0).context("--device cuda: no usable CUDA device")
        }
        Some(other) => bail!("--device {other}: expected cpu or cuda"),
        None => Ok(if candle::utils::cuda_is_available() {
            Device::new_cuda(0).unwrap_or(Device::Cpu)
        } else {
            Device::Cpu
        }),
    }
}

/// Parses `args` (program name first) and runs.
pub fn run(args: Vec<String>) -> anyhow::Result<()> {
    let cli = Cli::try_parse_from(args).map_err(|e| {
        if matches!(
            e.kind(),
            clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
        ) {
            let _ = e.print();
            std::process::exit(0);
        }
        anyhow::anyhow!("{e}")
    })?;
    match cli.command {
        Some(Command::Compare(c)) => compare::run(&c),
        Some(Command::RunConfig {
            config,
            out,
            device,
        }) => {
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("reading {}", config.display()))?;
            let cfg: RunConfig = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a seg_train config", config.display()))?;
            let opts = RunOpts {
                device: pick_device(device.as_deref())?,
                progress: false,
                verbose: false,
            };
            train::run(&cfg, &out, false, &opts)?;
            Ok(())
        }
        None => {
            let t = cli.train;
            let device = t.common.device()?;
            let opts = RunOpts {
                device,
                progress: !t.quiet,
                verbose: true,
            };
            match &t.resume {
                Some(dir) => {
                    let cfg = train::saved_config(dir)?;
                    train::run(&cfg, dir, true, &opts)?;
                }
                None => {
                    let cfg =
                        t.common
                            .config(&t.norm, t.batch_size, t.steps, t.seed, t.init.clone());
                    train::run(&cfg, &t.out, false, &opts)?;
                }
            }
            Ok(())
        }
    }
}
