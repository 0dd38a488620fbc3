//! cuDNN convolutions (forward, backward-data, backward-filter) for [`crate::conv2d`],
//! built with keel's `cudnn` feature, through cudarc 0.19's safe `cudnn` bindings.
//!
//! - **Layout**: NCHW tensors and filters, as candle stores them (no transposes); groups
//!   through `cudnnSetConvolutionGroupCount`, so depthwise is one call.
//! - **Precision**: the compute type is `f32` for every dtype (f16/bf16 data accumulate in
//!   f32). Math type: tensor cores (`CUDNN_TENSOR_OP_MATH`) for f16/bf16; for f32,
//!   `CUDNN_FMA_MATH` (true f32, no TF32) unless [`crate::set_conv_tf32`] turned TF32 on,
//!   in which case `CUDNN_TENSOR_OP_MATH` lets cuDNN use TF32 tensor cores. Off by default,
//!   as in candle and PyTorch's `torch.backends.cudnn.allow_tf32 = False`.
//! - **Algorithms**: cuDNN's heuristics (`cudnnGetConvolution*Algorithm_v7`) pick the
//!   algorithm; if it needs more than [`WORKSPACE_CAP`] bytes of workspace (or is rejected),
//!   fixed fallbacks with small workspaces are tried in order. The choice and its workspace
//!   size are cached per (direction, geometry, dtype, math mode, device) for the life of the
//!   process, so each shape pays the heuristic query once.
//! - **Workspace**: allocated per call from the device's stream-ordered allocator (not
//!   zeroed), at most [`WORKSPACE_CAP`] bytes, freed when the call returns.
//! - **Handles**: one cuDNN handle per (thread, device), bound to candle's stream (cuDNN
//!   handles are neither `Send` nor `Sync`).

use super::{poison, poison_outputs, view};
use crate::conv::{Geom, Kind};
use candle::backend::BackendStorage;
use candle::cuda_backend::cudarc::cudnn::sys::{
    cudnnConvolutionBwdDataAlgo_t as DataAlgo, cudnnConvolutionBwdFilterAlgo_t as FilterAlgo,
    cudnnConvolutionFwdAlgo_t as FwdAlgo, cudnnConvolutionMode_t, cudnnMathType_t,
    cudnnTensorFormat_t,
};
use candle::cuda_backend::cudarc::cudnn::{
    ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, CudnnDataType,
    CudnnError, FilterDescriptor, TensorDescriptor,
};
use candle::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, ValidAsZeroBits};
use candle::cuda_backend::{CudaDType, DeviceId};
use candle::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Shape, WithDType};
use half::{bf16, f16};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The most workspace (bytes) one cuDNN convolution call may use: 256 MiB. Algorithms
/// that need more are skipped for a fallback (see the module docs).
pub(crate) const WORKSPACE_CAP: usize = 256 << 20;

#[derive(Clone, Copy, Debug)]
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
    device: DeviceId,
}

/// `(algorithm, workspace bytes)` per key.
fn cache() -> &'static Mutex<HashMap<Key, (Algo, usize)>> {
    static CACHE: OnceLock<Mutex<HashMap<Key, (Algo, usize)>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

thread_local! {
    static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
}

fn handle(dev: &CudaDevice) -> Result<Arc<Cudnn>> {
    HANDLES.with(|h| {
        if let Some(c) = h.borrow().get(&dev.id()) {
            return Ok(c.clone());
        }
        let c = Cudnn::new(dev.cuda_stream())?;
        h.borrow_mut().insert(dev.id(), c.clone());
        Ok(c)
    })
}

/// The first of `candidates` whose workspace is known and within the cap.
fn first_fitting<A: Copy>(
    candidates: impl IntoIterator<Item = std::result::Result<A, CudnnError>>,
    workspace: impl Fn(A) -> std::result::Result<usize, CudnnError>,
) -> Option<(A, usize)> {
    candidates
        .into_iter()
        .filter_map(|a| a.ok())
        .find_map(|a| match workspace(a) {
            Ok(ws) if ws <= WORKSPACE_CAP => Some((a, ws)),
            _ => None,
        })
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

/// The descriptors of one call: convolution (f32 compute type), x, w, y.
type Descs<T> = (
    ConvDescriptor<f32>,
    TensorDescriptor<T>,
    FilterDescriptor<T>,
    TensorDescriptor<T>,
);

/// Builds descriptors for data type `T` with an f32 compute type.
fn descs<T: CudnnDataType>(
    op: &str,
    cudnn: &Arc<Cudnn>,
    g: &Geom,
    dtype: DType,
    tf32: bool,
) -> Result<Descs<T>> {
    let i = |v: usize| i32::try_from(v).unwrap_or(i32::MAX);
    let mut conv = cudnn.create_conv2d::<f32>(
        [i(g.padding); 2],
        [i(g.stride); 2],
        [i(g.dilation); 2],
        cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
    )?;
    conv.set_group_count(i(g.groups))?;
    let math = match (dtype, tf32) {
        (DType::F32, false) => cudnnMathType_t::CUDNN_FMA_MATH,
        _ => cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
    };
    conv.set_math_type(math)?;
    let nchw = cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
    let x = cudnn.create_4d_tensor::<T>(nchw, dims_i32(op, g.x_dims())?)?;
    let w = cudnn.create_4d_filter::<T>(nchw, dims_i32(op, g.w_dims())?)?;
    let y = cudnn.create_4d_tensor::<T>(nchw, dims_i32(op, g.y_dims())?)?;
    Ok((conv, x, w, y))
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

/// One cuDNN convolution direction (cudarc's `ConvForward`, `ConvBackwardData`,
/// `ConvBackwardFilter`): its algorithm type, fallbacks and call, so that [`convolve`] states
/// the algorithm choice, caching and workspace handling once for all three.
trait Direction<T: CudnnDataType> {
    /// cuDNN's algorithm enum for this direction.
    type Algo: Copy;
    /// Algorithms with small workspaces, tried in order after cuDNN's heuristic pick.
    const FALLBACKS: [Self::Algo; 2];
    /// cuDNN's heuristic choice (`cudnnGetConvolution*Algorithm_v7`).
    fn heuristic(&self) -> std::result::Result<Self::Algo, CudnnError>;
    /// Workspace bytes `algo` needs for these descriptors.
    fn workspace_size(&self, algo: Self::Algo) -> std::result::Result<usize, CudnnError>;
    /// The algorithm as a cache entry.
    fn cached(algo: Self::Algo) -> Algo;
    /// The algorithm of a cache entry, `None` when it belongs to another direction.
    fn uncached(algo: Algo) -> Option<Self::Algo>;
    /// Runs the convolution with `alpha = 1`, `beta = 0`: `(a, b)` are the op's two inputs in
    /// [`run`]'s order, `out` its output.
    ///
    /// # Safety
    /// `a`, `b` and `out` are contiguous NCHW buffers of dtype `T` with exactly the element
    /// counts of this direction's descriptors, and `ws` holds at least
    /// `workspace_size(algo)` bytes.
    unsafe fn call(
        &self,
        algo: Self::Algo,
        ws: Option<&mut CudaSlice<u8>>,
        a: &CudaView<'_, T>,
        b: &CudaView<'_, T>,
        out: &mut CudaSlice<T>,
    ) -> std::result::Result<(), CudnnError>;
}

impl<T: CudnnDataType + WithDType> Direction<T> for ConvForward<'_, T, f32, T> {
    type Algo = FwdAlgo;
    const FALLBACKS: [FwdAlgo; 2] = [
        FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
        FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
    ];
    fn heuristic(&self) -> std::result::Result<FwdAlgo, CudnnError> {
        self.pick_algorithm()
    }
    fn workspace_size(&self, algo: FwdAlgo) -> std::result::Result<usize, CudnnError> {
        self.get_workspace_size(algo)
    }
    fn cached(algo: FwdAlgo) -> Algo {
        Algo::Fwd(algo)
    }
    fn uncached(algo: Algo) -> Option<FwdAlgo> {
        match algo {
            Algo::Fwd(a) => Some(a),
            _ => None,
        }
    }
    unsafe fn call(
        &self,
        algo: FwdAlgo,
        ws: Option<&mut CudaSlice<u8>>,
        x: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        y: &mut CudaSlice<T>,
    ) -> std::result::Result<(), CudnnError> {
        // SAFETY: x (N, C_in, H, W), w (C_out, C_in/G, kH, kW), y (N, C_out, H_out, W_out)
        // match the descriptors `x`, `w`, `y` (the caller's contract).
        unsafe { self.launch(algo, ws, (T::from_f64(1.0), T::from_f64(0.0)), x, w, y) }
    }
}

impl<T: CudnnDataType + WithDType> Direction<T> for ConvBackwardData<'_, T, f32, T> {
    type Algo = DataAlgo;
    const FALLBACKS: [DataAlgo; 2] = [
        DataAlgo::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
        DataAlgo::CUDNN_CONVOLUTION_BWD_DATA_ALGO_0,
    ];
    fn heuristic(&self) -> std::result::Result<DataAlgo, CudnnError> {
        self.pick_algorithm()
    }
    fn workspace_size(&self, algo: DataAlgo) -> std::result::Result<usize, CudnnError> {
        self.get_workspace_size(algo)
    }
    fn cached(algo: DataAlgo) -> Algo {
        Algo::Data(algo)
    }
    fn uncached(algo: Algo) -> Option<DataAlgo> {
        match algo {
            Algo::Data(a) => Some(a),
            _ => None,
        }
    }
    unsafe fn call(
        &self,
        algo: DataAlgo,
        ws: Option<&mut CudaSlice<u8>>,
        dy: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        dx: &mut CudaSlice<T>,
    ) -> std::result::Result<(), CudnnError> {
        // SAFETY: dy (N, C_out, H_out, W_out), w and dx (N, C_in, H, W) match the
        // descriptors `dy`, `w`, `dx` (the caller's contract).
        unsafe { self.launch(algo, ws, (T::from_f64(1.0), T::from_f64(0.0)), dx, w, dy) }
    }
}

impl<T: CudnnDataType + WithDType> Direction<T> for ConvBackwardFilter<'_, T, f32, T> {
    type Algo = FilterAlgo;
    const FALLBACKS: [FilterAlgo; 2] = [
        FilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
        FilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
    ];
    fn heuristic(&self) -> std::result::Result<FilterAlgo, CudnnError> {
        self.pick_algorithm()
    }
    fn workspace_size(&self, algo: FilterAlgo) -> std::result::Result<usize, CudnnError> {
        self.get_workspace_size(algo)
    }
    fn cached(algo: FilterAlgo) -> Algo {
        Algo::Filter(algo)
    }
    fn uncached(algo: Algo) -> Option<FilterAlgo> {
        match algo {
            Algo::Filter(a) => Some(a),
            _ => None,
        }
    }
    unsafe fn call(
        &self,
        algo: FilterAlgo,
        ws: Option<&mut CudaSlice<u8>>,
        x: &CudaView<'_, T>,
        dy: &CudaView<'_, T>,
        dw: &mut CudaSlice<T>,
    ) -> std::result::Result<(), CudnnError> {
        // SAFETY: x, dy and dw (C_out, C_in/G, kH, kW) match the descriptors `x`, `dy`,
        // `dw` (the caller's contract).
        unsafe { self.launch(algo, ws, (T::from_f64(1.0), T::from_f64(0.0)), x, dw, dy) }
    }
}

/// Picks (or recalls) the algorithm of direction `d` for `key` and runs it on `(a, b)` into
/// `out`, with a workspace of the size cuDNN reports.
fn convolve<T: CudnnDataType, D: Direction<T>>(
    d: &D,
    key: Key,
    dev: &CudaDevice,
    (a, b): (&CudaView<'_, T>, &CudaView<'_, T>),
    out: &mut CudaSlice<T>,
) -> Result<()> {
    let cached = cache().lock().ok().and_then(|c| c.get(&key).copied());
    let (algo, ws) = match cached {
        Some((algo, ws)) => match D::uncached(algo) {
            Some(a) => (a, ws),
            None => bail!("conv2d (cudnn): algorithm cache mismatch for {key:?}"),
        },
        None => {
            let cands = [d.heuristic()].into_iter().chain(D::FALLBACKS.map(Ok));
            let Some((algo, ws)) = first_fitting(cands, |a| d.workspace_size(a)) else {
                bail!(
                    "conv2d (cudnn): no {:?} algorithm fits the {WORKSPACE_CAP}-byte workspace cap for {:?} in {:?}",
                    key.kind, key.geom, key.dtype
                )
            };
            if let Ok(mut c) = cache().lock() {
                c.insert(key, (D::cached(algo), ws));
            }
            (algo, ws)
        }
    };
    let mut wsb = workspace(dev, ws)?;
    // SAFETY: `a`, `b` and `out` are the contiguous NCHW operands of dtype T that [`launch`]
    // matched to this direction's descriptors, all built from one validated geometry; the
    // workspace has the size cuDNN reported for `algo`.
    unsafe { d.call(algo, wsb.as_mut(), a, b, out) }?;
    Ok(())
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
    let cudnn = handle(&dev)?;
    let tf32 = crate::conv::conv_tf32();
    let (conv, x, w, y) = descs::<T>(OP, &cudnn, g, T::DTYPE, tf32)?;
    let key = Key {
        kind,
        geom: *g,
        dtype: T::DTYPE,
        tf32,
        device: dev.id(),
    };
    let ab = (&a, &b);
    match kind {
        Kind::Forward => {
            let d = ConvForward {
                conv: &conv,
                x: &x,
                w: &w,
                y: &y,
            };
            convolve(&d, key, &dev, ab, &mut out)?
        }
        Kind::BackwardData => {
            let d = ConvBackwardData {
                conv: &conv,
                dx: &x,
                w: &w,
                dy: &y,
            };
            convolve(&d, key, &dev, ab, &mut out)?
        }
        Kind::BackwardFilter => {
            let d = ConvBackwardFilter {
                conv: &conv,
                x: &x,
                dw: &w,
                dy: &y,
            };
            convolve(&d, key, &dev, ab, &mut out)?
        }
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
