//! CUDA launches of the fused GroupNorm(+SiLU) forward and backward
//! (Wu & He, 2018, arXiv:1803.08494), kernels in `kernels/cuda/group_norm.cu`.
//!
//! Built for small batches: every `(sample, group)` is split over many blocks whose Welford
//! partials `(count, mean, M2)` are merged with Chan's formula by the consumers, so N = 1
//! fills the GPU. Forward: `gn_stats` + `gn_fwd_apply` (2 launches). Backward (mean and rstd
//! recomputed): `gn_stats` + `gn_bwd_reduce` + `gn_bwd_finalize` + `gn_bwd_dx` (4 launches);
//! the only temporaries are O(N * G * S + N * C * RS) floats of partial sums.

use super::{poison, poison_outputs};
use candle::backend::BackendStorage;
use candle::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle::cuda_backend::{CudaDType, WrapErr};
use candle::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Shape};
use half::{bf16, f16};

/// Module name under which the PTX is cached by the device.
pub(crate) const MODULE: &str = "keel_group_norm";
/// The committed PTX (`cargo xtask ptx` regenerates it; `cargo xtask ptx --check` verifies it).
pub(crate) const PTX: &str = include_str!("../../ptx/group_norm.ptx");
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
        if dims.len() < 2 || num_groups == 0 || dims[1] % num_groups != 0 || dims[1] != c_len {
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

/// The contiguous elements of `s` described by `l`, or an error naming the operand.
fn view<'a, T: CudaDType>(
    op: &str,
    what: &str,
    s: &'a CudaStorage,
    l: &Layout,
) -> Result<CudaView<'a, T>> {
    let slice = s.as_cuda_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => match slice.try_slice(a..b) {
            Some(v) => Ok(v),
            None => bail!("{op} (cuda): {what} layout {l:?} is out of bounds of its storage"),
        },
        None => bail!("{op} (cuda): {what} must be contiguous (layout {l:?})"),
    }
}

/// Allocates `len` elements (at least one, so that empty tensors never ask the driver for
/// zero bytes), poisoned with NaN when the test hook is on.
fn alloc_out<T: DeviceRepr>(dev: &CudaDevice, len: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every element of the first `len` is written by the kernels below before the
    // buffer is returned (or the buffer is poisoned first in test mode); a spare element of
    // an empty output is never read.
    let out = unsafe { dev.alloc::<T>(len.max(1)) }?;
    if poison_outputs() {
        poison(dev, MODULE, PTX, &out)?;
    }
    Ok(out)
}

/// Launches `gn_stats_<suffix>`: `part[ng * splits + s]` = Welford (count, mean, M2).
fn launch_stats<T>(
    dev: &CudaDevice,
    sfx: &str,
    p: &Plan,
    x: &CudaView<'_, T>,
    part: &CudaSlice<f32>,
) -> Result<()> {
    let func = dev.get_or_load_custom_func(&format!("gn_stats_{sfx}"), MODULE, PTX)?;
    let (group_len, chunk, splits) = (p.group_len as i64, p.chunk as i64, p.splits as i32);
    let mut b = func.builder();
    b.arg(x);
    b.arg(part);
    b.arg(&group_len);
    b.arg(&chunk);
    b.arg(&splits);
    // SAFETY: gn_stats(const T* x, float* part, i64 L, i64 chunk, int S) with T matching
    // `x`'s element type (same dtype suffix); x holds N * G * L elements (contiguous
    // (N, C, HW), L = C / G * HW); grid = N * G * S blocks of 256 threads, each reading
    // [s * chunk, min((s + 1) * chunk, L)) of its group and writing 3 floats at
    // part[3 * block]; part holds 3 * N * G * S floats.
    unsafe { b.launch(cfg(p.stats_blocks())) }.w()?;
    Ok(())
}

fn fwd_t<T: CudaDType + DeviceRepr>(
    sfx: &str,
    op: &str,
    (s1, l1, s2, l2, s3, l3): (
        &CudaStorage,
        &Layout,
        &CudaStorage,
        &Layout,
        &CudaStorage,
        &Layout,
    ),
    num_groups: usize,
    eps: f32,
    silu: bool,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let p = Plan::new(op, l1, num_groups, l2.shape().elem_count())?;
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
    let y = alloc_out::<T>(&dev, p.numel)?;
    if p.numel > 0 {
        // SAFETY: fully written by gn_stats (one triple per block) before gn_fwd_apply reads it.
        let part = unsafe { dev.alloc::<f32>(3 * p.stats_blocks()) }?;
        launch_stats(&dev, sfx, &p, &x, &part)?;
        let func = dev.get_or_load_custom_func(&format!("gn_fwd_apply_{sfx}"), MODULE, PTX)?;
        let (c, g, hw, rchunk) = (p.c as i32, p.g as i32, p.hw as i64, p.rchunk as i64);
        let (rs, s, silu) = (p.rsplits as i32, p.splits as i32, i32::from(silu));
        let mut lb = func.builder();
        lb.arg(&x);
        lb.arg(&w);
        lb.arg(&b);
        lb.arg(&y);
        lb.arg(&part);
        lb.arg(&c);
        lb.arg(&g);
        lb.arg(&hw);
        lb.arg(&rchunk);
        lb.arg(&rs);
        lb.arg(&s);
        lb.arg(&eps);
        lb.arg(&silu);
        // SAFETY: gn_fwd_apply(const T* x, const T* w, const T* b, T* y, const float* part,
        // int C, int G, i64 HW, i64 rchunk, int RS, int S, float eps, int silu), in that
        // order; x and y hold N * C * HW elements, w and b C elements, part the N * G * S
        // triples written above; grid = N * C * RS blocks, each writing
        // [s * rchunk, min((s + 1) * rchunk, HW)) of its row, so every y element is written
        // exactly once (RS = ceil(HW / rchunk)).
        unsafe { lb.launch(cfg(p.row_blocks())) }.w()?;
    }
    Ok((CudaStorage::wrap_cuda_slice(y, dev), l1.shape().clone()))
}

/// CUDA forward of `GroupNormOp`: `(x, weight, bias)` -> y with x's shape and dtype.
#[allow(clippy::too_many_arguments)] // reason: the signature is the CustomOp3 contract with group_norm.rs
pub(crate) fn fwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
    num_groups: usize,
    eps: f32,
    silu: bool,
) -> Result<(CudaStorage, Shape)> {
    let op = if silu {
        "group_norm_silu"
    } else {
        "group_norm"
    };
    let args = (s1, l1, s2, l2, s3, l3);
    match s1.dtype() {
        DType::F32 => fwd_t::<f32>("f32", op, args, num_groups, eps, silu),
        DType::F16 => fwd_t::<f16>("f16", op, args, num_groups, eps, silu),
        DType::BF16 => fwd_t::<bf16>("bf16", op, args, num_groups, eps, silu),
        dt => bail!("{op} (cuda): unsupported dtype {dt:?}; supported: f32, f16, bf16"),
    }
}

fn bwd_t<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
    sfx: &str,
    op: &str,
    (s1, l1, s2, l2, s3, l3): (
        &CudaStorage,
        &Layout,
        &CudaStorage,
        &Layout,
        &CudaStorage,
        &Layout,
    ),
    num_groups: usize,
    eps: f32,
    silu: bool,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let c2 = l2.shape().elem_count();
    let p = Plan::new(op, l1, num_groups, c2 / 2)?;
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
    let (w, b) = (wb.slice(0..p.c), wb.slice(p.c..2 * p.c));
    let out = alloc_out::<T>(&dev, out_len)?;
    let dx = out.slice(0..p.numel);
    let dw = out.slice(p.numel..p.numel + p.c);
    let db = out.slice(p.numel + p.c..out_len);

    // SAFETY (the three scratch buffers): each element is written by exactly one block of
    // the kernel that produces it before a later kernel on the same stream reads it.
    let part = unsafe { dev.alloc::<f32>(3 * p.stats_blocks()) }?;
    let ab = unsafe { dev.alloc::<f32>(2 * p.row_blocks()) }?;
    let coef = unsafe { dev.alloc::<f32>(4 * p.n * p.g) }?;
    launch_stats(&dev, sfx, &p, &x, &part)?;

    let (n, c, g) = (p.n as i32, p.c as i32, p.g as i32);
    let (hw, rchunk, rs, s) = (
        p.hw as i64,
        p.rchunk as i64,
        p.rsplits as i32,
        p.splits as i32,
    );
    let silu = i32::from(silu);

    let func = dev.get_or_load_custom_func(&format!("gn_bwd_reduce_{sfx}"), MODULE, PTX)?;
    let mut lb = func.builder();
    lb.arg(&x);
    lb.arg(&w);
    lb.arg(&b);
    lb.arg(&dy);
    lb.arg(&part);
    lb.arg(&ab);
    lb.arg(&c);
    lb.arg(&g);
    lb.arg(&hw);
    lb.arg(&rchunk);
    lb.arg(&rs);
    lb.arg(&s);
    lb.arg(&eps);
    lb.arg(&silu);
    // SAFETY: gn_bwd_reduce(const T* x, const T* w, const T* b, const T* dy,
    // const float* part, float* ab, int C, int G, i64 HW, i64 rchunk, int RS, int S,
    // float eps, int silu), in that order; x and dy hold N * C * HW elements, w and b C
    // elements, part the stats triples; grid = N * C * RS blocks, block (row, s) writes
    // ab[2 * (row * RS + s) + {0, 1}], and ab holds 2 * N * C * RS floats.
    unsafe { lb.launch(cfg(p.row_blocks())) }.w()?;

    let func = dev.get_or_load_custom_func(&format!("gn_bwd_finalize_{sfx}"), MODULE, PTX)?;
    let mut lb = func.builder();
    lb.arg(&part);
    lb.arg(&ab);
    lb.arg(&w);
    lb.arg(&coef);
    lb.arg(&dw);
    lb.arg(&db);
    lb.arg(&n);
    lb.arg(&c);
    lb.arg(&g);
    lb.arg(&hw);
    lb.arg(&rs);
    lb.arg(&s);
    lb.arg(&eps);
    // SAFETY: gn_bwd_finalize(const float* part, const float* ab, const T* w, float* coef,
    // T* dw, T* db, int N, int C, int G, i64 HW, int RS, int S, float eps), in that order;
    // grid = N * G blocks; block ng writes coef[4 * ng + {0..3}] (coef holds 4 * N * G
    // floats) and, for sample 0, dw[c] and db[c] for the C / G channels of its group, so
    // every one of the C elements of dw and db (views of C elements) is written once.
    unsafe { lb.launch(cfg(p.n * p.g)) }.w()?;

    let func = dev.get_or_load_custom_func(&format!("gn_bwd_dx_{sfx}"), MODULE, PTX)?;
    let mut lb = func.builder();
    lb.arg(&x);
    lb.arg(&w);
    lb.arg(&b);
    lb.arg(&dy);
    lb.arg(&coef);
    lb.arg(&dx);
    lb.arg(&c);
    lb.arg(&g);
    lb.arg(&hw);
    lb.arg(&rchunk);
    lb.arg(&rs);
    lb.arg(&silu);
    // SAFETY: gn_bwd_dx(const T* x, const T* w, const T* b, const T* dy, const float* coef,
    // T* dx, int C, int G, i64 HW, i64 rchunk, int RS, int silu), in that order; dx is the
    // first N * C * HW elements of `out`; grid = N * C * RS blocks, each writing its
    // [s * rchunk, min((s + 1) * rchunk, HW)) range of its row, so every dx element is
    // written exactly once.
    unsafe { lb.launch(cfg(p.row_blocks())) }.w()?;

    Ok((CudaStorage::wrap_cuda_slice(out, dev), out_shape))
}

/// CUDA forward of `GroupNormBwdOp`: `(x, wb = stack([weight, bias]), dy)` -> one flat
/// tensor `[dx, dweight, dbias]` of `numel(x) + 2 C` elements in x's dtype.
#[allow(clippy::too_many_arguments)] // reason: the signature is the CustomOp3 contract with group_norm.rs
pub(crate) fn bwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
    num_groups: usize,
    eps: f32,
    silu: bool,
) -> Result<(CudaStorage, Shape)> {
    let op = if silu {
        "group_norm_silu_bwd"
    } else {
        "group_norm_bwd"
    };
    let args = (s1, l1, s2, l2, s3, l3);
    match s1.dtype() {
        DType::F32 => bwd_t::<f32>("f32", op, args, num_groups, eps, silu),
        DType::F16 => bwd_t::<f16>("f16", op, args, num_groups, eps, silu),
        DType::BF16 => bwd_t::<bf16>("bf16", op, args, num_groups, eps, silu),
        dt => bail!("{op} (cuda): unsupported dtype {dt:?}; supported: f32, f16, bf16"),
    }
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
