//! One training run: det_train's [`Task`] (the FCOS detector's step on [`DetBatches`],
//! batches per `(seed, position)`, COCO evaluation) driven by keel-train's run driver
//! ([`keel::train::driver`]: the step loop with the guard, JSONL logs, evaluation and
//! checkpoint cadence, exact resume, graceful stop, health report and summary).
use std::path::Path;
use std::time::Instant;

use anyhow::bail;
use candle::{Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use keel::data::{DetBatches, DetHostBatch};
use keel::det::coco_eval::CocoGt;
use keel::det::fcos::{fcos_loss, prepare_targets, FcosLossConfig, FcosTargetConfig, GtBoxes};
use keel::models::backbone::{load_torchvision_init, BACKBONE_PREFIX};
use keel::models::seg::count_params;
use keel::optim::Precision;
use keel::train::driver::{
    EvalAt, Evaluation, MicroBatches, Run, RunEnd, RunOptions, RunSpec, Task, TaskContext,
};
use keel::train::fault::FaultPlan;
use keel::train::{named_vars, Resume, RunSummary, TrainState};
use serde::{Deserialize, Serialize};

use super::cli::DetConfig;
use super::data::{augment, DetData, PAD};
use super::eval::{evaluate, ground_truth, DetMetrics};
use super::model::{FcosNet, STRIDES};

/// The outcome of a run (summary.json): the loop's [`RunSummary`] (losses, grad norms,
/// alarms, guard; its `evals` and `final_miou` hold mAP@.5, `final_pixel_acc` mAP) and the
/// final evaluation.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DetSummary {
    /// Flattened: summary.json reads as a [`RunSummary`] too (the compare grid's children).
    #[serde(flatten)]
    pub run: RunSummary,
    /// The last evaluation's mAP @[.5:.95] and mAP @.5.
    #[serde(with = "keel::train::lossless_f64")]
    pub final_map: f64,
    #[serde(with = "keel::train::lossless_f64")]
    pub final_map50: f64,
    /// Wall time of the whole run (this session, data generation included), seconds.
    pub seconds: f64,
}

/// det_train's part of its checkpoints' meta (beside the config, summary and TrainState).
#[derive(Serialize, Deserialize)]
struct DetExtra {
    /// The next micro-batch to draw: batches depend only on `(seed, position)`, and a
    /// rollback of the guard moves past the batches that led to it, so the position is
    /// saved, not derived from the step.
    next_batch: usize,
}

/// The JSONL record of one evaluation.
#[derive(Serialize)]
struct DetEvalLog<'a> {
    kind: &'static str,
    step: usize,
    ema: bool,
    #[serde(flatten)]
    metrics: &'a DetMetrics,
}

/// det_train's [`Task`]: data, detector and COCO evaluation.
struct DetTask<'a> {
    cfg: &'a DetConfig,
    device: Device,
    data: DetData,
    gt: CocoGt,
    vm: VarMap,
    net: FcosNet,
    batches: DetBatches,
    next_batch: usize,
    /// The last evaluation of the training weights (printed at the end).
    last: Option<DetMetrics>,
    t_start: Instant,
    /// The run's wall time, taken once when the summary is first built, so that
    /// summary.json and the returned summary (printed) hold the same number.
    seconds: std::cell::Cell<Option<f64>>,
}

impl Task for DetTask<'_> {
    type Extra = DetExtra;

    fn extra(&self, _: usize) -> DetExtra {
        DetExtra {
            next_batch: self.next_batch,
        }
    }

    fn restore_extra(&mut self, extra: DetExtra) -> candle::Result<()> {
        self.next_batch = extra.next_batch;
        Ok(())
    }

    fn seek(&mut self, _: usize) -> candle::Result<()> {
        Ok(()) // the position is `next_batch`, restored with the checkpoint
    }

    /// Forward, FCOS targets and loss per micro-batch.
    fn micro_batches(&mut self, step: usize, fault: FaultPlan) -> candle::Result<MicroBatches<'_>> {
        let (cfg, dev, net, vm) = (self.cfg, &self.device, &self.net, &self.vm);
        let (batches, next) = (&mut self.batches, &mut self.next_batch);
        let classes = self.data.classes.len();
        Ok(Box::new(move |_| {
            let hb = batches.batch(*next)?;
            *next += 1;
            let loss = micro_loss(cfg, net, vm, classes, &hb, dev)?;
            // A NaN batch poisons the loss it leads to (the FCOS loss is no cross-entropy of
            // the inputs: NaN inputs and a NaN loss both make every gradient NaN).
            fault.poison_inputs(step, &loss)
        }))
    }

    /// mAP@.5 is the run's metric (the monitor's regression test, the best checkpoint).
    fn evaluate(&mut self, at: EvalAt) -> candle::Result<Evaluation> {
        let m = match at.weights_finite {
            false => DetMetrics::nan(&self.data.classes),
            true => evaluate(
                &self.net,
                &self.vm,
                self.cfg,
                self.data.val.as_ref(),
                &self.gt,
                &self.device,
            )?,
        };
        let record = serde_json::value::to_raw_value(&DetEvalLog {
            kind: "eval",
            step: at.step,
            ema: at.ema,
            metrics: &m,
        })
        .map_err(candle::Error::wrap)?;
        let e = Evaluation {
            metric: m.map50,
            secondary: m.map,
            record,
            line: format!("val mAP@.5 {:.4}, mAP@[.5:.95] {:.4}", m.map50, m.map),
        };
        if !at.ema {
            self.last = Some(m);
        }
        Ok(e)
    }

    /// With a ResNet backbone, `norm` is the head's GroupNorm and `backbone_norm` the
    /// backbone's (judged by `pretrained`); the twin has one norm.
    fn context(&self) -> TaskContext {
        let cfg = self.cfg;
        let model = cfg.model(self.data.classes.len());
        TaskContext {
            norm: model.resnet.map_or(cfg.norm, |_| model.head_norm()),
            batch_size: cfg.batch_size,
            pretrained: cfg.init.is_some(),
            backbone_norm: model.resnet.map(|r| r.norm),
        }
    }

    fn summary_record(&self, s: &RunSummary) -> candle::Result<serde_json::Value> {
        serde_json::to_value(self.det_summary(s)).map_err(candle::Error::wrap)
    }
}

impl DetTask<'_> {
    fn det_summary(&self, s: &RunSummary) -> DetSummary {
        DetSummary {
            run: s.clone(),
            final_map: s.final_pixel_acc,
            final_map50: s.final_miou,
            seconds: self.seconds.get().unwrap_or_else(|| {
                let secs = self.t_start.elapsed().as_secs_f64();
                self.seconds.set(Some(secs));
                secs
            }),
        }
    }
}

/// The run's banner (stderr).
fn banner(t: &DetTask, device: &Device) {
    let (cfg, r) = (t.cfg, t.cfg.recipe());
    let model = cfg.model(t.data.classes.len());
    let backbone = match &model.resnet {
        None => format!("backbone norm {}, width {}", cfg.norm, cfg.width),
        Some(m) => format!(
            "backbone {} ({}; norm {}, freeze_at {}, lr x{})",
            m.depth,
            cfg.init
                .as_ref()
                .map_or("from scratch".into(), |p| format!("init {}", p.display())),
            m.norm,
            m.freeze_at,
            cfg.backbone_lr_mult()
        ),
    };
    eprintln!(
        "det_train: FCOS P3-P5, {backbone}, fpn {}, head convs {}, {:.2} M params, {} classes, {} train / {} val images of {}px, batch {} x accum {}, {} steps, {} {} lr {}, amp {}, device {:?}",
        cfg.fpn, cfg.head_convs, count_params(&t.vm) as f64 / 1e6, t.data.classes.len(),
        t.data.train.len(), t.data.val.len(), cfg.image_size, cfg.batch_size, cfg.train.accum_steps, cfg.steps,
        cfg.train.optimizer, r.decay_name(), r.lr, cfg.train.amp, device.location()
    );
}

/// The trainable parts of a config: variables, the f32 master model and the train state.
/// A run and `det_train bench` build them the same way.
pub struct Net {
    pub vm: VarMap,
    pub net: FcosNet,
    pub state: TrainState,
}

impl Net {
    /// The detector for `num_classes` classes (seeded init, then a ResNet backbone's `--init`
    /// checkpoint, whose report line it prints) and its train state (the backbone's param
    /// groups at `--backbone-lr-mult`).
    pub fn build(cfg: &DetConfig, num_classes: usize, dev: &Device) -> anyhow::Result<Self> {
        if cfg.backbone.backbone.is_twin()
            && cfg.norm == keel::norm::NormKind::BatchNorm
            && cfg.train.amp == Precision::F16
            && dev.is_cpu()
        {
            bail!("--norm bn --amp f16 needs --device cuda: candle 0.11's BatchNorm has no f16 path on the CPU (use --norm gn / frozen-bn, or --amp off)")
        }
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, candle::DType::F32, dev);
        let model = cfg.model(num_classes);
        let net = FcosNet::new(&model, vb.clone())?;
        FcosNet::init(&vm, cfg.seed)?;
        if let (Some(r), Some(p)) = (&model.resnet, &cfg.init) {
            eprintln!(
                "{}",
                load_torchvision_init(p, r, &vm, vb.pp(BACKBONE_PREFIX), dev)?
            );
        }
        let train_cfg = cfg.train.train_config(Default::default());
        let groups = net.param_groups(&vm, cfg.backbone_lr_mult(), cfg.train.no_decay)?;
        let optimizer = cfg.recipe().optimizer(groups)?;
        let state = TrainState::new(named_vars(&vm), optimizer, &train_cfg)?;
        Ok(Self { vm, net, state })
    }
}

/// The boxes FCOS's targets are built from, per image of `hb`: ignored objects (VOC
/// difficult, COCO crowd) left out.
pub fn gt_boxes(hb: &DetHostBatch) -> Vec<GtBoxes> {
    (0..hb.n)
        .map(|k| {
            let idx: Vec<usize> = (0..hb.boxes[k].len())
                .filter(|&i| !hb.ignore[k][i])
                .collect();
            GtBoxes {
                boxes: idx.iter().map(|&i| hb.boxes[k][i]).collect(),
                classes: idx.iter().map(|&i| hb.classes[k][i]).collect(),
            }
        })
        .collect()
}

/// The FCOS loss of one micro-batch: forward (in the config's compute dtype), targets
/// (ignored objects, VOC difficult / COCO crowd, left out), focal + GIoU + centerness.
pub fn micro_loss(
    cfg: &DetConfig,
    net: &FcosNet,
    vm: &VarMap,
    num_classes: usize,
    hb: &DetHostBatch,
    dev: &Device,
) -> candle::Result<Tensor> {
    let gts = gt_boxes(hb);
    let x = Tensor::from_slice(&hb.images, (hb.n, 3, hb.height, hb.width), dev)?;
    let model = cfg.model(num_classes);
    let out = net.forward_in(&model, vm, &x, cfg.train.amp.compute_dtype(), true)?;
    let targets_cfg = FcosTargetConfig::with_base(&STRIDES, cfg.soi_base());
    let targets = prepare_targets(&out.feature_sizes()?, &gts, &targets_cfg, dev)?;
    fcos_loss(&out, &targets, &FcosLossConfig::default())?.total()
}

/// Trains (or resumes) a run in `out` on `device` and prints its final metrics. A
/// signal's stop is an error carrying [`keel::train::driver::Interrupted`] (exit 130 / 143).
pub fn run(
    cfg: &DetConfig,
    out: &Path,
    resume: Option<Resume>,
    device: &Device,
    opts: RunOptions,
) -> anyhow::Result<DetSummary> {
    let t_start = Instant::now();
    cfg.validate()?;
    let data = DetData::new(cfg, opts.progress)?;
    let gt = ground_truth(data.val.as_ref(), cfg, &data.classes)?;
    let Net { vm, net, state } = Net::build(cfg, data.classes.len(), device)?;
    let batches = DetBatches::new(
        data.train.clone(),
        augment(cfg, true),
        PAD,
        cfg.seed,
        cfg.batch_size,
    )?;
    let task = DetTask {
        cfg,
        device: device.clone(),
        data,
        gt,
        vm,
        net,
        batches,
        next_batch: 0,
        last: None,
        t_start,
        seconds: Default::default(),
    };
    let spec = RunSpec {
        config: cfg,
        format: "keel det_train checkpoint v1",
        steps: cfg.steps,
        train: &cfg.train,
    };
    // keel's shared advice flags name seg_train's meaning of --init and --norm; det_train's
    // differ (--init is a torchvision backbone), so the advice stays in words.
    let opts = RunOptions {
        advice_flags: None,
        ..opts
    };
    let mut run = Run::open(spec, task, state, out, resume, opts)?;
    banner(&run.task, device);
    let s = match run.train()? {
        RunEnd::Finished(s) => run.task.det_summary(&s),
        RunEnd::Interrupted(i) => return Err(i.into()),
    };
    if let Some(m) = &run.task.last {
        println!("{}", m.summary);
        for (name, ap, ap50) in &m.per_class {
            let show = |v: &Option<f64>| v.map_or("  n/a ".into(), |v| format!("{v:.4}"));
            println!("  {name:>12}: AP {} AP50 {}", show(ap), show(ap50));
        }
    }
    println!(
        "final val mAP@.5 {:.4}, mAP@[.5:.95] {:.4}; {:.1} s; artifacts in {}",
        s.final_map50,
        s.final_map,
        s.seconds,
        out.display()
    );
    Ok(s)
}
