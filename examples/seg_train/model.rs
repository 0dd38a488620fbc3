//! The segmentation network: the PyTorch eager twin of `shared/tools/torch_seg_twin.py`
//! (ResNet-18-style encoder, FPN-lite decoder) with every norm chosen by a [`NormKind`].
//!
//! Parameter names are the twin's `state_dict` keys (`stem.0.weight`, `stem.1.weight`,
//! `stages.2.0.skip.1.running_var`, `lat.3.bias`, `smooth.1.bias`, `head.weight`, ...), so
//! a twin checkpoint loads unchanged. `width 64, fpn 128, 21 classes` is the twin exactly
//! (11.46 M parameters).
use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, Context};
use candle::{DType, Device, Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder, VarMap};
use keel::norm::{conv_for, norm, Activation, Conv, Norm, NormKind};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The network's shape: base width `w` (stages w, 2w, 4w, 8w; stem w/2 then w), FPN width,
/// number of classes and norm.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelConfig {
    pub width: usize,
    pub fpn: usize,
    pub num_classes: usize,
    pub norm: NormKind,
}

impl ModelConfig {
    /// The widths of the four stages.
    pub fn widths(&self) -> [usize; 4] {
        let w = self.width;
        [w, 2 * w, 4 * w, 8 * w]
    }

    /// Checks the config before any variable is created: widths, and that the norm's group
    /// count divides every normalized layer.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.width < 2 || self.width % 2 != 0 {
            bail!(
                "--width {} must be an even number >= 2 (the stem's first conv has width/2 channels)",
                self.width
            )
        }
        if self.fpn == 0 {
            bail!("--fpn must be at least 1")
        }
        if self.num_classes < 2 {
            bail!(
                "--num-classes {} must be at least 2 (background and one class)",
                self.num_classes
            )
        }
        let mut layers = vec![("stem.1", self.width / 2), ("smooth.1", self.fpn)];
        for (i, w) in self.widths().into_iter().enumerate() {
            layers.push((["stages.0", "stages.1", "stages.2", "stages.3"][i], w));
        }
        for (name, c) in layers {
            self.norm
                .groups_for(c)
                .with_context(|| format!("--norm {} at layer {name} ({c} channels)", self.norm))?;
        }
        Ok(())
    }
}

/// conv (no bias) + norm, the pair every block is made of.
struct ConvNorm {
    conv: Conv,
    norm: Norm,
}

impl ConvNorm {
    #[allow(clippy::too_many_arguments)] // reason: mirrors nn.Conv2d's signature plus the norm
    fn new(
        kind: NormKind,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        conv_vb: VarBuilder,
        norm_vb: VarBuilder,
    ) -> candle::Result<Self> {
        let cfg = Conv2dConfig {
            padding: k / 2,
            stride,
            ..Default::default()
        };
        Ok(Self {
            conv: conv_for(kind, cin, cout, k, cfg, conv_vb)?,
            norm: norm(kind, cout, norm_vb)?,
        })
    }

    fn forward(&self, x: &Tensor, train: bool, act: Activation) -> candle::Result<Tensor> {
        // GN + SiLU runs as keel's fused kernel here.
        self.norm.forward_act(&self.conv.forward(x)?, train, act)
    }
}

/// ResNet basic block: conv3x3-norm-SiLU-conv3x3-norm, + skip, then SiLU.
struct Block {
    a: ConvNorm,
    b: ConvNorm,
    skip: Option<ConvNorm>,
}

impl Block {
    fn new(
        kind: NormKind,
        cin: usize,
        cout: usize,
        stride: usize,
        vb: VarBuilder,
    ) -> candle::Result<Self> {
        let skip = if stride == 1 && cin == cout {
            None
        } else {
            Some(ConvNorm::new(
                kind,
                cin,
                cout,
                1,
                stride,
                vb.pp("skip.0"),
                vb.pp("skip.1"),
            )?)
        };
        Ok(Self {
            a: ConvNorm::new(kind, cin, cout, 3, stride, vb.pp("c1"), vb.pp("n1"))?,
            b: ConvNorm::new(kind, cout, cout, 3, 1, vb.pp("c2"), vb.pp("n2"))?,
            skip,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> candle::Result<Tensor> {
        let y = self.a.forward(x, train, Activation::Silu)?;
        let y = self.b.forward(&y, train, Activation::Identity)?;
        let s = match &self.skip {
            None => x.clone(),
            Some(s) => s.forward(x, train, Activation::Identity)?,
        };
        candle_nn::ops::silu(&(y + s)?)
    }
}

/// The network.
pub struct SegNet {
    stem: [ConvNorm; 2],
    stages: Vec<[Block; 2]>,
    lat: Vec<keel::kernels::nn::Conv2d>,
    smooth: ConvNorm,
    head: keel::kernels::nn::Conv2d,
    batch_norms: Vec<(String, candle_nn::BatchNorm)>,
}

impl SegNet {
    /// Builds the network from `vb` (twin names).
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> anyhow::Result<Self> {
        cfg.validate()?;
        let kind = cfg.norm;
        let w = cfg.widths();
        let stem = [
            ConvNorm::new(
                kind,
                3,
                cfg.width / 2,
                3,
                2,
                vb.pp("stem.0"),
                vb.pp("stem.1"),
            )?,
            ConvNorm::new(
                kind,
                cfg.width / 2,
                w[0],
                3,
                2,
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
        let lat = w
            .iter()
            .enumerate()
            .map(|(i, &wi)| {
                keel::kernels::nn::conv2d(
                    wi,
                    cfg.fpn,
                    1,
                    Default::default(),
                    vb.pp(format!("lat.{i}")),
                )
            })
            .collect::<candle::Result<Vec<_>>>()?;
        let smooth = ConvNorm::new(
            kind,
            cfg.fpn,
            cfg.fpn,
            3,
            1,
            vb.pp("smooth.0"),
            vb.pp("smooth.1"),
        )?;
        let head = keel::kernels::nn::conv2d(
            cfg.fpn,
            cfg.num_classes,
            1,
            Default::default(),
            vb.pp("head"),
        )?;
        let mut net = Self {
            stem,
            stages,
            lat,
            smooth,
            head,
            batch_norms: Vec::new(),
        };
        net.batch_norms = net.collect_batch_norms();
        Ok(net)
    }

    fn collect_batch_norms(&self) -> Vec<(String, candle_nn::BatchNorm)> {
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
        push("smooth.1".into(), &self.smooth);
        out
    }

    /// The trainable BatchNorms (name prefix, layer): their running statistics live in the
    /// layer, so a mixed-precision forward (built on cast copies) copies them back.
    pub fn batch_norms(&self) -> &[(String, candle_nn::BatchNorm)] {
        &self.batch_norms
    }

    /// Logits `(N, num_classes, H, W)` for images `(N, 3, H, W)`.
    pub fn forward(&self, x: &Tensor, train: bool) -> candle::Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let mut y = self.stem[0].forward(x, train, Activation::Silu)?;
        y = self.stem[1].forward(&y, train, Activation::Silu)?;
        let mut feats = Vec::with_capacity(4);
        for stage in &self.stages {
            y = stage[0].forward(&y, train)?;
            y = stage[1].forward(&y, train)?;
            feats.push(y.clone());
        }
        let mut p = self.lat[3].forward(&feats[3])?;
        for i in (0..3).rev() {
            let (_, _, fh, fw) = feats[i].dims4()?;
            p = (self.lat[i].forward(&feats[i])? + upsample_nearest(&p, fh, fw)?)?;
        }
        let p = self.smooth.forward(&p, train, Activation::Silu)?;
        upsample_bilinear(&self.head.forward(&p)?, h, w)
    }
}

/// PyTorch's `F.interpolate(mode="nearest")` index: `floor(dst * in / out)`.
fn nearest_index(out: usize, inp: usize, dev: &Device) -> candle::Result<Tensor> {
    let scale = inp as f32 / out as f32;
    let idx: Vec<u32> = (0..out)
        .map(|d| ((d as f32 * scale).floor() as usize).min(inp - 1) as u32)
        .collect();
    Tensor::new(idx, dev)
}

/// Nearest-neighbour resize of `(N, C, h, w)` to `(N, C, oh, ow)`, as PyTorch's
/// `F.interpolate(mode="nearest")`, differentiable for any sizes (candle's own backward
/// handles integer factors only).
pub fn upsample_nearest(x: &Tensor, oh: usize, ow: usize) -> candle::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if (h, w) == (oh, ow) {
        return Ok(x.clone());
    }
    let x = x.index_select(&nearest_index(oh, h, x.device())?, 2)?;
    x.index_select(&nearest_index(ow, w, x.device())?, 3)
}

/// The `(out, in)` matrix of PyTorch's bilinear resize along one axis (align_corners=False).
fn bilinear_matrix(out: usize, inp: usize, dtype: DType, dev: &Device) -> candle::Result<Tensor> {
    let mut m = vec![0f32; out * inp];
    let scale = inp as f64 / out as f64;
    for d in 0..out {
        let src = ((d as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(inp - 1);
        let i1 = (i0 + 1).min(inp - 1);
        let l1 = (src - i0 as f64) as f32;
        m[d * inp + i0] += 1.0 - l1;
        m[d * inp + i1] += l1;
    }
    Tensor::from_vec(m, (out, inp), dev)?.to_dtype(dtype)
}

/// Bilinear resize of `(N, C, h, w)` to `(N, C, oh, ow)`, as PyTorch's
/// `F.interpolate(mode="bilinear", align_corners=False)`, written as two matmuls so it is
/// differentiable (candle 0.11's `upsample_bilinear2d` has no backward).
pub fn upsample_bilinear(x: &Tensor, oh: usize, ow: usize) -> candle::Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if (h, w) == (oh, ow) {
        return Ok(x.clone());
    }
    let mw = bilinear_matrix(ow, w, x.dtype(), x.device())?.t()?; // (w, ow)
    let mh = bilinear_matrix(oh, h, x.dtype(), x.device())?; // (oh, h)
    let y = x.reshape((n * c * h, w))?.matmul(&mw)?; // (n c h, ow)
    let y = y.reshape((n * c, h, ow))?;
    mh.broadcast_left(n * c)?
        .matmul(&y)?
        .reshape((n, c, oh, ow))
}

/// Sets every variable of `vm` from a seeded RNG with PyTorch's default init rules, so the
/// initial weights depend only on `seed` (candle's CPU `randn` is not seedable):
/// conv weights kaiming-uniform(a = sqrt 5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)); conv
/// biases U(-1/sqrt(fan_in), ..); norm weights 1, biases 0; running mean 0, variance 1.
pub fn init_weights(vm: &VarMap, seed: u64) -> anyhow::Result<()> {
    let data = vm.data().lock().unwrap_or_else(|e| e.into_inner());
    let sorted: BTreeMap<&String, &candle::Var> = data.iter().collect();
    let fan_in: HashMap<String, usize> = sorted
        .iter()
        .filter(|(_, v)| v.rank() == 4)
        .map(|(k, v)| {
            let d = v.dims();
            (
                k.trim_end_matches(".weight").to_string(),
                d[1] * d[2] * d[3],
            )
        })
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (name, var) in sorted {
        let (prefix, leaf) = name.rsplit_once('.').unwrap_or(("", name));
        let n = var.elem_count();
        let values: Vec<f32> = match (leaf, var.rank(), fan_in.get(prefix)) {
            ("weight", 4, Some(&f)) | ("bias", 1, Some(&f)) => {
                let bound = 1.0 / (f as f64).sqrt();
                (0..n)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect()
            }
            ("weight", 1, None) | ("running_var", 1, None) => vec![1.0; n],
            ("bias", 1, None) | ("running_mean", 1, None) => vec![0.0; n],
            _ => bail!(
                "init: no init rule for variable '{name}' of shape {:?}",
                var.dims()
            ),
        };
        let t = Tensor::from_vec(values, var.shape(), var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}

/// Number of trainable parameters (running statistics excluded), like PyTorch's
/// `sum(p.numel() for p in m.parameters())`.
pub fn count_params(vm: &VarMap) -> usize {
    let data = vm.data().lock().unwrap_or_else(|e| e.into_inner());
    data.iter()
        .filter(|(k, _)| !k.ends_with(".running_mean") && !k.ends_with(".running_var"))
        .map(|(_, v)| v.elem_count())
        .sum()
}
