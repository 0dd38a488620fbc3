//! [`SegNet`]: the blocks and the network.

use super::decoder::FpnDecoder;
use super::encoder::{copy_bn_stats, SegEncoder};
use super::ModelConfig;
use candle::{Result, Tensor};
use candle_nn::{BatchNorm, VarBuilder};

/// The segmentation network (see the module docs): stem (two stride-2 conv blocks), four
/// ResNet stages of two basic blocks (strides 1, 2, 2, 2), 1x1 lateral convs, a top-down
/// FPN path with nearest upsampling, a 3x3 smoothing block and a 1x1 head whose logits are
/// resized bilinearly to the input size.
///
/// # Example
/// ```
/// use candle::{DType, Device, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use keel_models::seg::{init_weights, ModelConfig, SegNet};
/// let vm = VarMap::new();
/// let cfg = ModelConfig { width: 8, fpn: 16, num_classes: 3, norm: "gn:4".parse()? };
/// let net = SegNet::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
/// init_weights(&vm, 0)?;
/// let x = Tensor::randn(0f32, 1.0, (2, 3, 37, 45), &Device::Cpu)?;
/// let logits = net.forward(&x, true)?;
/// assert_eq!(logits.dims(), &[2, 3, 37, 45]);
/// # Ok::<(), candle::Error>(())
/// ```
pub struct SegNet {
    encoder: SegEncoder,
    decoder: FpnDecoder,
    batch_norms: Vec<(String, BatchNorm)>,
}

impl SegNet {
    /// Builds the network from `vb` (twin names), after [`ModelConfig::validate`].
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let kind = cfg.norm;
        let w = cfg.widths();
        let encoder = SegEncoder::new(cfg.width, kind, vb.clone())?;
        let decoder = FpnDecoder::new(w, cfg.fpn, cfg.num_classes, kind, &vb)?;
        let mut net = Self {
            encoder,
            decoder,
            batch_norms: Vec::new(),
        };
        net.batch_norms = net.collect_batch_norms();
        Ok(net)
    }

    fn collect_batch_norms(&self) -> Vec<(String, BatchNorm)> {
        let mut out = self.encoder.batch_norms();
        if let Some(bn) = self.decoder.batch_norm() {
            out.push(("smooth.1".into(), bn.clone()));
        }
        out
    }

    /// The trainable BatchNorms (name prefix, layer): their running statistics live in the
    /// layer, so a mixed-precision forward (built on cast copies) copies them back.
    pub fn batch_norms(&self) -> &[(String, BatchNorm)] {
        &self.batch_norms
    }

    /// Copies the BatchNorm running statistics of this (cast, mixed-precision) model into
    /// the f32 variables of `vm`, the VarMap the master model was built from.
    pub fn copy_bn_stats_to(&self, vm: &candle_nn::VarMap) -> Result<()> {
        copy_bn_stats("SegNet::copy_bn_stats_to", &self.batch_norms, vm)
    }

    /// Logits for images; `train` selects batch statistics for BatchNorm.
    ///
    /// # Shapes
    /// - x: `(N, 3, H, W)`, any `H, W >= 1` (the stride-32 features are resized back).
    /// - output: `(N, num_classes, H, W)`, x's dtype.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let feats: [Tensor; 4] = self
            .encoder
            .forward(x, train)?
            .try_into()
            .map_err(|_| candle::Error::Msg("SegNet: expected 4 encoder stages".into()))?;
        self.decoder.forward(&feats, (h, w), train)
    }
}
