//! What to change about a run, as typed data: [`Advice`] carries the values (a clip threshold,
//! a learning rate, a normalization) and prints as a plain-words sentence. It never names a
//! command-line flag; a program renders the advice as its own options.
use std::fmt;

use keel_norm::{NormKind, BN_MIN_BATCH};
use serde::{Deserialize, Serialize};

use crate::stats::lossless_f64;

/// Why a lower learning rate is advised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LrCause {
    /// Gradient-norm explosions although clipping is tight.
    GradSpikesDespiteClipping,
    /// Loss spikes, at `batch_size` images per step (at 1-2, accumulating gradients over
    /// several batches also helps).
    LossSpikes {
        /// Images per optimizer step per device.
        batch_size: usize,
    },
}

/// Why bf16 is advised over f16.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Bf16Cause {
    /// The f16 loss scale collapsed.
    LossScaleCollapsed,
    /// Too many steps were skipped because the f16 GradScaler kept overflowing.
    ScalerOverflows,
}

/// One recommendation of a [`crate::HealthReport`]: the action and the values it needs.
/// `Display` writes it as a plain-words sentence that starts with the symptom.
///
/// ```
/// use keel_train::Advice;
/// let a = Advice::ClipGrad { at: 2.0, current: None, lr: 0.02 };
/// assert_eq!(
///     a.to_string(),
///     "grad-norm spikes: lower the LR (now 0.02) or clip the global gradient norm at 2 \
///      (the p99 of the healthy grad norms)"
/// );
/// let json = serde_json::to_string(&a).unwrap();
/// assert_eq!(serde_json::from_str::<Advice>(&json).unwrap(), a);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Advice {
    /// Normalize with `to` instead of `from`: BatchNorm below [`BN_MIN_BATCH`] images per
    /// device (always advised), or an unhealthy run whose norm is not the one keel's decision
    /// table ([`keel_norm::recommend`]) picks for its batch size and starting point.
    SwitchNorm {
        /// The normalization the run used.
        from: NormKind,
        /// The decision table's pick.
        to: NormKind,
        /// Images per optimizer step per device.
        batch_size: usize,
        /// Whether the run started from pretrained weights.
        pretrained: bool,
        /// Whether eval regressed while the train loss held: BatchNorm's train/eval mismatch.
        train_eval_mismatch: bool,
    },
    /// Normalize a model's separate backbone with `to` instead of `from` (keel's decision
    /// table for a backbone + head model, [`keel_norm::recommend_plan`]): a pretrained
    /// backbone below [`BN_MIN_BATCH`] images per device keeps its BatchNorm statistics frozen
    /// (`frozen-bn`) with a GroupNorm head (`head`); from scratch, GroupNorm. Advised for
    /// trainable BatchNorm at a small batch always, for another norm off the table when the
    /// run was unhealthy.
    SwitchBackboneNorm {
        /// The backbone's normalization in the run.
        from: NormKind,
        /// The decision table's pick for the backbone.
        to: NormKind,
        /// The decision table's pick for the head, the pairing `to` is meant with.
        head: NormKind,
        /// Images per optimizer step per device.
        batch_size: usize,
        /// Whether the backbone started from pretrained weights.
        pretrained: bool,
    },
    /// The run diverged: restart from the best (or an earlier healthy) checkpoint with the
    /// learning rate lowered to `to` and a warmup.
    RestartWithLowerLr {
        /// The suggested peak learning rate (a tenth of the run's).
        #[serde(with = "lossless_f64")]
        to: f64,
    },
    /// A divergence alarm at `step`: restart from the last checkpoint before that step with
    /// the learning rate lowered tenfold and a warmup.
    RestartBeforeDivergence {
        /// The step of the first divergence alarm.
        step: usize,
        /// The run's peak learning rate.
        #[serde(with = "lossless_f64")]
        from: f64,
        /// The suggested peak learning rate (a tenth of the run's).
        #[serde(with = "lossless_f64")]
        to: f64,
    },
    /// Gradient-norm explosions with no or loose clipping: clip the global gradient norm at
    /// `at` (the p99 of the healthy grad norms), or lower the learning rate.
    ClipGrad {
        /// The suggested clipping threshold.
        #[serde(with = "lossless_f64")]
        at: f64,
        /// The run's (loose) threshold, if it clipped.
        #[serde(with = "lossless_f64::option")]
        current: Option<f64>,
        /// The run's peak learning rate.
        #[serde(with = "lossless_f64")]
        lr: f64,
    },
    /// Lower the peak learning rate from `from` to about `to`, or lengthen the warmup.
    LowerLr {
        /// The run's peak learning rate.
        #[serde(with = "lossless_f64")]
        from: f64,
        /// The suggested peak learning rate (half the run's).
        #[serde(with = "lossless_f64")]
        to: f64,
        /// The symptom.
        cause: LrCause,
    },
    /// NaN/Inf losses: clip the global gradient norm (at `clip_at` when the monitor saw
    /// healthy grad norms), warm up, lower the learning rate, and with f16 try bf16.
    GuardAgainstNan {
        /// The suggested clipping threshold.
        #[serde(with = "lossless_f64::option")]
        clip_at: Option<f64>,
        /// The run's peak learning rate.
        #[serde(with = "lossless_f64")]
        lr: f64,
        /// Whether the run used f16, which overflows above 65504 (bf16 does not).
        try_bf16: bool,
    },
    /// Train in bf16 (f32's exponent range, no loss scaling) instead of f16.
    UseBf16 {
        /// The symptom.
        cause: Bf16Cause,
    },
    /// Too many skipped steps without f16: the gradients are non-finite; lower the learning
    /// rate and clip the global gradient norm.
    FixNonFiniteGrads {
        /// The suggested clipping threshold, when the monitor saw healthy grad norms.
        #[serde(with = "lossless_f64::option")]
        clip_at: Option<f64>,
        /// The run's peak learning rate.
        #[serde(with = "lossless_f64")]
        lr: f64,
    },
    /// Eval regressions: keep the best checkpoint, decay the learning rate towards the end and
    /// check for overfitting.
    KeepBestCheckpoint {
        /// The best eval mIoU.
        #[serde(with = "lossless_f64::option")]
        best_miou: Option<f64>,
    },
}

/// A normalization's name with its text form: "GroupNorm (gn)".
fn norm_name(k: &NormKind) -> String {
    let name = match k {
        NormKind::BatchNorm => "BatchNorm",
        NormKind::FrozenBatchNorm => "frozen BatchNorm",
        NormKind::GroupNorm { .. } => "GroupNorm",
        NormKind::WsGroupNorm { .. } => "Weight Standardization + GroupNorm",
    };
    format!("{name} ({k})")
}

/// "at X" when a threshold is known.
fn at(clip: Option<f64>) -> String {
    clip.map_or(String::new(), |c| format!(" at {c}"))
}

fn fmt_switch_norm(
    f: &mut fmt::Formatter<'_>,
    from: &NormKind,
    to: &NormKind,
    b: usize,
    pretrained: bool,
    train_eval_mismatch: bool,
) -> fmt::Result {
    let start = if pretrained {
        "with a pretrained backbone"
    } else {
        "from scratch"
    };
    let to_name = norm_name(to);
    if *from != NormKind::BatchNorm {
        return write!(
            f,
            "keel's decision table recommends {to_name} at batch {b} {start} (this run used {})",
            norm_name(from)
        );
    }
    let gn = norm_name(&NormKind::GroupNorm { groups: None });
    let frozen = NormKind::FrozenBatchNorm;
    let options = if pretrained {
        format!("freeze BatchNorm ({frozen}) or switch to {gn}")
    } else {
        format!(
            "switch to {gn} or, when starting from pretrained weights, freeze BatchNorm ({frozen})"
        )
    };
    write!(
        f,
        "BatchNorm at batch {b}: {options}; keel's decision table picks {to_name} at batch {b} \
         {start}, since BatchNorm needs about {BN_MIN_BATCH} images per device for its batch \
         statistics."
    )?;
    if train_eval_mismatch {
        f.write_str(
            " The eval regressions while the train loss kept falling are BatchNorm's train/eval \
             mismatch: eval uses running statistics that the noisy batch statistics of training \
             never matched.",
        )?;
    }
    Ok(())
}

fn fmt_switch_backbone_norm(
    f: &mut fmt::Formatter<'_>,
    from: &NormKind,
    to: &NormKind,
    head: &NormKind,
    b: usize,
    pretrained: bool,
) -> fmt::Result {
    let (to_name, head_name) = (norm_name(to), norm_name(head));
    match (from, pretrained) {
        (NormKind::BatchNorm, true) => write!(
            f,
            "the pretrained backbone's BatchNorm at batch {b}: freeze it ({}: the pretrained \
             statistics stay, its batch statistics would be noise) or convert it to {}; keel's \
             decision table picks {to_name} for a pretrained backbone below {BN_MIN_BATCH} \
             images per device, with a {head_name} head",
            NormKind::FrozenBatchNorm,
            norm_name(&NormKind::GroupNorm { groups: None })
        ),
        (NormKind::BatchNorm, false) => write!(
            f,
            "the backbone's BatchNorm at batch {b} from scratch: switch it to {to_name}; \
             BatchNorm needs about {BN_MIN_BATCH} images per device for its batch statistics"
        ),
        _ => write!(
            f,
            "keel's decision table recommends {to_name} for the backbone at batch {b} {} \
             (this run used {}), with a {head_name} head",
            if pretrained {
                "with pretrained weights"
            } else {
                "from scratch"
            },
            norm_name(from)
        ),
    }
}

impl fmt::Display for Advice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Advice::SwitchNorm {
                from,
                to,
                batch_size,
                pretrained,
                train_eval_mismatch,
            } => fmt_switch_norm(f, from, to, *batch_size, *pretrained, *train_eval_mismatch),
            Advice::SwitchBackboneNorm {
                from,
                to,
                head,
                batch_size,
                pretrained,
            } => fmt_switch_backbone_norm(f, from, to, head, *batch_size, *pretrained),
            Advice::RestartWithLowerLr { to } => write!(
                f,
                "the run diverged: restart from the best checkpoint or an earlier healthy one \
                 with a lower LR (e.g. {to}) and warmup"
            ),
            Advice::RestartBeforeDivergence { step, from, to } => write!(
                f,
                "the run diverged at step {step}: restart from the last checkpoint before step \
                 {step} with the LR lowered 10x (now {from}, e.g. {to}) and a warmup"
            ),
            Advice::ClipGrad {
                at,
                current: None,
                lr,
            } => write!(
                f,
                "grad-norm spikes: lower the LR (now {lr}) or clip the global gradient norm at \
                 {at} (the p99 of the healthy grad norms)"
            ),
            Advice::ClipGrad {
                at,
                current: Some(cur),
                lr,
            } => write!(
                f,
                "grad-norm spikes: clipping at {cur} is loose; clip the global gradient norm at \
                 {at} (the p99 of the healthy grad norms) or lower the LR (now {lr})"
            ),
            Advice::LowerLr {
                from,
                to,
                cause: LrCause::GradSpikesDespiteClipping,
            } => write!(
                f,
                "grad-norm spikes despite clipping: lower the LR (now {from}, e.g. {to}) or \
                 lengthen the warmup"
            ),
            Advice::LowerLr {
                from,
                to,
                cause: LrCause::LossSpikes { batch_size: b },
            } => {
                write!(
                    f,
                    "loss spikes: lower the LR (now {from}, e.g. {to}) or lengthen the warmup"
                )?;
                if *b <= 2 {
                    write!(
                        f,
                        "; at batch {b} a step sees few images, accumulating the gradients of \
                         several batches per step averages more"
                    )?;
                }
                Ok(())
            }
            Advice::GuardAgainstNan {
                clip_at,
                lr,
                try_bf16,
            } => write!(
                f,
                "NaN losses: clip the global gradient norm{}, warm up and lower the LR (now \
                 {lr}){}",
                at(*clip_at),
                if *try_bf16 {
                    "; f16 overflows above 65504: try bf16"
                } else {
                    ""
                }
            ),
            Advice::UseBf16 {
                cause: Bf16Cause::LossScaleCollapsed,
            } => f.write_str(
                "loss scale collapsed: use bf16 (same range as f32) or check for NaN-producing \
                 ops (log or division near 0, sqrt of negatives, exp overflow, f16 activations \
                 above 65504)",
            ),
            Advice::UseBf16 {
                cause: Bf16Cause::ScalerOverflows,
            } => f.write_str(
                "too many skipped steps: the GradScaler keeps overflowing; use bf16 or find the \
                 op that overflows in f16",
            ),
            Advice::FixNonFiniteGrads { clip_at, lr } => write!(
                f,
                "too many skipped steps: the gradients are non-finite; lower the LR (now {lr}) \
                 and clip the global gradient norm{}",
                at(*clip_at)
            ),
            Advice::KeepBestCheckpoint { best_miou } => write!(
                f,
                "eval regressions: keep the best checkpoint (CheckpointManager::best, mIoU {}), \
                 decay the LR towards the end (poly or cosine) and check for overfitting \
                 (augmentation, more data)",
                best_miou.map_or("-".to_string(), |v| format!("{v:.4}"))
            ),
        }
    }
}
