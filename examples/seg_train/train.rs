//! One training run: seg_train's [`Task`] (the data, the model's step through the fused
//! cross-entropy, mIoU evaluation) driven by keel-train's run driver
//! ([`keel::train::driver`]: the step loop with the guard and `--log-every` windows, JSONL
//! logs, evaluation and checkpoint cadence, exact resume, graceful stop, health report and
//! summary).
use std::path::Path;

use anyhow::{bail, Context};
use candle::{Device, Tensor};
use candle_nn::VarMap;
use keel::kernels::{cross_entropy, CrossEntropyConfig, PinnedUpload};
use keel::models::seg::count_params;
use keel::models::seg_model::{SegModel, SegModelStep};
use keel::optim::Precision;
use keel::train::driver::{
    EvalAt, Evaluation, MicroBatches, Run, RunEnd, RunOptions, RunSpec, Task, TaskContext,
};
use keel::train::fault::FaultPlan;
use keel::train::{named_vars, progress_bar, EvalLog, MonitorConfig, Resume, SegEval, TrainState};
use serde::{Deserialize, Serialize};

use super::cli::RunConfig;
use super::data::{self, HostBatch, Loader, LoaderConfig, Source, Sources, IGNORE};
use super::model;
use super::output;

/// The outcome of a run (summary.json), for the `compare` grid.
pub use keel::train::RunSummary;

/// seg_train's part of its checkpoints' meta (beside the config, summary and TrainState).
#[derive(Serialize, Deserialize)]
struct SegExtra {
    /// All randomness derives from `(seed, step)` (see keel::data): the step restored by
    /// TrainState is the RNG position.
    rng: serde_json::Value,
}

/// The run's data; a `--data-dir` set is validated in full first (in parallel, with a
/// progress bar), before anything is written, failing with all bad files named at once.
fn sources(cfg: &RunConfig, progress: bool) -> anyhow::Result<Sources> {
    let Some(dir) = &cfg.data_dir else {
        return Ok(Sources::shapes(
            cfg.train_size,
            cfg.val_size,
            cfg.image_size,
        ));
    };
    let pb = progress_bar(progress, 0, 0);
    pb.set_message("checking --data-dir");
    let tick = |total: usize| {
        pb.set_length(total as u64);
        pb.inc(1)
    };
    let res = Sources::voc(dir, cfg.num_classes(), Some(&tick));
    pb.finish_and_clear();
    res.with_context(|| format!("--data-dir {}", dir.display()))
}

/// seg_train's [`Task`]: data, model and evaluation.
struct SegTask<'a> {
    cfg: &'a RunConfig,
    device: Device,
    data: Sources,
    vm: VarMap,
    master: SegModel,
    uploads: Uploads,
    /// The training batches from the current step on ([`Task::seek`]).
    loader: Option<Loader>,
}

/// A run's batch uploads: through page-locked buffers on CUDA ([`PinnedUpload`]).
#[derive(Default)]
struct Uploads {
    images: PinnedUpload<f32>,
    targets: PinnedUpload<u32>,
}

impl Uploads {
    /// `(images (n, 3, s, s) f32, targets (n, s, s) u32)` on `dev`, as
    /// `HostBatch::to_tensors`.
    fn batch(&mut self, b: &HostBatch, dev: &Device) -> candle::Result<(Tensor, Tensor)> {
        let (n, s) = (b.n, b.size);
        let x = self.images.upload(&b.images, (n, 3, s, s), dev)?;
        Ok((x, self.targets.upload(&b.targets, (n, s, s), dev)?))
    }
}

impl SegTask<'_> {
    /// The training data loader from optimizer step `step` on.
    fn loader_at(&self, step: usize) -> Loader {
        let cfg = self.cfg;
        Loader::new(
            self.data.train.clone(),
            LoaderConfig {
                batch: cfg.batch_size,
                size: cfg.image_size,
                seed: cfg.seed,
                start: step * cfg.train.accum_steps,
                end: cfg.steps * cfg.train.accum_steps,
                workers: cfg.workers.resolve(&*self.data.train, self.device.is_cpu()),
                prefetch: cfg.prefetch,
            },
        )
    }

    /// The validation metrics of the weights now in the variables (NaN for non-finite
    /// weights).
    fn seg_eval(&self, weights_finite: bool) -> candle::Result<SegEval> {
        let (cfg, dev) = (self.cfg, &self.device);
        if !weights_finite {
            return Ok(SegEval::nan(cfg.num_classes()));
        }
        let dtype = cfg.train.amp.compute_dtype();
        let cast = SegModel::cast_copy(&cfg.seg_model(), &self.vm, dtype, dev)?;
        let model = cast.as_ref().unwrap_or(&self.master);
        let val = self.data.val.as_ref();
        let batches = data::eval_batches(val, cfg.batch_size.max(8), cfg.image_size)
            .map(|b| b?.to_tensors(dev));
        SegEval::evaluate(batches, cfg.num_classes(), Some(IGNORE as u32), |x| {
            model.forward(&x.to_dtype(dtype)?, false)
        })
    }
}

impl Task for SegTask<'_> {
    type Extra = SegExtra;

    fn extra(&self, steps_done: usize) -> SegExtra {
        SegExtra {
            rng: serde_json::json!({ "seed": self.cfg.seed, "step": steps_done, "scheme": "ChaCha8 per (seed, epoch) sample order and per (seed, sample) augmentation" }),
        }
    }

    fn restore_extra(&mut self, _: SegExtra) -> candle::Result<()> {
        Ok(()) // the data position is the restored step
    }

    fn seek(&mut self, step: usize) -> candle::Result<()> {
        self.loader = Some(self.loader_at(step));
        Ok(())
    }

    /// All micro-batches of a step run one network cast once for the step (`--amp`).
    fn micro_batches(&mut self, step: usize, fault: FaultPlan) -> candle::Result<MicroBatches<'_>> {
        let (cfg, dev) = (self.cfg, &self.device);
        let net = self.master.for_step(
            &cfg.seg_model(),
            &self.vm,
            cfg.train.amp.compute_dtype(),
            dev,
        )?;
        let (uploads, loader) = (&mut self.uploads, &mut self.loader);
        Ok(Box::new(move |_| {
            let batch = loader
                .as_mut()
                .and_then(|l| l.next())
                .ok_or_else(|| candle::Error::Msg("data loader ended early".into()))?;
            let (x, t) = uploads.batch(&batch?, dev)?;
            let x = fault.poison_inputs(step, &x)?;
            micro_loss(&net, &x, &t)
        }))
    }

    fn evaluate(&mut self, at: EvalAt) -> candle::Result<Evaluation> {
        let e = self.seg_eval(at.weights_finite)?;
        let record = serde_json::value::to_raw_value(&EvalLog {
            step: at.step,
            miou: e.miou,
            pixel_acc: e.pixel_acc,
            iou: &e.iou,
            classes: &self.data.classes,
            ema: at.ema,
        })
        .map_err(candle::Error::wrap)?;
        Ok(Evaluation {
            metric: e.miou,
            secondary: e.pixel_acc,
            record,
            line: format!("val mIoU {:.4}, pixel acc {:.4}", e.miou, e.pixel_acc),
        })
    }

    fn context(&self) -> TaskContext {
        let cfg = self.cfg;
        TaskContext {
            norm: cfg.norm,
            batch_size: cfg.batch_size,
            pretrained: cfg.init.is_some(),
            backbone_norm: cfg.backbone_norm(),
        }
    }
}

/// The run's banner (stderr).
fn banner(cfg: &RunConfig, vm: &VarMap, device: &Device, train: &dyn Source) {
    let r = cfg.recipe();
    let workers = cfg.workers.resolve(train, device.is_cpu());
    eprintln!(
        "seg_train: norm {}, width {}, fpn {}, {:.2} M params, {} classes, batch {} x accum {}, {} steps, {} {} lr {}, amp {}, device {:?}, loader threads {workers} (--workers {})",
        cfg.norm, cfg.width, cfg.fpn, count_params(vm) as f64 / 1e6, cfg.num_classes(), cfg.batch_size, cfg.train.accum_steps, cfg.steps, cfg.train.optimizer,
        r.decay_name(), r.lr, amp_label(cfg.train.amp), device.location(), cfg.workers
    );
}

/// The trainable parts of a config: variables, the f32 master model and the train state.
/// A run and `seg_train bench` build them the same way.
pub struct Net {
    pub vm: VarMap,
    pub master: SegModel,
    pub state: TrainState,
}

impl Net {
    /// Builds the model (seeded init, then `--init` weights if any) and its train state;
    /// returns the `--init` message to print.
    pub fn build(cfg: &RunConfig, dev: &Device) -> anyhow::Result<(Self, Option<String>)> {
        if cfg.train.amp == Precision::Bf16 && dev.is_cpu() {
            bail!("--amp bf16 needs --device cuda: candle 0.11's CPU backend has no bf16 matmul/conv (use --amp f16 or off on CPU)")
        }
        let vm = VarMap::new();
        let (master, init_msg) = model::build(cfg, &vm, dev)?;
        // A uniform prediction's cross-entropy: the monitor's reference for divergence.
        let train_cfg = cfg.train.train_config(MonitorConfig {
            reference_loss: Some((cfg.num_classes() as f64).ln()),
            ..Default::default()
        });
        let groups = master.param_groups(&vm, cfg.backbone_lr_mult(), cfg.train.no_decay)?;
        let optimizer = cfg.recipe().optimizer(groups)?;
        let state = TrainState::new(named_vars(&vm), optimizer, &train_cfg)?;
        Ok((Self { vm, master, state }, init_msg))
    }
}

/// Forward and loss of one micro-batch through the step's network ([`SegModel::for_step`]:
/// the f32 master model, or for mixed precision a copy cast from it once per optimizer
/// step, whose BatchNorm running statistics are written back to the master).
pub fn micro_loss(net: &SegModelStep, x: &Tensor, t: &Tensor) -> candle::Result<Tensor> {
    let logits = net.forward(x, true)?;
    let ignore = CrossEntropyConfig {
        ignore_index: Some(IGNORE as i64),
        weight: None,
    };
    cross_entropy(&logits, t, &ignore)
}

/// `--amp`'s label in logs and the report ("off" for f32, as the flag reads).
pub fn amp_label(p: Precision) -> String {
    match p {
        Precision::F32 => "off".into(),
        p => p.to_string(),
    }
}

/// Trains (or resumes) a run in `out` on `device`. With `resume` (the checkpoint to continue
/// from, see `cli::resume_plan`), `cfg` is the run's saved config. `opts` come from the
/// command line; the checkpoint save pause (a test knob, [`output::SAVE_PAUSE_ENV`]) is
/// added here. A signal's stop is an error carrying
/// [`keel::train::driver::Interrupted`] (exit 130 / 143).
pub fn run(
    cfg: &RunConfig,
    out: &Path,
    resume: Option<Resume>,
    device: &Device,
    opts: RunOptions,
) -> anyhow::Result<RunSummary> {
    cfg.validate()?;
    let data = sources(cfg, opts.progress)?;
    let (net, init_msg) = Net::build(cfg, device)?;
    let task = SegTask {
        cfg,
        device: device.clone(),
        data,
        vm: net.vm,
        master: net.master,
        uploads: Uploads::default(),
        loader: None,
    };
    let spec = RunSpec {
        config: cfg,
        format: "keel seg_train checkpoint v2",
        steps: cfg.steps,
        train: &cfg.train,
    };
    let opts = RunOptions {
        save_pause: output::save_pause()?,
        ..opts
    };
    let verbose = opts.verbose;
    let mut run = Run::open(spec, task, net.state, out, resume, opts)?;
    if verbose {
        banner(cfg, &run.task.vm, device, &*run.task.data.train);
        if let Some(m) = &init_msg {
            eprintln!("{m}");
        }
    }
    let s = match run.train()? {
        RunEnd::Finished(s) => s,
        RunEnd::Interrupted(i) => return Err(i.into()),
    };
    if verbose {
        println!(
            "final val mIoU {:.4}, pixel accuracy {:.4}; {:.3} s/step; artifacts in {}",
            s.final_miou,
            s.final_pixel_acc,
            s.seconds_per_step,
            out.display()
        );
    }
    Ok(s)
}
