//! keel-kernels: fused, differentiable ops for candle.
//!
//! - [`group_norm_silu`] / [`group_norm`]: fused Group Normalization (Wu & He, 2018)
//!   with an optional SiLU (Elfwing et al., 2018), forward and backward on CPU (and CUDA
//!   with the `cuda` feature), plus the composed references [`group_norm_silu_slow`] and
//!   [`group_norm_slow`].

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod group_norm;

pub use group_norm::{group_norm, group_norm_silu, group_norm_silu_slow, group_norm_slow};
