//! CUDA launch code for keel's fused kernels (built with the `cuda` feature).
//!
//! Kernel sources live in `kernels/cuda/*.cu`; `cargo xtask ptx` compiles them to the
//! committed `kernels/ptx/*.ptx` that are embedded here with `include_str!` and loaded lazily
//! by name through `CudaDevice::get_or_load_custom_func` (one [`Module`] per source file).
//!
//! Every kernel takes ONE argument: a `#[repr(C)]` parameter struct mirrored field for field
//! in its `.cu` file (device pointers as `u64`), so a kernel's signature is stated in one
//! place on each side, and const asserts here plus `static_assert`s there pin the same sizes
//! and offsets. The dtype of a kernel is chosen by [`kernel_name`] from the element type.

pub(crate) mod conv;
pub(crate) mod group_norm;

use candle::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig,
    PushKernelArg, SyncOnDrop,
};
use candle::cuda_backend::{CudaDType, WrapErr};
use candle::{bail, CudaDevice, CudaStorage, Layout, Result};
use half::{bf16, f16};

/// One PTX module: the name it is cached under by the device and its committed text.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Module {
    /// Cache key of the module on the device (the first PTX loaded under a name wins).
    pub(crate) name: &'static str,
    /// The committed PTX (`cargo xtask ptx` regenerates it; `--check` verifies it).
    pub(crate) ptx: &'static str,
}

/// `kernels/cuda/util.cu`: buffer fills.
pub(crate) const UTIL: Module = Module {
    name: "keel_util",
    ptx: include_str!("../../ptx/util.ptx"),
};

/// Element types the `.cu` kernels are instantiated for; [`Self::SUFFIX`] is the
/// `extern "C"` symbol suffix of that instantiation (`gn_stats_f32`, `..._bf16`).
pub(crate) trait KernelDType: CudaDType + DeviceRepr {
    /// Symbol suffix of the kernels instantiated for this type.
    const SUFFIX: &'static str;
}

impl KernelDType for f32 {
    const SUFFIX: &'static str = "f32";
}
impl KernelDType for f16 {
    const SUFFIX: &'static str = "f16";
}
impl KernelDType for bf16 {
    const SUFFIX: &'static str = "bf16";
}

/// The symbol of kernel `stem` instantiated for element type `T`: `kernel_name::<f16>("gn_stats")`
/// is `gn_stats_f16`.
pub(crate) fn kernel_name<T: KernelDType>(stem: &str) -> String {
    format!("{stem}_{}", T::SUFFIX)
}

/// Reads (`set = None`) or writes a `u64` attribute of `dev`'s default memory pool (the pool
/// cudarc's stream-ordered allocations come from); returns the value read or written.
fn pool_attr(
    dev: &CudaDevice,
    attr: candle::cuda_backend::cudarc::driver::sys::CUmemPool_attribute,
    set: Option<u64>,
) -> Result<u64> {
    use candle::cuda_backend::cudarc::driver::result;
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread().w()?;
    let mut value = set.unwrap_or(0);
    // SAFETY: `cu_device` is the live device of candle's context (bound to this thread
    // above); the attributes used here (release threshold, used-memory high watermark) are
    // `u64` values (cuMemPoolGet/SetAttribute), which `value` is.
    unsafe {
        let pool = result::device::get_default_mem_pool(ctx.cu_device()).w()?;
        let ptr = (&mut value as *mut u64).cast();
        match set {
            Some(_) => result::mem_pool::set_attribute(pool, attr, ptr).w()?,
            None => result::mem_pool::get_attribute(pool, attr, ptr).w()?,
        }
    }
    Ok(value)
}

/// Sets the release threshold of `dev`'s default memory pool to "never" (`u64::MAX`), once
/// per (thread, device): CUDA's default of 0 hands freed memory back to the OS at every
/// synchronisation, so every training step and every timed iteration would map its memory
/// again (PyTorch's caching allocator keeps it). Freed memory stays in the pool for the next
/// allocation of this process; other processes on the GPU do not get it back until exit.
pub(crate) fn prepare(dev: &CudaDevice) -> Result<()> {
    use candle::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as A;
    use std::cell::RefCell;
    use std::collections::HashSet;
    thread_local! {
        static DONE: RefCell<HashSet<candle::cuda_backend::DeviceId>> = RefCell::new(HashSet::new());
    }
    if DONE.with(|d| d.borrow().contains(&dev.id())) {
        return Ok(());
    }
    pool_attr(dev, A::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, Some(u64::MAX))?;
    DONE.with(|d| d.borrow_mut().insert(dev.id()));
    Ok(())
}

/// The release threshold of `dev`'s default memory pool (what [`prepare`] sets).
pub(crate) fn pool_release_threshold(dev: &CudaDevice) -> Result<u64> {
    use candle::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as A;
    pool_attr(dev, A::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, None)
}

/// The most bytes of `dev`'s default pool in use at once since the last [`reset_pool_peak`]
/// (`CU_MEMPOOL_ATTR_USED_MEM_HIGH`).
pub(crate) fn pool_peak(dev: &CudaDevice) -> Result<u64> {
    use candle::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as A;
    pool_attr(dev, A::CU_MEMPOOL_ATTR_USED_MEM_HIGH, None)
}

/// Resets [`pool_peak`] to the bytes in use now (CUDA allows resetting it to 0 only, which
/// it takes as "the current use").
pub(crate) fn reset_pool_peak(dev: &CudaDevice) -> Result<()> {
    use candle::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as A;
    pool_attr(dev, A::CU_MEMPOOL_ATTR_USED_MEM_HIGH, Some(0)).map(drop)
}

/// Launches kernel `name` of `module` with its parameter struct as the only argument.
///
/// # Safety
/// `P` must be the `#[repr(C)]` mirror of the kernel's parameter struct in its `.cu` file,
/// every device pointer in `params` must point to live memory of the element type and size
/// the kernel reads or writes for this grid, and those buffers must stay alive (their
/// [`Guards`] held) until the launch has been queued.
pub(crate) unsafe fn launch<P: DeviceRepr>(
    dev: &CudaDevice,
    module: Module,
    name: &str,
    cfg: LaunchConfig,
    params: &P,
) -> Result<()> {
    prepare(dev)?;
    let func = dev.get_or_load_custom_func(name, module.name, module.ptx)?;
    let mut b = func.builder();
    b.arg(params);
    // SAFETY: the caller's contract above.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// Raw device pointers for parameter structs, holding cudarc's stream-synchronisation
/// guards until dropped (drop it after the last launch that uses the pointers).
pub(crate) struct Guards<'a> {
    stream: &'a CudaStream,
    held: Vec<SyncOnDrop<'a>>,
}

impl<'a> Guards<'a> {
    /// An empty set of guards on `stream` (candle's stream of the device).
    pub(crate) fn new(stream: &'a CudaStream) -> Self {
        Self {
            stream,
            held: Vec::new(),
        }
    }

    /// The device address of `v`, for a kernel that reads it.
    pub(crate) fn read<T>(&mut self, v: &'a impl DevicePtr<T>) -> u64 {
        let (p, g) = v.device_ptr(self.stream);
        self.held.push(g);
        p
    }

    /// The device address of `v`, for a kernel that writes it.
    pub(crate) fn write<T>(&mut self, v: &'a mut impl DevicePtrMut<T>) -> u64 {
        let (p, g) = v.device_ptr_mut(self.stream);
        self.held.push(g);
        p
    }
}

/// The contiguous elements of `s` described by `l`, or an error naming the op and operand
/// (a non-contiguous layout, an offset range outside the storage, or another dtype than `T`).
pub(crate) fn view<'a, T: CudaDType>(
    op: &str,
    what: &str,
    s: &'a CudaStorage,
    l: &Layout,
) -> Result<CudaView<'a, T>> {
    let slice = s.as_cuda_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => match slice.try_slice(a..b) {
            Some(v) => Ok(v),
            None => bail!("{op} (cuda): {what} layout {l:?} is out of bounds of its storage ({} elements); make it contiguous first", slice.len()),
        },
        None => bail!("{op} (cuda): {what} must be contiguous (layout {l:?}); call .contiguous() first"),
    }
}

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

/// Mirror of `FillU8Params` in `kernels/cuda/util.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct FillU8Params {
    p: u64,
    n: i64,
    value: u32,
    pad: u32,
}
// SAFETY: plain `#[repr(C)]` data (integers only), laid out as the .cu struct (asserted below).
unsafe impl DeviceRepr for FillU8Params {}
const _: () = assert!(
    std::mem::size_of::<FillU8Params>() == 24
        && std::mem::offset_of!(FillU8Params, n) == 8
        && std::mem::offset_of!(FillU8Params, value) == 16
);

/// Fills the whole of `buf` with `0xFF` bytes (NaN in f32, f16 and bf16) with `fill_u8`.
pub(crate) fn poison<T: DeviceRepr>(dev: &CudaDevice, buf: &mut CudaSlice<T>) -> Result<()> {
    let n_bytes = buf.len() * std::mem::size_of::<T>();
    if n_bytes == 0 {
        return Ok(());
    }
    let stream = dev.cuda_stream();
    let mut guards = Guards::new(&stream);
    let params = FillU8Params {
        p: guards.write(buf),
        n: n_bytes as i64,
        value: 0xFF,
        pad: 0,
    };
    let cfg = LaunchConfig {
        grid_dim: (n_bytes.div_ceil(256).min(4096) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: fill_u8 writes bytes [0, n) of p with a grid-stride loop; `buf` holds exactly
    // n = len * size_of::<T>() bytes and its guard is held until after the launch.
    unsafe { launch(dev, UTIL, "fill_u8", cfg, &params) }
}
