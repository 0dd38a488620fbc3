//! Layers on keel's kernels, drop-in replacements for their candle_nn counterparts (same
//! constructor shapes, same PyTorch state-dict keys).

mod conv2d;

pub use conv2d::{conv2d, conv2d_no_bias, Conv2d};
