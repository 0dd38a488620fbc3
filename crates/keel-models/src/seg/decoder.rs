//! The FPN-lite decoder and classifier head shared by [`SegNet`](super::SegNet) and
//! [`ResNetSeg`](crate::seg_model::ResNetSeg) (Lin et al., 2017, "Feature Pyramid Networks
//! for Object Detection", arXiv:1612.03144): 1x1 lateral convs on C2-C5, a top-down path
//! with nearest upsampling, a 3x3 conv + norm + SiLU smoothing block on P2 and a 1x1 head
//! whose logits are resized bilinearly to the input size.
//!
//! Parameter names under the decoder's VarBuilder: `lat.{0..3}.{weight,bias}`,
//! `smooth.0.weight` (the conv), `smooth.1.*` (the norm), `head.{weight,bias}`.

use candle::{Module, Result, Tensor};
use candle_nn::{BatchNorm, VarBuilder};
use keel_kernels::nn::{conv2d, Conv2d};
use keel_kernels::{resize_bilinear, resize_nearest};
use keel_norm::{Activation, Norm, NormKind};

use super::layers::{ConvNorm, ConvSpec};

/// The decoder and head (see the module docs).
pub(crate) struct FpnDecoder {
    lat: Vec<Conv2d>,
    smooth: ConvNorm,
    head: Conv2d,
}

impl FpnDecoder {
    /// A decoder on features of `in_channels` (C2-C5) with `fpn` channels, `num_classes`
    /// logits and `norm` in the smoothing block.
    pub fn new(
        in_channels: [usize; 4],
        fpn: usize,
        num_classes: usize,
        norm: NormKind,
        vb: &VarBuilder,
    ) -> Result<Self> {
        let lat = in_channels
            .iter()
            .enumerate()
            .map(|(i, &c)| conv2d(c, fpn, 1, Default::default(), vb.pp(format!("lat.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let s = ConvSpec {
            cin: fpn,
            cout: fpn,
            k: 3,
            stride: 1,
        };
        let smooth = ConvNorm::new(norm, s, vb.pp("smooth.0"), vb.pp("smooth.1"))?;
        let head = conv2d(fpn, num_classes, 1, Default::default(), vb.pp("head"))?;
        Ok(Self { lat, smooth, head })
    }

    /// The smoothing block's trainable BatchNorm, if its norm is `bn`.
    pub fn batch_norm(&self) -> Option<&BatchNorm> {
        match &self.smooth.norm {
            Norm::Batch(bn) => Some(bn),
            _ => None,
        }
    }

    /// Logits at `(h, w)` from C2-C5.
    ///
    /// # Shapes
    /// - feats: `(N, C_i, H_i, W_i)`, each level at least as large as the next.
    /// - output: `(N, num_classes, h, w)`.
    pub fn forward(
        &self,
        feats: &[Tensor; 4],
        (h, w): (usize, usize),
        train: bool,
    ) -> Result<Tensor> {
        let mut p = self.lat[3].forward(&feats[3])?;
        for i in (0..3).rev() {
            let (_, _, fh, fw) = feats[i].dims4()?;
            p = (self.lat[i].forward(&feats[i])? + resize_nearest(&p, (fh, fw))?)?;
        }
        let p = self.smooth.forward(&p, train, Activation::Silu)?;
        resize_bilinear(&self.head.forward(&p)?, (h, w))
    }
}
