//! The conv + norm pair the segmentation networks are built from.

use candle::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use keel_norm::{conv_for, norm, Activation, Conv, Norm, NormKind};

/// A square convolution's geometry (padding `k / 2`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConvSpec {
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
}

/// conv (no bias) + norm, the pair every block is made of.
pub(crate) struct ConvNorm {
    pub conv: Conv,
    pub norm: Norm,
}

impl ConvNorm {
    pub fn new(
        kind: NormKind,
        s: ConvSpec,
        conv_vb: VarBuilder,
        norm_vb: VarBuilder,
    ) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: s.k / 2,
            stride: s.stride,
            ..Default::default()
        };
        Ok(Self {
            conv: conv_for(kind, s.cin, s.cout, s.k, cfg, conv_vb)?,
            norm: norm(kind, s.cout, norm_vb)?,
        })
    }

    pub fn forward(&self, x: &Tensor, train: bool, act: Activation) -> Result<Tensor> {
        // GN + SiLU runs as keel's fused kernel here.
        self.norm.forward_act(&self.conv.forward(x)?, train, act)
    }
}
