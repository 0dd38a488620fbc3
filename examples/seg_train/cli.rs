//! Command line: `seg_train [train flags]`, `seg_train --resume DIR`, `seg_train compare ...`,
//! and the [`RunConfig`] a run is defined by.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use candle::Device;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use keel::models::seg::ModelConfig;
use keel::norm::NormKind;
use keel::optim::{OptimizerKind, Precision};
use keel::train::{Advice, GuardPolicy, OptimRecipe};
use serde::{Deserialize, Serialize};

use super::bench::{self, BenchArgs};
use super::compare::{self, CompareArgs};
use super::data::SHAPE_CLASSES;
use super::resume::{resume_dir, resume_plan};
use super::train::{self, RunOpts};

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
        #[arg(long, value_enum)]
        device: Option<DeviceChoice>,
        #[arg(long)]
        deterministic: bool,
        #[arg(long)]
        tf32: bool,
    },
}

/// `--norm`: NormKind's text form (bn, frozen-bn, gn, gn:G, ws-gn, ws-gn:G).
pub fn parse_norm(s: &str) -> Result<NormKind, String> {
    s.parse().map_err(|e: candle::Error| e.to_string())
}

/// Settings shared by a single run and the compare grid.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// Optimizer: sgd (momentum 0.9, poly 0.9) or adamw (cosine).
    #[arg(long, value_enum, default_value_t = OptimizerKind::Sgd)]
    pub optimizer: OptimizerKind,
    /// Base learning rate (default: sgd 0.05, adamw 1e-3).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Weight decay on conv weights (default: sgd 1e-4, adamw 0.05); norms and biases get none.
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Linear warmup steps (0 = off). At least one step short of --steps: a larger value is
    /// lowered to --steps - 1 with a warning, and config.json records the value used.
    #[arg(long, default_value_t = 200)]
    pub warmup_steps: usize,
    /// Clip gradients to this global L2 norm (0 = off). The default 2.0 is about the p99 of
    /// the healthy grad norms of the default run, where the monitor saw batch-2 grad norms
    /// spike above 10x their median.
    #[arg(long, default_value_t = 2.0)]
    pub clip_grad: f64,
    /// Mixed precision: off (f32), f16 (with a GradScaler) or bf16 (CUDA only).
    #[arg(long, value_enum, default_value = "off")]
    pub amp: Precision,
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
    /// Data loader threads (at least 1).
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
    /// cpu or cuda (default: cuda when compiled in and usable, else cpu).
    #[arg(long, value_enum)]
    pub device: Option<DeviceChoice>,
    /// CUDA: deterministic cuDNN convolution algorithms only, so one seed gives identical
    /// weights on the GPU too (slower backward; keel::kernels::set_conv_deterministic). The
    /// CPU is always deterministic. Not part of the run's config: pass it again on --resume.
    #[arg(long)]
    pub deterministic: bool,
    /// CUDA: TF32 tensor cores for f32 convolutions and matmuls (10-bit mantissa products;
    /// PyTorch's default for cuDNN convolutions, not keel's). Not part of the run's config.
    #[arg(long)]
    pub tf32: bool,
    /// On divergence: off (nothing, NaN steps applied too), skip (skip NaN/Inf steps only),
    /// rollback (restore the last good in-memory snapshot, skip the batches that led there,
    /// halve the LR; stop with an error after 3 interventions).
    #[arg(long, default_value_t = GuardPolicy::Rollback)]
    pub guard: GuardPolicy,
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
    /// Continue the run in DIR from its newest valid checkpoint (a corrupt newer one is
    /// skipped with a warning), with the run's saved config. Other flags must match that
    /// config (an error names each one that differs), except --steps, which sets a new
    /// length: `--resume DIR --steps 40` extends a finished 20-step run to 40 steps. The LR
    /// schedule is then recomputed for the new length (warmup unchanged; the LR at step s is
    /// the new schedule's, so it rises again after the old schedule's end, like a warm
    /// restart). A missing config.json is recovered from the checkpoint.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Resume from this checkpoint file instead of the newest one (with --resume DIR, or
    /// alone for a file in a run's checkpoints/ folder).
    #[arg(long, value_name = "FILE")]
    pub resume_from: Option<PathBuf>,
    /// Pretrained weights (safetensors, twin names); BatchNorms are converted to --norm.
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
    pub optimizer: OptimizerKind,
    /// Base LR; `None` = the optimizer's default (SGD 0.05, AdamW 1e-3).
    pub lr: Option<f64>,
    pub weight_decay: Option<f64>,
    pub warmup_steps: usize,
    pub clip_grad: Option<f64>,
    pub amp: Precision,
    pub accum_steps: usize,
    pub eval_every: usize,
    pub ckpt_every: usize,
    pub keep_last: usize,
    pub width: usize,
    pub fpn: usize,
    pub image_size: usize,
    pub num_classes: Option<usize>,
    pub data_dir: Option<PathBuf>,
    pub train_size: usize,
    pub val_size: usize,
    pub workers: usize,
    pub prefetch: usize,
    pub ema_decay: f64,
    pub init: Option<PathBuf>,
    /// `--guard`; configs saved before it existed read as rollback.
    #[serde(default)]
    pub guard: GuardPolicy,
}

impl CommonArgs {
    /// The warning for a --warmup-steps that [`CommonArgs::config`] lowers to fit `steps`.
    pub fn warmup_warning(&self, steps: usize) -> Option<String> {
        let used = self.warmup_steps.min(steps.saturating_sub(1));
        (used != self.warmup_steps && steps > 0).then(|| {
            format!(
                "--warmup-steps {} does not fit --steps {steps}: warming up for {used} steps instead (config.json records {used})",
                self.warmup_steps
            )
        })
    }

    /// A run config with these settings and the run-specific ones. A --warmup-steps that
    /// does not fit `steps` is lowered to `steps - 1` (see [`CommonArgs::warmup_warning`]).
    pub fn config(&self, norm: NormKind, batch_size: usize, steps: usize, seed: u64) -> RunConfig {
        RunConfig {
            norm,
            batch_size,
            steps,
            seed,
            optimizer: self.optimizer,
            lr: self.lr,
            weight_decay: self.weight_decay,
            warmup_steps: self.warmup_steps.min(steps.saturating_sub(1)),
            clip_grad: (self.clip_grad != 0.0).then_some(self.clip_grad),
            amp: self.amp,
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
            init: None,
            guard: self.guard,
        }
    }
}

impl RunConfig {
    /// The optimizer and schedule: the kind's defaults unless --lr / --weight-decay.
    pub fn recipe(&self) -> OptimRecipe {
        let r = OptimRecipe::new(self.optimizer, self.steps).with_warmup(self.warmup_steps);
        OptimRecipe {
            lr: self.lr.unwrap_or(r.lr),
            weight_decay: self.weight_decay.unwrap_or(r.weight_decay),
            ..r
        }
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
        let at_least_1 = [
            ("--batch-size", self.batch_size),
            ("--steps", self.steps),
            ("--accum-steps", self.accum_steps),
            ("--eval-every", self.eval_every),
            ("--ckpt-every", self.ckpt_every),
            ("--keep-last", self.keep_last),
            ("--workers", self.workers),
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
        self.validate_optimizer()?;
        if let Some(c) = self.clip_grad {
            if !(c.is_finite() && c > 0.0) {
                bail!("--clip-grad {c}: must be a positive number")
            }
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            bail!(
                "--ema-decay {}: must lie in [0, 1) (0 = off)",
                self.ema_decay
            )
        }
        if self.warmup_steps >= self.steps {
            bail!(
                "--warmup-steps {} must be smaller than --steps {}",
                self.warmup_steps,
                self.steps
            )
        }
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
        self.model().validate()?;
        if self.norm == NormKind::BatchNorm {
            // The smallest BN input is the last stage's: 5 stride-2 convs, each ceil(n / 2).
            let side = (0..5).fold(self.image_size, |n, _| n.div_ceil(2));
            if self.batch_size * side * side < 2 {
                bail!(
                    "--norm bn cannot train at --batch-size {} with --image-size {}: the last stage is {side}x{side}, one value per channel; use --norm gn or frozen-bn, a larger batch or image",
                    self.batch_size,
                    self.image_size
                )
            }
        }
        Ok(())
    }
}

impl RunConfig {
    /// --lr and --weight-decay: finite and positive (non-negative) in f32, the precision
    /// the optimizer computes in (1e39 is a finite f64 but an infinite f32: every weight
    /// would become NaN at the first step).
    fn validate_optimizer(&self) -> anyhow::Result<()> {
        let r = self.recipe();
        let fits_f32 = |x: f64| (x as f32).is_finite();
        // 1e39, not 1000000000000000000000000000000000000000.
        let show = |x: f64| match x.abs() {
            a if a != 0.0 && !(1e-4..1e6).contains(&a) => format!("{x:e}"),
            _ => x.to_string(),
        };
        if !(r.lr > 0.0 && fits_f32(r.lr)) {
            bail!(
                "--lr {}: must be a positive number below {:e} (the largest f32; the optimizer computes in f32)",
                show(r.lr),
                f32::MAX
            )
        }
        if !(r.weight_decay >= 0.0 && fits_f32(r.weight_decay)) {
            bail!(
                "--weight-decay {}: must be a non-negative number below {:e} (the largest f32)",
                show(r.weight_decay),
                f32::MAX
            )
        }
        Ok(())
    }
}

/// `--device`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DeviceChoice {
    Cpu,
    Cuda,
}

/// `--device`: cpu, cuda (an error without a usable CUDA device), or the default: cuda when
/// compiled in and usable, else cpu — saying why on stderr when CUDA is compiled in but fails.
pub fn pick_device(want: Option<DeviceChoice>) -> anyhow::Result<Device> {
    match want {
        Some(DeviceChoice::Cpu) => Ok(Device::Cpu),
        Some(DeviceChoice::Cuda) => {
            if !candle::utils::cuda_is_available() {
                bail!("--device cuda: this binary was built without CUDA; rebuild with --features cuda")
            }
            Device::new_cuda(0).context("--device cuda: no usable CUDA device")
        }
        None if candle::utils::cuda_is_available() => match Device::new_cuda(0) {
            Ok(d) => Ok(d),
            Err(e) => {
                eprintln!("warning: CUDA is compiled in but device 0 failed to initialise ({e}); training on the CPU (--device cpu silences this, --device cuda makes it an error)");
                Ok(Device::Cpu)
            }
        },
        None => Ok(Device::Cpu),
    }
}

/// [`pick_device`], prepared for training (keel keeps freed CUDA memory in the device's
/// pool), with `--deterministic` and `--tf32` set process-wide (they change CUDA
/// convolutions and matmuls only; a note says so on the CPU).
pub fn setup_device(
    want: Option<DeviceChoice>,
    deterministic: bool,
    tf32: bool,
) -> anyhow::Result<Device> {
    let dev = pick_device(want)?;
    keel::kernels::set_conv_deterministic(deterministic);
    keel::kernels::set_conv_tf32(tf32);
    candle::cuda::set_gemm_reduced_precision_f32(tf32);
    if (deterministic || tf32) && !dev.is_cuda() {
        eprintln!("seg_train: note: --deterministic and --tf32 change CUDA only; a CPU run is deterministic and true f32 already");
    }
    keel::kernels::prepare_device(&dev)?;
    Ok(dev)
}

/// The seg_train flags that carry out `advice`, when flags can (keeping the best checkpoint
/// is a choice of file, not of flags).
pub fn advice_flags(advice: &Advice) -> Option<String> {
    let clip = |at: f64| format!("--clip-grad {at:.3}");
    match advice {
        Advice::SwitchNorm { to, .. } => Some(format!("--norm {to}")),
        Advice::RestartWithLowerLr { to } => Some(format!("--init <best checkpoint> --lr {to}")),
        Advice::RestartBeforeDivergence { step, to, .. } => Some(format!(
            "--init <a checkpoint from before step {step}> --lr {to} --warmup-steps <a few hundred>"
        )),
        Advice::LowerLr { to, .. } => Some(format!("--lr {to}")),
        Advice::ClipGrad { at, .. } => Some(clip(*at)),
        Advice::GuardAgainstNan {
            clip_at, try_bf16, ..
        } => {
            let mut f: Vec<String> = clip_at.map(clip).into_iter().collect();
            if *try_bf16 {
                f.push("--amp bf16".into());
            }
            (!f.is_empty()).then(|| f.join(" "))
        }
        Advice::UseBf16 { .. } => Some("--amp bf16".into()),
        Advice::FixNonFiniteGrads { clip_at, .. } => clip_at.map(clip),
        Advice::KeepBestCheckpoint { .. } => None,
    }
}

/// Reads a saved RunConfig (`config.json` of a run, or a compare job's file).
pub fn read_config(path: &std::path::Path) -> anyhow::Result<RunConfig> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "no {} (is this a seg_train --out directory?)",
            path.display()
        )
    })?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: not a seg_train config", path.display()))
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
            device,
            deterministic,
            tf32,
        }) => {
            let cfg = read_config(&config)?;
            let device = setup_device(device, deterministic, tf32)?;
            let opts = RunOpts {
                log_every: log_every_default(None, &device),
                device,
                progress: false,
                verbose: false,
                step_delay: None,
                fault: Default::default(),
            };
            train::run(&cfg, &out, None, &opts).and_then(fail_if_stopped)
        }
        None => {
            let t = cli.train;
            let c = &t.common;
            let device = setup_device(c.device, c.deterministic, c.tf32)?;
            let opts = RunOpts {
                log_every: c.log_every(&device),
                device,
                progress: !t.quiet,
                verbose: true,
                step_delay: t.step_delay_ms.map(Duration::from_millis),
                fault: t.fault.unwrap_or_default(),
            };
            let (cfg, out, resume) = match resume_dir(&t)? {
                Some(dir) => {
                    let (cfg, found) = resume_plan(&t, &dir, &matches, &opts.device)?;
                    (cfg, dir, Some(found))
                }
                None => {
                    if let Some(w) = t.common.warmup_warning(t.steps) {
                        eprintln!("seg_train: warning: {w}");
                    }
                    let cfg = t.common.config(t.norm, t.batch_size, t.steps, t.seed);
                    (
                        RunConfig {
                            init: t.init.clone(),
                            ..cfg
                        },
                        t.out.clone(),
                        None,
                    )
                }
            };
            train::run(&cfg, &out, resume, &opts).and_then(fail_if_stopped)
        }
    }
}

/// A run the guard stopped is an error (a non-zero exit), after its report was written.
fn fail_if_stopped(s: train::RunSummary) -> anyhow::Result<()> {
    match s.guard_stopped_at {
        Some(step) => bail!(
            "the guard stopped the run at step {step}: it kept diverging after {} rollbacks (see health.json); lower --lr",
            s.guard_interventions.saturating_sub(1)
        ),
        None => Ok(()),
    }
}
