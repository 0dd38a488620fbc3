//! The choices a training run makes, as enums: which optimizer ([`OptimizerKind`]) and
//! which numeric precision ([`Precision`]). Each parses from and prints as the text a
//! command line or a config file uses, and serializes as that text.
use std::fmt;
use std::str::FromStr;

use candle::DType;
use serde::{Deserialize, Serialize};

/// Which optimizer a run uses, with the defaults keel's recipes pair with it.
///
/// ```
/// use keel_optim::OptimizerKind;
/// let k: OptimizerKind = "adamw".parse()?;
/// assert_eq!(k, OptimizerKind::AdamW);
/// assert_eq!(k.to_string(), "adamw");
/// assert_eq!(OptimizerKind::Sgd.default_lr(), 0.05);
/// # Ok::<(), candle::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// [`crate::Sgd`] with momentum 0.9 and a polynomial (power 0.9) decay.
    #[default]
    Sgd,
    /// [`crate::AdamW`] with a cosine decay.
    #[cfg_attr(feature = "clap", value(name = "adamw"))]
    AdamW,
}

impl OptimizerKind {
    /// Every choice, in the order help texts list them.
    pub const ALL: [OptimizerKind; 2] = [OptimizerKind::Sgd, OptimizerKind::AdamW];

    /// The peak learning rate keel's recipes use when none is given (SGD 0.05, AdamW 1e-3).
    pub fn default_lr(self) -> f64 {
        match self {
            OptimizerKind::Sgd => 0.05,
            OptimizerKind::AdamW => 1e-3,
        }
    }

    /// The weight decay keel's recipes use when none is given (SGD 1e-4, AdamW 0.05).
    pub fn default_weight_decay(self) -> f64 {
        match self {
            OptimizerKind::Sgd => 1e-4,
            OptimizerKind::AdamW => 0.05,
        }
    }
}

impl fmt::Display for OptimizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OptimizerKind::Sgd => "sgd",
            OptimizerKind::AdamW => "adamw",
        })
    }
}

impl FromStr for OptimizerKind {
    type Err = candle::Error;

    fn from_str(s: &str) -> candle::Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "sgd" => Ok(OptimizerKind::Sgd),
            "adamw" => Ok(OptimizerKind::AdamW),
            _ => candle::bail!("unknown optimizer '{s}': expected one of sgd, adamw"),
        }
    }
}

/// The numeric precision of the forward and backward passes. The weights (and optimizer
/// state) stay f32 in every case ([`crate::mixed`]).
///
/// Text form: `f32` (also accepted: `off`, `fp32`), `f16` (`fp16`), `bf16`.
///
/// ```
/// use candle::DType;
/// use keel_optim::Precision;
/// let p: Precision = "off".parse()?;
/// assert_eq!(p, Precision::F32);
/// assert_eq!("f16".parse::<Precision>()?.compute_dtype(), DType::F16);
/// assert!(Precision::F16.needs_loss_scaling());
/// assert!(!Precision::Bf16.needs_loss_scaling());
/// assert!("fp8".parse::<Precision>().is_err());
/// # Ok::<(), candle::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Plain f32 everywhere.
    #[default]
    #[serde(alias = "off", alias = "fp32")]
    #[cfg_attr(feature = "clap", value(alias = "off", alias = "fp32"))]
    F32,
    /// f16 compute with f32 master weights and dynamic loss scaling ([`crate::GradScaler`]).
    #[serde(alias = "fp16")]
    #[cfg_attr(feature = "clap", value(alias = "fp16"))]
    F16,
    /// bf16 compute with f32 master weights (f32's exponent range: no loss scaling).
    Bf16,
}

impl Precision {
    /// Every choice, in the order help texts list them.
    pub const ALL: [Precision; 3] = [Precision::F32, Precision::F16, Precision::Bf16];

    /// The dtype the forward and backward run in.
    pub fn compute_dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
            Precision::Bf16 => DType::BF16,
        }
    }

    /// Whether this precision needs a [`crate::GradScaler`] (only f16).
    pub fn needs_loss_scaling(self) -> bool {
        self == Precision::F16
    }

    /// Whether the forward runs in a dtype other than the f32 master weights'.
    pub fn is_mixed(self) -> bool {
        self != Precision::F32
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        })
    }
}

impl FromStr for Precision {
    type Err = candle::Error;

    fn from_str(s: &str) -> candle::Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "off" => Ok(Precision::F32),
            "f16" | "fp16" => Ok(Precision::F16),
            "bf16" => Ok(Precision::Bf16),
            _ => candle::bail!("unknown precision '{s}': expected one of f32 (or off), f16, bf16"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips() {
        for p in Precision::ALL {
            assert_eq!(p.to_string().parse::<Precision>().unwrap(), p);
        }
        for k in OptimizerKind::ALL {
            assert_eq!(k.to_string().parse::<OptimizerKind>().unwrap(), k);
        }
        // Every spelling FromStr takes, serde takes too (config files), and the reverse.
        for (text, p) in [
            ("off", Precision::F32),
            ("fp32", Precision::F32),
            ("f32", Precision::F32),
            ("fp16", Precision::F16),
            ("f16", Precision::F16),
            ("bf16", Precision::Bf16),
        ] {
            assert_eq!(text.parse::<Precision>().unwrap(), p, "{text}");
            assert_eq!(
                serde_json::from_str::<Precision>(&format!("\"{text}\"")).unwrap(),
                p,
                "{text}"
            );
        }
        let e = "lamb".parse::<OptimizerKind>().unwrap_err().to_string();
        assert!(e.contains("lamb") && e.contains("sgd, adamw"), "{e}");
    }
}
