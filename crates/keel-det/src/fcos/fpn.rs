//! A small Feature Pyramid Network (Lin et al., CVPR 2017) for FCOS: P3-P5 from C3-C5 and
//! optional P6/P7 from P5 (`LastLevelP6P7` with `use_P5`), with maskrcnn-benchmark / FCOS
//! state-dict names (`fcos_core/modeling/backbone/fpn.py`): `fpn_inner{2,3,4}` (1x1
//! laterals), `fpn_layer{2,3,4}` (3x3 outputs), `top_blocks.p6`, `top_blocks.p7`.
//!
//! With a norm (FCOS's `USE_GN`), each lateral/output conv is bias-free and followed by it:
//! keys `fpn_inner2.0.weight` (conv) and `fpn_inner2.1.*` (norm), as the reference's
//! `nn.Sequential(conv, GroupNorm)`; without, `fpn_inner2.weight/bias`. The top-down path
//! upsamples by 2 (nearest) and crops to the lateral's size, so odd sizes (`ceil(H / 2)`
//! backbones) work. The reference instead interpolates (nearest) straight to the lateral's
//! size (`F.interpolate(..., size=inner_lateral.shape[-2:])`, its `scale_factor=2` line is
//! commented out); for a lateral of size `H <= 2 h` both pick source pixel `floor(i / 2)`
//! (`floor(i * h / H)` is `floor(i / 2)` when `H` is `2h` or `2h - 1`), so the results
//! agree. P7 is `p7(relu(P6))`.
//!
//! Init as the reference (`conv_with_kaiming_uniform` of `make_layers.py`, `LastLevelP6P7`
//! of `fpn.py`): every lateral/output/P6/P7 conv weight is `kaiming_uniform_(a=1)`, i.e.
//! `U(-b, b)` with `b = sqrt(3 / fan_in)` (`fan_in = cin * k * k`, gain 1), and biases are
//! zero. Weight-Standardized convs (`gn+ws`) keep keel-norm's init.
use candle::{bail, Module, Result, Tensor};
use candle_nn::{init::Init, Conv2dConfig, VarBuilder};
use keel_norm::{conv_for, norm, Activation, Conv, Norm, NormKind};

/// The configuration of an [`Fpn`].
#[derive(Clone, Debug, PartialEq)]
pub struct FpnConfig {
    /// Channels of C3, C4, C5.
    pub in_channels: [usize; 3],
    /// Output width of every level.
    pub out_channels: usize,
    /// Norm after each lateral/output conv (`None`: plain convs with bias).
    pub norm: Option<NormKind>,
    /// Extra levels from P5: 0 (P3-P5), 1 (P6) or 2 (P6, P7).
    pub extra_levels: usize,
}

/// The reference's `kaiming_uniform_(a=1)` bound for a conv of `fan_in = cin * k * k`:
/// `sqrt(3) * gain / sqrt(fan_in)` with `gain = sqrt(2 / (1 + a^2)) = 1`.
fn kaiming_uniform_a1_bound(fan_in: usize) -> f64 {
    (3.0 / fan_in as f64).sqrt()
}

/// A `k x k` conv with `kaiming_uniform_(a=1)` weights and (when `bias`) zero bias.
fn kaiming_conv(
    cin: usize,
    cout: usize,
    k: usize,
    cfg: Conv2dConfig,
    bias: bool,
    vb: VarBuilder,
) -> Result<Conv> {
    let b = kaiming_uniform_a1_bound(cin * k * k);
    let w = vb.get_with_hints((cout, cin, k, k), "weight", Init::Uniform { lo: -b, up: b })?;
    let bias = if bias {
        Some(vb.get_with_hints(cout, "bias", Init::Const(0.0))?)
    } else {
        None
    };
    Ok(Conv::Plain(candle_nn::Conv2d::new(w, bias, cfg)))
}

/// A conv with an optional norm after it (no activation).
#[derive(Clone, Debug)]
struct ConvNorm {
    conv: Conv,
    norm: Option<Norm>,
}

impl ConvNorm {
    fn new(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        kind: Option<NormKind>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: k / 2,
            stride,
            ..Default::default()
        };
        match kind {
            Some(kind) => Ok(Self {
                conv: if kind.uses_weight_standardization() {
                    conv_for(kind, cin, cout, k, cfg, vb.pp(0))?
                } else {
                    kaiming_conv(cin, cout, k, cfg, false, vb.pp(0))?
                },
                norm: Some(norm(kind, cout, vb.pp(1))?),
            }),
            None => Ok(Self {
                conv: kaiming_conv(cin, cout, k, cfg, true, vb)?,
                norm: None,
            }),
        }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.conv.forward(x)?;
        match &self.norm {
            Some(n) => n.forward_act(&y, train, Activation::Identity),
            None => Ok(y),
        }
    }
}

/// The FPN (see the [module docs](self)).
#[derive(Clone, Debug)]
pub struct Fpn {
    inner: Vec<ConvNorm>,
    layer: Vec<ConvNorm>,
    top: Vec<Conv>,
}

/// Builds an [`Fpn`] under `vb`.
///
/// # Errors
/// Zero channels, more than 2 extra levels, a group count that does not divide a width.
///
/// ```
/// use candle::{DType, Device, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use keel_det::fcos::{fpn, FpnConfig};
/// # fn main() -> candle::Result<()> {
/// let vm = VarMap::new();
/// let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
/// let cfg = FpnConfig { in_channels: [8, 16, 32], out_channels: 16, norm: Some("gn".parse()?), extra_levels: 2 };
/// let fpn = fpn(&cfg, vb)?;
/// let c = |ch, s| Tensor::randn(0f32, 1., (1, ch, s, s), &Device::Cpu);
/// let p = fpn.forward_t(&[c(8, 8)?, c(16, 4)?, c(32, 2)?], true)?;
/// let sizes: Vec<usize> = p.iter().map(|t| t.dim(2).unwrap()).collect();
/// assert_eq!(sizes, [8, 4, 2, 1, 1]);
/// # Ok(()) }
/// ```
pub fn fpn(cfg: &FpnConfig, vb: VarBuilder) -> Result<Fpn> {
    if cfg.in_channels.contains(&0) || cfg.out_channels == 0 || cfg.extra_levels > 2 {
        bail!("Fpn: in_channels {:?} and out_channels ({}) must be positive and extra_levels ({}) at most 2 (P6, P7)", cfg.in_channels, cfg.out_channels, cfg.extra_levels)
    }
    if let Some(kind) = cfg.norm {
        kind.groups_for(cfg.out_channels)?;
    }
    let out = cfg.out_channels;
    let mut inner = vec![];
    let mut layer = vec![];
    for (i, &cin) in cfg.in_channels.iter().enumerate() {
        inner.push(ConvNorm::new(
            cin,
            out,
            1,
            1,
            cfg.norm,
            vb.pp(format!("fpn_inner{}", i + 2)),
        )?);
        layer.push(ConvNorm::new(
            out,
            out,
            3,
            1,
            cfg.norm,
            vb.pp(format!("fpn_layer{}", i + 2)),
        )?);
    }
    let s2 = Conv2dConfig {
        padding: 1,
        stride: 2,
        ..Default::default()
    };
    let top = ["p6", "p7"][..cfg.extra_levels]
        .iter()
        .map(|name| kaiming_conv(out, out, 3, s2, true, vb.pp("top_blocks").pp(name)))
        .collect::<Result<_>>()?;
    Ok(Fpn { inner, layer, top })
}

impl Fpn {
    /// P3..P5 (and P6, P7) from C3, C4, C5.
    ///
    /// # Shapes
    /// `c[i]`: `(N, in_channels[i], H_i, W_i)` with `H_{i+1} = ceil(H_i / 2)`; outputs
    /// `(N, out_channels, H_l, W_l)`, P6/P7 halving again (rounded up).
    pub fn forward_t(&self, c: &[Tensor], train: bool) -> Result<Vec<Tensor>> {
        if c.len() != 3 {
            bail!("Fpn: expected C3, C4, C5 (3 tensors), got {}", c.len())
        }
        let mut last = self.inner[2].forward_t(&c[2], train)?;
        let mut outs = vec![self.layer[2].forward_t(&last, train)?];
        for i in (0..2).rev() {
            let lateral = self.inner[i].forward_t(&c[i], train)?;
            let (h, w) = (lateral.dim(2)?, lateral.dim(3)?);
            let (h2, w2) = (2 * last.dim(2)?, 2 * last.dim(3)?);
            if h2 < h || w2 < w {
                bail!("Fpn: C{} is {h}x{w} but C{} is {}x{}; each level must be half the previous (rounded up)", i + 3, i + 4, h2 / 2, w2 / 2)
            }
            // `copy` first: candle 0.11's upsample_nearest2d backward overwrites its input's
            // gradient instead of adding to it, which would drop the share `last` gets from
            // its own output conv (`layer[i + 1]`); the copy's gradient is added to it.
            let up = last
                .copy()?
                .upsample_nearest2d(h2, w2)?
                .narrow(2, 0, h)?
                .narrow(3, 0, w)?;
            last = (lateral + up)?;
            outs.insert(0, self.layer[i].forward_t(&last, train)?);
        }
        let mut x = outs[2].clone();
        for (i, conv) in self.top.iter().enumerate() {
            x = conv.forward(&if i == 0 { x } else { x.relu()? })?;
            outs.push(x.clone());
        }
        Ok(outs)
    }
}
