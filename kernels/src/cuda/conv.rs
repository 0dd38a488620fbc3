//! cuDNN convolutions (forward, backward-data, backward-filter) for [`crate::conv2d`],
//! built with keel's `cuda` feature, through cudarc 0.19's raw `cudnn` bindings (its safe
//! layer returns only the first algorithm of cuDNN's ranking and hides the descriptors).
//!
//! - **Layout**: NCHW tensors and filters, as candle stores them (no transposes); groups
//!   through `cudnnSetConvolutionGroupCount`, so depthwise is one call.
//! - **Precision**: the compute type is `f32` for every dtype (f16/bf16 data accumulate in
//!   f32). Math type: tensor cores (`CUDNN_TENSOR_OP_MATH`) for f16/bf16; for f32,
//!   `CUDNN_FMA_MATH` (true f32, no TF32) unless [`crate::set_conv_tf32`] turned TF32 on.
//!   Off by default, as in candle; PyTorch's `torch.backends.cudnn.allow_tf32` defaults to
//!   True, so benchmarks compare f32 with PyTorch's TF32 off and TF32 with TF32 on.
//! - **Algorithms** (policy in `crate::conv::algo`, tested without a GPU): cuDNN's whole
//!   ranked list (`cudnnGetConvolution*Algorithm_v7`), then fixed small-workspace fallbacks;
//!   the first entry that fits [`WORKSPACE_CAP`], is deterministic when
//!   [`crate::set_conv_deterministic`] is on and keeps f32 on FMA math when TF32 is off,
//!   runs with its own math type. An entry that fails at launch (or whose workspace cannot
//!   be allocated) is skipped for the next. What ran is cached per (direction, geometry,
//!   dtype, TF32, deterministic, device) for the life of the process; a cached algorithm
//!   that fails later is evicted and the list is walked again.
//! - **Workspace**: allocated per call from the device's stream-ordered allocator (not
//!   zeroed), at most [`WORKSPACE_CAP`] bytes, freed when the call returns.
//! - **Handles**: one cuDNN handle per (thread, device), bound to candle's stream (cuDNN
//!   handles are neither `Send` nor `Sync`).

use super::{poison, poison_outputs, view, Guards};
use crate::conv::algo::{self, Candidate, Math, Needs};
use crate::conv::{Geom, Kind};
use candle::backend::BackendStorage;
use candle::cuda_backend::cudarc::cudnn::result as cr;
use candle::cuda_backend::cudarc::cudnn::sys::{
    self, cudnnConvolutionBwdDataAlgo_t as DataAlgo, cudnnConvolutionBwdFilterAlgo_t as FilterAlgo,
    cudnnConvolutionFwdAlgo_t as FwdAlgo, cudnnDeterminism_t, cudnnMathType_t, cudnnStatus_t,
};
use candle::cuda_backend::cudarc::cudnn::CudnnDataType;
use candle::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use candle::cuda_backend::{CudaDType, DeviceId, WrapErr};
use candle::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Shape, WithDType};
use half::{bf16, f16};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::rc::Rc;
use std::sync::{Mutex, OnceLock};

/// The most workspace (bytes) one cuDNN convolution call may use: 256 MiB. Algorithms
/// that need more are skipped for the next in cuDNN's ranking (see the module docs).
pub(crate) const WORKSPACE_CAP: usize = 256 << 20;

/// An algorithm of one of the three directions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Algo {
    Fwd(FwdAlgo),
    Data(DataAlgo),
    Filter(FilterAlgo),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    kind: Kind,
    geom: Geom,
    dtype: DType,
    tf32: bool,
    deterministic: bool,
    device: DeviceId,
}

/// The algorithm that last ran, per key.
fn cache() -> &'static Mutex<HashMap<Key, Candidate<Algo>>> {
    static CACHE: OnceLock<Mutex<HashMap<Key, Candidate<Algo>>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// A cuDNN handle bound to candle's stream of one device.
struct Handle(sys::cudnnHandle_t);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by `cr::create_handle` in [`handle`], destroyed once, here.
        let _ = unsafe { cr::destroy_handle(self.0) };
    }
}

thread_local! {
    static HANDLES: RefCell<HashMap<DeviceId, Rc<Handle>>> = RefCell::new(HashMap::new());
}

fn handle(dev: &CudaDevice) -> Result<Rc<Handle>> {
    HANDLES.with(|h| {
        if let Some(c) = h.borrow().get(&dev.id()) {
            return Ok(c.clone());
        }
        let stream = dev.cuda_stream();
        stream.context().bind_to_thread().w()?;
        let c = Rc::new(Handle(cr::create_handle()?));
        // SAFETY: a live handle and candle's live stream of this device.
        unsafe { cr::set_stream(c.0, stream.cu_stream() as *mut _) }?;
        h.borrow_mut().insert(dev.id(), c.clone());
        Ok(c)
    })
}

/// The descriptors of one call: convolution (f32 compute type), x, w, y. Destroyed on drop,
/// also when building them fails half way.
struct Descs {
    conv: sys::cudnnConvolutionDescriptor_t,
    x: sys::cudnnTensorDescriptor_t,
    w: sys::cudnnFilterDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
}

impl Drop for Descs {
    fn drop(&mut self) {
        // SAFETY: each non-null descriptor was created by [`descs`] and is destroyed once.
        unsafe {
            if !self.conv.is_null() {
                let _ = cr::destroy_convolution_descriptor(self.conv);
            }
            if !self.x.is_null() {
                let _ = cr::destroy_tensor_descriptor(self.x);
            }
            if !self.w.is_null() {
                let _ = cr::destroy_filter_descriptor(self.w);
            }
            if !self.y.is_null() {
                let _ = cr::destroy_tensor_descriptor(self.y);
            }
        }
    }
}

fn dims_i32(op: &str, d: [usize; 4]) -> Result<[i32; 4]> {
    let mut out = [0i32; 4];
    for (o, v) in out.iter_mut().zip(d) {
        *o = match i32::try_from(v) {
            Ok(v) => v,
            Err(_) => bail!("{op} (cudnn): dimension {v} of {d:?} does not fit in i32"),
        };
    }
    Ok(out)
}

/// The math type set on the descriptor before the ranking query.
fn base_math(dtype: DType, tf32: bool) -> Math {
    match (dtype, tf32) {
        (DType::F32, false) => Math::Fma,
        _ => Math::TensorOp,
    }
}

fn math_to_sys(m: Math) -> cudnnMathType_t {
    match m {
        Math::Default => cudnnMathType_t::CUDNN_DEFAULT_MATH,
        Math::TensorOp => cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
        Math::TensorOpConversion => cudnnMathType_t::CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION,
        Math::Fma => cudnnMathType_t::CUDNN_FMA_MATH,
    }
}

fn math_from_sys(m: cudnnMathType_t) -> Math {
    match m {
        cudnnMathType_t::CUDNN_TENSOR_OP_MATH => Math::TensorOp,
        cudnnMathType_t::CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION => Math::TensorOpConversion,
        cudnnMathType_t::CUDNN_FMA_MATH => Math::Fma,
        _ => Math::Default,
    }
}

/// Builds the descriptors for data type `T` of geometry `g`, with math type `math`.
fn descs<T: CudnnDataType>(op: &str, g: &Geom, math: Math) -> Result<Descs> {
    // Padding, stride, dilation and groups as cuDNN's ints; too large is an error, not a clamp.
    let [pad, stride, dil, groups] = dims_i32(op, [g.padding, g.stride, g.dilation, g.groups])?;
    let mut d = Descs {
        conv: std::ptr::null_mut(),
        x: std::ptr::null_mut(),
        w: std::ptr::null_mut(),
        y: std::ptr::null_mut(),
    };
    let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
    d.conv = cr::create_convolution_descriptor()?;
    d.x = cr::create_tensor_descriptor()?;
    d.w = cr::create_filter_descriptor()?;
    d.y = cr::create_tensor_descriptor()?;
    // SAFETY: the descriptors were just created and are live; the arrays are 4 ints.
    unsafe {
        cr::set_convolution2d_descriptor(
            d.conv,
            pad,
            pad,
            stride,
            stride,
            dil,
            dil,
            sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
        )?;
        cr::set_convolution_group_count(d.conv, groups)?;
        cr::set_convolution_math_type(d.conv, math_to_sys(math))?;
        cr::set_tensor4d_descriptor(d.x, nchw, T::DATA_TYPE, dims_i32(op, g.x_dims())?)?;
        cr::set_filter4d_descriptor(d.w, T::DATA_TYPE, nchw, dims_i32(op, g.w_dims())?)?;
        cr::set_tensor4d_descriptor(d.y, nchw, T::DATA_TYPE, dims_i32(op, g.y_dims())?)?;
    }
    Ok(d)
}

/// Fixed small-workspace algorithms tried after cuDNN's ranking, with their determinism
/// (cuDNN's documentation: backward-data/-filter ALGO_0 use atomics).
fn fallbacks(kind: Kind) -> [(Algo, bool); 2] {
    match kind {
        Kind::Forward => [
            (
                Algo::Fwd(FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM),
                true,
            ),
            (
                Algo::Fwd(FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM),
                true,
            ),
        ],
        Kind::BackwardData => [
            (
                Algo::Data(DataAlgo::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1),
                true,
            ),
            (
                Algo::Data(DataAlgo::CUDNN_CONVOLUTION_BWD_DATA_ALGO_0),
                false,
            ),
        ],
        Kind::BackwardFilter => [
            (
                Algo::Filter(FilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1),
                true,
            ),
            (
                Algo::Filter(FilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0),
                false,
            ),
        ],
    }
}

/// Workspace bytes `algo` needs with descriptors `d` (`Err` when cuDNN rejects it).
fn workspace_size(h: &Handle, d: &Descs, algo: Algo) -> Result<usize> {
    // SAFETY: a live handle and live descriptors of one geometry.
    let ws = unsafe {
        match algo {
            Algo::Fwd(a) => {
                cr::get_convolution_forward_workspace_size(h.0, d.x, d.w, d.conv, d.y, a)
            }
            Algo::Data(a) => {
                cr::get_convolution_backward_data_workspace_size(h.0, d.w, d.y, d.conv, d.x, a)
            }
            Algo::Filter(a) => {
                cr::get_convolution_backward_filter_workspace_size(h.0, d.x, d.y, d.conv, d.w, a)
            }
        }
    }?;
    Ok(ws)
}

/// Converts a perf entry's fields to a candidate, `None` when its status is not success.
fn candidate(
    algo: Algo,
    status: cudnnStatus_t,
    memory: usize,
    det: cudnnDeterminism_t,
    math: cudnnMathType_t,
) -> Option<Candidate<Algo>> {
    (status == cudnnStatus_t::CUDNN_STATUS_SUCCESS).then_some(Candidate {
        algo,
        workspace: memory,
        deterministic: det == cudnnDeterminism_t::CUDNN_DETERMINISTIC,
        math: math_from_sys(math),
    })
}

/// cuDNN's ranked list for direction `kind` (entries with a success status), then the
/// fixed fallbacks whose workspace size cuDNN reports.
fn ranked(h: &Handle, d: &Descs, kind: Kind, math: Math) -> Result<Vec<Candidate<Algo>>> {
    let mut n = 0i32;
    let mut out = Vec::new();
    // A failed cached candidate may have left its own math type on the descriptor: rank
    // (and size the fallbacks' workspaces) with the base one.
    // SAFETY: a live descriptor.
    unsafe { cr::set_convolution_math_type(d.conv, math_to_sys(math)) }?;
    // SAFETY: a live handle and descriptors; each perf array holds `count` zeroed entries
    // (a valid bit pattern: algo 0, status success, non-deterministic, default math) and
    // cuDNN writes at most `count` of them, reporting how many in `n`.
    unsafe {
        // The directions differ only in the perf struct, the query, its descriptor order
        // and the algorithm's wrapper.
        macro_rules! query {
            ($count:expr, $perf:ty, $get:path, ($a:expr, $b:expr, $c:expr), $wrap:path) => {{
                let count = $count as usize;
                let mut perf: Vec<$perf> = vec![std::mem::zeroed(); count];
                $get(
                    h.0,
                    $a,
                    $b,
                    d.conv,
                    $c,
                    count as i32,
                    &mut n,
                    perf.as_mut_ptr(),
                )?;
                let got = (n.max(0) as usize).min(count);
                out.extend(perf[..got].iter().filter_map(|p| {
                    candidate($wrap(p.algo), p.status, p.memory, p.determinism, p.mathType)
                }));
            }};
        }
        match kind {
            Kind::Forward => query!(
                FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_COUNT,
                sys::cudnnConvolutionFwdAlgoPerf_t,
                cr::get_convolution_forward_algorithm,
                (d.x, d.w, d.y),
                Algo::Fwd
            ),
            Kind::BackwardData => query!(
                DataAlgo::CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT,
                sys::cudnnConvolutionBwdDataAlgoPerf_t,
                cr::get_convolution_backward_data_algorithm,
                (d.w, d.y, d.x),
                Algo::Data
            ),
            Kind::BackwardFilter => query!(
                FilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT,
                sys::cudnnConvolutionBwdFilterAlgoPerf_t,
                cr::get_convolution_backward_filter_algorithm,
                (d.x, d.y, d.w),
                Algo::Filter
            ),
        }
    }
    for (algo, deterministic) in fallbacks(kind) {
        if let Ok(workspace) = workspace_size(h, d, algo) {
            out.push(Candidate {
                algo,
                workspace,
                deterministic,
                math,
            });
        }
    }
    Ok(out)
}

/// The device addresses of one call's operands: `(a, b)` are the op's inputs in [`run`]'s
/// order, `out` its output, `ws` the workspace (0 when none).
#[derive(Clone, Copy)]
struct Ptrs {
    a: u64,
    b: u64,
    out: u64,
    ws: u64,
    ws_bytes: usize,
}

/// Runs candidate `c` with `alpha = 1`, `beta = 0` (f32 scaling factors: the compute type
/// is f32 for every data type).
///
/// # Safety
/// `p.a`, `p.b` and `p.out` point to live contiguous NCHW buffers of the descriptors'
/// data type with exactly their element counts, `p.ws` to at least `p.ws_bytes` bytes
/// (at least `c.workspace`), and all stay alive until the call has been queued.
unsafe fn call(h: &Handle, d: &Descs, c: &Candidate<Algo>, p: Ptrs) -> Result<()> {
    let (alpha, beta) = (1f32, 0f32);
    let (al, be) = (
        &alpha as *const f32 as *const c_void,
        &beta as *const f32 as *const c_void,
    );
    let (a, b) = (p.a as *const c_void, p.b as *const c_void);
    let (out, ws) = (p.out as *mut c_void, p.ws as *mut c_void);
    // SAFETY: the caller's contract; the math type is set on the live descriptor first.
    unsafe {
        cr::set_convolution_math_type(d.conv, math_to_sys(c.math))?;
        match c.algo {
            // (x, w) -> y
            Algo::Fwd(algo) => cr::convolution_forward(
                h.0, al, d.x, a, d.w, b, d.conv, algo, ws, p.ws_bytes, be, d.y, out,
            )?,
            // (dy, w) -> dx
            Algo::Data(algo) => cr::convolution_backward_data(
                h.0, al, d.w, b, d.y, a, d.conv, algo, ws, p.ws_bytes, be, d.x, out,
            )?,
            // (x, dy) -> dw
            Algo::Filter(algo) => cr::convolution_backward_filter(
                h.0, al, d.x, a, d.y, b, d.conv, algo, ws, p.ws_bytes, be, d.w, out,
            )?,
        }
    }
    Ok(())
}

/// Runs convolution `kind` of geometry `g` on `(s1, s2)`: `(x, w)`, `(dy, w)` or `(x, dy)`.
pub(crate) fn run(
    kind: Kind,
    g: &Geom,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    match (s1.dtype(), s2.dtype()) {
        (DType::F32, DType::F32) => launch::<f32>(kind, g, s1, l1, s2, l2),
        (DType::F16, DType::F16) => launch::<f16>(kind, g, s1, l1, s2, l2),
        (DType::BF16, DType::BF16) => launch::<bf16>(kind, g, s1, l1, s2, l2),
        (a, b) => {
            bail!("conv2d (cudnn): operands must be both f32, f16 or bf16, got {a:?} and {b:?}")
        }
    }
}

fn direction(kind: Kind) -> &'static str {
    match kind {
        Kind::Forward => "conv2d forward (cudnn)",
        Kind::BackwardData => "conv2d backward-data (cudnn)",
        Kind::BackwardFilter => "conv2d backward-filter (cudnn)",
    }
}

fn launch<T>(
    kind: Kind,
    g: &Geom,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)>
where
    T: CudaDType + DeviceRepr + ValidAsZeroBits + CudnnDataType + WithDType,
{
    const OP: &str = "conv2d";
    let dev = s1.device().clone();
    let out_dims = match kind {
        Kind::Forward => g.y_dims(),
        Kind::BackwardData => g.x_dims(),
        Kind::BackwardFilter => g.w_dims(),
    };
    let n_out: usize = out_dims.iter().product();
    let shape = Shape::from(&out_dims[..]);
    if g.n == 0 || n_out == 0 {
        // Nothing to convolve: empty outputs, or a zero weight gradient. At least one element:
        // cuMemAlloc(Async) rejects a size of 0 bytes (CUDA_ERROR_INVALID_VALUE); a storage
        // longer than its layout is valid in candle.
        let out = dev.alloc_zeros::<T>(n_out.max(1))?;
        return Ok((CudaStorage::wrap_cuda_slice(out, dev), shape));
    }
    let (n1, n2) = match kind {
        Kind::Forward => ("x", "weight"),
        Kind::BackwardData => ("dy", "weight"),
        Kind::BackwardFilter => ("x", "dy"),
    };
    let a = view::<T>(OP, n1, s1, l1)?;
    let b = view::<T>(OP, n2, s2, l2)?;
    // SAFETY: every element of `out` is written by the cuDNN call below (beta = 0 for all
    // three directions, so the previous contents are never read).
    let mut out = unsafe { dev.alloc::<T>(n_out)? };
    if poison_outputs() {
        poison(&dev, &mut out)?;
    }
    super::prepare(&dev)?;
    let h = handle(&dev)?;
    let tf32 = crate::conv::conv_tf32();
    let deterministic = crate::conv::conv_deterministic();
    let math = base_math(T::DTYPE, tf32);
    let d = descs::<T>(OP, g, math)?;
    let key = Key {
        kind,
        geom: *g,
        dtype: T::DTYPE,
        tf32,
        deterministic,
        device: dev.id(),
    };
    let needs = Needs {
        workspace_cap: WORKSPACE_CAP,
        deterministic,
        fma_only: math == Math::Fma,
    };
    // A poisoned lock only means another thread panicked mid-insert; the map is still valid.
    let cached = cache()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
        .copied();
    let stream = dev.cuda_stream();
    let (ran, failures) = algo::run(
        direction(kind),
        cached,
        || ranked(&h, &d, kind, math),
        &needs,
        |c| {
            let mut ws = workspace(&dev, c.workspace)?;
            let mut guards = Guards::new(&stream);
            let ptrs = Ptrs {
                a: guards.read(&a),
                b: guards.read(&b),
                out: guards.write(&mut out),
                ws: ws.as_mut().map_or(0, |w| guards.write(w)),
                ws_bytes: c.workspace,
            };
            // SAFETY: `a`, `b` and `out` are the contiguous NCHW operands of dtype T that
            // this function matched to the descriptors, all built from one validated
            // geometry; the workspace has the size cuDNN reported for `c`; the guards keep
            // every buffer alive and ordered on the stream until after the call.
            unsafe { call(&h, &d, c, ptrs) }
        },
    )?;
    if !failures.is_empty() {
        // No silent fallback: say once per key (the winner is cached below) what failed.
        let failed: Vec<String> = failures
            .iter()
            .map(|(c, e)| format!("{:?}: {e}", c.algo))
            .collect();
        eprintln!(
            "keel: {} for {:?} {:?}: {} failed; using {:?}",
            direction(kind),
            key.geom,
            key.dtype,
            failed.join("; "),
            ran.algo
        );
    }
    if cached != Some(ran) {
        cache()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, ran);
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
}

/// An uninitialized workspace of `bytes` bytes (`None` for 0).
fn workspace(dev: &CudaDevice, bytes: usize) -> Result<Option<CudaSlice<u8>>> {
    if bytes == 0 {
        return Ok(None);
    }
    // SAFETY: cuDNN treats the workspace as scratch memory it writes before reading.
    Ok(Some(unsafe { dev.alloc::<u8>(bytes)? }))
}
