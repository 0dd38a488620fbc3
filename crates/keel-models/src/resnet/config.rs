//! [`ResNetConfig`] and [`ResNetDepth`]: the network's shape, its layer layout and the
//! torchvision `state_dict` keys that layout implies.

use std::fmt;
use std::str::FromStr;

use candle::{bail, Result};
use keel_norm::NormKind;
use serde::{Deserialize, Serialize};

/// Which torchvision ResNet: the block type and the number of blocks per stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "usize", into = "usize")]
pub enum ResNetDepth {
    /// ResNet-18: BasicBlock, `[2, 2, 2, 2]`.
    R18,
    /// ResNet-34: BasicBlock, `[3, 4, 6, 3]`.
    R34,
    /// ResNet-50: Bottleneck, `[3, 4, 6, 3]`.
    R50,
    /// ResNet-101: Bottleneck, `[3, 4, 23, 3]`.
    R101,
}

impl ResNetDepth {
    /// The number of layers: 18, 34, 50 or 101.
    pub fn layers(self) -> usize {
        match self {
            ResNetDepth::R18 => 18,
            ResNetDepth::R34 => 34,
            ResNetDepth::R50 => 50,
            ResNetDepth::R101 => 101,
        }
    }

    /// Blocks per stage (`layer1` .. `layer4`).
    pub fn blocks(self) -> [usize; 4] {
        match self {
            ResNetDepth::R18 => [2, 2, 2, 2],
            ResNetDepth::R34 | ResNetDepth::R50 => [3, 4, 6, 3],
            ResNetDepth::R101 => [3, 4, 23, 3],
        }
    }

    /// Whether the blocks are Bottlenecks (1x1, 3x3, 1x1; expansion 4) rather than
    /// BasicBlocks (3x3, 3x3; expansion 1).
    pub fn is_bottleneck(self) -> bool {
        matches!(self, ResNetDepth::R50 | ResNetDepth::R101)
    }

    /// The output width of a block relative to its `planes`: 4 for Bottleneck, 1 for
    /// BasicBlock.
    pub fn expansion(self) -> usize {
        if self.is_bottleneck() {
            4
        } else {
            1
        }
    }
}

impl TryFrom<usize> for ResNetDepth {
    type Error = candle::Error;

    fn try_from(n: usize) -> Result<Self> {
        Ok(match n {
            18 => ResNetDepth::R18,
            34 => ResNetDepth::R34,
            50 => ResNetDepth::R50,
            101 => ResNetDepth::R101,
            _ => bail!("ResNet depth {n} is not one of 18, 34, 50, 101"),
        })
    }
}

impl From<ResNetDepth> for usize {
    fn from(d: ResNetDepth) -> usize {
        d.layers()
    }
}

impl fmt::Display for ResNetDepth {
    /// torchvision's model name: `resnet18`, `resnet34`, `resnet50`, `resnet101`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "resnet{}", self.layers())
    }
}

impl FromStr for ResNetDepth {
    type Err = candle::Error;

    /// Parses `resnet18` (torchvision's name) or `18`.
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        let digits = t.strip_prefix("resnet").unwrap_or(&t);
        match digits.parse::<usize>() {
            Ok(n) => ResNetDepth::try_from(n),
            Err(_) => bail!(
                "unknown ResNet '{s}': expected one of resnet18, resnet34, resnet50, resnet101"
            ),
        }
    }
}

/// A torchvision ResNet's shape, serialized with serde (depth as a number, norm as its
/// string form: `{"depth": 50, "norm": "frozen-bn", "freeze_at": 2, "with_fc": false,
/// "num_classes": 1000}`).
///
/// `freeze_at` follows detectron2: stage 1 is the stem (`conv1`, `bn1`), stages 2-5 are
/// `layer1`-`layer4`; `freeze_at = k` freezes stages `1..=k`. 0 freezes nothing, 1 the stem,
/// 2 the stem and `layer1` (detectron2's default), 5 the whole backbone. A frozen stage's
/// parameters get no gradient (its output is detached, so no gradient reaches it or the
/// input) and are left out of [`ResNet::trainable_vars`](super::ResNet::trainable_vars), so
/// an optimizer keeps no state for them; its trainable BatchNorms become FrozenBatchNorms
/// (same keys), as detectron2's `freeze()` does.
///
/// ```
/// use keel_models::resnet::{ResNetConfig, ResNetDepth};
/// let cfg: ResNetConfig = serde_json::from_str(
///     r#"{"depth": 18, "norm": "gn", "freeze_at": 0, "with_fc": false, "num_classes": 1000}"#,
/// ).unwrap();
/// cfg.validate()?;
/// assert_eq!(cfg.depth, ResNetDepth::R18);
/// assert_eq!(cfg.out_channels(), [64, 128, 256, 512]);
/// # Ok::<(), candle::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResNetConfig {
    /// ResNet-18, -34, -50 or -101.
    pub depth: ResNetDepth,
    /// The norm of every conv block (frozen stages turn `bn` into `frozen-bn`).
    pub norm: NormKind,
    /// Stages frozen from the input (see the type docs), 0..=5.
    pub freeze_at: usize,
    /// Whether the network has torchvision's classifier (`avgpool` + `fc`).
    pub with_fc: bool,
    /// Classes of `fc` (used only when `with_fc`), >= 1.
    pub num_classes: usize,
}

impl Default for ResNetConfig {
    /// detectron2's backbone defaults: ResNet-50, FrozenBatchNorm, `freeze_at` 2, no `fc`.
    fn default() -> Self {
        Self {
            depth: ResNetDepth::R50,
            norm: NormKind::FrozenBatchNorm,
            freeze_at: 2,
            with_fc: false,
            num_classes: 1000,
        }
    }
}

/// One conv (no bias) + norm pair of the layout: torchvision names and geometry.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ConvSpec {
    /// The conv's name, e.g. `layer1.0.conv1` or `layer1.0.downsample.0`.
    pub conv: String,
    /// The norm's name, e.g. `layer1.0.bn1` or `layer1.0.downsample.1`.
    pub norm: String,
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
}

/// One residual block: its convs in order and the optional downsample.
#[derive(Clone, Debug)]
pub(crate) struct BlockSpec {
    pub convs: Vec<ConvSpec>,
    pub downsample: Option<ConvSpec>,
}

/// The whole layout: the stem and the blocks of `layer1` .. `layer4`.
#[derive(Clone, Debug)]
pub(crate) struct Layout {
    pub stem: ConvSpec,
    pub stages: [Vec<BlockSpec>; 4],
}

fn spec(conv: String, norm: String, cin: usize, cout: usize, k: usize, stride: usize) -> ConvSpec {
    ConvSpec {
        conv,
        norm,
        cin,
        cout,
        k,
        stride,
    }
}

impl ResNetConfig {
    /// A config for `depth` with `norm`, nothing frozen and no `fc`.
    pub fn backbone(depth: ResNetDepth, norm: NormKind) -> Self {
        Self {
            depth,
            norm,
            freeze_at: 0,
            with_fc: false,
            num_classes: 1000,
        }
    }

    /// Channels of C2-C5 (the outputs of `layer1` .. `layer4`): `[64, 128, 256, 512]` times
    /// the block expansion.
    pub fn out_channels(&self) -> [usize; 4] {
        [64, 128, 256, 512].map(|p| p * self.depth.expansion())
    }

    /// The norm stage `stage` (1 = stem, 2-5 = `layer1`-`layer4`) is built with: `bn` in a
    /// frozen stage becomes `frozen-bn`.
    pub fn norm_for_stage(&self, stage: usize) -> NormKind {
        match self.norm {
            NormKind::BatchNorm if stage <= self.freeze_at => NormKind::FrozenBatchNorm,
            kind => kind,
        }
    }

    /// Checks the config before any variable is created; errors name the field, the value
    /// and the fix.
    pub fn validate(&self) -> Result<()> {
        if self.freeze_at > 5 {
            bail!(
                "ResNetConfig: freeze_at {} is out of range; 0 freezes nothing, 1 the stem, \
                 2-5 also layer1-layer4 (5 = the whole backbone)",
                self.freeze_at
            )
        }
        if self.with_fc && self.num_classes == 0 {
            bail!("ResNetConfig: num_classes must be at least 1 when with_fc is true, got 0")
        }
        for spec in self.layout().all_convs() {
            if let Err(e) = self.norm.groups_for(spec.cout) {
                bail!(
                    "ResNetConfig: norm {} at {} ({} channels): {e}",
                    self.norm,
                    spec.norm,
                    spec.cout
                )
            }
        }
        Ok(())
    }

    /// torchvision's layout (v1.5: the stride sits on the 3x3 conv of a Bottleneck).
    pub(crate) fn layout(&self) -> Layout {
        let stem = spec("conv1".into(), "bn1".into(), 3, 64, 7, 2);
        let exp = self.depth.expansion();
        let mut inplanes = 64;
        let stages = std::array::from_fn(|s| {
            let planes = 64 << s;
            let first_stride = if s == 0 { 1 } else { 2 };
            (0..self.depth.blocks()[s])
                .map(|b| {
                    let p = format!("layer{}.{b}", s + 1);
                    let stride = if b == 0 { first_stride } else { 1 };
                    let c = |i: usize| (format!("{p}.conv{i}"), format!("{p}.bn{i}"));
                    let convs = if self.depth.is_bottleneck() {
                        let ((c1, n1), (c2, n2), (c3, n3)) = (c(1), c(2), c(3));
                        vec![
                            spec(c1, n1, inplanes, planes, 1, 1),
                            spec(c2, n2, planes, planes, 3, stride),
                            spec(c3, n3, planes, planes * exp, 1, 1),
                        ]
                    } else {
                        let ((c1, n1), (c2, n2)) = (c(1), c(2));
                        vec![
                            spec(c1, n1, inplanes, planes, 3, stride),
                            spec(c2, n2, planes, planes, 3, 1),
                        ]
                    };
                    let downsample = (stride != 1 || inplanes != planes * exp).then(|| {
                        let (c, n) = (format!("{p}.downsample.0"), format!("{p}.downsample.1"));
                        spec(c, n, inplanes, planes * exp, 1, stride)
                    });
                    inplanes = planes * exp;
                    BlockSpec { convs, downsample }
                })
                .collect()
        });
        Layout { stem, stages }
    }

    /// The parameter keys and shapes of this network in torchvision's `state_dict` order
    /// (without `num_batches_tracked`): `conv1.weight`, `bn1.weight`, `bn1.bias`,
    /// `bn1.running_mean`, `bn1.running_var`, `layer1.0.conv1.weight`, ...,
    /// `layer1.0.downsample.0.weight`, `layer1.0.downsample.1.*`, ..., `fc.weight`, `fc.bias`.
    /// GroupNorm layers have only `weight` and `bias`; `fc` is listed when `with_fc`.
    pub fn state_dict_keys(&self) -> Vec<(String, Vec<usize>)> {
        let layout = self.layout();
        let mut keys = Vec::new();
        let mut push = |s: &ConvSpec, stage: usize| {
            keys.push((format!("{}.weight", s.conv), vec![s.cout, s.cin, s.k, s.k]));
            let stats: &[&str] = match self.norm_for_stage(stage) {
                NormKind::BatchNorm | NormKind::FrozenBatchNorm => {
                    &["weight", "bias", "running_mean", "running_var"]
                }
                NormKind::GroupNorm { .. } | NormKind::WsGroupNorm { .. } => &["weight", "bias"],
            };
            for k in stats {
                keys.push((format!("{}.{k}", s.norm), vec![s.cout]));
            }
        };
        push(&layout.stem, 1);
        for (s, blocks) in layout.stages.iter().enumerate() {
            for b in blocks {
                for c in &b.convs {
                    push(c, s + 2);
                }
                if let Some(d) = &b.downsample {
                    push(d, s + 2);
                }
            }
        }
        if self.with_fc {
            let c5 = self.out_channels()[3];
            keys.push(("fc.weight".into(), vec![self.num_classes, c5]));
            keys.push(("fc.bias".into(), vec![self.num_classes]));
        }
        keys
    }
}

impl Layout {
    /// Every conv + norm pair, stem first.
    pub(crate) fn all_convs(&self) -> impl Iterator<Item = &ConvSpec> {
        std::iter::once(&self.stem).chain(
            self.stages
                .iter()
                .flatten()
                .flat_map(|b| b.convs.iter().chain(b.downsample.iter())),
        )
    }
}
