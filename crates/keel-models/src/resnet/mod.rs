//! torchvision's ResNet-18/34/50/101 (He et al., 2016, "Deep Residual Learning for Image
//! Recognition", arXiv:1512.03385; torchvision's v1.5 with the Bottleneck stride on the 3x3
//! conv) as a backbone: C2-C5 feature maps (strides 4, 8, 16, 32) for an FPN, optional
//! logits, every norm chosen by a [`NormKind`](keel_norm::NormKind), detectron2's
//! `freeze_at`, and exactly torchvision's `state_dict` names (`conv1.weight`, `bn1.*`,
//! `layer1.0.conv1.weight`, `layer1.0.downsample.0.weight`, `layer1.0.downsample.1.*`, ...,
//! `fc.weight`, `fc.bias`), so a torchvision checkpoint converted to safetensors by
//! `scripts/torchvision_to_safetensors.py` loads unchanged.
//!
//! The convolutions run on keel's conv2d ([`keel_kernels::conv2d`]); the stem's max pool is
//! composed from tensor ops so that it has a backward.
//!
//! # Fine-tuning a pretrained backbone at small batch
//! Keep the pretrained BatchNorm statistics frozen (`frozen-bn`, or convert to `gn`), freeze
//! the stem and `layer1` (`freeze_at: 2`), and train the rest, the backbone at a lower
//! learning rate than the new head:
//!
//! ```
//! use candle::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use keel_models::resnet::{ResNet, ResNetConfig, ResNetDepth};
//! use keel_norm::convert::StateDict;
//! # fn main() -> candle::Result<()> {
//! let dev = Device::Cpu;
//! // A checkpoint as scripts/torchvision_to_safetensors.py writes it; here: made up.
//! # let sd: StateDict = ResNetConfig::backbone(ResNetDepth::R18, keel_norm::NormKind::BatchNorm)
//! #     .state_dict_keys()
//! #     .into_iter()
//! #     .map(|(k, s)| Ok((k, Tensor::randn(0f32, 0.05, s, &dev)?.abs()?)))
//! #     .collect::<candle::Result<_>>()?;
//! // let sd = keel_norm::convert::load_state_dict("resnet18.safetensors", &dev)?;
//! let cfg = ResNetConfig {
//!     freeze_at: 2,
//!     ..ResNetConfig::backbone(ResNetDepth::R18, "frozen-bn".parse()?)
//! };
//! let vm = VarMap::new();
//! let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
//! let (backbone, report) = ResNet::from_state_dict(&cfg, sd, &vm, vb.pp("backbone"))?;
//! println!("{report}");
//! // The backbone's trainable variables, for an optimizer group with a lower LR; the
//! // frozen stem, layer1 and the FrozenBatchNorm statistics are not among them.
//! let backbone_vars = backbone.trainable_vars(&vm)?;
//! assert!(backbone.trainable_names().iter().all(|n| n.starts_with("backbone.layer")));
//! let out = backbone.forward(&Tensor::zeros((1, 3, 64, 64), DType::F32, &dev)?, true)?;
//! let [c2, c3, c4, c5] = &out.features;
//! assert_eq!(c5.dims(), &[1, 512, 2, 2]);
//! # let _ = (backbone_vars, c2, c3, c4);
//! # Ok(()) }
//! ```

mod config;
mod load;
mod net;

pub use config::{ResNetConfig, ResNetDepth};
pub use load::{FcLoad, ResNetLoadReport};
pub use net::{ResNet, ResNetOutput};
