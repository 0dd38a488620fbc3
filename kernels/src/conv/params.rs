//! [`Conv2dParams`]: the hyper-parameters of a 2D convolution.

/// Stride, padding, dilation and groups of a 2D convolution, the same value for both
/// spatial dimensions (as candle_nn's `Conv2dConfig` and most PyTorch models).
///
/// A plain struct rather than `candle_nn::Conv2dConfig` so that the op does not depend on
/// candle-nn's cuDNN algorithm field (keel picks and caches its own algorithms); convert
/// with `From`: `Conv2dParams::from(cfg)`.
///
/// # Example
/// ```
/// use keel_kernels::Conv2dParams;
/// let cfg = candle_nn::Conv2dConfig { padding: 1, stride: 2, ..Default::default() };
/// let p = Conv2dParams::from(cfg);
/// assert_eq!(p, Conv2dParams { stride: 2, padding: 1, dilation: 1, groups: 1 });
/// assert_eq!(Conv2dParams::default(), Conv2dParams { stride: 1, padding: 0, dilation: 1, groups: 1 });
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conv2dParams {
    /// Step between output positions, in input pixels (>= 1).
    pub stride: usize,
    /// Zero padding added on each side of both spatial dimensions.
    pub padding: usize,
    /// Spacing between kernel taps (>= 1; 1 = a dense kernel).
    pub dilation: usize,
    /// Number of channel groups (>= 1; must divide C_in and C_out; C_in = depthwise).
    pub groups: usize,
}

impl Default for Conv2dParams {
    fn default() -> Self {
        Self {
            stride: 1,
            padding: 0,
            dilation: 1,
            groups: 1,
        }
    }
}

impl From<candle_nn::Conv2dConfig> for Conv2dParams {
    fn from(c: candle_nn::Conv2dConfig) -> Self {
        Self {
            stride: c.stride,
            padding: c.padding,
            dilation: c.dilation,
            groups: c.groups,
        }
    }
}

impl From<&candle_nn::Conv2dConfig> for Conv2dParams {
    fn from(c: &candle_nn::Conv2dConfig) -> Self {
        Self::from(*c)
    }
}

impl From<Conv2dParams> for candle_nn::Conv2dConfig {
    fn from(p: Conv2dParams) -> Self {
        Self {
            stride: p.stride,
            padding: p.padding,
            dilation: p.dilation,
            groups: p.groups,
            cudnn_fwd_algo: None,
        }
    }
}
