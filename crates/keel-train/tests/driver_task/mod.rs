//! A tiny [`Task`] for the run driver's tests: linear regression `y = x·w*` (4 features),
//! batches drawn from `(seed, position)` so a resumed or windowed run sees the same data,
//! evaluated on a fixed validation set (metric `1 / (1 + mse)`, higher is better).
#![allow(dead_code)] // each test binary uses part of it

use std::path::Path;

use candle::{DType, Device, Tensor};
use candle_nn::{Init, VarMap};
use keel_optim::{split_no_decay, OptimizerKind};
use keel_train::driver::{
    EvalAt, Evaluation, MicroBatches, Run, RunOptions, RunSpec, Task, TaskContext,
};
use keel_train::fault::FaultPlan;
use keel_train::{
    named_vars, CheckpointManager, Interrupt, LoopConfig, MonitorConfig, Resume, StopSignal,
    TrainState,
};
use serde::{Deserialize, Serialize};

use super::common::Noise;

pub const FEATURES: usize = 4;
pub const BATCH: usize = 8;
pub const STEPS: usize = 12;
const W_TRUE: [f32; FEATURES] = [1.5, -2.0, 0.5, 3.0];

/// The test run's config (written to config.json and the checkpoints).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Cfg {
    pub seed: u64,
    pub steps: usize,
    #[serde(flatten)]
    pub train: LoopConfig,
}

impl Cfg {
    pub fn new(steps: usize) -> Self {
        Self {
            seed: 7,
            steps,
            train: LoopConfig {
                optimizer: OptimizerKind::Sgd,
                lr: Some(0.01),
                eval_every: 4,
                ckpt_every: 4,
                ..Default::default()
            },
        }
    }
}

/// The data position saved in the checkpoints (the task's [`Task::Extra`]).
#[derive(Serialize, Deserialize)]
pub struct Pos {
    pub next: usize,
}

pub struct Regression {
    pub w: Tensor,
    pub vm: VarMap,
    pub seed: u64,
    /// The next batch to draw.
    pub next: usize,
    /// Ask for a SIGTERM-like stop while running this step (tests of the graceful stop).
    pub stop_at: Option<usize>,
    /// Every `seek` call's step.
    pub seeks: Vec<usize>,
    val: (Tensor, Tensor),
}

/// `(x (n, 4), y (n, 1))` of batch `position` of seed `seed`.
fn batch(seed: u64, position: u64, n: usize) -> candle::Result<(Tensor, Tensor)> {
    let mut noise = Noise(seed.wrapping_mul(1_000_003).wrapping_add(position) | 1);
    let x: Vec<f32> = (0..n * FEATURES).map(|_| noise.gauss() as f32).collect();
    let y: Vec<f32> = x
        .chunks(FEATURES)
        .map(|r| r.iter().zip(W_TRUE).map(|(a, b)| a * b).sum::<f32>() + 0.1 * noise.gauss() as f32)
        .collect();
    Ok((
        Tensor::from_vec(x, (n, FEATURES), &Device::Cpu)?,
        Tensor::from_vec(y, (n, 1), &Device::Cpu)?,
    ))
}

impl Regression {
    pub fn new(seed: u64) -> candle::Result<Self> {
        let vm = VarMap::new();
        let w = vm.get(
            (FEATURES, 1),
            "w",
            Init::Const(0.0),
            DType::F32,
            &Device::Cpu,
        )?;
        Ok(Self {
            w,
            vm,
            seed,
            next: 0,
            stop_at: None,
            seeks: Vec::new(),
            val: batch(seed ^ 0xabc, u64::MAX, 64)?,
        })
    }

    /// The task and its train state for `cfg`.
    pub fn with_state(cfg: &Cfg) -> candle::Result<(Self, TrainState)> {
        let task = Self::new(cfg.seed)?;
        let opt = cfg
            .train
            .recipe(cfg.steps)
            .optimizer(split_no_decay(&task.vm))?;
        let tc = cfg.train.train_config(MonitorConfig::default());
        let state = TrainState::new(named_vars(&task.vm), opt, &tc)?;
        Ok((task, state))
    }
}

impl Task for Regression {
    type Extra = Pos;

    fn extra(&self, _: usize) -> Pos {
        Pos { next: self.next }
    }

    fn restore_extra(&mut self, extra: Pos) -> candle::Result<()> {
        self.next = extra.next;
        Ok(())
    }

    fn seek(&mut self, step: usize) -> candle::Result<()> {
        self.seeks.push(step);
        self.next = step;
        Ok(())
    }

    fn micro_batches(&mut self, step: usize, fault: FaultPlan) -> candle::Result<MicroBatches<'_>> {
        if self.stop_at == Some(step) {
            Interrupt::install()?.request(StopSignal::Terminate);
        }
        let (w, seed, next) = (&self.w, self.seed, &mut self.next);
        Ok(Box::new(move |_| {
            let (x, y) = batch(seed, *next as u64, BATCH)?;
            *next += 1;
            let x = fault.poison_inputs(step, &x)?;
            (x.matmul(w)? - y)?.sqr()?.mean_all()
        }))
    }

    fn evaluate(&mut self, at: EvalAt) -> candle::Result<Evaluation> {
        let mse = match at.weights_finite {
            true => {
                let (x, y) = &self.val;
                (x.matmul(&self.w)? - y)?
                    .sqr()?
                    .mean_all()?
                    .to_scalar::<f32>()? as f64
            }
            false => f64::NAN,
        };
        let metric = 1.0 / (1.0 + mse);
        let record = serde_json::value::to_raw_value(&serde_json::json!({
            "kind": "eval", "step": at.step, "ema": at.ema, "mse": mse
        }))
        .map_err(candle::Error::wrap)?;
        Ok(Evaluation {
            metric,
            secondary: mse,
            record,
            line: format!("val mse {mse:.5}"),
        })
    }

    fn context(&self) -> TaskContext {
        TaskContext {
            norm: keel_norm::NormKind::GroupNorm { groups: None },
            batch_size: BATCH,
            pretrained: false,
            backbone_norm: None,
        }
    }
}

/// Quiet options (no bar, no printing), reading every `log_every` steps.
pub fn quiet(log_every: usize) -> RunOptions {
    RunOptions {
        progress: false,
        verbose: false,
        log_every,
        ..RunOptions::new("driver_test")
    }
}

/// Opens a run of `cfg` in `out` (fresh, or resumed from its newest checkpoint).
pub fn open<'a>(
    cfg: &'a Cfg,
    out: &Path,
    resume: bool,
    opts: RunOptions,
) -> candle::Result<Run<'a, Cfg, Regression>> {
    let (task, state) = Regression::with_state(cfg)?;
    let found: Option<Resume> = match resume {
        true => CheckpointManager::new(out.join("checkpoints"), cfg.train.keep_last)?
            .load_latest(&Device::Cpu)?,
        false => None,
    };
    let spec = RunSpec {
        config: cfg,
        format: "keel driver test v1",
        steps: cfg.steps,
        train: &cfg.train,
    };
    Run::open(spec, task, state, out, found, opts)
}

/// The `kind` of every record of `out/log.jsonl`.
pub fn log_kinds(out: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(out.join("log.jsonl"))?;
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)?;
            Ok(v["kind"].as_str().unwrap_or("?").to_string())
        })
        .collect()
}
