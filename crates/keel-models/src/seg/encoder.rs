//! [`SegEncoder`]: SegNet's ResNet-18-style encoder (He et al., 2016, arXiv:1512.03385)
//! on its own, the backbone a detector puts an FPN on: a stem of two stride-2 conv blocks
//! and four stages of two basic blocks (strides 1, 2, 2, 2), so the stage outputs C2-C5
//! have strides 4, 8, 16 and 32. Parameter names are SegNet's (`stem.*`, `stages.*`) under
//! the given VarBuilder.
use candle::{Result, Tensor};
use candle_nn::{BatchNorm, VarBuilder, VarMap};
use keel_norm::{Activation, Norm, NormKind};

use super::layers::{ConvNorm, ConvSpec};

/// ResNet basic block: conv3x3-norm-SiLU-conv3x3-norm, + skip, then SiLU.
struct Block {
    a: ConvNorm,
    b: ConvNorm,
    skip: Option<ConvNorm>,
}

impl Block {
    fn new(kind: NormKind, cin: usize, cout: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let skip = if stride == 1 && cin == cout {
            None
        } else {
            let s = ConvSpec {
                cin,
                cout,
                k: 1,
                stride,
            };
            Some(ConvNorm::new(kind, s, vb.pp("skip.0"), vb.pp("skip.1"))?)
        };
        let a = ConvSpec {
            cin,
            cout,
            k: 3,
            stride,
        };
        let b = ConvSpec {
            cin: cout,
            cout,
            k: 3,
            stride: 1,
        };
        Ok(Self {
            a: ConvNorm::new(kind, a, vb.pp("c1"), vb.pp("n1"))?,
            b: ConvNorm::new(kind, b, vb.pp("c2"), vb.pp("n2"))?,
            skip,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.a.forward(x, train, Activation::Silu)?;
        let y = self.b.forward(&y, train, Activation::Identity)?;
        let s = match &self.skip {
            None => x.clone(),
            Some(s) => s.forward(x, train, Activation::Identity)?,
        };
        // One fused op (one graph node, one backward pass) for silu(y + s).
        keel_kernels::add_silu(&y, &s)
    }
}

/// SegNet's encoder on its own: a stem of two stride-2 conv blocks and four stages of two
/// basic blocks (strides 1, 2, 2, 2), so C2-C5 have strides 4, 8, 16, 32; parameter names
/// are SegNet's (`stem.*`, `stages.*`) under the given VarBuilder.
///
/// # Example
/// ```
/// use candle::{DType, Device, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use keel_models::seg::{init_weights, SegEncoder};
/// let vm = VarMap::new();
/// let enc = SegEncoder::new(8, "gn:4".parse()?, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
/// init_weights(&vm, 0)?;
/// let c = enc.forward(&Tensor::randn(0f32, 1.0, (1, 3, 64, 48), &Device::Cpu)?, true)?;
/// let dims: Vec<_> = c.iter().map(|t| t.dims().to_vec()).collect();
/// assert_eq!(dims, [[1, 8, 16, 12], [1, 16, 8, 6], [1, 32, 4, 3], [1, 64, 2, 2]]);
/// assert_eq!(enc.widths(), [8, 16, 32, 64]);
/// # Ok::<(), candle::Error>(())
/// ```
pub struct SegEncoder {
    stem: [ConvNorm; 2],
    stages: Vec<[Block; 2]>,
    width: usize,
}

impl SegEncoder {
    /// Builds the encoder of base width `width` (stem `width / 2` then `width`; stages
    /// `w, 2w, 4w, 8w`) with `kind` as every norm.
    ///
    /// # Errors
    /// An odd or too small width, a group count of `kind` that does not divide a layer.
    pub fn new(width: usize, kind: NormKind, vb: VarBuilder) -> Result<Self> {
        if width < 2 || !width.is_multiple_of(2) {
            candle::bail!("SegEncoder: width {width} must be an even number >= 2 (the stem's first conv has width/2 channels)")
        }
        let w = [width, 2 * width, 4 * width, 8 * width];
        for (name, c) in [
            ("stem.1", width / 2),
            ("stages.0", w[0]),
            ("stages.1", w[1]),
            ("stages.2", w[2]),
            ("stages.3", w[3]),
        ] {
            if let Err(e) = kind.groups_for(c) {
                candle::bail!("SegEncoder: norm {kind} at layer {name} ({c} channels): {e}")
            }
        }
        let spec = |cin, cout| ConvSpec {
            cin,
            cout,
            k: 3,
            stride: 2,
        };
        let stem = [
            ConvNorm::new(kind, spec(3, width / 2), vb.pp("stem.0"), vb.pp("stem.1"))?,
            ConvNorm::new(
                kind,
                spec(width / 2, w[0]),
                vb.pp("stem.3"),
                vb.pp("stem.4"),
            )?,
        ];
        let mut stages = Vec::new();
        let mut cin = w[0];
        for (i, &wi) in w.iter().enumerate() {
            let vb = vb.pp(format!("stages.{i}"));
            let stride = if i == 0 { 1 } else { 2 };
            stages.push([
                Block::new(kind, cin, wi, stride, vb.pp("0"))?,
                Block::new(kind, wi, wi, 1, vb.pp("1"))?,
            ]);
            cin = wi;
        }
        Ok(Self {
            stem,
            stages,
            width,
        })
    }

    /// The channels of C2, C3, C4, C5: `w, 2w, 4w, 8w`.
    pub fn widths(&self) -> [usize; 4] {
        let w = self.width;
        [w, 2 * w, 4 * w, 8 * w]
    }

    /// The trainable BatchNorms (name prefix under the encoder's VarBuilder, layer).
    pub fn batch_norms(&self) -> Vec<(String, BatchNorm)> {
        let mut out = Vec::new();
        let mut push = |name: String, cn: &ConvNorm| {
            if let Norm::Batch(bn) = &cn.norm {
                out.push((name, bn.clone()));
            }
        };
        push("stem.1".into(), &self.stem[0]);
        push("stem.4".into(), &self.stem[1]);
        for (i, stage) in self.stages.iter().enumerate() {
            for (j, b) in stage.iter().enumerate() {
                push(format!("stages.{i}.{j}.n1"), &b.a);
                push(format!("stages.{i}.{j}.n2"), &b.b);
                if let Some(s) = &b.skip {
                    push(format!("stages.{i}.{j}.skip.1"), s);
                }
            }
        }
        out
    }

    /// The stage outputs C2, C3, C4, C5; `train` selects batch statistics for BatchNorm.
    ///
    /// # Shapes
    /// - x: `(N, 3, H, W)`, any `H, W >= 1`.
    /// - output `i`: `(N, widths()[i], H_i, W_i)`, each side halved (rounded up) by every
    ///   stride-2 conv: strides 4, 8, 16, 32.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let mut y = self.stem[0].forward(x, train, Activation::Silu)?;
        y = self.stem[1].forward(&y, train, Activation::Silu)?;
        let mut feats = Vec::with_capacity(4);
        for stage in &self.stages {
            y = stage[0].forward(&y, train)?;
            y = stage[1].forward(&y, train)?;
            feats.push(y.clone());
        }
        Ok(feats)
    }
}

/// Copies the running statistics of `batch_norms` (name prefix, layer), e.g. those of a
/// cast mixed-precision copy of a model, into the f32 variables `{prefix}.running_mean` /
/// `{prefix}.running_var` of `vm`, the VarMap the master model was built from; `op` names
/// the caller in errors.
pub fn copy_bn_stats(op: &str, batch_norms: &[(String, BatchNorm)], vm: &VarMap) -> Result<()> {
    let data = vm.data().lock().unwrap_or_else(|e| e.into_inner());
    for (name, bn) in batch_norms {
        for (k, t) in [
            ("running_mean", bn.running_mean()),
            ("running_var", bn.running_var()),
        ] {
            let Some(var) = data.get(&format!("{name}.{k}")) else {
                candle::bail!("{op}: the VarMap has no variable {name}.{k}; pass the VarMap the master model was built from")
            };
            var.set(&t.to_dtype(candle::DType::F32)?)?;
        }
    }
    Ok(())
}
