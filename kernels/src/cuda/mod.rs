//! CUDA launch code for keel's fused kernels (built with the `cuda` feature).
//!
//! Kernel sources live in `kernels/cuda/*.cu`; `cargo xtask ptx` compiles them to the
//! committed `kernels/ptx/*.ptx` that are embedded here with `include_str!` and loaded lazily
//! by name through `CudaDevice::get_or_load_custom_func` (one module per source file).

#[cfg(feature = "cudnn")]
pub(crate) mod conv;
pub(crate) mod group_norm;

use candle::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use candle::cuda_backend::WrapErr;
use candle::{CudaDevice, Result};

/// Environment variable that turns on output poisoning (a test hook used by the GPU suite):
/// when set to anything but `0` or empty, every output buffer is filled with `0xFF` bytes
/// (NaN in f32, f16 and bf16) before the kernels run, so an element a kernel forgot to write
/// shows up as NaN.
pub(crate) const POISON_ENV: &str = "KEEL_CUDA_POISON_OUTPUTS";

/// Whether [`POISON_ENV`] is set (read on every call: it is a test hook, and the lookup
/// costs far less than a kernel launch).
pub(crate) fn poison_outputs() -> bool {
    std::env::var_os(POISON_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// Fills the whole of `buf` with `0xFF` bytes using `fill_u8` from `module`/`ptx`.
pub(crate) fn poison<T: DeviceRepr>(
    dev: &CudaDevice,
    module: &str,
    ptx: &str,
    buf: &CudaSlice<T>,
) -> Result<()> {
    let n_bytes = buf.len() * std::mem::size_of::<T>();
    if n_bytes == 0 {
        return Ok(());
    }
    let func = dev.get_or_load_custom_func("fill_u8", module, ptx)?;
    let n = n_bytes as i64;
    let value = 0xFFu32;
    let blocks = n_bytes.div_ceil(256).min(4096) as u32;
    let mut b = func.builder();
    b.arg(buf);
    b.arg(&n);
    b.arg(&value);
    // SAFETY: fill_u8(unsigned char* p, long long n, unsigned int value) writes bytes
    // [0, n) of p with a grid-stride loop; `buf` holds exactly n bytes.
    unsafe {
        b.launch(LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        })
    }
    .w()?;
    Ok(())
}
