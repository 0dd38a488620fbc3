//! [`SegNet`]: the blocks and the network.

use super::decoder::FpnDecoder;
use super::layers::{ConvNorm, ConvSpec};
use super::ModelConfig;
use candle::{Result, Tensor};
use candle_nn::{BatchNorm, VarBuilder};
use keel_norm::{Activation, Norm, NormKind};

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
        candle_nn::ops::silu(&(y + s)?)
    }
}

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
    stem: [ConvNorm; 2],
    stages: Vec<[Block; 2]>,
    decoder: FpnDecoder,
    batch_norms: Vec<(String, BatchNorm)>,
}

impl SegNet {
    /// Builds the network from `vb` (twin names), after [`ModelConfig::validate`].
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let kind = cfg.norm;
        let w = cfg.widths();
        let (half, k, stride) = (cfg.width / 2, 3, 2);
        let stem = [
            ConvNorm::new(
                kind,
                ConvSpec {
                    cin: 3,
                    cout: half,
                    k,
                    stride,
                },
                vb.pp("stem.0"),
                vb.pp("stem.1"),
            )?,
            ConvNorm::new(
                kind,
                ConvSpec {
                    cin: half,
                    cout: w[0],
                    k,
                    stride,
                },
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
        let decoder = FpnDecoder::new(w, cfg.fpn, cfg.num_classes, kind, &vb)?;
        let mut net = Self {
            stem,
            stages,
            decoder,
            batch_norms: Vec::new(),
        };
        net.batch_norms = net.collect_batch_norms();
        Ok(net)
    }

    fn collect_batch_norms(&self) -> Vec<(String, BatchNorm)> {
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
        let data = vm.data().lock().unwrap_or_else(|e| e.into_inner());
        for (name, bn) in &self.batch_norms {
            for (k, t) in [
                ("running_mean", bn.running_mean()),
                ("running_var", bn.running_var()),
            ] {
                let Some(var) = data.get(&format!("{name}.{k}")) else {
                    candle::bail!("SegNet::copy_bn_stats_to: the VarMap has no variable {name}.{k}; pass the VarMap the master model was built from")
                };
                var.set(&t.to_dtype(candle::DType::F32)?)?;
            }
        }
        Ok(())
    }

    /// Logits for images; `train` selects batch statistics for BatchNorm.
    ///
    /// # Shapes
    /// - x: `(N, 3, H, W)`, any `H, W >= 1` (the stride-32 features are resized back).
    /// - output: `(N, num_classes, H, W)`, x's dtype.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let mut y = self.stem[0].forward(x, train, Activation::Silu)?;
        y = self.stem[1].forward(&y, train, Activation::Silu)?;
        let mut feats = Vec::with_capacity(4);
        for stage in &self.stages {
            y = stage[0].forward(&y, train)?;
            y = stage[1].forward(&y, train)?;
            feats.push(y.clone());
        }
        let feats: [Tensor; 4] = feats
            .try_into()
            .map_err(|_| candle::Error::Msg("SegNet: expected 4 stages".into()))?;
        self.decoder.forward(&feats, (h, w), train)
    }
}
