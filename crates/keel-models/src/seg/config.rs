//! [`ModelConfig`]: the network's shape, validated before any variable exists.

use candle::{bail, Result};
use keel_norm::NormKind;
use serde::{Deserialize, Serialize};

/// The network's shape: base width (stages `w, 2w, 4w, 8w`; stem `w/2` then `w`), FPN
/// width, number of classes and norm. Serialized with serde (the norm as its string form,
/// e.g. `"gn"`, `"gn:16"`, `"frozen-bn"`).
///
/// # Example
/// ```
/// use keel_models::seg::ModelConfig;
/// let cfg: ModelConfig = serde_json::from_str(r#"{"width": 16, "fpn": 32, "num_classes": 5, "norm": "gn:8"}"#).unwrap();
/// cfg.validate()?;
/// assert_eq!(cfg.widths(), [16, 32, 64, 128]);
/// # Ok::<(), candle::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Base width `w`: even, >= 2 (the stem's first conv has `w / 2` channels).
    pub width: usize,
    /// Channels of the FPN decoder, >= 1.
    pub fpn: usize,
    /// Number of output classes (logit channels), >= 2.
    pub num_classes: usize,
    /// The norm of every conv block.
    pub norm: NormKind,
}

impl Default for ModelConfig {
    /// The PyTorch twin: width 64, FPN 128, 21 classes (Pascal VOC), GroupNorm.
    fn default() -> Self {
        Self {
            width: 64,
            fpn: 128,
            num_classes: 21,
            norm: NormKind::GroupNorm { groups: None },
        }
    }
}

impl ModelConfig {
    /// The widths of the four stages.
    pub fn widths(&self) -> [usize; 4] {
        let w = self.width;
        [w, 2 * w, 4 * w, 8 * w]
    }

    /// Checks the config before any variable is created: widths, classes, and that the
    /// norm's group count divides every normalized layer. Errors name the field, the value
    /// and the fix.
    pub fn validate(&self) -> Result<()> {
        if self.width < 2 || !self.width.is_multiple_of(2) {
            bail!(
                "ModelConfig: width {} must be an even number >= 2 (the stem's first conv has width/2 channels)",
                self.width
            )
        }
        if self.fpn == 0 {
            bail!("ModelConfig: fpn must be at least 1, got 0")
        }
        if self.num_classes < 2 {
            bail!(
                "ModelConfig: num_classes {} must be at least 2 (background and one class)",
                self.num_classes
            )
        }
        let mut layers = vec![("stem.1", self.width / 2), ("smooth.1", self.fpn)];
        for (name, w) in ["stages.0", "stages.1", "stages.2", "stages.3"]
            .into_iter()
            .zip(self.widths())
        {
            layers.push((name, w));
        }
        for (name, c) in layers {
            if let Err(e) = self.norm.groups_for(c) {
                bail!(
                    "ModelConfig: norm {} at layer {name} ({c} channels): {e}",
                    self.norm
                )
            }
        }
        Ok(())
    }
}
