//! One training run: data, model, optimizer, the step loop with evaluation, JSONL logs,
//! checkpoints, exact resume and the health report.
use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use candle::{DType, Device, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use keel::norm::NormKind;
use keel::optim::{
    clip_grad_norm, split_no_decay, AdamW, AdamWConfig, Cosine, DynOptimizer, Ema, EmaConfig,
    EmaWarmup, GradAccumulator, GradScaler, GradScalerConfig, LrSchedule, Poly, Sgd, SgdConfig,
    StateDict, Warmup,
};
use keel::train::{
    load_checkpoint, Alarm, Checkpoint, CheckpointManager, ConfusionMatrix, EvalRecord,
    HealthReport, JsonlLogger, MonitorConfig, RunContext, StabilityMonitor, StepRecord,
};
use serde::{Deserialize, Serialize};

use super::data::{self, Loader, Shapes, Source, Voc, IGNORE, SHAPE_CLASSES};
use super::model::{count_params, init_weights, ModelConfig, SegNet};

/// Everything that defines a run; saved as `config.json` in the output directory and in
/// every checkpoint, so `--resume` continues with exactly these settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunConfig {
    pub norm: String,
    pub batch_size: usize,
    pub steps: usize,
    pub seed: u64,
    pub optimizer: String,
    /// Base LR; `None` = the optimizer's default (SGD 0.05, AdamW 1e-3).
    pub lr: Option<f64>,
    pub weight_decay: Option<f64>,
    pub warmup_steps: usize,
    pub clip_grad: Option<f64>,
    pub amp: String,
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
}

impl RunConfig {
    pub fn norm_kind(&self) -> anyhow::Result<NormKind> {
        self.norm
            .parse::<NormKind>()
            .with_context(|| format!("--norm {}", self.norm))
    }

    pub fn lr(&self) -> f64 {
        self.lr.unwrap_or(if self.optimizer == "adamw" {
            1e-3
        } else {
            0.05
        })
    }

    pub fn weight_decay(&self) -> f64 {
        self.weight_decay.unwrap_or(if self.optimizer == "adamw" {
            0.05
        } else {
            1e-4
        })
    }

    pub fn num_classes(&self) -> usize {
        self.num_classes.unwrap_or(if self.data_dir.is_some() {
            21
        } else {
            SHAPE_CLASSES.len()
        })
    }

    pub fn model(&self) -> anyhow::Result<ModelConfig> {
        Ok(ModelConfig {
            width: self.width,
            fpn: self.fpn,
            num_classes: self.num_classes(),
            norm: self.norm_kind()?,
        })
    }

    /// Checks every setting before anything is created or written.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.batch_size == 0 {
            bail!("--batch-size must be at least 1 (got 0)")
        }
        if self.steps == 0 {
            bail!("--steps must be at least 1")
        }
        if self.accum_steps == 0 {
            bail!("--accum-steps must be at least 1 (1 = no accumulation)")
        }
        if self.eval_every == 0 || self.ckpt_every == 0 {
            bail!("--eval-every and --ckpt-every must be at least 1")
        }
        if self.keep_last == 0 {
            bail!("--keep-last must be at least 1")
        }
        if self.image_size < 32 {
            bail!(
                "--image-size {} is too small: the encoder downsamples by 32",
                self.image_size
            )
        }
        if !["sgd", "adamw"].contains(&self.optimizer.as_str()) {
            bail!("--optimizer {}: expected sgd or adamw", self.optimizer)
        }
        if !["off", "f16", "bf16"].contains(&self.amp.as_str()) {
            bail!("--amp {}: expected off, f16 or bf16", self.amp)
        }
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
            if let Some(n) = self.num_classes {
                if n != SHAPE_CLASSES.len() {
                    bail!("--num-classes {n}: the synthetic shapes set has {} classes ({}); --num-classes is for --data-dir", SHAPE_CLASSES.len(), SHAPE_CLASSES.join(", "))
                }
            }
            if self.train_size == 0 || self.val_size == 0 {
                bail!("--train-size and --val-size must be at least 1")
            }
        }
        if let Some(p) = &self.init {
            if !p.is_file() {
                bail!("--init {}: no such file", p.display())
            }
        }
        self.model()?.validate()?;
        if self.norm_kind()? == NormKind::BatchNorm {
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

/// How a run is driven (not part of its identity).
pub struct RunOpts {
    pub device: Device,
    pub progress: bool,
    /// Print the health report and per-eval lines.
    pub verbose: bool,
}

/// The outcome of a run, for the `compare` grid.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunSummary {
    pub final_miou: f64,
    pub final_pixel_acc: f64,
    pub losses: Vec<(usize, f64)>,
    pub evals: Vec<(usize, f64)>,
    pub grad_norms: Vec<f64>,
    pub loss_spikes: usize,
    pub nonfinite_steps: usize,
    pub skipped_steps: usize,
    pub seconds_per_step: f64,
    pub verdict: String,
}

#[derive(Serialize, Deserialize)]
struct StepLog {
    kind: &'static str,
    step: usize,
    loss: f64,
    lr: f64,
    grad_norm: Option<f64>,
    loss_scale: Option<f64>,
    skipped: bool,
    seconds: f64,
}

#[derive(Serialize)]
struct EvalLog<'a> {
    kind: &'static str,
    step: usize,
    miou: f64,
    pixel_acc: f64,
    iou: &'a [Option<f64>],
    classes: &'a [String],
    ema: bool,
}

/// SGD or AdamW behind one interface (state dicts included).
enum Opt {
    Sgd(Sgd),
    AdamW(AdamW),
}

impl Opt {
    fn set_lr(&mut self, lr: f64) -> candle::Result<()> {
        match self {
            Opt::Sgd(o) => o.set_learning_rate(lr),
            Opt::AdamW(o) => o.set_learning_rate(lr),
        }
    }
    fn state_dict(&self) -> candle::Result<HashMap<String, Tensor>> {
        match self {
            Opt::Sgd(o) => o.state_dict(),
            Opt::AdamW(o) => o.state_dict(),
        }
    }
    fn load_state_dict(&mut self, st: &HashMap<String, Tensor>) -> candle::Result<()> {
        match self {
            Opt::Sgd(o) => o.load_state_dict(st),
            Opt::AdamW(o) => o.load_state_dict(st),
        }
    }
}

/// Mean cross-entropy over the pixels whose target is not 255 (PyTorch's
/// `F.cross_entropy(logits, target, ignore_index=255)`), computed in f32.
pub fn cross_entropy_ignore(logits: &Tensor, target: &Tensor) -> candle::Result<Tensor> {
    let c = logits.dim(1)?;
    let logits = logits.to_dtype(DType::F32)?;
    let logp =
        candle_nn::ops::log_softmax(&logits.permute((0, 2, 3, 1))?.reshape(((), c))?, D::Minus1)?;
    let t = target.flatten_all()?;
    let keep = t.ne(IGNORE as u32)?;
    let safe = keep.where_cond(&t, &t.zeros_like()?)?;
    let picked = logp.gather(&safe.unsqueeze(1)?, 1)?.squeeze(1)?;
    let keep = keep.to_dtype(DType::F32)?;
    let count = keep.sum_all()?.maximum(1f32)?;
    (picked * &keep)?.sum_all()?.neg()?.div(&count)
}

/// The compute dtype of `--amp`.
fn amp_dtype(amp: &str) -> DType {
    match amp {
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        _ => DType::F32,
    }
}

/// Train source, val source, class names.
type Sources = (Arc<dyn Source>, Arc<dyn Source>, Vec<String>);

/// Builds the data sources (train, val) and the class names.
fn sources(cfg: &RunConfig) -> anyhow::Result<Sources> {
    match &cfg.data_dir {
        Some(dir) => {
            let n = cfg.num_classes();
            let train = Voc::open(dir, "train", n)?;
            let val = Voc::open(dir, "val", n)?;
            Ok((
                Arc::new(train),
                Arc::new(val),
                (0..n).map(|i| format!("class{i}")).collect(),
            ))
        }
        None => {
            let train = Shapes::generate(cfg.train_size, cfg.image_size, data::SHAPES_TRAIN_SEED);
            let val = Shapes::generate(cfg.val_size, cfg.image_size, data::SHAPES_VAL_SEED);
            Ok((
                Arc::new(train),
                Arc::new(val),
                SHAPE_CLASSES.iter().map(|s| s.to_string()).collect(),
            ))
        }
    }
}

/// Loads `--init` weights: BatchNorm entries are converted to the run's norm with
/// keel::norm::convert; tensors whose names match the model are loaded (shapes must agree,
/// except for the classifier `head.*`, skipped when the class count differs).
fn load_init(vm: &VarMap, path: &Path, kind: NormKind, device: &Device) -> anyhow::Result<String> {
    use keel::norm::convert::{bn_to_frozen_bn, bn_to_group_norm, find_batch_norms};
    let mut sd = candle::safetensors::load(path, device)
        .with_context(|| format!("--init {}: cannot read safetensors", path.display()))?;
    let has_bn = !find_batch_norms(&sd).is_empty();
    let converted = match kind {
        NormKind::FrozenBatchNorm if has_bn => bn_to_frozen_bn(&mut sd, None)?.len(),
        NormKind::GroupNorm { .. } | NormKind::WsGroupNorm { .. } if has_bn => {
            bn_to_group_norm(&mut sd, None)?.len()
        }
        _ => 0,
    };
    sd.retain(|k, _| !k.ends_with(".num_batches_tracked"));
    let data = vm.data().lock().unwrap_or_else(|e| e.into_inner());
    let (mut loaded, mut skipped) = (0, Vec::new());
    for (name, var) in data.iter() {
        let Some(t) = sd.get(name) else { continue };
        if t.dims() != var.dims() {
            if name.starts_with("head.") {
                skipped.push(name.clone());
                continue;
            }
            bail!("--init {}: '{name}' has shape {:?}, the model's is {:?} (same --width/--fpn as the checkpoint?)", path.display(), t.dims(), var.dims())
        }
        var.set(&t.to_dtype(var.dtype())?)?;
        loaded += 1;
    }
    if loaded == 0 {
        bail!("--init {}: no tensor name matches the model (expected twin names such as stem.0.weight)", path.display())
    }
    let unused = sd.keys().filter(|k| !data.contains_key(*k)).count();
    Ok(format!(
        "--init: loaded {loaded}/{} tensors ({converted} BatchNorms converted to {kind}, {} head tensors skipped, {unused} checkpoint tensors unused)",
        data.len(),
        skipped.len()
    ))
}

/// Sorted (name, var) pairs of the VarMap.
fn named_vars(vm: &VarMap) -> Vec<(String, Var)> {
    let data = vm.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Rewrites `path` keeping only the records with `step <= last` (a resumed run re-logs the
/// steps after its checkpoint); atomic (temp file + rename).
fn truncate_log(path: &Path, last: usize) -> anyhow::Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path)?;
    let mut kept = String::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        }; // a torn last line
        if v.get("step")
            .and_then(|s| s.as_u64())
            .is_some_and(|s| s as usize <= last)
        {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    let tmp = path.with_extension("jsonl.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(kept.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Checks that `out` can be created and written, leaving nothing behind when it cannot.
pub fn check_writable(out: &Path) -> anyhow::Result<()> {
    let existed = out.exists();
    std::fs::create_dir_all(out)
        .with_context(|| format!("--out {}: cannot create the directory", out.display()))?;
    let probe = out.join(".seg_train_write_probe");
    let res = std::fs::write(&probe, b"ok");
    let _ = std::fs::remove_file(&probe);
    if let Err(e) = res {
        if !existed {
            let _ = std::fs::remove_dir(out);
        }
        bail!("--out {}: not writable: {e}", out.display())
    }
    Ok(())
}

struct Evaluation {
    miou: f64,
    pixel_acc: f64,
    iou: Vec<Option<f64>>,
}

fn evaluate(
    model: &SegNet,
    val: &dyn Source,
    cfg: &RunConfig,
    dev: &Device,
    dtype: DType,
) -> anyhow::Result<Evaluation> {
    let mut cm = ConfusionMatrix::new(cfg.num_classes(), Some(IGNORE as u32))?;
    for b in data::eval_batches(val, cfg.batch_size.max(8), cfg.image_size) {
        let (x, t) = b?.to_tensors(dev)?;
        let logits = model.forward(&x.to_dtype(dtype)?, false)?;
        let pred = logits.argmax(1)?;
        cm.update(&pred, &t)?;
    }
    Ok(Evaluation {
        miou: cm.miou(),
        pixel_acc: cm.pixel_accuracy(),
        iou: cm.iou(),
    })
}

/// Trains (or resumes) a run in `out`. With `resume`, `cfg` is read from the checkpoint.
pub fn run(
    cfg: &RunConfig,
    out: &Path,
    resume: bool,
    opts: &RunOpts,
) -> anyhow::Result<RunSummary> {
    cfg.validate()?;
    let dev = &opts.device;
    if cfg.amp == "bf16" && dev.is_cpu() {
        bail!("--amp bf16 needs --device cuda: candle 0.11's CPU backend has no bf16 matmul/conv (use --amp f16 or off on CPU)")
    }
    let kind = cfg.norm_kind()?;
    let mcfg = cfg.model()?;
    // Everything that can fail on bad input happens before the first file is written.
    let (train_src, val_src, class_names) = sources(cfg)?;
    let vm = VarMap::new();
    let master = SegNet::new(&mcfg, VarBuilder::from_varmap(&vm, DType::F32, dev))?;
    init_weights(&vm, cfg.seed)?;
    let init_msg = match &cfg.init {
        Some(p) => Some(load_init(&vm, p, kind, dev)?),
        None => None,
    };
    let named = named_vars(&vm);
    let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
    let groups = split_no_decay(&vm);
    let mut opt = match cfg.optimizer.as_str() {
        "adamw" => Opt::AdamW(AdamW::with_groups(
            groups,
            AdamWConfig {
                lr: cfg.lr(),
                weight_decay: cfg.weight_decay(),
                ..Default::default()
            },
        )?),
        _ => Opt::Sgd(Sgd::with_groups(
            groups,
            SgdConfig {
                lr: cfg.lr(),
                momentum: 0.9,
                weight_decay: cfg.weight_decay(),
                ..Default::default()
            },
        )?),
    };
    let main_steps = cfg.steps - cfg.warmup_steps;
    let inner: Box<dyn LrSchedule> = match cfg.optimizer.as_str() {
        "adamw" => Box::new(Cosine::new(cfg.lr(), main_steps, 0.0)?),
        _ => Box::new(Poly::new(cfg.lr(), main_steps, 0.9)?),
    };
    let schedule: Box<dyn LrSchedule> = match cfg.warmup_steps {
        0 => inner,
        w => Box::new(Warmup::linear(inner, w, 0.001)?),
    };
    let mut scaler = match cfg.amp.as_str() {
        "f16" => Some(GradScaler::new(GradScalerConfig::default())?),
        _ => None,
    };
    let mut ema = match cfg.ema_decay {
        d if d > 0.0 => Some(Ema::new(
            vars.clone(),
            EmaConfig {
                decay: d,
                warmup: EmaWarmup::Tf,
            },
        )?),
        _ => None,
    };
    let mut monitor = StabilityMonitor::new(MonitorConfig::default());
    let mut accum = GradAccumulator::new(cfg.accum_steps)?;

    if !resume && out.join("config.json").exists() {
        bail!(
            "--out {} already holds a run; continue it with --resume {} or pick another --out",
            out.display(),
            out.display()
        )
    }
    check_writable(out)?;
    let ckpt_dir = out.join("checkpoints");
    let mut manager = CheckpointManager::new(&ckpt_dir, cfg.keep_last)?;
    let log_path = out.join("log.jsonl");
    let mut start = 0usize;
    let mut summary = RunSummary::default();
    if resume {
        // The newest file by name; `latest()` skips files whose header is not valid.
        let newest = std::fs::read_dir(&ckpt_dir)
            .map(|rd| {
                let mut v: Vec<PathBuf> = rd
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with("ckpt-") && n.ends_with(".safetensors"))
                    })
                    .collect();
                v.sort();
                v.pop()
            })
            .unwrap_or(None);
        let Some(path) = manager.latest()? else {
            match newest {
                Some(bad) => {
                    let why = load_checkpoint(&bad, dev)
                        .err()
                        .map(|e| e.to_string())
                        .unwrap_or_default();
                    bail!("--resume {}: no valid checkpoint; the newest, {}, is corrupt or truncated: {why}", out.display(), bad.display())
                }
                None => bail!(
                    "--resume {}: no checkpoint in {}",
                    out.display(),
                    ckpt_dir.display()
                ),
            }
        };
        if let Some(bad) = newest.filter(|n| *n != path) {
            eprintln!(
                "warning: skipping {} (corrupt or truncated); resuming from {}",
                bad.display(),
                path.display()
            );
        }
        let ck = load_checkpoint(&path, dev)?;
        restore(
            &ck,
            &named,
            &mut opt,
            scaler.as_mut(),
            ema.as_mut(),
            &mut monitor,
            &mut summary,
            &master,
        )
        .with_context(|| format!("restoring {}", path.display()))?;
        start = ck.step;
        truncate_log(&log_path, start.saturating_sub(1))?;
        if opts.verbose {
            eprintln!("resumed from {} at step {start}", path.display());
        }
    } else {
        std::fs::write(out.join("config.json"), serde_json::to_string_pretty(cfg)?)?;
    }
    let mut logger = if resume {
        JsonlLogger::append(&log_path)?
    } else {
        JsonlLogger::create(&log_path)?
    };
    if opts.verbose {
        let p = count_params(&vm);
        eprintln!(
            "seg_train: norm {kind}, width {}, fpn {}, {:.2} M params, {} classes, batch {} x accum {}, {} steps, {} {} lr {}, amp {}, device {:?}",
            cfg.width, cfg.fpn, p as f64 / 1e6, cfg.num_classes(), cfg.batch_size, cfg.accum_steps, cfg.steps, cfg.optimizer,
            if cfg.optimizer == "adamw" { "cosine" } else { "poly 0.9" }, cfg.lr(), cfg.amp, dev.location()
        );
        if let Some(m) = &init_msg {
            eprintln!("{m}");
        }
    }

    let dtype = amp_dtype(&cfg.amp);
    let build = |dt: DType| -> anyhow::Result<Option<SegNet>> {
        Ok(match dt {
            DType::F32 => None,
            _ => Some(SegNet::new(
                &mcfg,
                keel::optim::mixed::cast_var_builder(&vm, dt, dev),
            )?),
        })
    };
    let pb = if opts.progress {
        let pb = indicatif::ProgressBar::new(cfg.steps as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} {msg} {per_sec} ETA {eta}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        pb.set_position(start as u64);
        pb
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut loader = Loader::new(
        train_src.clone(),
        cfg.batch_size,
        cfg.image_size,
        cfg.seed,
        start * cfg.accum_steps,
        cfg.steps * cfg.accum_steps,
        cfg.workers,
        cfg.prefetch,
    );
    // Test knob: slow each step down so a test can SIGKILL the process mid-run.
    let step_delay = std::env::var("SEG_TRAIN_STEP_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    let t_run = Instant::now();
    let mut window_losses = Vec::new();
    for step in start..cfg.steps {
        let t0 = Instant::now();
        let lr = schedule.lr(step);
        opt.set_lr(lr)?;
        let mut loss_sum = 0.0;
        let mut grads = None;
        for _ in 0..cfg.accum_steps {
            let batch = loader.next().context("data loader ended early")??;
            let (x, t) = batch.to_tensors(dev)?;
            let cast = build(dtype)?;
            let model = cast.as_ref().unwrap_or(&master);
            let logits = model.forward(&x.to_dtype(dtype)?, true)?;
            if let Some(c) = &cast {
                // BN running statistics were updated on the cast copy: write them back.
                copy_bn_stats(&vm, c)?;
            }
            let loss = cross_entropy_ignore(&logits, &t)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            let mut l = accum.scale_loss(&loss)?;
            if let Some(s) = &scaler {
                l = s.scale(&l)?;
            }
            grads = accum.accumulate(l.backward()?)?;
        }
        let loss = loss_sum / cfg.accum_steps as f64;
        let mut grads = grads.context("accumulation did not complete")?;
        let found_inf = match scaler.as_mut() {
            Some(s) => s.unscale(&mut grads, &vars)?,
            None => false,
        };
        let grad_norm =
            clip_grad_norm(&mut grads, &vars, cfg.clip_grad.unwrap_or(f32::MAX as f64))?;
        let skipped = found_inf || !grad_norm.is_finite() || !loss.is_finite();
        let stepped = match scaler.as_mut() {
            Some(s) => {
                let o: &mut dyn DynOptimizer = match &mut opt {
                    Opt::Sgd(o) => o,
                    Opt::AdamW(o) => o,
                };
                let stepped = !skipped && s.step(o, &mut grads, &vars)?;
                s.update(!stepped);
                stepped
            }
            None => {
                if !skipped {
                    match &mut opt {
                        Opt::Sgd(o) => o.step(&grads)?,
                        Opt::AdamW(o) => o.step(&grads)?,
                    }
                }
                !skipped
            }
        };
        if stepped {
            if let Some(e) = ema.as_mut() {
                e.update()?;
            }
        }
        let loss_scale = scaler.as_ref().map(|s| s.current_scale());
        let rec = StepRecord {
            step,
            loss,
            grad_norm: Some(grad_norm),
            loss_scale,
            skipped: !stepped,
        };
        for alarm in monitor.record_step(&rec) {
            match alarm {
                Alarm::LossSpike { .. } => summary.loss_spikes += 1,
                Alarm::NonFinite { .. } => summary.nonfinite_steps += 1,
                Alarm::SkippedStep { .. } => summary.skipped_steps += 1,
                _ => {}
            }
            if opts.verbose {
                pb.suspend(|| eprintln!("monitor: {alarm}"));
            }
        }
        if let Some(ms) = step_delay {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        let seconds = t0.elapsed().as_secs_f64();
        logger.log(&StepLog {
            kind: "step",
            step,
            loss,
            lr,
            grad_norm: Some(grad_norm),
            loss_scale,
            skipped: !stepped,
            seconds,
        })?;
        summary.losses.push((step, loss));
        summary.grad_norms.push(grad_norm);
        window_losses.push(loss);
        pb.set_message(format!("loss {loss:.4} lr {lr:.2e}"));
        pb.inc(1);

        let last = step + 1 == cfg.steps;
        let mut metric = None;
        if (step + 1) % cfg.eval_every == 0 || last {
            let cast = build(dtype)?;
            let e = evaluate(
                cast.as_ref().unwrap_or(&master),
                val_src.as_ref(),
                cfg,
                dev,
                dtype,
            )?;
            let train_loss = (!window_losses.is_empty())
                .then(|| window_losses.iter().sum::<f64>() / window_losses.len() as f64);
            window_losses.clear();
            logger.log(&EvalLog {
                kind: "eval",
                step,
                miou: e.miou,
                pixel_acc: e.pixel_acc,
                iou: &e.iou,
                classes: &class_names,
                ema: false,
            })?;
            for alarm in monitor.record_eval(&EvalRecord {
                step,
                miou: e.miou,
                pixel_acc: e.pixel_acc,
                train_loss,
            }) {
                if opts.verbose {
                    pb.suspend(|| eprintln!("monitor: {alarm}"));
                }
            }
            if opts.verbose {
                pb.suspend(|| {
                    eprintln!(
                        "step {:>6}: val mIoU {:.4}, pixel acc {:.4}",
                        step + 1,
                        e.miou,
                        e.pixel_acc
                    )
                });
            }
            summary.evals.push((step + 1, e.miou));
            summary.final_miou = e.miou;
            summary.final_pixel_acc = e.pixel_acc;
            metric = Some(e.miou);
        }
        if (step + 1) % cfg.ckpt_every == 0 || last {
            let ck = snapshot(
                step + 1,
                cfg,
                &named,
                &opt,
                scaler.as_ref(),
                ema.as_ref(),
                &monitor,
                &summary,
            )?;
            manager.save(&ck, metric)?;
        }
    }
    drop(loader);
    pb.finish_and_clear();
    let ran = cfg.steps - start;
    summary.seconds_per_step = if ran > 0 {
        t_run.elapsed().as_secs_f64() / ran as f64
    } else {
        0.0
    };

    if let Some(e) = ema.as_ref() {
        // Evaluate the averaged weights too (the training weights are restored after).
        let backup: Vec<Tensor> = vars
            .iter()
            .map(|v| v.as_tensor().copy())
            .collect::<candle::Result<_>>()?;
        e.copy_to_vars()?;
        let cast = build(dtype)?;
        let ev = evaluate(
            cast.as_ref().unwrap_or(&master),
            val_src.as_ref(),
            cfg,
            dev,
            dtype,
        )?;
        for (v, b) in vars.iter().zip(backup) {
            v.set(&b)?;
        }
        logger.log(&EvalLog {
            kind: "eval",
            step: cfg.steps - 1,
            miou: ev.miou,
            pixel_acc: ev.pixel_acc,
            iou: &ev.iou,
            classes: &class_names,
            ema: true,
        })?;
        if opts.verbose {
            eprintln!(
                "EMA weights: val mIoU {:.4}, pixel acc {:.4}",
                ev.miou, ev.pixel_acc
            );
        }
    }

    let ctx = RunContext {
        norm: kind,
        batch_size: cfg.batch_size,
        pretrained: cfg.init.is_some(),
        lr: cfg.lr(),
        clip_grad: cfg.clip_grad,
        precision: cfg.amp.parse()?,
        steps: cfg.steps,
    };
    let report: HealthReport = monitor.report(&ctx);
    write_atomic(
        &out.join("health.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    summary.verdict = format!("{:?}", report.verdict);
    if opts.verbose {
        println!("{}", report.to_text());
        println!(
            "final val mIoU {:.4}, pixel accuracy {:.4}; {:.3} s/step; artifacts in {}",
            summary.final_miou,
            summary.final_pixel_acc,
            summary.seconds_per_step,
            out.display()
        );
    }
    write_atomic(
        &out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    Ok(summary)
}

/// Copies the BatchNorm running statistics of a cast (mixed-precision) model into the f32
/// master variables.
fn copy_bn_stats(vm: &VarMap, cast: &SegNet) -> anyhow::Result<()> {
    let data = vm.data().lock().unwrap_or_else(|e| e.into_inner());
    for (name, bn) in cast.batch_norms() {
        for (k, t) in [
            ("running_mean", bn.running_mean()),
            ("running_var", bn.running_var()),
        ] {
            let var = data
                .get(&format!("{name}.{k}"))
                .with_context(|| format!("no variable {name}.{k}"))?;
            var.set(&t.to_dtype(DType::F32)?)?;
        }
    }
    Ok(())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The checkpoint after `step` steps: model weights under their PyTorch names, optimizer
/// (`optim.*`), scaler (`scaler.*`) and EMA (`ema.*`) state, and in the meta the config,
/// the monitor, the curves so far and the RNG state. All randomness is derived from
/// `(seed, step)` (see data.rs), so the RNG state is the seed and the step.
#[allow(clippy::too_many_arguments)] // reason: everything a checkpoint holds
fn snapshot(
    step: usize,
    cfg: &RunConfig,
    named: &[(String, Var)],
    opt: &Opt,
    scaler: Option<&GradScaler>,
    ema: Option<&Ema>,
    monitor: &StabilityMonitor,
    summary: &RunSummary,
) -> anyhow::Result<Checkpoint> {
    let mut ck = Checkpoint::new(step);
    // Model weights under their plain PyTorch names (a twin's load_state_dict(strict=False)
    // takes the file as is); the rest under prefixes.
    ck.extend_prefixed(
        "",
        named
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone())),
    );
    ck.extend_prefixed("optim.", opt.state_dict()?);
    if let Some(s) = scaler {
        ck.extend_prefixed("scaler.", s.state_dict()?);
    }
    if let Some(e) = ema {
        ck.extend_prefixed("ema.", e.state_dict()?);
    }
    ck.meta = serde_json::json!({
        "format": "keel seg_train checkpoint v1",
        "config": cfg,
        "monitor": monitor,
        "summary": summary,
        "rng": { "seed": cfg.seed, "step": step, "scheme": "ChaCha8 per (seed, epoch) sample order and per (seed, sample) augmentation" },
    });
    Ok(ck)
}

#[allow(clippy::too_many_arguments)] // reason: everything a checkpoint restores
fn restore(
    ck: &Checkpoint,
    named: &[(String, Var)],
    opt: &mut Opt,
    scaler: Option<&mut GradScaler>,
    ema: Option<&mut Ema>,
    monitor: &mut StabilityMonitor,
    summary: &mut RunSummary,
    _model: &SegNet,
) -> anyhow::Result<()> {
    for (k, v) in named {
        let t = ck.tensors.get(k).with_context(|| {
            format!("checkpoint has no '{k}': was it written by a run with another --norm/--width?")
        })?;
        if t.dims() != v.dims() {
            bail!(
                "checkpoint '{k}' has shape {:?}, the model's is {:?}",
                t.dims(),
                v.dims()
            )
        }
        v.set(&t.to_dtype(v.dtype())?.to_device(v.device())?)?;
    }
    opt.load_state_dict(&ck.prefixed("optim."))?;
    if let Some(s) = scaler {
        s.load_state_dict(&ck.prefixed("scaler."))?;
    }
    if let Some(e) = ema {
        e.load_state_dict(&ck.prefixed("ema."))?;
    }
    *monitor =
        serde_json::from_value(ck.meta["monitor"].clone()).context("checkpoint meta: monitor")?;
    *summary =
        serde_json::from_value(ck.meta["summary"].clone()).context("checkpoint meta: summary")?;
    Ok(())
}

/// Reads the config saved with a run.
pub fn saved_config(dir: &Path) -> anyhow::Result<RunConfig> {
    let p = dir.join("config.json");
    let text = std::fs::read_to_string(&p).with_context(|| {
        format!(
            "--resume {}: no config.json (is this a seg_train --out directory?)",
            dir.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a seg_train config", p.display()))
}
