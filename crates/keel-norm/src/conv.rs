//! The 2D convolution behind keel-norm's conv layers: keel's own op
//! ([`keel_kernels::conv2d`]: im2col + GEMM on CPU, cuDNN with the `cuda` feature, and
//! dedicated backward-data / backward-filter kernels), with errors naming the calling layer.
//!
//! It replaces a workaround for a candle 0.11.1 backward bug: candle's conv2d backward
//! derives the `out_padding` of its transposed convolution from the height alone and reuses
//! it for the width, so for stride > 1 with different row and column remainders (e.g. a
//! 7x8 input at stride 2) backward fails. keel's op never uses candle's conv backward.
use candle::{Result, Tensor};
use candle_nn::Conv2dConfig;

/// `x (N, C_in, H, W) * w (C_out, C_in / groups, kH, kW) (+ bias)` with `cfg`'s stride,
/// padding, dilation and groups; differentiable w.r.t. x, w and bias. `op` names the calling
/// layer in errors.
pub(crate) fn conv2d(
    op: &str,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    cfg: &Conv2dConfig,
) -> Result<Tensor> {
    keel_kernels::conv2d(x, w, bias, &cfg.into())
        .map_err(|e| candle::Error::Msg(format!("{op}: {e}")))
}
