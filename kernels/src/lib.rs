//! keel-kernels: fused, differentiable ops for candle.
//!
//! - [`group_norm_silu`] / [`group_norm()`]: fused Group Normalization (Wu & He, 2018)
//!   with an optional SiLU (Elfwing et al., 2018), forward and backward on CPU (and CUDA
//!   with the `cuda` feature), plus the composed references [`group_norm_silu_slow`] and
//!   [`group_norm_slow`].
//! - [`conv2d`]: 2D convolution with stride, padding, dilation and groups, differentiable
//!   through dedicated backward-data and backward-filter kernels (im2col + GEMM on CPU,
//!   cuDNN with the `cuda` feature), plus the composed reference [`conv2d_slow`].
//! - [`cross_entropy`]: mean cross-entropy with `ignore_index` and class weights, fused
//!   forward and backward on CPU, plus the composed [`cross_entropy_slow`] (used on CUDA).
//! - [`resize_nearest`] / [`resize_bilinear`]: differentiable NCHW resizing with PyTorch's
//!   `F.interpolate` semantics, CPU kernels with backward, plus the composed `*_slow` twins
//!   (used on CUDA).
//! - [`add_silu`] / [`add_relu`]: a residual sum and its activation as one op with a
//!   one-pass backward (CPU; the candle composition on other devices).
//! - [`nn`]: layers on these ops ([`nn::Conv2d`], a drop-in for candle_nn's).
//! - [`PinnedUpload`]: host-to-device uploads from page-locked memory on CUDA.
//! - [`cpu_isa`] / [`set_cpu_isa`] / [`CpuIsa`]: the instruction set of the CPU GroupNorm
//!   kernels (baseline, AVX2+FMA or AVX-512, picked at run time), capped by the
//!   `KEEL_CPU_ISA` environment variable (`base`, `avx2` or `avx512`, read once) or by
//!   [`set_cpu_isa`]; every level gives bit-identical results.

mod add_act;
mod conv;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod group_norm;
mod loss;
pub mod nn;
mod pinned;
mod resize;

pub use add_act::{add_relu, add_silu};
pub use conv::{
    conv2d, conv2d_slow, conv_deterministic, conv_tf32, set_conv_deterministic, set_conv_tf32,
    Conv2dParams,
};
pub use cpu::isa::{cpu_isa, set_cpu_isa, CpuIsa, CPU_ISA_ENV};
pub use group_norm::{group_norm, group_norm_silu, group_norm_silu_slow, group_norm_slow};
pub use loss::{cross_entropy, cross_entropy_slow, CrossEntropyConfig};
pub use pinned::{PinnedDType, PinnedUpload};
pub use resize::{resize_bilinear, resize_bilinear_slow, resize_nearest, resize_nearest_slow};

/// Prepares `dev` for training. On CUDA: keeps freed memory in the device's default memory
/// pool (its release threshold set to "never"; CUDA's default of 0 returns freed memory to
/// the OS at every synchronisation, so each training step would map its memory again, which
/// PyTorch's caching allocator avoids). keel's CUDA ops do this on their first launch; call
/// it yourself before timing anything else on the device. Idempotent, cheap after the
/// first call per thread; the CPU needs nothing.
///
/// # Example
/// ```
/// keel_kernels::prepare_device(&candle::Device::Cpu)?;
/// # Ok::<(), candle::Error>(())
/// ```
pub fn prepare_device(dev: &candle::Device) -> candle::Result<()> {
    match dev {
        #[cfg(feature = "cuda")]
        candle::Device::Cuda(d) => cuda::prepare(d),
        _ => Ok(()),
    }
}

/// The release threshold (bytes) of a CUDA device's default memory pool, as
/// [`prepare_device`] leaves it (`u64::MAX`); `None` for other devices. For checks.
pub fn cuda_pool_release_threshold(dev: &candle::Device) -> candle::Result<Option<u64>> {
    match dev {
        #[cfg(feature = "cuda")]
        candle::Device::Cuda(d) => cuda::pool_release_threshold(d).map(Some),
        _ => Ok(None),
    }
}

/// The most bytes of a CUDA device's default memory pool in use at once since the last
/// [`reset_cuda_pool_peak`]; `None` for other devices. candle's allocations come from that
/// pool when the device supports stream-ordered allocation (cudarc then uses
/// `cuMemAllocAsync`; Hopper and every recent GPU do) and nobody replaced the device's
/// current pool; otherwise this reads about 0.
/// The GPU counterpart of PyTorch's `torch.cuda.max_memory_allocated`.
pub fn cuda_pool_peak(dev: &candle::Device) -> candle::Result<Option<u64>> {
    match dev {
        #[cfg(feature = "cuda")]
        candle::Device::Cuda(d) => cuda::pool_peak(d).map(Some),
        _ => Ok(None),
    }
}

/// Starts [`cuda_pool_peak`] over from the bytes in use now; a no-op for other devices.
pub fn reset_cuda_pool_peak(dev: &candle::Device) -> candle::Result<()> {
    match dev {
        #[cfg(feature = "cuda")]
        candle::Device::Cuda(d) => cuda::reset_pool_peak(d),
        _ => Ok(()),
    }
}
