//! Command line: `seg_train [train flags]`, `seg_train --resume DIR`, `seg_train compare ...`,
//! and the [`RunConfig`] a run is defined by.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use candle::Device;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use keel::data::Workers;
use keel::models::backbone::BackboneArgs;
use keel::models::seg::ModelConfig;
use keel::norm::NormKind;
use keel::train::cli::{DeviceArgs, LoopArgs, ResumableConfig, ResumeArgs};
use keel::train::{LoopConfig, OptimRecipe};
use serde::{Deserialize, Serialize};

use super::bench::{self, BenchArgs};
use super::compare::{self, CompareArgs};
use super::data::SHAPE_CLASSES;
use super::resume::resume_plan;
use super::train;
use keel::train::driver::RunOptions;

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
    /// Time the training step alone on one fixed batch (optionally against PyTorch).
    Bench(BenchArgs),
    /// Run one saved RunConfig (JSON) into --out, quietly; used by `compare` for its jobs.
    #[command(hide = true)]
    RunConfig {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        dev: DeviceArgs,
        /// As a run's --log-every (compare passes its own on).
        #[arg(long, value_name = "N")]
        log_every: Option<usize>,
    },
}

/// `--norm`: NormKind's text form (bn, frozen-bn, gn, gn:G, ws-gn, ws-gn:G).
pub use keel::models::backbone::parse_norm;

/// Settings shared by a single run and the compare grid: keel's loop and device flags
/// (keel::train::cli) and seg_train's model and data flags.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    #[command(flatten)]
    pub train: LoopArgs,
    #[command(flatten)]
    pub dev: DeviceArgs,
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
    /// Data loader threads: `auto` (1 for the synthetic set, held in memory; for a dataset
    /// decoded from disk a quarter of the cores with --device cpu, all but one (<= 8) on a
    /// GPU) or a number >= 1.
    #[arg(long, default_value_t = Workers::Auto)]
    pub workers: Workers,
    /// Batches queued per loader thread.
    #[arg(long, default_value_t = 4)]
    pub prefetch: usize,
    #[command(flatten)]
    pub backbone: BackboneArgs,
    /// Read the loss and gradient norm on the host every N steps (default: 1 on the CPU, 20
    /// on CUDA, where a read per step makes the host wait for the GPU every step). The
    /// steps of a window are logged (log.jsonl), monitored and judged by the guard when it
    /// is read, in order; the progress bar shows the last loss read. Also read before every
    /// evaluation, checkpoint and signal stop. Not part of the run's config.
    #[arg(long, value_name = "N")]
    pub log_every: Option<usize>,
}

impl CommonArgs {
    /// `--log-every`, or its default for `device` (1 on the CPU, 20 on CUDA).
    pub fn log_every(&self, device: &Device) -> usize {
        log_every_default(self.log_every, device)
    }
}

/// `--log-every`'s value, or its default for `device`: 1 on the CPU (every step read at
/// once, as before the flag), 20 on CUDA.
pub fn log_every_default(flag: Option<usize>, device: &Device) -> usize {
    flag.unwrap_or(if device.is_cuda() { 20 } else { 1 }).max(1)
}

#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// Norm: bn, frozen-bn, gn, gn:G, ws-gn, ws-gn:G.
    #[arg(long, value_parser = parse_norm, default_value = "gn")]
    pub norm: NormKind,
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
    #[command(flatten)]
    pub resume: ResumeArgs,
    /// Pretrained weights (safetensors): twin names for the twin (BatchNorms converted to
    /// --norm), a torchvision checkpoint written by scripts/torchvision_to_safetensors.py for
    /// --backbone resnet* (BatchNorms kept, frozen or converted to --backbone-norm; the
    /// first missing, misshapen or unexpected key is an error before anything is written).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Sleep this long after every step (tests use it to kill a run mid-way).
    #[arg(long, hide = true)]
    pub step_delay_ms: Option<u64>,
    /// Inject a fault (the guard's fault table and tests): none, lr-burst@STEP[*F],
    /// nan-batch@STEP, poison-labels@STEP[*F], huge-lr[*F] (keel::train::fault).
    #[arg(long, hide = true, value_name = "SPEC")]
    pub fault: Option<keel::train::fault::FaultPlan>,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Everything that defines a run; saved as `config.json` in the output directory and in
/// every checkpoint, so `--resume` continues with exactly these settings. The choices
/// serialize as their text forms, and the old spellings (`"amp": "off"`) still read.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunConfig {
    pub norm: NormKind,
    pub batch_size: usize,
    pub steps: usize,
    pub seed: u64,
    /// The loop settings (flattened: config.json stays one flat object).
    #[serde(flatten)]
    pub train: LoopConfig,
    pub width: usize,
    pub fpn: usize,
    pub image_size: usize,
    pub num_classes: Option<usize>,
    pub data_dir: Option<PathBuf>,
    pub train_size: usize,
    pub val_size: usize,
    /// `auto` or a number (configs saved before `auto` hold a number).
    pub workers: Workers,
    pub prefetch: usize,
    pub init: Option<PathBuf>,
    /// `--backbone` and its flags (absent from configs saved before them, and from a twin
    /// run's: the twin).
    #[serde(flatten)]
    pub backbone: BackboneArgs,
}

impl CommonArgs {
    /// A run config with these settings and the run-specific ones. A --warmup-steps that
    /// does not fit `steps` is lowered to `steps - 1` (see [`LoopArgs::warmup_warning`]).
    pub fn config(&self, norm: NormKind, batch_size: usize, steps: usize, seed: u64) -> RunConfig {
        RunConfig {
            norm,
            batch_size,
            steps,
            seed,
            train: self.train.config(steps),
            width: self.width,
            fpn: self.fpn,
            image_size: self.image_size,
            num_classes: self.num_classes,
            data_dir: self.data_dir.clone(),
            train_size: self.train_size,
            val_size: self.val_size,
            workers: self.workers,
            prefetch: self.prefetch,
            init: None,
            backbone: self.backbone.clone(),
        }
    }
}

impl RunConfig {
    /// The optimizer and schedule: the kind's defaults unless --lr / --weight-decay.
    pub fn recipe(&self) -> OptimRecipe {
        self.train.recipe(self.steps)
    }

    pub fn num_classes(&self) -> usize {
        let default = if self.data_dir.is_some() {
            21
        } else {
            SHAPE_CLASSES.len()
        };
        self.num_classes.unwrap_or(default)
    }

    pub fn model(&self) -> ModelConfig {
        ModelConfig {
            width: self.width,
            fpn: self.fpn,
            num_classes: self.num_classes(),
            norm: self.norm,
        }
    }

    /// Checks every setting before anything is created or written.
    pub fn validate(&self) -> anyhow::Result<()> {
        keel::train::check_at_least_1(&[
            ("--batch-size", self.batch_size),
            ("--steps", self.steps),
        ])?;
        if self.image_size < 32 {
            bail!(
                "--image-size {} is too small: the encoder downsamples by 32",
                self.image_size
            )
        }
        self.train.validate(self.steps)?;
        if self.data_dir.is_none() {
            if let Some(n) = self.num_classes.filter(|&n| n != SHAPE_CLASSES.len()) {
                bail!("--num-classes {n}: the synthetic shapes set has {} classes ({}); --num-classes is for --data-dir", SHAPE_CLASSES.len(), SHAPE_CLASSES.join(", "))
            }
            if self.train_size == 0 || self.val_size == 0 {
                bail!("--train-size and --val-size must be at least 1")
            }
        }
        if let Some(p) = self.init.as_ref().filter(|p| !p.is_file()) {
            bail!("--init {}: no such file", p.display())
        }
        self.validate_model()?;
        Ok(())
    }
}

/// Reads a saved RunConfig (`config.json` of a run, or a compare job's file).
pub fn read_config(path: &std::path::Path) -> anyhow::Result<RunConfig> {
    Ok(keel::train::cli::read_config(path, "seg_train")?)
}

impl ResumableConfig for RunConfig {
    fn steps(&self) -> usize {
        self.steps
    }

    fn set_steps(&mut self, steps: usize) {
        self.steps = steps;
    }

    fn absent(key: &str) -> Option<serde_json::Value> {
        (key == "backbone").then(|| serde_json::json!("twin"))
    }
}

/// Parses `args` (program name first) and runs.
pub fn run(args: Vec<String>) -> anyhow::Result<()> {
    let matches = Cli::command().try_get_matches_from(args).map_err(|e| {
        use clap::error::ErrorKind;
        if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
            let _ = e.print();
            std::process::exit(0);
        }
        anyhow::anyhow!("{e}")
    })?;
    let cli = Cli::from_arg_matches(&matches).map_err(|e| anyhow::anyhow!("{e}"))?;
    match cli.command {
        Some(Command::Compare(c)) => compare::run(&c),
        Some(Command::Bench(b)) => bench::run(&b).map(drop),
        Some(Command::RunConfig {
            config,
            out,
            dev,
            log_every,
        }) => {
            let cfg = read_config(&config)?;
            let device = dev.setup("seg_train")?;
            let opts = RunOptions {
                log_every: log_every_default(log_every, &device),
                progress: false,
                verbose: false,
                ..RunOptions::new("seg_train")
            };
            let s = train::run(&cfg, &out, None, &device, opts)?;
            Ok(s.check_not_stopped()?)
        }
        None => {
            let t = cli.train;
            let c = &t.common;
            let device = c.dev.setup("seg_train")?;
            let opts = RunOptions {
                log_every: c.log_every(&device),
                progress: !t.quiet,
                step_delay: t.step_delay_ms.map(Duration::from_millis),
                fault: t.fault.unwrap_or_default(),
                ..RunOptions::new("seg_train")
            };
            let (cfg, out, resume) = match t.resume.run_dir()? {
                Some(dir) => {
                    let (cfg, found) = resume_plan(&t, &dir, &matches, &device)?;
                    (cfg, dir, Some(found))
                }
                None => {
                    if let Some(w) = t.common.train.warmup_warning(t.steps) {
                        eprintln!("seg_train: warning: {w}");
                    }
                    let cfg = t.common.config(t.norm, t.batch_size, t.steps, t.seed);
                    (
                        RunConfig {
                            init: t.init.clone(),
                            ..cfg
                        }
                        .with_backbone_defaults(),
                        t.out.clone(),
                        None,
                    )
                }
            };
            let s = train::run(&cfg, &out, resume, &device, opts)?;
            Ok(s.check_not_stopped()?)
        }
    }
}
