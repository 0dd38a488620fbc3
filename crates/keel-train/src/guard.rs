//! The guard: a run that goes haywire heals itself or stops loudly. It keeps in-memory
//! snapshots of the last good [`TrainState`] and, on a divergence alarm of the monitor (or
//! NaN weights, or a run of non-finite losses), restores one, moves past the batches that led
//! there, lowers the learning rate for the rest of the run, and after
//! [`GuardConfig::max_interventions`] stops the run. Large-model trainers do this around
//! loss spikes by hand (PaLM, Chowdhery et al. 2022, §5.1: restart about 100 steps before
//! the spike and skip 200-500 batches); the guard does it in-process for small-batch runs.
//!
//! The data position: the guard does not rewind [`TrainState::step`]. After a rollback the
//! weights, optimizer, scaler, EMA and monitor are those of the snapshot, but the step counter
//! continues after the alarm step, so a loop that draws batch `step` (or reads a stream of
//! batches) and an LR schedule of `step` move past the batches that led to the divergence
//! ([`Intervention::skipped_batches`] of them) without being told. The learning rate the loop
//! passes is [`Guard::lr`] of the scheduled one: lowered by [`GuardConfig::lr_factor`] per
//! intervention, for the rest of the run (not a cool-down window: an LR that diverged once
//! from a healthy snapshot would diverge again when restored).
//!
//! Two kinds of divergence, two cuts. A snapshot after the first (the one taken by
//! [`Guard::new`]) is taken only while the run is no worse than its start: the median of the
//! trailing losses at most the robust initial loss ([`crate::StabilityMonitor::anchor_loss`]).
//! - A divergence after such a snapshot (the run had made progress: an LR burst, a bad
//!   batch) is a transient: the rollback goes to a snapshot of that progress and the LR is
//!   cut gently, by [`GuardConfig::lr_factor`] (0.5), so the rest of the run loses little.
//! - A divergence while the only snapshot is the start (the loss never came down to its
//!   initial value: an LR far too large from step 0) cannot be a transient that a later
//!   batch caused; the LR itself is the cause. Halving it three times covers only 8x, so the
//!   cut is [`GuardConfig::early_lr_factor`] (0.1): three such interventions cover an LR up
//!   to 1000x too large, and each costs only the steps since the start. The rollback goes to
//!   the start, where the run was last known good. Once an intervention was early, every
//!   later one is too: the run has shown that its LR is the problem, and a divergence after
//!   a 10x cut (at an LR 100x too large, the loss may well come down for a while before it
//!   blows up again) shows the cut was not enough. An LR still further off (1e20) diverges
//!   again at 1/1000 of it and the run stops loudly after
//!   [`GuardConfig::max_interventions`].
//!
//! A rollback restores the monitor's baseline statistics with the weights
//! ([`crate::StabilityMonitor::rolled_back_to`]) but keeps its history: the final report
//! still counts the steps, spikes and divergences that led to each intervention.
use std::collections::VecDeque;

use crate::config::{GuardConfig, GuardPolicy};
use crate::monitor::{Alarm, StabilityMonitor};
use crate::state::{StepOutcome, TrainState};
use crate::summary::{GuardSummary, Intervention, InterventionCause, InterventionKind};
use crate::Checkpoint;

/// Snapshots held: the newest, and one older in case the newest already holds the start of
/// a divergence.
const SNAPSHOTS_HELD: usize = 2;

/// What the loop does after [`Guard::after_step`].
#[derive(Clone, Debug, PartialEq)]
pub enum GuardAction {
    /// Nothing happened: go on.
    Continue,
    /// The state was rolled back and the LR lowered: log the intervention and go on (the
    /// next step is [`TrainState::step`], after the alarm step).
    RolledBack(Intervention),
    /// The interventions are used up: the last good snapshot is restored; end the loop, write
    /// the report (DIVERGED) and exit with an error.
    Stop(Intervention),
}

/// Watches a [`TrainState`] after each step and acts on divergence by its
/// [`GuardPolicy`]. Holds up to two deep copies of the state in memory (on its device).
///
/// A custom loop with a guard (an LR burst of 1000x for 5 steps mid-run, rolled back):
///
/// ```
/// use candle::{DType, Device, Module, Tensor};
/// use candle_nn::{linear, VarBuilder, VarMap};
/// use keel_optim::{split_no_decay, OptimizerKind};
/// use keel_train::{named_vars, Guard, GuardAction, GuardConfig, OptimRecipe, TrainConfig, TrainState};
/// # fn main() -> candle::Result<()> {
/// let dev = Device::Cpu;
/// let x = (Tensor::arange(0f32, 64.0, &dev)?.reshape((16, 4))? / 64.0)?.sin()?;
/// let y = x.sum_keepdim(1)?;
/// let vm = VarMap::new();
/// let model = linear(4, 1, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
/// let recipe = OptimRecipe { lr: 0.1, ..OptimRecipe::new(OptimizerKind::Sgd, 200) };
/// let mut state = TrainState::new(named_vars(&vm), recipe.optimizer(split_no_decay(&vm))?,
///                                 &TrainConfig::default())?;
/// let mut guard = Guard::new(GuardConfig { snapshot_every: 20, ..GuardConfig::for_run(200) }, &mut state)?;
/// while state.step < 200 {
///     let burst = if (100..105).contains(&state.step) { 1000.0 } else { 1.0 };
///     let lr = guard.lr(0.1 * burst);
///     let out = state.step(lr, None, |_| (model.forward(&x)? - &y)?.sqr()?.mean_all())?;
///     match guard.after_step(&mut state, &out)? {
///         GuardAction::Continue => {}
///         GuardAction::RolledBack(i) => eprintln!("guard: {i}"),
///         GuardAction::Stop(i) => panic!("stopped: {i}"),
///     }
/// }
/// let i = &guard.interventions()[0];
/// assert!(i.step > 100 && i.restored_step <= 100, "{i}");
/// assert!(guard.summary().recovered());
/// let loss = (model.forward(&x)? - &y)?.sqr()?.mean_all()?.to_scalar::<f32>()?;
/// assert!(loss < 1e-2, "{loss}");
/// # Ok(()) }
/// ```
pub struct Guard {
    cfg: GuardConfig,
    /// Deep copies of healthy states, oldest first.
    snapshots: VecDeque<Snapshot>,
    interventions: Vec<Intervention>,
    lr_scale: f64,
    /// An intervention was early: the LR itself is the cause, later cuts are early ones too.
    lr_is_cause: bool,
    /// Non-finite losses in a row, up to the last step.
    nonfinite_run: usize,
    stopped: bool,
}

impl Guard {
    /// A guard over `state` (fresh, or just restored from a checkpoint). Sets
    /// [`TrainState::skip_non_finite`] by the policy (off only for [`GuardPolicy::Off`]); with
    /// [`GuardPolicy::Rollback`] takes the first snapshot now, so a run diverging from its
    /// first step can roll back to its start. Errors on an invalid config, or on
    /// non-finite weights with Rollback.
    pub fn new(cfg: GuardConfig, state: &mut TrainState) -> candle::Result<Self> {
        cfg.validate()?;
        state.skip_non_finite = cfg.policy != GuardPolicy::Off;
        state.check_weights_every(cfg.check_every);
        if cfg.policy == GuardPolicy::Rollback {
            state.flush_also_every(cfg.snapshot_every);
        }
        let mut guard = Self {
            cfg,
            snapshots: VecDeque::new(),
            interventions: Vec::new(),
            lr_scale: 1.0,
            lr_is_cause: false,
            nonfinite_run: 0,
            stopped: false,
        };
        if cfg.policy == GuardPolicy::Rollback {
            if !state.weights_finite()? {
                candle::bail!(
                    "Guard::new: the weights at step {} are not finite, so there is no good state to roll back to; start from finite weights or use GuardPolicy::Skip",
                    state.step
                )
            }
            guard.snapshots.push_back(Snapshot::of(state)?);
        }
        Ok(guard)
    }

    /// Continues the history of an earlier process of the same run (its
    /// [`Guard::summary`], e.g. stored in the checkpoint meta): its interventions count
    /// towards [`GuardConfig::max_interventions`], its LR reduction holds, and after an early
    /// cut (an LR ratio of [`GuardConfig::early_lr_factor`]) later cuts are early ones too. Call it right
    /// after [`Guard::new`] on the restored state. A run the guard stopped cannot continue.
    ///
    /// ```
    /// # use candle::{DType, Device};
    /// # use candle_nn::{linear, VarBuilder, VarMap};
    /// # use keel_optim::{split_no_decay, OptimizerKind};
    /// use keel_train::*;
    /// # let vm = VarMap::new();
    /// # let _ = linear(4, 1, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    /// # let opt = OptimRecipe::new(OptimizerKind::Sgd, 100).optimizer(split_no_decay(&vm)).unwrap();
    /// # let mut state = TrainState::new(named_vars(&vm), opt, &TrainConfig::default()).unwrap();
    /// let rollback = Intervention { step: 57, cause: InterventionCause::NonFiniteLosses(3),
    ///     action: InterventionKind::RolledBack, restored_step: 40, skipped_batches: 18,
    ///     lr_before: 0.1, lr_after: 0.05 };
    /// let earlier = GuardSummary { policy: GuardPolicy::Rollback, interventions: vec![rollback],
    ///                              stopped: false, lr_scale: 0.5 };
    /// let mut guard = Guard::new(GuardConfig::for_run(100), &mut state)?;
    /// guard.continue_history(&earlier)?;
    /// assert_eq!((guard.lr(0.1), guard.interventions().len()), (0.05, 1));
    /// assert!(guard.continue_history(&GuardSummary { stopped: true, ..earlier }).is_err());
    /// # Ok::<(), candle::Error>(())
    /// ```
    pub fn continue_history(&mut self, earlier: &GuardSummary) -> candle::Result<()> {
        if earlier.stopped {
            candle::bail!(
                "Guard::continue_history: the guard stopped this run after {} interventions; restart it with a lower LR instead of resuming",
                earlier.interventions.len()
            )
        }
        if !(earlier.lr_scale > 0.0 && earlier.lr_scale <= 1.0) {
            candle::bail!(
                "Guard::continue_history: lr_scale {} is not in (0, 1]; was the history written by Guard::summary?",
                earlier.lr_scale
            )
        }
        self.interventions = earlier.interventions.clone();
        self.lr_scale = earlier.lr_scale;
        // An early cut is the one whose LR ratio is the early factor (when the two differ).
        let (early, gentle) = (self.cfg.early_lr_factor, self.cfg.lr_factor);
        self.lr_is_cause = early != gentle
            && earlier.interventions.iter().any(|i| {
                i.action == InterventionKind::RolledBack
                    && (i.lr_after / i.lr_before - early).abs() <= 1e-9 * early
            });
        Ok(())
    }

    /// The configuration.
    pub fn config(&self) -> &GuardConfig {
        &self.cfg
    }

    /// The learning rate to use for a scheduled `lr`: `lr` times [`Guard::lr_scale`].
    pub fn lr(&self, lr: f64) -> f64 {
        lr * self.lr_scale
    }

    /// The product of the LR reductions so far (1 before any intervention).
    pub fn lr_scale(&self) -> f64 {
        self.lr_scale
    }

    /// The interventions so far, in order.
    pub fn interventions(&self) -> &[Intervention] {
        &self.interventions
    }

    /// Whether the guard stopped the run.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The steps of the snapshots held, oldest first.
    pub fn snapshot_steps(&self) -> Vec<usize> {
        self.snapshots.iter().map(|s| s.ck.step).collect()
    }

    /// What the guard did, for [`crate::HealthReport::with_guard`].
    pub fn summary(&self) -> GuardSummary {
        GuardSummary {
            policy: self.cfg.policy,
            interventions: self.interventions.clone(),
            stopped: self.stopped,
            lr_scale: self.lr_scale,
        }
    }

    /// Called once after each [`TrainState::step`] with its outcome. Every
    /// [`GuardConfig::check_every`] steps (any policy) checks that the weights are finite
    /// and records it in the monitor ([`crate::StabilityMonitor::record_weights_finite`]).
    /// With [`GuardPolicy::Rollback`]: on an [`Alarm::Divergence`] (of the step or of that
    /// check) or [`GuardConfig::nonfinite_patience`] non-finite losses in a row, restores a
    /// snapshot and returns [`GuardAction::RolledBack`], or [`GuardAction::Stop`] once
    /// [`GuardConfig::max_interventions`] are used up; otherwise takes a snapshot every
    /// [`GuardConfig::snapshot_every`] steps while the run is healthy.
    pub fn after_step(
        &mut self,
        state: &mut TrainState,
        out: &StepOutcome,
    ) -> candle::Result<GuardAction> {
        if self.stopped {
            candle::bail!(
                "Guard::after_step: the guard stopped the run at step {}; end the loop on GuardAction::Stop",
                self.interventions.last().map_or(out.step, |i| i.step)
            )
        }
        self.nonfinite_run = if out.loss.is_finite() {
            0
        } else {
            self.nonfinite_run + 1
        };
        let checked = (out.step + 1).is_multiple_of(self.cfg.check_every);
        let weight_alarms = if checked {
            let finite = match out.weights_finite {
                Some(f) => f,
                None => state.weights_finite()?,
            };
            state.monitor.record_weights_finite(out.step, finite)
        } else {
            Vec::new()
        };
        if self.cfg.policy != GuardPolicy::Rollback {
            return Ok(GuardAction::Continue);
        }
        let divergence = out
            .alarms
            .iter()
            .chain(&weight_alarms)
            .find_map(|a| match a {
                Alarm::Divergence { cause, .. } => Some(cause.clone()),
                _ => None,
            });
        let cause = match divergence {
            Some(c) => Some(InterventionCause::Divergence(c)),
            None => (self.nonfinite_run >= self.cfg.nonfinite_patience)
                .then_some(InterventionCause::NonFiniteLosses(self.nonfinite_run)),
        };
        if let Some(cause) = cause {
            return self.intervene(state, out, cause);
        }
        // A windowed state ends its windows at snapshot steps, so the state is at this step.
        let due =
            (out.step + 1).is_multiple_of(self.cfg.snapshot_every) && state.step == out.step + 1;
        if due
            && self.nonfinite_run == 0
            && !state.monitor.diverging()
            && no_worse_than_start(&state.monitor)
        {
            // The check above already ran on a check step; it raised no alarm then.
            if checked || state.weights_finite()? {
                self.snapshots.push_back(Snapshot::of(state)?);
                while self.snapshots.len() > SNAPSHOTS_HELD {
                    self.snapshots.pop_front();
                }
            }
        }
        Ok(GuardAction::Continue)
    }

    /// [`Guard::after_step`] for a windowed loop ([`TrainState::launch`]): reads every
    /// launched step in one transfer ([`TrainState::flush`]) and takes them in order, each
    /// recorded in the monitor and then judged as [`Guard::after_step`] judges it. The
    /// weights check of a step is the sum taken right after it and read with the window,
    /// and windows end at snapshot steps, so the guard sees what it would have seen step
    /// by step; it acts later in time (at the flush, at most one window late). When it
    /// rolls back at a step of the window, the later steps are discarded unrecorded, their
    /// work is lost and [`TrainState::step`] is the step after the alarm, as in a loop that
    /// reads every step: a loop that draws batches in sequence must move its data back to
    /// [`TrainState::step`] ([`Flushed::discarded`] steps).
    pub fn flush(&mut self, state: &mut TrainState) -> candle::Result<Flushed> {
        let launched = state.pending();
        let mut action = GuardAction::Continue;
        let outcomes = state.flush_with(|st, out| {
            action = self.after_step(st, out)?;
            Ok(action == GuardAction::Continue)
        })?;
        Ok(Flushed {
            discarded: launched - outcomes.len(),
            outcomes,
            action,
        })
    }

    /// Restores the newest snapshot at least `lookback` steps older than the alarm (or the
    /// oldest), keeps the step counter after the alarm step and the monitor's history,
    /// lowers the LR (by the early factor when no snapshot of progress is held) or stops.
    fn intervene(
        &mut self,
        state: &mut TrainState,
        out: &StepOutcome,
        cause: InterventionCause,
    ) -> candle::Result<GuardAction> {
        // The step after the alarm (a windowed state may have launched further steps; they
        // are discarded).
        let next = out.step + 1;
        let early = self.lr_is_cause || !self.snapshots.iter().any(|s| s.progressed);
        let idx = self
            .snapshots
            .iter()
            .rposition(|s| s.ck.step + self.cfg.lookback <= next)
            .unwrap_or(0);
        self.snapshots.truncate(idx + 1);
        let Some(snap) = self.snapshots.back() else {
            candle::bail!(
                "Guard: no snapshot to roll back to at step {} ({cause}); build the Guard with GuardPolicy::Rollback before the first step",
                out.step
            )
        };
        let history = state.monitor.clone();
        state.restore::<()>(&snap.ck)?;
        let baseline = std::mem::replace(&mut state.monitor, history);
        state.monitor.rolled_back_to(&baseline);
        let restored_step = snap.ck.step;
        state.step = next;
        self.nonfinite_run = 0;
        let stop = self.interventions.len() >= self.cfg.max_interventions;
        let factor = if early {
            self.cfg.early_lr_factor
        } else {
            self.cfg.lr_factor
        };
        if !stop {
            self.lr_scale *= factor;
            self.lr_is_cause |= early;
        }
        let rec = Intervention {
            step: out.step,
            cause,
            action: if stop {
                InterventionKind::Stopped
            } else {
                InterventionKind::RolledBack
            },
            restored_step,
            skipped_batches: next - restored_step,
            lr_before: out.lr,
            lr_after: if stop { out.lr } else { out.lr * factor },
        };
        self.interventions.push(rec.clone());
        self.stopped = stop;
        Ok(if stop {
            GuardAction::Stop(rec)
        } else {
            GuardAction::RolledBack(rec)
        })
    }
}

/// What [`Guard::flush`] read and did.
#[derive(Clone, Debug, PartialEq)]
pub struct Flushed {
    /// The steps read, in order, up to the one the guard acted on.
    pub outcomes: Vec<StepOutcome>,
    /// What the guard did at the last of them ([`GuardAction::Continue`] when nothing).
    pub action: GuardAction,
    /// Launched steps after a rollback or stop, discarded unrecorded.
    pub discarded: usize,
}

/// A held state and whether the run was then no worse than its start (the first snapshot
/// of a fresh run was not: it has no losses yet).
struct Snapshot {
    ck: Checkpoint,
    progressed: bool,
}

impl Snapshot {
    /// [`TrainState::snapshot`] with every tensor copied: the optimizer updates the weights
    /// in place, which would change a snapshot that shares their storage.
    fn of(state: &TrainState) -> candle::Result<Self> {
        let mut ck = state.snapshot(&())?;
        for t in ck.tensors.values_mut() {
            *t = t.copy()?;
        }
        Ok(Self {
            ck,
            progressed: no_worse_than_start(&state.monitor),
        })
    }
}

/// Whether the median of the trailing losses is at most the robust initial loss (false
/// before any finite loss).
fn no_worse_than_start(monitor: &StabilityMonitor) -> bool {
    match (monitor.trailing_loss(), monitor.anchor_loss()) {
        (Some(t), Some(a)) => t <= a,
        _ => false,
    }
}
