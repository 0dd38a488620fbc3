//! Command line: `det_train [flags]`, `det_train --resume DIR`, and the [`DetConfig`] a
//! run is defined by. Flags mean what seg_train's flags of the same name mean.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, ValueEnum};
use keel::data::DET_SHAPE_CLASSES;
use keel::models::backbone::BackboneArgs;
use keel::norm::NormKind;
use keel::optim::Precision;
use keel::train::cli::{
    plan_resume, DeviceArgs, LoopArgs, ResumableConfig, ResumeArgs, ResumeRequest,
};
use keel::train::{LoopConfig, OptimRecipe, Resume};
use serde::{Deserialize, Serialize};

use super::bench::{self, BenchArgs};
use super::compare;
use super::model::DetModelConfig;
use super::train;
use keel::train::driver::RunOptions;

/// `--format` of a `--data-dir`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// Pascal VOC: `Annotations/*.xml`, `JPEGImages/*.jpg`, `ImageSets/Main/<split>.txt`.
    Voc,
    /// COCO: `annotations/instances_<split>.json` with images in `<split>/`.
    Coco,
}

#[derive(Parser, Debug)]
#[command(
    name = "det_train",
    after_help = "det_train bench [flags] [--bench-warmup N] [--bench-steps N] [--vs-torch] [--json FILE]: time the training step on one fixed batch (beside the PyTorch twin with --vs-torch)\ndet_train compare [--norms bn,gn,ws-gn] [--batch-sizes 1,2,8] [--seeds 3] [--jobs 2] [flags]: the norm x batch x seed grid (results.md, curves.png)",
    about = "FCOS object detection training with keel (synthetic shapes, Pascal VOC or COCO)"
)]
pub struct Cli {
    /// Backbone norm: bn, frozen-bn, gn, gn:G, ws-gn, ws-gn:G (the FCOS head is always GN;
    /// a ResNet --backbone takes --backbone-norm, whose default from scratch this is).
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
    #[command(flatten)]
    pub resume: ResumeArgs,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub train: LoopArgs,
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
    #[command(flatten)]
    pub backbone: BackboneArgs,
    /// Pretrained backbone weights for --backbone resnet*: a torchvision checkpoint
    /// (safetensors, as scripts/torchvision_to_safetensors.py and examples/pretrain_resnet.rs
    /// write it; BatchNorms kept, frozen or converted to --backbone-norm; the first missing,
    /// misshapen or unexpected key is an error before anything is written).
    #[arg(long)]
    pub init: Option<PathBuf>,
    #[command(flatten)]
    pub dev: DeviceArgs,
    /// Inject a fault (the guard's tests): none, lr-burst@STEP[*F], nan-batch@STEP,
    /// poison-labels@STEP[*F], huge-lr[*F] (keel::train::fault). Not part of the config.
    #[arg(long, hide = true, value_name = "SPEC")]
    pub fault: Option<keel::train::fault::FaultPlan>,
}

/// `--norm`: NormKind's text form.
pub use keel::models::backbone::parse_norm;

/// Everything that defines a run; saved as `config.json` and in every checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DetConfig {
    pub norm: NormKind,
    pub batch_size: usize,
    pub steps: usize,
    pub seed: u64,
    /// The loop settings (flattened: config.json stays one flat object).
    #[serde(flatten)]
    pub train: LoopConfig,
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
    /// `--init` (absent from a config without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
    /// `--backbone` and its flags, defaults resolved (absent from configs saved before them,
    /// and from a twin run's: the twin).
    #[serde(flatten)]
    pub backbone: BackboneArgs,
}

impl Cli {
    /// The run config these flags define, the backbone defaults resolved.
    pub fn config(&self) -> DetConfig {
        self.config_for(
            self.norm,
            self.backbone.backbone_norm,
            self.batch_size,
            self.seed,
        )
    }

    /// The run config of these flags with a compare grid's norm, backbone norm, batch size
    /// and seed, the backbone defaults resolved for them.
    pub fn config_for(
        &self,
        norm: NormKind,
        backbone_norm: Option<NormKind>,
        batch_size: usize,
        seed: u64,
    ) -> DetConfig {
        let backbone = BackboneArgs {
            backbone_norm,
            ..self.backbone.clone()
        };
        DetConfig {
            norm,
            batch_size,
            steps: self.steps,
            seed,
            train: self.train.config(self.steps),
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
            init: self.init.clone(),
            backbone: backbone.resolved(self.init.is_some(), norm),
        }
    }
}

impl DetConfig {
    /// The optimizer and schedule: the kind's defaults unless --lr / --weight-decay.
    pub fn recipe(&self) -> OptimRecipe {
        self.train.recipe(self.steps)
    }

    /// The detector's shape for `num_classes` classes.
    pub fn model(&self, num_classes: usize) -> DetModelConfig {
        DetModelConfig {
            width: self.width,
            fpn: self.fpn,
            head_convs: self.head_convs,
            num_classes,
            norm: self.norm,
            resnet: self.backbone.resnet(self.norm),
        }
    }

    /// P3's upper object size (see `--soi-base`).
    pub fn soi_base(&self) -> f32 {
        self.soi_base.unwrap_or(self.image_size as f32 / 8.0)
    }

    /// Checks every setting before anything is created or written.
    pub fn validate(&self) -> anyhow::Result<()> {
        keel::train::check_at_least_1(&[
            ("--batch-size", self.batch_size),
            ("--steps", self.steps),
            ("--head-convs", self.head_convs),
        ])?;
        if self.image_size < 32 {
            bail!(
                "--image-size {} is too small: the encoder downsamples by 32",
                self.image_size
            )
        }
        self.train.validate(self.steps)?;
        if let Some(b) = self.soi_base.filter(|b| !(b.is_finite() && *b > 0.0)) {
            bail!("--soi-base {b}: must be a positive number of pixels")
        }
        if self.data_dir.is_none() && (self.train_size == 0 || self.val_size == 0) {
            bail!("--train-size and --val-size must be at least 1")
        }
        if self.train.amp == Precision::Bf16 && !candle::utils::cuda_is_available() {
            bail!("--amp bf16 needs --device cuda: candle 0.11's CPU backend has no bf16 matmul/conv (use --amp f16 or off on CPU)")
        }
        let n = if self.data_dir.is_some() {
            2
        } else {
            DET_SHAPE_CLASSES.len()
        };
        self.model(n).norm.groups_for(self.fpn).context("--fpn")?;
        self.validate_backbone(n)
    }

    /// The backbone flags' checks (keel::models::backbone) and `--init`'s, and the ResNet's
    /// config and `--amp`.
    fn validate_backbone(&self, num_classes: usize) -> anyhow::Result<()> {
        self.backbone.validate()?;
        if let Some(p) = &self.init {
            if self.backbone.backbone.is_twin() {
                bail!("--init {}: det_train loads a torchvision checkpoint into a ResNet backbone (--backbone resnet18|resnet34|resnet50|resnet101); the twin trains from scratch", p.display())
            }
            if !p.is_file() {
                bail!("--init {}: no such file", p.display())
            }
        }
        let model = self.model(num_classes);
        if let Some(r) = &model.resnet {
            r.validate().context("--backbone-norm / --freeze-at")?;
        }
        Ok(model.check_dtype(self.train.amp.compute_dtype())?)
    }

    /// The backbone's LR multiplier (1 for the twin).
    pub fn backbone_lr_mult(&self) -> f64 {
        self.backbone.lr_mult()
    }
}

impl ResumableConfig for DetConfig {
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

/// det_train's flags that drive a run without being part of its config (keel::train::cli's
/// own, `--device` and the like, are never compared).
const NOT_CONFIG: [&str; 2] = ["quiet", "fault"];

/// det_train's command: keel's shared loop flags with det_train's defaults (AdamW, 50
/// warmup steps, clip at 5, an evaluation every 350 steps).
pub fn command() -> clap::Command {
    with_defaults(Cli::command())
}

/// `cmd` (det_train's flags, or a command that flattens them) with det_train's defaults.
pub fn with_defaults(cmd: clap::Command) -> clap::Command {
    cmd.mut_arg("optimizer", |a| a.default_value("adamw"))
        .mut_arg("warmup_steps", |a| a.default_value("50"))
        .mut_arg("clip_grad", |a| a.default_value("5"))
        .mut_arg("eval_every", |a| a.default_value("350"))
}

/// The config and checkpoint `--resume` continues (keel::train::cli::plan_resume).
fn resume_plan(
    cli: &Cli,
    dir: &Path,
    matches: &ArgMatches,
    dev: &candle::Device,
) -> anyhow::Result<(DetConfig, Resume)> {
    let req = ResumeRequest {
        tool: "det_train",
        dir,
        args: &cli.resume,
        given: cli.config(),
        out: &cli.out,
        matches,
        not_config: &NOT_CONFIG,
    };
    let plan = plan_resume(req, dev, |w| eprintln!("warning: {w}"))?;
    Ok((plan.config, plan.found))
}

/// Parses `argv` with `cmd`: `--help` prints and exits 0, an error is an error.
pub fn matches(cmd: clap::Command, argv: Vec<String>) -> anyhow::Result<ArgMatches> {
    cmd.try_get_matches_from(argv).map_err(|e| {
        use clap::error::ErrorKind;
        if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
            let _ = e.print();
            std::process::exit(0);
        }
        anyhow::anyhow!("{e}")
    })
}

/// `argv` parsed into `T` (det_train's flags or a command that flattens them) with
/// det_train's defaults ([`with_defaults`]).
pub fn parse<T: CommandFactory + FromArgMatches>(argv: Vec<String>) -> anyhow::Result<T> {
    let m = matches(with_defaults(T::command()), argv)?;
    T::from_arg_matches(&m).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Reads a saved DetConfig (`config.json` of a run, or a compare job's file).
pub fn read_config(path: &Path) -> anyhow::Result<DetConfig> {
    Ok(keel::train::cli::read_config(path, "det_train")?)
}

/// Parses `args` (program name first) and runs.
pub fn run(args: Vec<String>) -> anyhow::Result<()> {
    let sub = |name: &str| args.get(1).is_some_and(|a| a == name);
    if sub("compare") || sub("run-config") {
        let rest: Vec<String> = std::iter::once(args[0].clone())
            .chain(args[2..].iter().cloned())
            .collect();
        return match sub("compare") {
            true => compare::run(rest),
            false => compare::run_config(rest),
        };
    }
    if args.get(1).is_some_and(|a| a == "bench") {
        let rest = std::iter::once(args[0].clone()).chain(args[2..].iter().cloned());
        return bench::run(&parse::<BenchArgs>(rest.collect())?).map(drop);
    }
    let matches = matches(command(), args)?;
    let cli = Cli::from_arg_matches(&matches).map_err(|e| anyhow::anyhow!("{e}"))?;
    let device = cli.dev.setup("det_train")?;
    let opts = RunOptions {
        progress: !cli.quiet,
        fault: cli.fault.unwrap_or_default(),
        ..RunOptions::new("det_train")
    };
    let (cfg, out, resume) = match cli.resume.run_dir()? {
        Some(dir) => {
            let (cfg, found) = resume_plan(&cli, &dir, &matches, &device)?;
            (cfg, dir, Some(found))
        }
        None => {
            if let Some(w) = cli.train.warmup_warning(cli.steps) {
                eprintln!("det_train: warning: {w}");
            }
            (cli.config(), cli.out.clone(), None)
        }
    };
    let s = train::run(&cfg, &out, resume, &device, opts)?;
    Ok(s.run.check_not_stopped()?)
}
