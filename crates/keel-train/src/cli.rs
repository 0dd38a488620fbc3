//! Command-line parts that every keel trainer shares (feature `clap`): the loop flags
//! ([`LoopArgs`] -> [`LoopConfig`]), the device flags ([`DeviceArgs`]), `--resume`
//! ([`ResumeArgs`], [`plan_resume`]) and the rendering of [`Advice`] as those flags.
//!
//! seg_train and det_train use the same flag names for the same things, so a user who knows
//! one knows the other. This module is for programs that build such a command line; the
//! rest of keel-train never names a flag.
//!
//! `--resume` works the same in every trainer: a run directory holds `config.json` and
//! `checkpoints/`, and each checkpoint's meta holds the run's config at `user.config` (put it
//! there with [`crate::TrainState::snapshot`]'s `user` argument). [`plan_resume`] finds the
//! checkpoint (the newest that verifies, or the named file), checks `config.json` against
//! the checkpoint's config (or recovers it from the checkpoint), checks the flags given on
//! the command line against it (only `--steps` may change, to extend a run) and returns the
//! config to continue with. Every check happens before anything is built or written.
use std::path::{Path, PathBuf};

use candle::Device;
use clap::parser::ValueSource;
use clap::ArgMatches;
use serde::de::DeserializeOwned;
use serde::Serialize;

use keel_optim::{OptimizerKind, Precision};

use crate::{
    changed_fields, load_latest_checkpoint, Advice, FieldChange, GuardPolicy, LoopConfig, Resume,
};

/// `--device`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    /// The CPU.
    Cpu,
    /// CUDA device 0 (an error when the binary has no CUDA or no device is usable).
    Cuda,
}

/// `--device`: cpu, cuda (an error without a usable CUDA device), or the default (`None`):
/// cuda when compiled in and usable, else cpu, saying why on stderr when CUDA is compiled in
/// but fails to initialise.
pub fn pick_device(want: Option<DeviceChoice>) -> candle::Result<Device> {
    match want {
        Some(DeviceChoice::Cpu) => Ok(Device::Cpu),
        Some(DeviceChoice::Cuda) => {
            if !candle::utils::cuda_is_available() {
                candle::bail!(
                    "--device cuda: this binary was built without CUDA; rebuild with --features cuda"
                )
            }
            Device::new_cuda(0).map_err(|e| {
                candle::Error::Msg(format!("--device cuda: no usable CUDA device: {e}"))
            })
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

/// [`pick_device`], prepared for training ([`keel_kernels::prepare_device`]: freed CUDA
/// memory stays in the device's pool), with `--deterministic` and `--tf32` set process-wide
/// (they change CUDA convolutions and matmuls only; `tool` prints a note saying so on the CPU),
/// and candle's own CPU pool at one thread unless `CANDLE_NUM_THREADS` is set
/// ([`crate::threads::candle_pool_single_thread`]: its barrier spins against keel's threads).
/// Call it before any tensor op.
pub fn setup_device(
    tool: &str,
    want: Option<DeviceChoice>,
    deterministic: bool,
    tf32: bool,
) -> candle::Result<Device> {
    crate::threads::candle_pool_single_thread();
    let dev = pick_device(want)?;
    keel_kernels::set_conv_deterministic(deterministic);
    keel_kernels::set_conv_tf32(tf32);
    candle::cuda::set_gemm_reduced_precision_f32(tf32);
    if (deterministic || tf32) && !dev.is_cuda() {
        eprintln!("{tool}: note: --deterministic and --tf32 change CUDA only; a CPU run is deterministic and true f32 already");
    }
    keel_kernels::prepare_device(&dev)?;
    Ok(dev)
}

/// The trainer flags that carry out `advice` (`--clip-grad`, `--lr`, `--norm`,
/// `--backbone-norm`, `--amp`,
/// `--init`, `--warmup-steps`), when flags can (keeping the best checkpoint is a choice of
/// file, not of flags).
///
/// ```
/// use keel_train::{cli::advice_flags, Advice};
/// let a = Advice::ClipGrad { at: 2.0, current: None, lr: 0.02 };
/// assert_eq!(advice_flags(&a).as_deref(), Some("--clip-grad 2.000"));
/// ```
pub fn advice_flags(advice: &Advice) -> Option<String> {
    let clip = |at: f64| format!("--clip-grad {at:.3}");
    match advice {
        Advice::SwitchNorm { to, .. } => Some(format!("--norm {to}")),
        Advice::SwitchBackboneNorm { to, .. } => Some(format!("--backbone-norm {to}")),
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

/// `--resume DIR` and `--resume-from FILE`: which run a command continues.
#[derive(clap::Args, Debug, Clone, Default, PartialEq)]
pub struct ResumeArgs {
    /// Continue the run in DIR from its newest valid checkpoint (a corrupt newer one is
    /// skipped with a warning), with the run's saved config. Other flags must match that
    /// config (an error names each one that differs), except --steps, which sets a new
    /// length: `--resume DIR --steps 40` extends a finished 20-step run to 40 steps. The LR
    /// schedule is then recomputed for the new length (warmup unchanged; the LR at step s is
    /// the new schedule's, so it rises again after the old schedule's end, like a warm
    /// restart). A missing config.json is recovered from the checkpoint.
    #[arg(long = "resume", id = "resume", value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Resume from this checkpoint file instead of the newest one (with --resume DIR, or
    /// alone for a file in a run's checkpoints/ folder).
    #[arg(long = "resume-from", id = "resume_from", value_name = "FILE")]
    pub from: Option<PathBuf>,
}

impl ResumeArgs {
    /// The run directory to resume: `--resume DIR`, or the run that `--resume-from FILE`'s
    /// `checkpoints/` folder belongs to; `None` for a fresh run.
    pub fn run_dir(&self) -> candle::Result<Option<PathBuf>> {
        match (&self.dir, &self.from) {
            (Some(dir), _) => Ok(Some(dir.clone())),
            (None, Some(file)) => {
                let run = file
                    .parent()
                    .filter(|p| p.file_name().is_some_and(|n| n == "checkpoints"))
                    .and_then(Path::parent);
                match run {
                    Some(run) => Ok(Some(run.to_path_buf())),
                    None => candle::bail!(
                        "--resume-from {}: the file is not in a run's checkpoints/ folder; name \
                         the run too: --resume DIR --resume-from {}",
                        file.display(),
                        file.display()
                    ),
                }
            }
            (None, None) => Ok(None),
        }
    }

    /// The checkpoint to continue `dir` from: `--resume-from`'s file, or the newest in
    /// `dir/checkpoints` that verifies (the newer ones skipped are in [`Resume::skipped`]).
    pub fn find_checkpoint(&self, dir: &Path, device: &Device) -> candle::Result<Resume> {
        if let Some(file) = &self.from {
            return Resume::from_file(file, device)
                .map_err(|e| msg(format!("--resume-from {}: {e}", file.display())));
        }
        let shown = dir.display();
        let ckpts = dir.join("checkpoints");
        load_latest_checkpoint(&ckpts, device)
            .map_err(|e| msg(format!("--resume {shown}: {e}")))?
            .ok_or_else(|| {
                msg(format!(
                    "--resume {shown}: no checkpoint in {}",
                    ckpts.display()
                ))
            })
    }
}

/// A trainer's run config as `--resume` handles it: saved as `config.json` and in every
/// checkpoint's meta at `user.config`; its serde field names are its flags' names with `_`
/// for `-` (`batch_size` is `--batch-size`).
pub trait ResumableConfig: Serialize + DeserializeOwned + Clone {
    /// Optimizer steps of the run.
    fn steps(&self) -> usize;
    /// Sets the run's length (`--steps` on `--resume` extends a run).
    fn set_steps(&mut self, steps: usize);
    /// The value a field that this config leaves out of its serialization stands for (a
    /// field skipped when it has its default, e.g. `backbone` for the default network), so
    /// messages show it; `None` shows "the default".
    fn absent(_key: &str) -> Option<serde_json::Value> {
        None
    }
}

/// The fields that differ between `a` and `b`, by key, in either direction: a field only one
/// side serializes counts, and reads as [`ResumableConfig::absent`] on the other side.
fn changed_either<C: ResumableConfig>(a: &C, b: &C) -> candle::Result<Vec<FieldChange>> {
    let mut changes = changed_fields(a, b)?;
    for c in changed_fields(b, a)? {
        if !changes.iter().any(|x| x.key == c.key) {
            changes.push(FieldChange {
                a: c.b,
                b: c.a,
                key: c.key,
            });
        }
    }
    for c in &mut changes {
        for v in [&mut c.a, &mut c.b] {
            if v.is_null() {
                *v = C::absent(&c.key).unwrap_or(serde_json::Value::Null);
            }
        }
    }
    changes.retain(|c| c.a != c.b);
    changes.sort_by(|x, y| x.key.cmp(&y.key));
    Ok(changes)
}

/// The flags of this module that drive a run without being part of its config
/// ([`ResumeArgs`], [`DeviceArgs`], and `out`, checked on its own): [`plan_resume`] never
/// compares them with the run's config.
pub const RUNTIME_FLAGS: [&str; 6] = [
    "resume",
    "resume_from",
    "device",
    "deterministic",
    "tf32",
    "out",
];

/// What [`plan_resume`] needs to know about the command line.
pub struct ResumeRequest<'a, C> {
    /// The program's name, in messages ("not a seg_train checkpoint?").
    pub tool: &'a str,
    /// The run directory ([`ResumeArgs::run_dir`]).
    pub dir: &'a Path,
    /// `--resume` / `--resume-from`.
    pub args: &'a ResumeArgs,
    /// The config the command line's flags would define for a fresh run.
    pub given: C,
    /// `--out` as given (checked against `dir` when given explicitly).
    pub out: &'a Path,
    /// The parsed command line: which flags the user gave explicitly.
    pub matches: &'a ArgMatches,
    /// The trainer's own flags that are not part of its config (`quiet`, ...): never
    /// compared. This module's ([`RUNTIME_FLAGS`]) are never compared either.
    pub not_config: &'a [&'a str],
}

/// What `--resume` continues with: the config (the run's, with `--steps` applied) and the
/// checkpoint.
pub struct ResumePlan<C> {
    /// The config to continue with.
    pub config: C,
    /// The checkpoint to restore.
    pub found: Resume,
}

/// Plans a resumed run; see the module docs. `warn` receives each warning as soon as it is
/// known (newer checkpoints skipped, a missing `config.json` recovered), also when a later
/// check fails. Errors name the directory, the file and every flag that differs from the
/// run's config, with the fix.
pub fn plan_resume<C: ResumableConfig>(
    req: ResumeRequest<'_, C>,
    device: &Device,
    mut warn: impl FnMut(&str),
) -> candle::Result<ResumePlan<C>> {
    let (dir, tool) = (req.dir, req.tool);
    let shown = dir.display();
    let found = req.args.find_checkpoint(dir, device)?;
    for (bad, why) in found.skipped.iter().zip(&found.skip_reasons) {
        warn(&format!(
            "skipping {} ({why}); resuming from {}",
            bad.display(),
            found.path.display()
        ));
    }
    let stored: C = serde_json::from_value(found.checkpoint.meta["user"]["config"].clone())
        .map_err(|e| {
            msg(format!(
                "--resume {shown}: {} holds no {tool} config in its meta (not a {tool} \
                 checkpoint?): {e}",
                found.path.display()
            ))
        })?;
    let config_path = dir.join("config.json");
    let mut cfg = if config_path.exists() {
        let file: C =
            read_config(&config_path, tool).map_err(|e| msg(format!("--resume {shown}: {e}")))?;
        check_config_file(&file, &stored, &found.path)
            .map_err(|e| msg(format!("--resume {shown}: {e}")))?;
        file
    } else {
        warn(&format!(
            "--resume {shown}: no config.json; recovered the run's config from {}",
            found.path.display()
        ));
        stored
    };
    let differ = flags_that_differ(&req, &cfg)?;
    if !differ.is_empty() {
        let one = differ.len() == 1;
        candle::bail!(
            "--resume {shown}: {} differ{} from the run's config; a resumed run keeps its \
             settings (only --steps may change, to extend it): drop {}, or start a new run \
             with another --out",
            differ.join(", "),
            if one { "s" } else { "" },
            if one { "it" } else { "them" }
        )
    }
    let at = found.checkpoint.step;
    let steps = req.given.steps();
    if explicit(req.matches, "steps") && steps != cfg.steps() {
        if steps <= at {
            candle::bail!(
                "--resume {shown} --steps {steps}: the checkpoint is at step {at}; pass a larger \
                 --steps to continue"
            )
        }
        cfg.set_steps(steps);
    }
    if at >= cfg.steps() {
        candle::bail!(
            "--resume {shown}: the run already finished its {} steps ({} is at step {at}); \
             extend it with --steps N (N > {at})",
            cfg.steps(),
            found.path.display()
        )
    }
    Ok(ResumePlan { config: cfg, found })
}

/// Reads a saved config (`config.json` of a run, or a job file).
pub fn read_config<C: DeserializeOwned>(path: &Path, tool: &str) -> candle::Result<C> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        msg(format!(
            "no {} (is this a {tool} --out directory?): {e}",
            path.display()
        ))
    })?;
    serde_json::from_str(&text)
        .map_err(|e| msg(format!("{}: not a {tool} config: {e}", path.display())))
}

/// `config.json` must be the config the checkpoint was trained with; only a larger `steps`
/// (an extension whose first checkpoint was not written yet) may differ.
fn check_config_file<C: ResumableConfig>(file: &C, stored: &C, ckpt: &Path) -> candle::Result<()> {
    let differ: Vec<String> = changed_either(file, stored)?
        .into_iter()
        .filter(|c| !(c.key == "steps" && file.steps() > stored.steps()))
        .map(|c| {
            let (key, a, b) = (c.key, FieldChange::show(&c.a), FieldChange::show(&c.b));
            format!("{key} (config.json {a}, checkpoint {b})")
        })
        .collect();
    if !differ.is_empty() {
        candle::bail!(
            "config.json differs from the config stored in {} in: {}; the checkpoint is what \
             the run trained with: restore config.json (or delete it, and it is recovered from \
             the checkpoint)",
            ckpt.display(),
            differ.join(", ")
        )
    }
    Ok(())
}

/// The flags the user gave whose value differs from `cfg` (`--steps` aside), as
/// `--flag value (the run has value)`.
fn flags_that_differ<C: ResumableConfig>(
    req: &ResumeRequest<'_, C>,
    cfg: &C,
) -> candle::Result<Vec<String>> {
    let mut differ = Vec::new();
    if explicit(req.matches, "out") && req.out != req.dir {
        differ.push(format!(
            "--out {} (the run is in {})",
            req.out.display(),
            req.dir.display()
        ));
    }
    // Sorted by name; a config field that is no flag of this command is not checked.
    for c in changed_either(&req.given, cfg)? {
        let id = c.key.as_str();
        let runtime = RUNTIME_FLAGS.contains(&id) || req.not_config.contains(&id);
        if runtime || id == "steps" || !explicit(req.matches, id) {
            continue;
        }
        let flag = c.key.replace('_', "-");
        differ.push(format!(
            "--{flag} {} (the run has {})",
            FieldChange::show(&c.a),
            FieldChange::show(&c.b)
        ));
    }
    Ok(differ)
}

/// Whether the user gave flag `id` on the command line (not its default).
fn explicit(matches: &ArgMatches, id: &str) -> bool {
    matches.ids().any(|i| i.as_str() == id)
        && matches.value_source(id) == Some(ValueSource::CommandLine)
}

fn msg(s: String) -> candle::Error {
    candle::Error::Msg(s)
}

/// The loop flags every keel trainer shares, as a clap group to `#[command(flatten)]`;
/// [`LoopArgs::config`] turns them into a [`LoopConfig`]. A trainer that wants other
/// defaults changes them on its `clap::Command` (`mut_arg("eval_every", |a|
/// a.default_value("500"))`).
#[derive(clap::Args, Debug, Clone)]
pub struct LoopArgs {
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
    /// Clip gradients to this global L2 norm (0 = off); a value near the p99 of a healthy
    /// run's grad norms bounds the spikes of small batches (the health report suggests one).
    #[arg(long, default_value_t = 2.0)]
    pub clip_grad: f64,
    /// Mixed precision: off (f32), f16 (with a GradScaler) or bf16 (CUDA only).
    #[arg(long, value_enum, default_value = "off")]
    pub amp: Precision,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub accum_steps: usize,
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
    /// On divergence: off (nothing, NaN steps applied too), skip (skip NaN/Inf steps only),
    /// rollback (restore the last good in-memory snapshot, skip the batches that led there,
    /// halve the LR; stop with an error after 3 interventions).
    #[arg(long, default_value_t = GuardPolicy::Rollback)]
    pub guard: GuardPolicy,
}

impl LoopArgs {
    /// The loop config for a run of `steps` steps: `--clip-grad 0` is off, `--ckpt-every`
    /// defaults to `--eval-every`, and a `--warmup-steps` that does not fit is lowered to
    /// `steps - 1` (see [`LoopArgs::warmup_warning`]).
    pub fn config(&self, steps: usize) -> LoopConfig {
        LoopConfig {
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
            ema_decay: self.ema_decay,
            guard: self.guard,
            no_decay: keel_optim::NoDecay::Rank,
        }
    }

    /// The warning for a `--warmup-steps` that [`LoopArgs::config`] lowers to fit `steps`.
    pub fn warmup_warning(&self, steps: usize) -> Option<String> {
        let used = self.warmup_steps.min(steps.saturating_sub(1));
        (used != self.warmup_steps && steps > 0).then(|| {
            format!(
                "--warmup-steps {} does not fit --steps {steps}: warming up for {used} steps instead (config.json records {used})",
                self.warmup_steps
            )
        })
    }
}

/// `--device`, `--deterministic` and `--tf32`: where a run computes, not part of its config
/// (a resumed run takes them again).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DeviceArgs {
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
}

impl DeviceArgs {
    /// [`setup_device`] with these flags; `tool` names the program in notes.
    pub fn setup(&self, tool: &str) -> candle::Result<Device> {
        setup_device(tool, self.device, self.deterministic, self.tf32)
    }

    /// These flags for a child process that is to run on `device` (the one this process
    /// picked): `--device cpu|cuda`, then `--deterministic` and `--tf32` when set.
    pub fn child_args(&self, device: &Device) -> Vec<String> {
        let mut args = vec![
            "--device".to_string(),
            if device.is_cpu() { "cpu" } else { "cuda" }.to_string(),
        ];
        args.extend(self.deterministic.then(|| "--deterministic".to_string()));
        args.extend(self.tf32.then(|| "--tf32".to_string()));
        args
    }
}

/// A training-step benchmark's flags for a PyTorch twin beside it (`--vs-torch`,
/// `--python`, `--twin-script`, `--torch-threads`) and its JSON output (`--json`); the
/// twin runs through [`crate::bench::run_twin_checked`].
#[derive(clap::Args, Debug, Clone)]
pub struct TwinArgs {
    /// Also time the PyTorch eager twin (python3 with torch) in this run and print the ratio.
    #[arg(long)]
    pub vs_torch: bool,
    /// The Python interpreter for --vs-torch.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// The PyTorch twin script for --vs-torch (default: the example's torch_twin.py in the
    /// source tree this binary was built from; give it where that tree is not present).
    #[arg(long, value_name = "FILE")]
    pub twin_script: Option<PathBuf>,
    /// CPU threads of the PyTorch twin (default: the threads keel's step uses).
    #[arg(long)]
    pub torch_threads: Option<usize>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

impl TwinArgs {
    /// `--twin-script`, or `default` (the example's twin in its source tree).
    pub fn script(&self, default: &Path) -> PathBuf {
        self.twin_script
            .clone()
            .unwrap_or_else(|| default.to_path_buf())
    }

    /// `--torch-threads`, or the threads keel's CPU ops use.
    pub fn threads(&self) -> usize {
        self.torch_threads
            .unwrap_or_else(candle::utils::get_num_threads)
    }
}
