//! CPU convolution kernels: im2col / col2im over tiles of output rows, and `f32` GEMMs on the
//! `gemm` crate (runtime-dispatched AVX2/AVX-512 micro-kernels with its own cache blocking).
//!
//! Per `(sample, group)` task, with `K = C_in / G * kH * kW` and `P = H_out * W_out`:
//! - forward: `y[og, P] = w[og, K] @ col[K, P]`;
//! - backward-data: `dcol[K, P] = w^T @ dy[og, P]`, then col2im adds dcol into dx; for
//!   output images under 64 pixels (ungrouped, batch >= 2, not pointwise), several samples
//!   side by side: `dcol[K, ns * P]`;
//! - backward-filter: `dw[og, K] += dy[og, P] @ col[K, P]^T`, summed over samples; the
//!   transposed read of `col` is why its row stride is padded ([`padded_ld`]).
//!
//! The im2col buffer covers a tile of whole output rows sized to stay in L2
//! ([`TILE_FLOATS`]), so it is written and read back from cache. A 1x1 stride-1 unpadded
//! convolution skips im2col and multiplies x directly. Parallelism: rayon over tasks when
//! there are enough of them, otherwise sequential tasks with the GEMM itself parallel.

use super::Geom;
use gemm::Parallelism;
use rayon::prelude::*;

/// Target size (f32 elements) of one im2col tile: 256 Ki floats = 1 MiB, within L2.
const TILE_FLOATS: usize = 1 << 18;

/// The backward-filter's `dw` size (floats, per group) from which its GEMMs are split over
/// rows of `dw` rather than over samples with per-thread partial sums (4 MiB: two L2s).
const ROW_SPLIT_FLOATS: usize = 1 << 20;

/// Below this many output pixels a pointwise backward-filter multiplies `x` in place (its
/// row stride is too short to alias); from it on it copies `x` into a padded buffer.
const POINTWISE_DIRECT_PIXELS: usize = 256;

/// Below this many output pixels per sample, backward-data multiplies several samples at
/// once ([`sample_tile`]).
const SMALL_IMAGE_PIXELS: usize = 64;

/// The largest scratch buffer (floats) a thread keeps between calls ([`with_scratch`]):
/// 4 Mi floats = 16 MiB. The tiles aim at 1 MiB ([`TILE_FLOATS`]); only a single output row
/// wider than that, or a sample tile of very wide layers, goes above it.
const KEPT_SCRATCH_FLOATS: usize = 1 << 22;

thread_local! {
    /// Each thread's im2col / GEMM scratch, kept between calls (see [`with_scratch`]).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on `len` floats of this thread's scratch buffer. The buffer outlives the call,
/// so a call neither allocates, zero-fills nor page-faults its scratch again (`memset` fell
/// from 4.7-4.9% to 3.8% of seg_train's twin-width step in `perf`). Each thread keeps the
/// largest buffer it has used up to [`KEPT_SCRATCH_FLOATS`] (16 MiB) until it exits; a larger
/// one is freed after its call. The contents are whatever the last call left: every user
/// writes the part it reads (im2col writes its zeros for padding; the GEMMs run with
/// `acc = false` into it). A nested call (rayon work stealing inside `f`) finds the buffer
/// taken and uses a fresh one.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buf = SCRATCH.with(|s| s.take());
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let out = f(&mut buf[..len]);
    if buf.len() <= KEPT_SCRATCH_FLOATS {
        SCRATCH.with(|s| {
            let mut cur = s.borrow_mut();
            if cur.len() < buf.len() {
                *cur = buf;
            }
        });
    }
    out
}

/// A strided `f32` matrix operand: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

/// `dst[m, n] (row stride dst_rs) = (acc ? dst : 0) + a[m, k] @ b[k, n]`.
#[allow(clippy::too_many_arguments)] // a GEMM call: three sizes, three operands, two modes
fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    acc: bool,
    a: Mat,
    b: Mat,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    let end = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    // Internal invariants (the geometry was validated): every operand holds its extent.
    assert!(
        end(m, n, dst_rs, 1) < dst.len(),
        "conv: GEMM dst out of bounds"
    );
    assert!(
        end(m, k, a.rs, a.cs) < a.data.len(),
        "conv: GEMM lhs out of bounds"
    );
    assert!(
        end(k, n, b.rs, b.cs) < b.data.len(),
        "conv: GEMM rhs out of bounds"
    );
    // SAFETY: the asserts above show that every element the GEMM reads or writes,
    // `(i, j) -> base + i * rs + j * cs` for i < rows, j < cols, lies inside its slice; `dst`
    // is borrowed mutably so it aliases neither operand; strides fit in isize because they
    // index allocated slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            acc,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// The range of output columns `j` whose input column `j * s + off` lies in `[0, len)`.
fn valid_range(off: isize, s: usize, len: usize, out: usize) -> (usize, usize) {
    let s = s as isize;
    let lo = if off >= 0 { 0 } else { ((-off) + s - 1) / s };
    let hi = if (len as isize) - off <= 0 {
        0
    } else {
        ((len as isize - off - 1) / s + 1) as usize
    };
    let hi = hi.min(out);
    (lo.min(hi as isize) as usize, hi)
}

/// col2im: adds the patch rows of output rows `[r0, r1)` in `col` (`K` rows of
/// `(r1 - r0) * W_out` values, row `r` starting at `col[r * ld]`) back into one
/// `(sample, group)` image slice `(C_in / G, H, W)`.
fn col2im(g: &Geom, r0: usize, r1: usize, col: &[f32], ld: usize, img: &mut [f32]) {
    let (h, w, ow) = (g.h, g.w, g.ow);
    let (s, d, p) = (g.stride, g.dilation, g.padding as isize);
    let pt = (r1 - r0) * ow;
    for c in 0..g.cg() {
        let plane = c * h * w;
        for a in 0..g.kh {
            for b in 0..g.kw {
                let row = (c * g.kh + a) * g.kw + b;
                let src = &col[row * ld..row * ld + pt];
                let off = (b * d) as isize - p;
                let (lo, hi) = valid_range(off, s, w, ow);
                if lo >= hi {
                    continue;
                }
                let start = ((lo * s) as isize + off) as usize;
                for (i, oy) in (r0..r1).enumerate() {
                    let ih = (oy * s + a * d) as isize - p;
                    if ih < 0 || ih >= h as isize {
                        continue;
                    }
                    let crow = &src[i * ow + lo..i * ow + hi];
                    let irow = &mut img[plane + ih as usize * w..plane + (ih as usize + 1) * w];
                    if s == 1 {
                        for (x, v) in irow[start..start + hi - lo].iter_mut().zip(crow) {
                            *x += v;
                        }
                    } else {
                        for (j, v) in crow.iter().enumerate() {
                            irow[start + j * s] += v;
                        }
                    }
                }
            }
        }
    }
}

/// im2col: copies the patch rows of output rows `[r0, r1)` of one `(sample, group)` image
/// `(C_in / G, H, W)` into `col` (`K` rows of `(r1 - r0) * W_out` values, row `r` starting at
/// `col[r * ld]`), zeros where they read padding.
fn im2col(g: &Geom, img: &[f32], r0: usize, r1: usize, col: &mut [f32], ld: usize) {
    let (h, w, ow) = (g.h, g.w, g.ow);
    let (s, d, p) = (g.stride, g.dilation, g.padding as isize);
    let pt = (r1 - r0) * ow;
    for c in 0..g.cg() {
        let plane = c * h * w;
        for a in 0..g.kh {
            for b in 0..g.kw {
                let row = (c * g.kh + a) * g.kw + b;
                let dst = &mut col[row * ld..row * ld + pt];
                let off = (b * d) as isize - p;
                let (lo, hi) = valid_range(off, s, w, ow);
                for (i, oy) in (r0..r1).enumerate() {
                    let ih = (oy * s + a * d) as isize - p;
                    let crow = &mut dst[i * ow..(i + 1) * ow];
                    if ih < 0 || ih >= h as isize || lo >= hi {
                        crow.fill(0.0);
                        continue;
                    }
                    let irow = &img[plane + ih as usize * w..plane + (ih as usize + 1) * w];
                    crow[..lo].fill(0.0);
                    crow[hi..].fill(0.0);
                    let start = ((lo * s) as isize + off) as usize;
                    if s == 1 {
                        crow[lo..hi].copy_from_slice(&irow[start..start + hi - lo]);
                    } else {
                        for (j, v) in crow[lo..hi].iter_mut().enumerate() {
                            *v = irow[start + j * s];
                        }
                    }
                }
            }
        }
    }
}

/// Output rows per im2col tile: as many as fit [`TILE_FLOATS`], rounded down (where that
/// leaves at least one) so a tile holds whole multiples of 64 pixels: `gemm` runs the
/// backward-data product with the pixels as its row dimension, and below its 64-row
/// micro-kernel that ran 1.6-2.6x slower per FLOP (one thread, K 4608: 55 GFLOP/s at 32
/// pixels, 34 at 16, 90 at 64).
fn tile_rows(g: &Geom) -> usize {
    let rows = (TILE_FLOATS / (g.k() * g.ow).max(1)).clamp(1, g.oh.max(1));
    if rows == g.oh {
        return rows;
    }
    let unit = 64 / gcd(g.ow.max(1), 64);
    if rows >= unit {
        rows / unit * unit
    } else {
        rows
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Samples per backward-data GEMM for small output images. With one sample the product
/// `dcol (K, P)` has fewer pixels than `gemm`'s 64-row micro-kernel, and it ran at 34
/// GFLOP/s instead of 90 (one thread, s3's 512 -> 512 3x3 on 4x4 maps: K 4608, P 16), so
/// [`backward_data_sample_tiles`] puts several samples' pixels side by side. (The forward's
/// product `w (C_out, K) @ col (K, P)` ran at full speed with P = 16: it keeps one sample.)
/// A pointwise convolution keeps its direct product (no dy copy, no col2im; measured level
/// or faster on lat3's 512 -> 128 1x1 on 4x4); so does an empty input image. 1 = one
/// sample at a time (the per-sample path).
fn sample_tile(g: &Geom) -> usize {
    let p = g.oh * g.ow;
    let empty = g.c_in * g.h * g.w == 0;
    if g.groups != 1 || g.n < 2 || p == 0 || p >= SMALL_IMAGE_PIXELS || g.is_pointwise() || empty {
        return 1;
    }
    SMALL_IMAGE_PIXELS.div_ceil(p).min(g.n)
}

/// Rows per thread when a GEMM's `rows` output rows are split over the pool (multiples of 16).
fn row_block(rows: usize) -> usize {
    rows.div_ceil(rayon::current_num_threads())
        .div_ceil(16)
        .max(1)
        * 16
}

/// How to spread `tasks` independent tasks over the pool: `true` = rayon over tasks with
/// sequential GEMMs, `false` = sequential tasks with parallel GEMMs.
fn over_tasks(tasks: usize) -> bool {
    let t = rayon::current_num_threads();
    t <= 1 || tasks >= 2 * t || (tasks >= t && tasks.is_multiple_of(t))
}

fn inner_par(outer: bool) -> Parallelism {
    if outer || rayon::current_num_threads() <= 1 {
        Parallelism::None
    } else {
        Parallelism::Rayon(rayon::current_num_threads())
    }
}

/// Runs `f(task, out_chunk, scratch)` for every `(sample, group)` task, each owning the
/// `chunk`-sized piece `task` of `out`.
fn for_tasks(
    g: &Geom,
    out: &mut [f32],
    chunk: usize,
    scratch: usize,
    f: impl Fn(usize, &mut [f32], &mut [f32], Parallelism) + Sync,
) {
    if chunk == 0 {
        return;
    }
    let tasks = g.n * g.groups;
    let outer = over_tasks(tasks);
    let par = inner_par(outer);
    if outer {
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(t, o)| with_scratch(scratch, |buf| f(t, o, buf, par)));
    } else {
        with_scratch(scratch, |buf| {
            for (t, o) in out.chunks_mut(chunk).enumerate() {
                f(t, o, buf, par);
            }
        });
    }
}

/// Forward: `y (N, C_out, H_out, W_out)` from `x (N, C_in, H, W)` and `w (C_out, K)`.
pub(super) fn forward(g: &Geom, x: &[f32], w: &[f32]) -> Vec<f32> {
    let (p, k, og, cg) = (g.oh * g.ow, g.k(), g.og(), g.cg());
    let mut y = vec![0f32; g.n * g.c_out * p];
    let rows = tile_rows(g);
    let scratch = if g.is_pointwise() { 0 } else { k * rows * g.ow };
    for_tasks(g, &mut y, og * p, scratch, |t, y_ng, col, par| {
        let (n, gi) = (t / g.groups, t % g.groups);
        let img = &x[(n * g.c_in + gi * cg) * g.h * g.w..][..cg * g.h * g.w];
        let wg = Mat {
            data: &w[gi * og * k..][..og * k],
            rs: k,
            cs: 1,
        };
        if g.is_pointwise() {
            let b = Mat {
                data: img,
                rs: p,
                cs: 1,
            };
            matmul((og, p, k), y_ng, p, false, wg, b, par);
            return;
        }
        for r0 in (0..g.oh).step_by(rows) {
            let r1 = (r0 + rows).min(g.oh);
            let pt = (r1 - r0) * g.ow;
            im2col(g, img, r0, r1, col, pt);
            let b = Mat {
                data: &col[..k * pt],
                rs: pt,
                cs: 1,
            };
            matmul((og, pt, k), &mut y_ng[r0 * g.ow..], p, false, wg, b, par);
        }
    });
    y
}

/// Backward-data: `dx (N, C_in, H, W)` from `dy (N, C_out, H_out, W_out)` and `w`.
pub(super) fn backward_data(g: &Geom, dy: &[f32], w: &[f32]) -> Vec<f32> {
    let (p, k, og, cg) = (g.oh * g.ow, g.k(), g.og(), g.cg());
    let mut dx = vec![0f32; g.n * g.c_in * g.h * g.w];
    let ns = sample_tile(g);
    if ns > 1 {
        backward_data_sample_tiles(g, dy, w, ns, &mut dx);
        return dx;
    }
    let rows = tile_rows(g);
    let scratch = if g.is_pointwise() { 0 } else { k * rows * g.ow };
    for_tasks(
        g,
        &mut dx,
        cg * g.h * g.w,
        scratch,
        |t, dx_ng, dcol, par| {
            let (n, gi) = (t / g.groups, t % g.groups);
            let dy_ng = &dy[(n * g.c_out + gi * og) * p..][..og * p];
            // w_g^T: element (kk, o) = w_g[o * K + kk].
            let wt = Mat {
                data: &w[gi * og * k..][..og * k],
                rs: 1,
                cs: k,
            };
            if g.is_pointwise() {
                let b = Mat {
                    data: dy_ng,
                    rs: p,
                    cs: 1,
                };
                matmul((k, p, og), dx_ng, p, false, wt, b, par);
                return;
            }
            for r0 in (0..g.oh).step_by(rows) {
                let r1 = (r0 + rows).min(g.oh);
                let pt = (r1 - r0) * g.ow;
                let b = Mat {
                    data: &dy_ng[r0 * g.ow..],
                    rs: p,
                    cs: 1,
                };
                matmul((k, pt, og), &mut dcol[..k * pt], pt, false, wt, b, par);
                col2im(g, r0, r1, dcol, pt, dx_ng);
            }
        },
    );
    dx
}

/// Backward-data for small images (`groups == 1`): tiles of `ns` samples, whose `dy` blocks
/// are packed side by side (`(C_out, ns * P)`); the product `dcol (K, ns * P)` is split over
/// blocks of its rows, one per thread, then each sample's columns go back through col2im.
fn backward_data_sample_tiles(g: &Geom, dy: &[f32], w: &[f32], ns: usize, dx: &mut [f32]) {
    let (p, k, co) = (g.oh * g.ow, g.k(), g.c_out);
    let block = row_block(k);
    with_scratch((co + k) * ns * p, |buf| {
        let (packed, dcol) = buf.split_at_mut(co * ns * p);
        backward_data_tiles(g, (dy, w), ns, block, (packed, dcol), dx)
    })
}

/// [`backward_data_sample_tiles`]'s loop over its tiles, with `packed` and `dcol` holding
/// `C_out * ns * P` and `K * ns * P` floats.
fn backward_data_tiles(
    g: &Geom,
    (dy, w): (&[f32], &[f32]),
    ns: usize,
    block: usize,
    (packed, dcol): (&mut [f32], &mut [f32]),
    dx: &mut [f32],
) {
    let (p, k, co) = (g.oh * g.ow, g.k(), g.c_out);
    let img_len = g.c_in * g.h * g.w;
    for n0 in (0..g.n).step_by(ns) {
        let m = ns.min(g.n - n0);
        let pt = m * p;
        pack_samples(dy, |j| (n0 + j) * co * p, m, (co, p), packed);
        let packed = &packed[..co * pt];
        dcol[..k * pt]
            .par_chunks_mut(block * pt)
            .enumerate()
            .for_each(|(bi, out)| {
                let rows = out.len() / pt;
                // w^T's rows from bi * block: element (kk, o) = w[o * K + kk].
                let a = Mat {
                    data: &w[bi * block..],
                    rs: 1,
                    cs: k,
                };
                let b = Mat {
                    data: packed,
                    rs: pt,
                    cs: 1,
                };
                matmul((rows, pt, co), out, pt, false, a, b, Parallelism::None);
            });
        let dcol = &dcol[..k * pt];
        dx[n0 * img_len..(n0 + m) * img_len]
            .par_chunks_mut(img_len)
            .enumerate()
            .for_each(|(j, dx_n)| col2im(g, 0, g.oh, &dcol[j * p..], pt, dx_n));
    }
}

/// Puts the `(rows, P)` blocks of `m` samples side by side in `out` (`(rows, m * P)`);
/// sample `j`'s block starts at `src[at(j)]`.
fn pack_samples(
    src: &[f32],
    at: impl Fn(usize) -> usize,
    m: usize,
    (rows, p): (usize, usize),
    out: &mut [f32],
) {
    if p == 0 {
        return;
    }
    let pt = m * p;
    for j in 0..m {
        let block = &src[at(j)..][..rows * p];
        for (r, row) in block.chunks_exact(p).enumerate() {
            out[r * pt + j * p..][..p].copy_from_slice(row);
        }
    }
}

/// Row stride of an im2col buffer whose rows hold `pt` values: `pt` rounded up to 16 floats
/// and moved off multiples of 64 floats. The backward-filter GEMM reads that buffer
/// transposed, one value per row; with a stride of a large power of two those reads alias in
/// the cache and `gemm` ran 2-30x slower (measured: 30 vs 85 GFLOP/s at `pt` = 1024).
fn padded_ld(pt: usize) -> usize {
    let ld = pt.div_ceil(16) * 16;
    if ld.is_multiple_of(64) {
        ld + 16
    } else {
        ld
    }
}

/// Backward-filter for the samples `ns` into `dw (C_out, K)` (accumulating), one
/// `(sample, group)` and row tile at a time; `col` holds `K * padded_ld(tile)` values.
fn filter_samples(
    g: &Geom,
    (x, dy): (&[f32], &[f32]),
    ns: std::ops::Range<usize>,
    groups: std::ops::Range<usize>,
    dw: &mut [f32],
    col: &mut [f32],
    par: Parallelism,
) {
    let (p, k, og, cg) = (g.oh * g.ow, g.k(), g.og(), g.cg());
    let rows = tile_rows(g);
    let g0 = groups.start;
    for n in ns {
        for gi in groups.clone() {
            let img = &x[(n * g.c_in + gi * cg) * g.h * g.w..][..cg * g.h * g.w];
            let dy_ng = &dy[(n * g.c_out + gi * og) * p..][..og * p];
            let dwg = &mut dw[(gi - g0) * og * k..][..og * k];
            if g.is_pointwise() && p < POINTWISE_DIRECT_PIXELS {
                let a = Mat {
                    data: dy_ng,
                    rs: p,
                    cs: 1,
                };
                let b = Mat {
                    data: img,
                    rs: 1,
                    cs: p,
                };
                matmul((og, k, p), dwg, k, true, a, b, par);
                continue;
            }
            for r0 in (0..g.oh).step_by(rows) {
                let r1 = (r0 + rows).min(g.oh);
                let pt = (r1 - r0) * g.ow;
                let ld = padded_ld(pt);
                im2col(g, img, r0, r1, col, ld);
                let a = Mat {
                    data: &dy_ng[r0 * g.ow..],
                    rs: p,
                    cs: 1,
                };
                let b = Mat {
                    data: &col[..k * ld],
                    rs: 1,
                    cs: ld,
                };
                matmul((og, k, pt), dwg, k, true, a, b, par);
            }
        }
    }
}

/// The im2col buffer size (floats) for [`filter_samples`].
fn filter_scratch(g: &Geom) -> usize {
    g.k() * padded_ld(tile_rows(g) * g.ow)
}

/// Backward-filter of one group with many output channels: tiles of whole samples (small
/// images: the GEMM's reduction spans several samples, so `dw` is read and written once per
/// tile, not once per sample) or of output rows of one sample; each tile's im2col is built
/// once and the GEMM is split over blocks of output-channel rows, one per thread, so `dw`
/// needs no per-thread partial sums.
fn filter_rows_split(g: &Geom, (x, dy): (&[f32], &[f32]), gi: usize, dwg: &mut [f32]) {
    let (p, k, og) = (g.oh * g.ow, g.k(), g.og());
    // Tiles: (first sample, samples, first row, rows).
    let mut tiles = Vec::new();
    if 2 * p * k <= TILE_FLOATS {
        let count = (g.n * p * k).div_ceil(TILE_FLOATS).max(1);
        let per = g.n.div_ceil(count).max(1);
        for n0 in (0..g.n).step_by(per) {
            tiles.push((n0, per.min(g.n - n0), 0, g.oh));
        }
    } else {
        let rows = tile_rows(g);
        for n in 0..g.n {
            for r0 in (0..g.oh).step_by(rows) {
                tiles.push((n, 1, r0, rows.min(g.oh - r0)));
            }
        }
    }
    let max_pt = tiles.iter().map(|t| t.1 * t.3 * g.ow).max().unwrap_or(0);
    let ld = padded_ld(max_pt);
    let block = row_block(og);
    with_scratch(k * ld + og * max_pt, |buf| {
        let (col, packed_dy) = buf.split_at_mut(k * ld);
        filter_tiles(g, (x, dy), gi, &tiles, (ld, block), (col, packed_dy), dwg)
    })
}

/// [`filter_rows_split`]'s loop over its tiles `(first sample, samples, first row, rows)`.
fn filter_tiles(
    g: &Geom,
    (x, dy): (&[f32], &[f32]),
    gi: usize,
    tiles: &[(usize, usize, usize, usize)],
    (ld, block): (usize, usize),
    (col, packed_dy): (&mut [f32], &mut [f32]),
    dwg: &mut [f32],
) {
    let (p, k, og, cg) = (g.oh * g.ow, g.k(), g.og(), g.cg());
    for &(n0, ns, r0, nr) in tiles {
        let pt = ns * nr * g.ow;
        for j in 0..ns {
            let n = n0 + j;
            let img = &x[(n * g.c_in + gi * cg) * g.h * g.w..][..cg * g.h * g.w];
            im2col(g, img, r0, r0 + nr, &mut col[j * p..], ld);
        }
        let dy_at = |n: usize| (n * g.c_out + gi * og) * p;
        let (a_data, a_rs): (&[f32], usize) = if ns == 1 {
            (&dy[dy_at(n0) + r0 * g.ow..], p)
        } else {
            pack_samples(dy, |j| dy_at(n0 + j), ns, (og, p), packed_dy);
            (&packed_dy[..og * pt], pt)
        };
        let col = &col[..k * ld];
        dwg.par_chunks_mut(block * k)
            .enumerate()
            .for_each(|(bi, dw_rows)| {
                let rows = dw_rows.len() / k;
                let a = Mat {
                    data: &a_data[bi * block * a_rs..],
                    rs: a_rs,
                    cs: 1,
                };
                let b = Mat {
                    data: col,
                    rs: 1,
                    cs: ld,
                };
                matmul((rows, k, pt), dw_rows, k, true, a, b, Parallelism::None);
            });
    }
}

/// Backward-filter: `dw (C_out, C_in / G, kH, kW)` from `x` and `dy`, summed over samples.
pub(super) fn backward_filter(g: &Geom, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let (k, og) = (g.k(), g.og());
    let mut dw = vec![0f32; g.c_out * k];
    if g.n == 0 {
        return dw;
    }
    let scratch = filter_scratch(g);
    let threads = rayon::current_num_threads();
    if threads > 1 && g.groups >= threads {
        // Disjoint per-group slices of dw.
        dw.par_chunks_mut(og * k).enumerate().for_each(|(gi, dwg)| {
            with_scratch(scratch, |col| {
                filter_samples(g, (x, dy), 0..g.n, gi..gi + 1, dwg, col, Parallelism::None)
            })
        });
    } else if threads > 1 && og >= 64 * threads && og * k >= ROW_SPLIT_FLOATS {
        // A large dw: split its rows, no partial sums.
        for (gi, dwg) in dw.chunks_mut(og * k).enumerate() {
            filter_rows_split(g, (x, dy), gi, dwg);
        }
    } else if threads > 1 && g.n >= threads {
        // Per-thread partial sums over contiguous sample ranges (dw is small here), then
        // one reduction.
        let per = g.n.div_ceil(threads);
        let partials: Vec<Vec<f32>> = (0..g.n.div_ceil(per))
            .into_par_iter()
            .map(|i| {
                let mut part = vec![0f32; g.c_out * k];
                let ns = i * per..((i + 1) * per).min(g.n);
                with_scratch(scratch, |col| {
                    filter_samples(
                        g,
                        (x, dy),
                        ns,
                        0..g.groups,
                        &mut part,
                        col,
                        Parallelism::None,
                    )
                });
                part
            })
            .collect();
        for part in partials {
            for (d, v) in dw.iter_mut().zip(part) {
                *d += v;
            }
        }
    } else {
        with_scratch(scratch, |col| {
            filter_samples(
                g,
                (x, dy),
                0..g.n,
                0..g.groups,
                &mut dw,
                col,
                inner_par(false),
            )
        });
    }
    dw
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geom(n: usize, c_in: usize, h: usize, w: usize, c_out: usize, k: usize, s: usize) -> Geom {
        let p = k / 2;
        let (oh, ow) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
        Geom {
            n,
            c_in,
            h,
            w,
            c_out,
            kh: k,
            kw: k,
            oh,
            ow,
            stride: s,
            padding: p,
            dilation: 1,
            groups: 1,
        }
    }

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + seed * 104729) % 2003) as f32 / 1001.0 - 1.0)
            .collect()
    }

    /// The row-split backward-filter (whole-sample tiles with a packed dy, and row tiles of
    /// one sample; row blocks that do not divide the channels) against the per-sample path.
    #[test]
    fn row_split_filter_matches_per_sample_filter() {
        let cases = [
            // 2 * P * K <= TILE_FLOATS: tiles of whole samples.
            geom(5, 6, 7, 5, 40, 3, 1),
            geom(3, 4, 9, 8, 33, 3, 2),
            geom(4, 8, 4, 4, 20, 1, 1),
            geom(5, 32, 19, 19, 24, 3, 1), // two tiles: 3 samples, then 2
            // 2 * P * K > TILE_FLOATS: tiles of output rows.
            geom(2, 64, 19, 17, 21, 3, 1),
        ];
        for threads in [1, 2, 3] {
            let pool = pool(threads);
            for g in &cases {
                let x = values(g.n * g.c_in * g.h * g.w, 1);
                let dy = values(g.n * g.c_out * g.oh * g.ow, 2);
                let mut want = vec![0f32; g.c_out * g.k()];
                let mut col = vec![f32::NAN; filter_scratch(g)];
                let all = 0..g.n;
                filter_samples(
                    g,
                    (&x, &dy),
                    all,
                    0..1,
                    &mut want,
                    &mut col,
                    Parallelism::None,
                );
                let mut got = vec![0f32; g.c_out * g.k()];
                poison(&pool);
                pool.install(|| filter_rows_split(g, (&x, &dy), 0, &mut got));
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * scale.max(1.0),
                        "threads {threads} geom {g:?}: dw[{i}] = {a}, per-sample path {b}"
                    );
                }
            }
        }
    }

    /// Backward-data of small images, several samples per GEMM, gives each sample's own
    /// one-sample result (the forward, one sample per GEMM, is checked alongside): tiles
    /// that do not divide the batch, a strided 1x1 kernel, stride 2, single pixels, row
    /// blocks that do not divide the channels, 1-3 threads.
    #[test]
    fn sample_tiles_match_one_sample_at_a_time() {
        let cases = [
            geom(4, 8, 4, 4, 20, 3, 1),  // P 16: one tile of 4
            geom(7, 6, 4, 4, 33, 3, 1),  // tiles of 4 and 3
            geom(5, 5, 8, 8, 9, 3, 2),   // stride 2: P 16
            geom(6, 12, 4, 5, 17, 1, 2), // 1x1 stride 2, P 6: tiles of 6
            geom(3, 4, 1, 1, 5, 3, 1),   // one pixel
            geom(3, 40, 3, 3, 70, 3, 1), // K 360, og 70: uneven row blocks
            geom(2, 3, 7, 6, 4, 3, 1),   // P 42: tile of 2, 84 pixels
        ];
        for threads in [1, 2, 3] {
            let pool = pool(threads);
            for g in &cases {
                assert!(sample_tile(g) > 1, "{g:?} must take the sample-tile path");
                let one = Geom { n: 1, ..*g };
                assert_eq!(sample_tile(&one), 1);
                let x = values(g.n * g.c_in * g.h * g.w, 1);
                let w = values(g.c_out * g.k(), 3);
                let dy = values(g.n * g.c_out * g.oh * g.ow, 2);
                let (y, dx) = pool.install(|| (forward(g, &x, &w), backward_data(g, &dy, &w)));
                let (xl, yl) = (g.c_in * g.h * g.w, g.c_out * g.oh * g.ow);
                for n in 0..g.n {
                    let (y1, dx1) = pool.install(|| {
                        (
                            forward(&one, &x[n * xl..][..xl], &w),
                            backward_data(&one, &dy[n * yl..][..yl], &w),
                        )
                    });
                    for (what, got, want) in [
                        ("y", &y[n * yl..][..yl], &y1[..]),
                        ("dx", &dx[n * xl..][..xl], &dx1[..]),
                    ] {
                        for (i, (a, b)) in got.iter().zip(want).enumerate() {
                            assert!(
                                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                                "threads {threads} {g:?} sample {n}: {what}[{i}] = {a}, one-sample path {b}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Fills every pool thread's scratch with NaN, as an earlier call could leave it.
    fn poison(pool: &rayon::ThreadPool) {
        pool.broadcast(|_| with_scratch(1 << 20, |b| b.fill(f32::NAN)));
    }

    /// The kept scratch buffers are written before they are read: a pool whose scratch
    /// holds NaN gives the results of a fresh pool, on every path (row tiles with padding,
    /// sample tiles, per-thread partial sums, strides, row-split filter tiles).
    #[test]
    fn stale_scratch_is_never_read() {
        let cases = [
            geom(2, 5, 9, 7, 6, 3, 1),
            geom(4, 8, 4, 4, 20, 3, 1),
            geom(5, 32, 19, 19, 24, 3, 1),
            geom(3, 4, 9, 8, 6, 3, 2),
            geom(2, 64, 19, 17, 21, 3, 1),
            geom(3, 6, 5, 7, 4, 1, 1),
        ];
        for threads in [1, 2, 3] {
            let build = || pool(threads);
            let used = build();
            for g in &cases {
                let x = values(g.n * g.c_in * g.h * g.w, 1);
                let w = values(g.c_out * g.k(), 3);
                let dy = values(g.n * g.c_out * g.oh * g.ow, 2);
                // Each path on its own: a fresh pool (empty scratch) for the reference, the
                // poisoned pool (NaN scratch) re-poisoned before every call.
                let paths: [&(dyn Fn() -> Vec<f32> + Sync); 4] = [
                    &|| forward(g, &x, &w),
                    &|| backward_data(g, &dy, &w),
                    &|| backward_filter(g, &x, &dy),
                    &|| {
                        let mut split = vec![0f32; g.c_out * g.k()];
                        filter_rows_split(g, (&x, &dy), 0, &mut split);
                        split
                    },
                ];
                let want: Vec<Vec<f32>> = paths.iter().map(|f| build().install(f)).collect();
                let got: Vec<Vec<f32>> = paths
                    .iter()
                    .map(|f| {
                        poison(&used);
                        used.install(f)
                    })
                    .collect();
                for (what, (a, b)) in ["y", "dx", "dw", "dw (row split)"]
                    .iter()
                    .zip(got.iter().zip(&want))
                {
                    for (i, (u, v)) in a.iter().zip(b).enumerate() {
                        assert!(
                            (u - v).abs() <= 1e-5 * v.abs().max(1.0),
                            "threads {threads} {g:?}: {what}[{i}] = {u} after stale scratch, {v} fresh"
                        );
                    }
                }
            }
        }
    }

    /// An empty input image with padding (output 2x2 of zeros) takes the per-sample path:
    /// the sample tiles' `dx` chunks would be empty (a review found the panic).
    #[test]
    fn empty_input_images_give_empty_or_zero_results() {
        let g = Geom {
            n: 2,
            c_in: 3,
            h: 0,
            w: 0,
            c_out: 4,
            kh: 1,
            kw: 1,
            oh: 2,
            ow: 2,
            stride: 1,
            padding: 1,
            dilation: 1,
            groups: 1,
        };
        assert_eq!(sample_tile(&g), 1);
        let pool = pool(2);
        let w = values(g.c_out * g.k(), 3);
        let dy = values(g.n * g.c_out * 4, 2);
        let (y, dx, dw) = pool.install(|| {
            (
                forward(&g, &[], &w),
                backward_data(&g, &dy, &w),
                backward_filter(&g, &[], &dy),
            )
        });
        assert_eq!(y.len(), g.n * g.c_out * 4);
        assert!(y.iter().all(|&v| v == 0.0));
        assert!(dx.is_empty());
        assert!(dw.iter().all(|&v| v == 0.0));
    }

    /// Row tiles hold whole multiples of 64 pixels where the image allows it.
    #[test]
    fn tile_rows_keep_whole_64_pixel_blocks() {
        // smooth 128 -> 128 on 32x32: 7 rows fit, 6 are taken (192 pixels).
        assert_eq!(tile_rows(&geom(4, 128, 32, 32, 128, 3, 1)), 6);
        // s0 64 -> 64 on 32x32: 14 rows (448 pixels) already fit.
        assert_eq!(tile_rows(&geom(4, 64, 32, 32, 64, 3, 1)), 14);
        // A whole image that fits stays whole; an odd width keeps what fits.
        assert_eq!(tile_rows(&geom(2, 8, 9, 9, 8, 3, 1)), 9);
        assert_eq!(tile_rows(&geom(1, 512, 40, 23, 8, 3, 1)), 2);
    }

    /// An empty batch gives a zero dw on every path (the row split's tiling divided by it).
    #[test]
    fn empty_batch_filter_is_zero() {
        let pool = pool(2);
        // s3's 512 -> 512 3x3 on 4x4: the row-split path with whole-sample tiles.
        for g in [geom(0, 512, 4, 4, 512, 3, 1), geom(0, 4, 9, 8, 6, 3, 2)] {
            let dw = pool.install(|| backward_filter(&g, &[], &[]));
            assert_eq!(dw.len(), g.c_out * g.k());
            assert!(dw.iter().all(|&v| v == 0.0));
        }
    }

    #[test]
    fn padded_ld_avoids_multiples_of_64_floats() {
        for pt in 1..5000 {
            let ld = padded_ld(pt);
            assert!(ld >= pt && ld < pt + 32, "pt {pt} ld {ld}");
            assert!(
                ld.is_multiple_of(16) && !ld.is_multiple_of(64),
                "pt {pt} ld {ld}"
            );
        }
    }

    #[test]
    fn valid_range_matches_brute_force() {
        for s in 1..4 {
            for off in -5isize..5 {
                for len in 1..9 {
                    for out in 0..9 {
                        let want: Vec<usize> = (0..out)
                            .filter(|&j| {
                                let i = (j * s) as isize + off;
                                i >= 0 && i < len as isize
                            })
                            .collect();
                        let (lo, hi) = valid_range(off, s, len, out);
                        let got: Vec<usize> = (lo..hi).collect();
                        assert_eq!(got, want, "s {s} off {off} len {len} out {out}");
                    }
                }
            }
        }
    }
}
