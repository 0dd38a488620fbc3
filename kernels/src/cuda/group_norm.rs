//! CUDA launches of the fused GroupNorm(+SiLU) forward and backward
//! (Wu & He, 2018, arXiv:1803.08494), kernels in `kernels/cuda/group_norm.cu`.
//!
//! Built for small batches: every `(sample, group)` is split over many blocks whose Welford
//! partials `(count, mean, M2)` are merged with Chan's formula by the consumers, so N = 1
//! fills the GPU. Forward: `gn_stats` + `gn_fwd_apply` (2 launches). Backward (mean and rstd
//! recomputed): `gn_stats` + `gn_bwd_reduce` + `gn_bwd_finalize` + `gn_bwd_dx` (4 launches);
//! the only temporaries are O(N * G * S + N * C * RS) floats of partial sums.

use super::{kernel_name, launch, poison, poison_outputs, view, Guards, KernelDType, Module};
use candle::backend::BackendStorage;
use candle::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, ValidAsZeroBits};
use candle::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Shape};
use half::{bf16, f16};

/// `kernels/cuda/group_norm.cu`.
const MODULE: Module = Module {
    name: "keel_group_norm",
    ptx: include_str!("../../ptx/group_norm.ptx"),
};
/// Threads per block; must equal `GN_THREADS` in the .cu file.
const THREADS: u32 = 256;
/// Blocks to aim for per launch: about 8 resident 256-thread blocks on each of an H100's
/// 132 SMs. Fewer when the tensor is small (see [`MIN_CHUNK`]).
const TARGET_BLOCKS: usize = 1024;
/// Smallest chunk (elements) worth a block of its own.
const MIN_CHUNK: usize = 4096;
/// Chunks are a multiple of this many elements (a multiple of every 16-byte vector width),
/// so a chunk starts 16-byte aligned whenever its row or group does.
const CHUNK_ALIGN: usize = 64;

/// Launch geometry of one call; see the .cu header for the meaning of each split.
#[derive(Clone, Copy, Debug)]
struct Plan {
    n: usize,
    c: usize,
    g: usize,
    hw: usize,
    numel: usize,
    /// Elements per `(sample, group)`: `C / G * HW`.
    group_len: usize,
    /// Stats chunk (elements) and chunks per group.
    chunk: usize,
    splits: usize,
    /// Row chunk (elements) and chunks per `(sample, channel)` row.
    rchunk: usize,
    rsplits: usize,
}

/// `(chunk, count)`: cuts `len >= 1` elements into `count` chunks of `chunk` elements (the
/// last one shorter) so that `parallel * count` is about [`TARGET_BLOCKS`].
fn split(len: usize, parallel: usize) -> (usize, usize) {
    let want = TARGET_BLOCKS.div_ceil(parallel.max(1)).max(1);
    let count = want.min(len.div_ceil(MIN_CHUNK)).max(1);
    let chunk = len.div_ceil(count).next_multiple_of(CHUNK_ALIGN);
    (chunk, len.div_ceil(chunk))
}

impl Plan {
    fn new(op: &str, l: &Layout, num_groups: usize, c_len: usize) -> Result<Self> {
        let dims = l.shape().dims();
        if dims.len() < 2
            || num_groups == 0
            || !dims[1].is_multiple_of(num_groups)
            || dims[1] != c_len
        {
            bail!("{op} (cuda): invalid x shape {dims:?} for {num_groups} groups and {c_len} channels")
        }
        let (n, c) = (dims[0], dims[1]);
        let hw: usize = dims[2..].iter().product();
        let numel = n * c * hw;
        let group_len = c / num_groups * hw;
        let (chunk, splits) = split(group_len.max(1), n * num_groups);
        let (rchunk, rsplits) = split(hw.max(1), n * c);
        let blocks_stats = n * num_groups * splits;
        let blocks_rows = n * c * rsplits;
        let fits_i32 = |v: usize| i32::try_from(v).is_ok();
        if !(fits_i32(c) && fits_i32(blocks_stats) && fits_i32(blocks_rows) && fits_i32(splits)) {
            bail!("{op} (cuda): x of shape {dims:?} is too large for one launch (more than 2^31 - 1 blocks or channels)")
        }
        Ok(Self {
            n,
            c,
            g: num_groups,
            hw,
            numel,
            group_len,
            chunk,
            splits,
            rchunk,
            rsplits,
        })
    }

    fn stats_blocks(&self) -> usize {
        self.n * self.g * self.splits
    }

    fn row_blocks(&self) -> usize {
        self.n * self.c * self.rsplits
    }
}

fn cfg(blocks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Launches group_norm.cu's kernel `stem` for element type `T` on `blocks` blocks of
/// [`THREADS`] threads with its parameter struct.
///
/// # Safety
/// As for [`launch`]: `P` is the kernel's parameter struct and its pointers are live buffers
/// of the sizes the kernel touches for this grid.
unsafe fn run<T: KernelDType, P: DeviceRepr>(
    dev: &CudaDevice,
    stem: &str,
    blocks: usize,
    params: &P,
) -> Result<()> {
    // SAFETY: the caller's contract above.
    unsafe { launch(dev, MODULE, &kernel_name::<T>(stem), cfg(blocks), params) }
}

/// Mirror of `GnDims` in group_norm.cu: the geometry and options every kernel of a call shares.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct GnDims {
    hw: i64,
    l: i64,
    chunk: i64,
    rchunk: i64,
    n: i32,
    c: i32,
    g: i32,
    s: i32,
    rs: i32,
    eps: f32,
    silu: i32,
    pad: i32,
}

/// Mirror of `GnStatsParams<T>`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct GnStatsParams {
    x: u64,
    part: u64,
    d: GnDims,
}

/// Mirror of `GnFwdApplyParams<T>`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct GnFwdApplyParams {
    x: u64,
    w: u64,
    b: u64,
    y: u64,
    part: u64,
    d: GnDims,
}

/// Mirror of `GnBwdReduceParams<T>`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct GnBwdReduceParams {
    x: u64,
    w: u64,
    b: u64,
    dy: u64,
    part: u64,
    ab: u64,
    d: GnDims,
}

/// Mirror of `GnBwdFinalizeParams<T>`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct GnBwdFinalizeParams {
    part: u64,
    ab: u64,
    w: u64,
    coef: u64,
    dw: u64,
    db: u64,
    d: GnDims,
}

/// Mirror of `GnBwdDxParams<T>`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct GnBwdDxParams {
    x: u64,
    w: u64,
    b: u64,
    dy: u64,
    coef: u64,
    dx: u64,
    d: GnDims,
}

// SAFETY (all six): plain `#[repr(C)]` integers and floats laid out exactly as the .cu
// structs, which the asserts below pin to the numbers group_norm.cu's static_asserts check.
unsafe impl DeviceRepr for GnDims {}
unsafe impl DeviceRepr for GnStatsParams {}
unsafe impl DeviceRepr for GnFwdApplyParams {}
unsafe impl DeviceRepr for GnBwdReduceParams {}
unsafe impl DeviceRepr for GnBwdFinalizeParams {}
unsafe impl DeviceRepr for GnBwdDxParams {}

const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<GnDims>() == 64);
    assert!(offset_of!(GnDims, n) == 32 && offset_of!(GnDims, eps) == 52);
    assert!(offset_of!(GnDims, silu) == 56);
    assert!(size_of::<GnStatsParams>() == 80 && offset_of!(GnStatsParams, d) == 16);
    assert!(size_of::<GnFwdApplyParams>() == 104 && offset_of!(GnFwdApplyParams, d) == 40);
    assert!(size_of::<GnBwdReduceParams>() == 112 && offset_of!(GnBwdReduceParams, d) == 48);
    assert!(size_of::<GnBwdFinalizeParams>() == 112 && offset_of!(GnBwdFinalizeParams, d) == 48);
    assert!(size_of::<GnBwdDxParams>() == 112 && offset_of!(GnBwdDxParams, d) == 48);
};

impl Plan {
    /// The kernels' shared parameters (every count was checked to fit in i32 by [`Plan::new`]).
    fn dims(&self, eps: f32, silu: bool) -> GnDims {
        GnDims {
            hw: self.hw as i64,
            l: self.group_len as i64,
            chunk: self.chunk as i64,
            rchunk: self.rchunk as i64,
            n: self.n as i32,
            c: self.c as i32,
            g: self.g as i32,
            s: self.splits as i32,
            rs: self.rsplits as i32,
            eps,
            silu: i32::from(silu),
            pad: 0,
        }
    }
}

/// Allocates `len` elements (at least one, so that empty tensors never ask the driver for
/// zero bytes), poisoned with NaN when the test hook is on.
fn alloc_out<T: DeviceRepr>(dev: &CudaDevice, len: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every element of the first `len` is written by the kernels below before the
    // buffer is returned (or the buffer is poisoned first in test mode); a spare element of
    // an empty output is never read.
    let mut out = unsafe { dev.alloc::<T>(len.max(1)) }?;
    if poison_outputs() {
        poison(dev, &mut out)?;
    }
    Ok(out)
}

/// The three inputs of one call: `(x, weight, bias)` forward, `(x, wb, dy)` backward.
pub(crate) type Args<'a> = (
    &'a CudaStorage,
    &'a Layout,
    &'a CudaStorage,
    &'a Layout,
    &'a CudaStorage,
    &'a Layout,
);

/// The op's options: name (for errors), groups, eps, SiLU.
#[derive(Clone, Copy)]
pub(crate) struct Opts<'a> {
    /// The op's name in error messages (`group_norm_silu`, `group_norm_bwd`, ...).
    pub(crate) op: &'a str,
    /// Number of groups G (divides C).
    pub(crate) num_groups: usize,
    /// Added to the variance.
    pub(crate) eps: f32,
    /// Whether SiLU follows the normalization.
    pub(crate) silu: bool,
}

/// One dtype instantiation of [`fwd_t`] or [`bwd_t`].
type Instance = fn(Opts<'_>, Args<'_>) -> Result<(CudaStorage, Shape)>;

/// Runs the instantiation (f32, f16, bf16) of `x`'s dtype; any other dtype is an error.
fn by_dtype(
    o: Opts<'_>,
    args: Args<'_>,
    [f32_, f16_, bf16_]: [Instance; 3],
) -> Result<(CudaStorage, Shape)> {
    match args.0.dtype() {
        DType::F32 => f32_(o, args),
        DType::F16 => f16_(o, args),
        DType::BF16 => bf16_(o, args),
        dt => bail!(
            "{} (cuda): unsupported dtype {dt:?}; supported: f32, f16, bf16",
            o.op
        ),
    }
}

fn fwd_t<T: KernelDType>(
    o: Opts<'_>,
    (s1, l1, s2, l2, s3, l3): Args<'_>,
) -> Result<(CudaStorage, Shape)> {
    let op = o.op;
    let dev = s1.device().clone();
    let p = Plan::new(op, l1, o.num_groups, l2.shape().elem_count())?;
    if l3.shape().elem_count() != p.c {
        bail!(
            "{op} (cuda): bias has {} elements, expected {}",
            l3.shape().elem_count(),
            p.c
        )
    }
    let x = view::<T>(op, "x", s1, l1)?;
    let w = view::<T>(op, "weight", s2, l2)?;
    let b = view::<T>(op, "bias", s3, l3)?;
    let mut y = alloc_out::<T>(&dev, p.numel)?;
    if p.numel > 0 {
        // SAFETY: fully written by gn_stats (one triple per block) before gn_fwd_apply reads it.
        let mut part = unsafe { dev.alloc::<f32>(3 * p.stats_blocks()) }?;
        let stream = dev.cuda_stream();
        let mut gd = Guards::new(&stream);
        let d = p.dims(o.eps, o.silu);
        let (xp, partp) = (gd.read(&x), gd.write(&mut part));
        let stats = GnStatsParams {
            x: xp,
            part: partp,
            d,
        };
        // SAFETY: gn_stats_<T> reads x (N * G * L elements of T, contiguous (N, C, HW),
        // L = C / G * HW); grid = N * G * S blocks, block b reads [s * chunk,
        // min((s + 1) * chunk, L)) of its group and writes 3 floats at part[3 * b]; part
        // holds 3 * N * G * S floats. Guards held until the end of this block.
        unsafe { run::<T, _>(&dev, "gn_stats", p.stats_blocks(), &stats) }?;
        let apply = GnFwdApplyParams {
            x: xp,
            w: gd.read(&w),
            b: gd.read(&b),
            y: gd.write(&mut y),
            part: partp,
            d,
        };
        // SAFETY: gn_fwd_apply_<T>: x and y hold N * C * HW elements of T, w and b C
        // elements, part the N * G * S triples written above; grid = N * C * RS blocks,
        // each writing [s * rchunk, min((s + 1) * rchunk, HW)) of its row, so every y
        // element is written exactly once (RS = ceil(HW / rchunk)).
        unsafe { run::<T, _>(&dev, "gn_fwd_apply", p.row_blocks(), &apply) }?;
    }
    Ok((CudaStorage::wrap_cuda_slice(y, dev), l1.shape().clone()))
}

/// CUDA forward of `GroupNormOp`: `(x, weight, bias)` -> y with x's shape and dtype.
pub(crate) fn fwd(o: Opts<'_>, args: Args<'_>) -> Result<(CudaStorage, Shape)> {
    by_dtype(o, args, [fwd_t::<f32>, fwd_t::<f16>, fwd_t::<bf16>])
}

fn bwd_t<T: KernelDType + ValidAsZeroBits>(
    o: Opts<'_>,
    (s1, l1, s2, l2, s3, l3): Args<'_>,
) -> Result<(CudaStorage, Shape)> {
    let op = o.op;
    let dev = s1.device().clone();
    let c2 = l2.shape().elem_count();
    let p = Plan::new(op, l1, o.num_groups, c2 / 2)?;
    if c2 != 2 * p.c || l3.shape().elem_count() != p.numel {
        bail!(
            "{op} (cuda): expected wb of {} elements and dy of shape {:?}, got {c2} and {:?}",
            2 * p.c,
            l1.shape(),
            l3.shape()
        )
    }
    let out_len = p.numel + 2 * p.c;
    let out_shape = Shape::from(out_len);
    if p.numel == 0 {
        // Empty x: no dx, and dweight = dbias = 0.
        let out = dev.alloc_zeros::<T>(out_len.max(1))?;
        return Ok((CudaStorage::wrap_cuda_slice(out, dev), out_shape));
    }
    let x = view::<T>(op, "x", s1, l1)?;
    let wb = view::<T>(op, "wb", s2, l2)?;
    let dy = view::<T>(op, "dy", s3, l3)?;
    let mut out = alloc_out::<T>(&dev, out_len)?;
    // SAFETY (the three scratch buffers): each element is written by exactly one block of
    // the kernel that produces it before a later kernel on the same stream reads it.
    let mut part = unsafe { dev.alloc::<f32>(3 * p.stats_blocks()) }?;
    let mut ab = unsafe { dev.alloc::<f32>(2 * p.row_blocks()) }?;
    let mut coef = unsafe { dev.alloc::<f32>(4 * p.n * p.g) }?;
    let stream = dev.cuda_stream();
    let mut gd = Guards::new(&stream);
    let d = p.dims(o.eps, o.silu);
    let elem = std::mem::size_of::<T>() as u64;
    let (xp, wp, dyp) = (gd.read(&x), gd.read(&wb), gd.read(&dy));
    // weight = wb[0..C], bias = wb[C..2C]; dx = out[0..numel], dweight = out[numel..numel + C],
    // dbias = out[numel + C..numel + 2C] (byte offsets from the buffers' base addresses).
    let bp = wp + p.c as u64 * elem;
    let dxp = gd.write(&mut out);
    let (dwp, dbp) = (
        dxp + p.numel as u64 * elem,
        dxp + (p.numel + p.c) as u64 * elem,
    );
    let (partp, abp, coefp) = (gd.write(&mut part), gd.write(&mut ab), gd.write(&mut coef));

    let stats = GnStatsParams {
        x: xp,
        part: partp,
        d,
    };
    // SAFETY: as in fwd_t: x holds N * G * L elements of T; part 3 * N * G * S floats.
    unsafe { run::<T, _>(&dev, "gn_stats", p.stats_blocks(), &stats) }?;

    let reduce = GnBwdReduceParams {
        x: xp,
        w: wp,
        b: bp,
        dy: dyp,
        part: partp,
        ab: abp,
        d,
    };
    // SAFETY: gn_bwd_reduce_<T>: x and dy hold N * C * HW elements of T, w and b C elements
    // each (the two halves of wb's 2 C), part the stats triples; grid = N * C * RS blocks,
    // block (row, s) writes ab[2 * (row * RS + s) + {0, 1}], and ab holds 2 * N * C * RS floats.
    unsafe { run::<T, _>(&dev, "gn_bwd_reduce", p.row_blocks(), &reduce) }?;

    let fin = GnBwdFinalizeParams {
        part: partp,
        ab: abp,
        w: wp,
        coef: coefp,
        dw: dwp,
        db: dbp,
        d,
    };
    // SAFETY: gn_bwd_finalize_<T>: grid = N * G blocks; block ng writes coef[4 * ng + {0..3}]
    // (coef holds 4 * N * G floats) and, for sample 0, dw[c] and db[c] for the C / G channels
    // of its group, so each of the C elements of dw and db (inside out's numel + 2 C) is
    // written once.
    unsafe { run::<T, _>(&dev, "gn_bwd_finalize", p.n * p.g, &fin) }?;

    let dxk = GnBwdDxParams {
        x: xp,
        w: wp,
        b: bp,
        dy: dyp,
        coef: coefp,
        dx: dxp,
        d,
    };
    // SAFETY: gn_bwd_dx_<T>: dx is the first N * C * HW elements of `out`; grid = N * C * RS
    // blocks, each writing its [s * rchunk, min((s + 1) * rchunk, HW)) range of its row, so
    // every dx element is written exactly once; coef was written by gn_bwd_finalize.
    unsafe { run::<T, _>(&dev, "gn_bwd_dx", p.row_blocks(), &dxk) }?;
    drop(gd);

    Ok((CudaStorage::wrap_cuda_slice(out, dev), out_shape))
}

/// CUDA forward of `GroupNormBwdOp`: `(x, wb = stack([weight, bias]), dy)` -> one flat
/// tensor `[dx, dweight, dbias]` of `numel(x) + 2 C` elements in x's dtype.
pub(crate) fn bwd(o: Opts<'_>, args: Args<'_>) -> Result<(CudaStorage, Shape)> {
    by_dtype(o, args, [bwd_t::<f32>, bwd_t::<f16>, bwd_t::<bf16>])
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn splits_cover_every_element_once() {
        for &(len, par) in &[
            (1, 1),
            (63, 1),
            (4096, 128),
            (524_288, 128),
            (65_536, 64),
            (7, 5000),
        ] {
            let (chunk, count) = split(len, par);
            assert!(chunk % 64 == 0 && count >= 1);
            assert!(
                (count - 1) * chunk < len && count * chunk >= len,
                "{len} {par}"
            );
        }
        // A small batch is spread over many blocks.
        assert_eq!(split(524_288, 128).1, 8);
    }
}
