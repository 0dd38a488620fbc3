//! The 2D convolution behind keel-norm's conv layers: input validation with clear errors, and
//! a workaround for a candle 0.11.1 backward bug.
//!
//! candle's conv2d backward derives the `out_padding` of its transposed convolution from the
//! height alone and reuses it for the width. When stride > 1 and the rows and columns leave
//! different remainders (`(H + 2p - k_eff) % s != (W + 2p - k_eff) % s`, e.g. a 7x8 input at
//! stride 2), the input gradient gets the wrong shape and backward fails. Here such inputs
//! are zero-padded explicitly and cropped to the rows and columns the convolution reads, and
//! convolved with padding 0: same output, exact gradients.
use candle::{Result, Tensor};
use candle_nn::Conv2dConfig;

/// Output size of one spatial dimension, or an error naming `op` when the dilated kernel is
/// larger than the padded input.
fn out_dim(op: &str, what: &str, size: usize, k: usize, cfg: &Conv2dConfig) -> Result<usize> {
    let eff = cfg.dilation * (k - 1) + 1;
    let padded = size + 2 * cfg.padding;
    if padded < eff {
        candle::bail!(
            "{op}: the (dilated) kernel {what} {eff} is larger than the padded input {what} \
             {padded} (input {size}, padding {}); use a larger input or more padding",
            cfg.padding
        )
    }
    Ok((padded - eff) / cfg.stride + 1)
}

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
    let (_, c_in, h, wd) = x.dims4().map_err(|_| {
        candle::Error::Msg(format!(
            "{op}: input has shape {:?}, expected (N, C_in, H, W)",
            x.dims()
        ))
    })?;
    let (_, c_in_g, kh, kw) = w.dims4()?;
    if cfg.groups == 0 || cfg.stride == 0 || cfg.dilation == 0 {
        candle::bail!(
            "{op}: groups ({}), stride ({}) and dilation ({}) must be >= 1",
            cfg.groups,
            cfg.stride,
            cfg.dilation
        )
    }
    if c_in != c_in_g * cfg.groups {
        candle::bail!(
            "{op}: input has {c_in} channels, the weight expects {} ({c_in_g} x {} groups)",
            c_in_g * cfg.groups,
            cfg.groups
        )
    }
    let out_h = out_dim(op, "height", h, kh, cfg)?;
    let out_w = out_dim(op, "width", wd, kw, cfg)?;
    let used_h = (out_h - 1) * cfg.stride + cfg.dilation * (kh - 1) + 1;
    let used_w = (out_w - 1) * cfg.stride + cfg.dilation * (kw - 1) + 1;
    let p = cfg.padding;
    let y = if (h + 2 * p - used_h) == (wd + 2 * p - used_w) {
        x.conv2d(w, p, cfg.stride, cfg.dilation, cfg.groups)?
    } else {
        let xp = x
            .pad_with_zeros(2, p, p)?
            .pad_with_zeros(3, p, p)?
            .narrow(2, 0, used_h)?
            .narrow(3, 0, used_w)?;
        xp.conv2d(w, 0, cfg.stride, cfg.dilation, cfg.groups)?
    };
    match bias {
        None => Ok(y),
        Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?.reshape((1, (), 1, 1))?),
    }
}
