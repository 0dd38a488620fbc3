//! keel-kernels: fused, differentiable ops for candle.
