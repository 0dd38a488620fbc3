//! [`ResNet`]: the blocks, the stem pool and the network.

use candle::{Module, ModuleT, Result, Tensor, Var};
use candle_nn::{Conv2dConfig, Linear, VarBuilder, VarMap};
use keel_norm::{conv_for, norm, Conv, Norm, NormKind};

use super::config::{ConvSpec, ResNetConfig};

/// conv (no bias, padding `k / 2`) + norm; `norm` is `None` once folded into the conv.
#[derive(Clone, Debug)]
struct ConvNorm {
    conv: Conv,
    norm: Option<Norm>,
}

impl ConvNorm {
    fn new(kind: NormKind, s: &ConvSpec, vb: &VarBuilder) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: s.k / 2,
            stride: s.stride,
            ..Default::default()
        };
        Ok(Self {
            conv: conv_for(kind, s.cin, s.cout, s.k, cfg, vb.pp(&s.conv))?,
            norm: Some(norm(kind, s.cout, vb.pp(&s.norm))?),
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.conv.forward(x)?;
        match &self.norm {
            Some(n) => n.forward_t(&y, train),
            None => Ok(y),
        }
    }

    /// This pair with a FrozenBatchNorm folded into the conv (`*folded += 1`), else as is.
    fn fold(&self, folded: &mut usize) -> Result<Self> {
        match (&self.conv, &self.norm) {
            (Conv::Plain(c), Some(Norm::Frozen(bn))) => {
                *folded += 1;
                Ok(Self {
                    conv: Conv::Plain(bn.fold_into(c)?),
                    norm: None,
                })
            }
            _ => Ok(self.clone()),
        }
    }
}

/// A BasicBlock (2 convs) or Bottleneck (3 convs): ReLU after every norm but the last, the
/// identity or downsample added, then ReLU.
#[derive(Clone, Debug)]
struct Block {
    convs: Vec<ConvNorm>,
    downsample: Option<ConvNorm>,
}

impl Block {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = x.clone();
        let last = self.convs.len() - 1;
        for (i, cn) in self.convs.iter().enumerate() {
            y = cn.forward(&y, train)?;
            if i < last {
                y = y.relu()?;
            }
        }
        let identity = match &self.downsample {
            Some(d) => d.forward(x, train)?,
            None => x.clone(),
        };
        // One fused op (one graph node, one backward pass) for relu(y + identity).
        keel_kernels::add_relu(&y, &identity)
    }
}

/// torchvision's stem pool, `MaxPool2d(kernel_size=3, stride=2, padding=1)`, as tensor ops
/// with a backward (candle's `max_pool2d` has none for kernel != stride).
///
/// The input is a ReLU output (>= 0), so zero padding gives the same maxima as PyTorch's
/// `-inf` padding. As in PyTorch, the gradient of a window goes to its first maximum in
/// row-major order (ties are common in f16): the output is `sum_k tap_k * first_k`, with
/// `first_k` the detached one-hot mask of that maximum. (A padded position can take a
/// window's gradient only when the window's maximum is 0, where the ReLU before the pool
/// passes none anyway.)
///
/// # Shapes
/// `(N, C, H, W) -> (N, C, (H - 1) / 2 + 1, (W - 1) / 2 + 1)`.
pub(crate) fn stem_max_pool(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (ho, wo) = ((h.max(1) - 1) / 2 + 1, (w.max(1) - 1) / 2 + 1);
    // Padded to 2 * (out + 1) rows/cols: padded row 2i + d (d in 0..3) is pair i + d / 2,
    // member d % 2 of the (out + 1, 2) reshape.
    let xp = x
        .pad_with_zeros(2, 1, 2 * ho + 1 - h)?
        .pad_with_zeros(3, 1, 2 * wo + 1 - w)?
        .reshape((n, c, ho + 1, 2, wo + 1, 2))?;
    let mut taps = Vec::with_capacity(9);
    for dy in 0..3 {
        for dx in 0..3 {
            let tap = xp
                .narrow(2, dy / 2, ho)?
                .narrow(3, dy % 2, 1)?
                .narrow(4, dx / 2, wo)?
                .narrow(5, dx % 2, 1)?
                .reshape((n, c, ho, wo))?;
            taps.push(tap);
        }
    }
    let max = Tensor::stack(&taps, 0)?.max(0)?.detach();
    let mut taken = max.zeros_like()?;
    let mut out = max.zeros_like()?;
    for tap in &taps {
        // 1 where this tap is the window's first maximum (comparisons carry no gradient).
        let first = (tap.eq(&max)?.to_dtype(x.dtype())? * (1.0 - &taken)?)?;
        taken = (taken + &first)?;
        out = (out + (tap * first)?)?;
    }
    Ok(out)
}

/// The VarMap name of key `name` under a VarBuilder prefix (`""` at the root).
pub(crate) fn var_name(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// What [`ResNet::forward`] returns.
#[derive(Clone, Debug)]
pub struct ResNetOutput {
    /// C2-C5: the outputs of `layer1` .. `layer4`, strides 4, 8, 16, 32, channels
    /// [`ResNetConfig::out_channels`].
    pub features: [Tensor; 4],
    /// `fc(avgpool(C5))`, `(N, num_classes)`, when the config has `with_fc`.
    pub logits: Option<Tensor>,
}

/// A torchvision ResNet (He et al., 2016, arXiv:1512.03385; v1.5 Bottleneck with the stride on
/// the 3x3 conv) with torchvision's `state_dict` names, every norm chosen by a [`NormKind`],
/// and detectron2's `freeze_at`. See the [module docs](super) for loading a checkpoint.
///
/// ```
/// use candle::{DType, Device, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use keel_models::resnet::{ResNet, ResNetConfig, ResNetDepth};
/// let vm = VarMap::new();
/// let cfg = ResNetConfig { freeze_at: 1, ..ResNetConfig::backbone(ResNetDepth::R18, "gn".parse()?) };
/// let net = ResNet::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu).pp("backbone"))?;
/// let out = net.forward(&Tensor::randn(0f32, 1.0, (1, 3, 40, 36), &Device::Cpu)?, true)?;
/// let dims: Vec<_> = out.features.iter().map(|f| f.dims().to_vec()).collect();
/// assert_eq!(dims, [[1, 64, 10, 9], [1, 128, 5, 5], [1, 256, 3, 3], [1, 512, 2, 2]]);
/// // The stem is frozen: conv1 and bn1 are not among the trainable variables.
/// let names = net.trainable_names();
/// assert!(!names.iter().any(|n| n.starts_with("backbone.conv1") || n.starts_with("backbone.bn1")));
/// assert!(names.contains(&"backbone.layer1.0.conv1.weight".to_string()));
/// # Ok::<(), candle::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct ResNet {
    cfg: ResNetConfig,
    prefix: String,
    stem: ConvNorm,
    stages: [Vec<Block>; 4],
    fc: Option<Linear>,
    trainable: Vec<String>,
}

impl ResNet {
    /// Builds the network from `vb` (torchvision names under `vb`'s prefix) after
    /// [`ResNetConfig::validate`].
    pub fn new(cfg: &ResNetConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let layout = cfg.layout();
        let prefix = vb.prefix();
        let full = |name: &str| var_name(&prefix, name);
        let mut trainable = Vec::new();
        let mut build = |s: &ConvSpec, stage: usize| -> Result<ConvNorm> {
            let kind = cfg.norm_for_stage(stage);
            if stage > cfg.freeze_at {
                trainable.push(full(&format!("{}.weight", s.conv)));
                if !matches!(kind, NormKind::FrozenBatchNorm) {
                    trainable.push(full(&format!("{}.weight", s.norm)));
                    trainable.push(full(&format!("{}.bias", s.norm)));
                }
            }
            ConvNorm::new(kind, s, &vb)
        };
        let stem = build(&layout.stem, 1)?;
        let mut stages: [Vec<Block>; 4] = Default::default();
        for (s, blocks) in layout.stages.iter().enumerate() {
            for b in blocks {
                let convs = b
                    .convs
                    .iter()
                    .map(|c| build(c, s + 2))
                    .collect::<Result<Vec<_>>>()?;
                let downsample = b.downsample.as_ref().map(|d| build(d, s + 2)).transpose()?;
                stages[s].push(Block { convs, downsample });
            }
        }
        let fc = if cfg.with_fc {
            trainable.push(full("fc.weight"));
            trainable.push(full("fc.bias"));
            let c5 = cfg.out_channels()[3];
            Some(candle_nn::linear(c5, cfg.num_classes, vb.pp("fc"))?)
        } else {
            None
        };
        trainable.sort();
        Ok(Self {
            cfg: *cfg,
            prefix,
            stem,
            stages,
            fc,
            trainable,
        })
    }

    /// The config the network was built with.
    pub fn config(&self) -> &ResNetConfig {
        &self.cfg
    }

    /// The VarBuilder prefix the variables live under (`""` at the root).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The full names (with [`ResNet::prefix`]) of the variables that train, sorted: conv
    /// weights, BatchNorm / GroupNorm affine parameters and `fc` outside the frozen stages.
    /// Running statistics, FrozenBatchNorm tensors and frozen stages are left out. Everything
    /// else in a VarMap that holds a larger model (a decoder, a head) is not the backbone's,
    /// so these names split the parameters for a lower backbone learning rate.
    pub fn trainable_names(&self) -> &[String] {
        &self.trainable
    }

    /// The variables of [`ResNet::trainable_names`] from `vm`, the VarMap the network was
    /// built from, in name order. Errors naming the first variable `vm` lacks.
    pub fn trainable_vars(&self, vm: &VarMap) -> Result<Vec<Var>> {
        let data = vm.data().lock().unwrap_or_else(|e| e.into_inner());
        self.trainable
            .iter()
            .map(|name| match data.get(name) {
                Some(v) => Ok(v.clone()),
                None => candle::bail!(
                    "ResNet::trainable_vars: the VarMap has no variable '{name}'; pass the \
                     VarMap the ResNet was built from"
                ),
            })
            .collect()
    }

    /// A copy for inference with every FrozenBatchNorm folded into the conv before it
    /// ([`FrozenBatchNorm2d::fold_into`](keel_norm::FrozenBatchNorm2d::fold_into)): one conv
    /// with a bias instead of a conv and a per-channel affine map, the same outputs up to
    /// rounding. Trainable BatchNorm and GroupNorm stay. The folded weights are new tensors,
    /// not the VarMap's variables: train the original, fold for deployment. Errors when the
    /// network has no FrozenBatchNorm.
    pub fn fold_frozen_bn(&self) -> Result<ResNet> {
        let mut folded = 0;
        let mut net = self.clone();
        net.stem = self.stem.fold(&mut folded)?;
        for blocks in net.stages.iter_mut() {
            for b in blocks.iter_mut() {
                for cn in b.convs.iter_mut() {
                    *cn = cn.fold(&mut folded)?;
                }
                if let Some(d) = &mut b.downsample {
                    *d = d.fold(&mut folded)?;
                }
            }
        }
        if folded == 0 {
            candle::bail!(
                "ResNet::fold_frozen_bn: norm {} with freeze_at {} has no FrozenBatchNorm to \
                 fold; build with norm frozen-bn (or bn with frozen stages)",
                self.cfg.norm,
                self.cfg.freeze_at
            )
        }
        Ok(net)
    }

    /// C2-C5 and, with `fc`, the logits. `train` selects batch statistics for trainable
    /// BatchNorm (no other norm depends on it). The outputs of the frozen stages
    /// (among them the frozen C2-C5) are detached.
    ///
    /// # Shapes
    /// - x: `(N, 3, H, W)`, any `H, W >= 1`.
    /// - features: `(N, C_i, ceil(H / s), ceil(W / s))` for strides `s = 4, 8, 16, 32` (each
    ///   stride-2 layer maps `n -> ceil(n / 2)`).
    /// - logits: `(N, num_classes)`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<ResNetOutput> {
        let freeze = |stage: usize, y: Tensor| {
            if stage <= self.cfg.freeze_at {
                y.detach()
            } else {
                y
            }
        };
        let y = self.stem.forward(x, train)?.relu()?;
        let mut y = freeze(1, stem_max_pool(&y)?);
        let mut feats = Vec::with_capacity(4);
        for (s, blocks) in self.stages.iter().enumerate() {
            for b in blocks {
                y = b.forward(&y, train)?;
            }
            y = freeze(s + 2, y);
            feats.push(y.clone());
        }
        let logits = match &self.fc {
            Some(fc) => Some(fc.forward(&y.mean((2, 3))?)?),
            None => None,
        };
        let features: [Tensor; 4] = feats
            .try_into()
            .map_err(|_| candle::Error::Msg("ResNet: expected 4 stages".into()))?;
        Ok(ResNetOutput { features, logits })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::{Device, Var};

    /// Values and gradient of PyTorch's `max_pool2d(x, 3, 2, 1)` on a 4x5 map with ties:
    /// `y.sum().backward()` gives the gradient to each window's first maximum.
    /// ```python
    /// x = torch.tensor(v).reshape(1, 1, 4, 5).requires_grad_(True)
    /// y = F.max_pool2d(x, 3, 2, 1); y.sum().backward()  # y and x.grad as below
    /// ```
    #[test]
    fn the_stem_pool_matches_pytorch_with_ties() -> Result<()> {
        let v = [
            1f32, 1., 0., 2., 2., 1., 0., 0., 2., 1., 3., 3., 0., 0., 0., 0., 0., 0., 1., 1.,
        ];
        let x = Var::from_tensor(&Tensor::from_slice(&v, (1, 1, 4, 5), &Device::Cpu)?)?;
        let y = stem_max_pool(x.as_tensor())?;
        assert_eq!(y.dims(), &[1, 1, 2, 3]);
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, [1., 2., 2., 3., 3., 2.]);
        let g = y.sum_all()?.backward()?;
        let gx = g.get(x.as_tensor()).expect("a gradient for x");
        let want = [
            1f32, 0., 0., 2., 0., 0., 0., 0., 1., 0., 1., 1., 0., 0., 0., 0., 0., 0., 0., 0.,
        ];
        assert_eq!(gx.flatten_all()?.to_vec1::<f32>()?, want);
        Ok(())
    }
}
