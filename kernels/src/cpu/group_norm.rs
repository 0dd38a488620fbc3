//! CPU kernels for fused GroupNorm (Wu & He, 2018) with an optional SiLU (Elfwing et al.,
//! 2018), forward and backward.
//!
//! # Work decomposition
//! x is contiguous (N, C, HW); group `gi = n * G + g` is the contiguous run of
//! `M = (C / G) * HW` elements starting at `gi * M`. Each group is split into `k` chunks
//! (`k = 1` unless there are too few groups to keep every thread busy, see [`plan_chunks`]):
//! - `k = 1`: one rayon task per group computes the statistics and then normalizes (forward)
//!   or runs both backward passes while the group is still in L1/L2 cache.
//! - `k > 1`: phases separated by a join. Each chunk computes partial statistics, the
//!   partials of a group are merged with Chan et al.'s parallel formula, then every chunk
//!   normalizes (or reduces / writes dx) independently.
//!
//! # Statistics
//! Each chunk sums `x - s` and `(x - s)^2` in `f32` lanes over blocks of [`BLK`] elements,
//! with the shift `s` the chunk's first element, and accumulates the block sums in `f64`.
//! The shift keeps the sums small for inputs with a large mean (1e3 with std 1 loses nothing
//! to cancellation); the `f64` accumulation keeps long groups exact to `f32` precision.
//! Variance is the biased one (PyTorch's), so a constant group has variance exactly 0 and
//! `rstd = 1 / sqrt(eps)`; NaN anywhere in a group makes that group's output NaN.

use super::{dispatch, sigmoid_f32, silu_f32, Elem, Isa, Kernel, BLK};
use rayon::prelude::*;

/// Sizes of a GroupNorm problem; `c` is a multiple of `groups`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GnDims {
    /// Batch size N.
    pub n: usize,
    /// Channels C.
    pub c: usize,
    /// Product of the trailing (spatial) dims; 1 for a rank-2 input.
    pub hw: usize,
    /// Number of groups G.
    pub groups: usize,
}

impl GnDims {
    fn cpg(&self) -> usize {
        self.c / self.groups
    }
    fn m(&self) -> usize {
        self.cpg() * self.hw
    }
    fn ng(&self) -> usize {
        self.n * self.groups
    }
}

/// How one GroupNorm call runs: its sizes and configuration, the number of chunks per
/// group and the instruction set of every loop.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GnCall {
    /// Sizes.
    pub d: GnDims,
    /// Added to the variance.
    pub eps: f32,
    /// SiLU after the affine transform (else identity).
    pub silu: bool,
    /// Chunks per group ([`plan_chunks`]); results do not depend on it beyond `f64`
    /// rounding.
    pub k: usize,
    /// The instantiation every loop runs; all give bit-identical results.
    pub isa: Isa,
}

/// Count, mean and sum of squared deviations of a set of values.
#[derive(Clone, Copy, Debug, Default)]
struct Moments {
    n: f64,
    mean: f64,
    m2: f64,
}

impl Moments {
    /// Chan, Golub & LeVeque's pairwise merge.
    fn merge(self, o: Moments) -> Moments {
        if self.n == 0.0 {
            return o;
        }
        if o.n == 0.0 {
            return self;
        }
        let n = self.n + o.n;
        let d = o.mean - self.mean;
        Moments {
            n,
            mean: self.mean + d * (o.n / n),
            m2: self.m2 + o.m2 + d * d * (self.n * o.n / n),
        }
    }

    /// Mean and `1 / sqrt(var + eps)` with the biased variance.
    fn mean_rstd(self, eps: f32) -> (f32, f32) {
        let var = self.m2 / self.n;
        // `var < 0` (rounding) becomes 0; NaN fails the comparison and propagates.
        let var = if var < 0.0 { 0.0 } else { var };
        (self.mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32)
    }
}

/// Minimum chunk length when a group is split, so per-chunk overhead stays negligible.
const MIN_CHUNK: usize = 8192;

/// Number of chunks per group: enough units for ~4 per thread, chunks of at least
/// [`MIN_CHUNK`] elements, and 1 whenever the groups alone keep the threads busy.
pub(crate) fn plan_chunks(ng: usize, m: usize, threads: usize) -> usize {
    let want = (4 * threads).div_ceil(ng.max(1));
    want.min(m / MIN_CHUNK).max(1)
}

/// Lengths of the `k` chunks of a group of `m` elements: `(chunk_len, actual_k)`.
fn chunking(m: usize, k: usize) -> (usize, usize) {
    let cs = m.div_ceil(k.max(1)).max(1);
    (cs, m.div_ceil(cs))
}

/// The per-channel runs of the group-relative element range `[lo, hi)`: items are
/// `(local channel, start, end)` with `end - start <= hw`.
struct Segments {
    start: usize,
    hi: usize,
    hw: usize,
}

impl Segments {
    fn new(lo: usize, hi: usize, hw: usize) -> Self {
        Segments { start: lo, hi, hw }
    }
}

impl Iterator for Segments {
    type Item = (usize, usize, usize);

    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        if self.start >= self.hi {
            return None;
        }
        let (cl, s) = (self.start / self.hw, self.start);
        let e = self.hi.min((cl + 1) * self.hw);
        self.start = e;
        Some((cl, s, e))
    }
}

/// Lane count of the reductions: independent accumulators the compiler maps to vectors.
const L: usize = 16;

/// `(Σ (x - s), Σ (x - s)^2)` in `f32` lanes.
#[inline(always)]
fn shifted_sums(x: &[f32], s: f32) -> (f32, f32) {
    let mut a = [0f32; L];
    let mut q = [0f32; L];
    let mut it = x.chunks_exact(L);
    for ch in &mut it {
        for i in 0..L {
            let d = ch[i] - s;
            a[i] += d;
            q[i] += d * d;
        }
    }
    let (mut s1, mut s2) = (0f32, 0f32);
    for &v in it.remainder() {
        let d = v - s;
        s1 += d;
        s2 += d * d;
    }
    for i in 0..L {
        s1 += a[i];
        s2 += q[i];
    }
    (s1, s2)
}

/// Kernel: the [`Moments`] of a run of x.
struct MomentsOf<'a, T>(&'a [T]);

impl<T: Elem> Kernel for MomentsOf<'_, T> {
    type Output = Moments;

    #[inline(always)]
    fn run(self) -> Moments {
        let x = self.0;
        let Some(&first) = x.first() else {
            return Moments::default();
        };
        let s = first.to_f32();
        let (mut s1, mut s2) = (0f64, 0f64);
        let mut bx = [0f32; BLK];
        for xc in x.chunks(BLK) {
            let (a, q) = shifted_sums(T::load(xc, &mut bx), s);
            s1 += a as f64;
            s2 += q as f64;
        }
        let n = x.len() as f64;
        let d = s1 / n;
        Moments {
            n,
            mean: s as f64 + d,
            m2: s2 - s1 * d,
        }
    }
}

/// The [`Moments`] of `x`, compiled for `isa`.
fn moments<T: Elem>(isa: Isa, x: &[T]) -> Moments {
    dispatch(isa, MomentsOf(x))
}

/// Per-group constants of the forward and backward passes.
#[derive(Clone, Copy)]
struct GroupCtx<'a> {
    /// The group's slice of the weight, in `f32`.
    w: &'a [f32],
    /// The group's slice of the bias, in `f32`.
    b: &'a [f32],
    hw: usize,
    mean: f32,
    rstd: f32,
    silu: bool,
}

/// Weight and bias in `f32` and what every group shares; [`Affine::ctx`] makes a group's
/// [`GroupCtx`].
struct Affine<'a> {
    w: &'a [f32],
    b: &'a [f32],
    d: GnDims,
    silu: bool,
}

impl Affine<'_> {
    fn ctx(&self, gi: usize, (mean, rstd): (f32, f32)) -> GroupCtx<'_> {
        let cpg = self.d.cpg();
        let g = gi % self.d.groups;
        GroupCtx {
            w: &self.w[g * cpg..(g + 1) * cpg],
            b: &self.b[g * cpg..(g + 1) * cpg],
            hw: self.d.hw,
            mean,
            rstd,
            silu: self.silu,
        }
    }
}

/// Kernel: writes `y` for the run `x` of a group that starts at group-relative element `lo`.
struct FwdApply<'a, T> {
    x: &'a [T],
    y: &'a mut [T],
    lo: usize,
    ctx: GroupCtx<'a>,
}

impl<T: Elem> FwdApply<'_, T> {
    /// The body for one activation (`SILU` a constant, so each loop has no branch).
    #[inline(always)]
    fn apply<const SILU: bool>(self) {
        let (x, y, lo, ctx) = (self.x, self.y, self.lo, self.ctx);
        let (mut bx, mut by) = ([0f32; BLK], [0f32; BLK]);
        for (cl, s, e) in Segments::new(lo, lo + x.len(), ctx.hw) {
            let scale = ctx.rstd * ctx.w[cl];
            let beta = ctx.b[cl];
            let mean = ctx.mean;
            let (xs, ys) = (&x[s - lo..e - lo], &mut y[s - lo..e - lo]);
            for (xc, yc) in xs.chunks(BLK).zip(ys.chunks_mut(BLK)) {
                let xb = T::load(xc, &mut bx);
                for (y, &x) in T::out(yc, &mut by).iter_mut().zip(xb) {
                    let z = (x - mean) * scale + beta;
                    *y = if SILU { silu_f32(z) } else { z };
                }
                T::store(&by, yc);
            }
        }
    }
}

impl<T: Elem> Kernel for FwdApply<'_, T> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        if self.ctx.silu {
            self.apply::<true>()
        } else {
            self.apply::<false>()
        }
    }
}

/// Fused forward: `y = act((x - mean_g) * rstd_g * w_c + b_c)`, `act` = SiLU or identity.
///
/// `x.len() == n * c * hw`, `w.len() == b.len() == c`.
pub(crate) fn forward<T: Elem>(x: &[T], w: &[T], b: &[T], call: GnCall) -> Vec<T> {
    let GnCall {
        d,
        eps,
        silu,
        k,
        isa,
    } = call;
    let mut y = vec![T::ZERO; x.len()];
    let m = d.m();
    if x.is_empty() || m == 0 {
        return y;
    }
    let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
    let bf: Vec<f32> = b.iter().map(|v| v.to_f32()).collect();
    let affine = Affine {
        w: &wf,
        b: &bf,
        d,
        silu,
    };
    let (cs, k) = chunking(m, k);
    if k == 1 {
        y.par_chunks_mut(m)
            .zip(x.par_chunks(m))
            .enumerate()
            .for_each(|(gi, (yg, xg))| {
                let ctx = affine.ctx(gi, moments(isa, xg).mean_rstd(eps));
                let (x, y) = (xg, yg);
                dispatch(isa, FwdApply { x, y, lo: 0, ctx });
            });
        return y;
    }
    let stats = group_stats(isa, x, m, cs, k, eps);
    y.par_chunks_mut(m)
        .zip(x.par_chunks(m))
        .enumerate()
        .for_each(|(gi, (yg, xg))| {
            let ctx = affine.ctx(gi, stats[gi]);
            yg.par_chunks_mut(cs)
                .zip(xg.par_chunks(cs))
                .enumerate()
                .for_each(|(ci, (y, x))| {
                    dispatch(
                        isa,
                        FwdApply {
                            x,
                            y,
                            lo: ci * cs,
                            ctx,
                        },
                    );
                });
        });
    y
}

/// `(mean, rstd)` of every group, computed in `k` chunks of length `cs` per group.
fn group_stats<T: Elem>(
    isa: Isa,
    x: &[T],
    m: usize,
    cs: usize,
    k: usize,
    eps: f32,
) -> Vec<(f32, f32)> {
    let partial: Vec<Moments> = x
        .par_chunks(m)
        .flat_map_iter(|xg| xg.chunks(cs).map(move |xc| moments(isa, xc)))
        .collect();
    partial
        .chunks(k)
        .map(|p| {
            p.iter()
                .fold(Moments::default(), |a, &b| a.merge(b))
                .mean_rstd(eps)
        })
        .collect()
}

/// `dy_eff = dy * silu'(z)` with `z = xhat * w + b`, or `dy` without SiLU.
#[inline(always)]
fn dy_eff(dy: f32, xhat: f32, w: f32, b: f32, silu: bool) -> f32 {
    if silu {
        let z = xhat * w + b;
        let s = sigmoid_f32(z);
        dy * s * (1.0 + z * (1.0 - s))
    } else {
        dy
    }
}

/// Kernel: `acc[cl] += (Σ dy_eff * xhat, Σ dy_eff)` over the run `(x, dy)` of a group that
/// starts at group-relative element `lo`, per local channel `cl`.
struct BwdReduce<'a, T> {
    x: &'a [T],
    dy: &'a [T],
    lo: usize,
    ctx: GroupCtx<'a>,
    acc: &'a mut [[f64; 2]],
}

impl<T: Elem> Kernel for BwdReduce<'_, T> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let (x, dy, lo, ctx, acc) = (self.x, self.dy, self.lo, self.ctx, self.acc);
        let (mut bx, mut bd) = ([0f32; BLK], [0f32; BLK]);
        for (cl, s, e) in Segments::new(lo, lo + x.len(), ctx.hw) {
            let (w, b, mean, rstd, silu) = (ctx.w[cl], ctx.b[cl], ctx.mean, ctx.rstd, ctx.silu);
            let (mut sgx, mut sg) = (0f64, 0f64);
            let (xs, ds) = (&x[s - lo..e - lo], &dy[s - lo..e - lo]);
            for (xc, dc) in xs.chunks(BLK).zip(ds.chunks(BLK)) {
                let (xb, db) = (T::load(xc, &mut bx), T::load(dc, &mut bd));
                let mut a = [0f32; L];
                let mut q = [0f32; L];
                let mut xi = xb.chunks_exact(L);
                let mut di = db.chunks_exact(L);
                for (xc, dc) in (&mut xi).zip(&mut di) {
                    for i in 0..L {
                        let xhat = (xc[i] - mean) * rstd;
                        let g = dy_eff(dc[i], xhat, w, b, silu);
                        a[i] += g * xhat;
                        q[i] += g;
                    }
                }
                let (mut s1, mut s2) = (0f32, 0f32);
                for (&xv, &dv) in xi.remainder().iter().zip(di.remainder()) {
                    let xhat = (xv - mean) * rstd;
                    let g = dy_eff(dv, xhat, w, b, silu);
                    s1 += g * xhat;
                    s2 += g;
                }
                for i in 0..L {
                    s1 += a[i];
                    s2 += q[i];
                }
                sgx += s1 as f64;
                sg += s2 as f64;
            }
            acc[cl][0] += sgx;
            acc[cl][1] += sg;
        }
    }
}

/// Group-level coefficients of dx: `dx = rstd * w * g + q * (x - mean) + r`.
#[derive(Clone, Copy)]
struct DxCoef {
    q: f32,
    r: f32,
}

/// Kernel: writes dx for the run `(x, dy)` of a group that starts at group-relative
/// element `lo`.
struct BwdDx<'a, T> {
    x: &'a [T],
    dy: &'a [T],
    dx: &'a mut [T],
    lo: usize,
    ctx: GroupCtx<'a>,
    coef: DxCoef,
}

impl<T: Elem> Kernel for BwdDx<'_, T> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let (x, dy, lo, ctx, coef) = (self.x, self.dy, self.lo, self.ctx, self.coef);
        let dx = self.dx;
        let (mut bx, mut bd, mut bo) = ([0f32; BLK], [0f32; BLK], [0f32; BLK]);
        for (cl, s, e) in Segments::new(lo, lo + x.len(), ctx.hw) {
            let (w, b, mean, rstd, silu) = (ctx.w[cl], ctx.b[cl], ctx.mean, ctx.rstd, ctx.silu);
            let (p, q, r) = (rstd * w, coef.q, coef.r);
            let (xs, ds, os) = (
                &x[s - lo..e - lo],
                &dy[s - lo..e - lo],
                &mut dx[s - lo..e - lo],
            );
            let chunks = xs.chunks(BLK).zip(ds.chunks(BLK));
            for ((xc, dc), oc) in chunks.zip(os.chunks_mut(BLK)) {
                let (xb, db) = (T::load(xc, &mut bx), T::load(dc, &mut bd));
                let ob = T::out(oc, &mut bo);
                for ((o, &xv), &dv) in ob.iter_mut().zip(xb).zip(db) {
                    let xc = xv - mean;
                    let g = dy_eff(dv, xc * rstd, w, b, silu);
                    *o = p * g + q * xc + r;
                }
                T::store(&bo, oc);
            }
        }
    }
}

/// Turns a group's per-channel sums into the dx coefficients:
/// `A = Σ_c w_c Σ dy_eff xhat`, `B = Σ_c w_c Σ dy_eff`,
/// `dx = rstd * (w * dy_eff - B / M - xhat * A / M)`.
fn dx_coef(acc: &[[f64; 2]], w: &[f32], rstd: f32, m: usize) -> DxCoef {
    let (mut a, mut b) = (0f64, 0f64);
    for (s, &wc) in acc.iter().zip(w) {
        a += wc as f64 * s[0];
        b += wc as f64 * s[1];
    }
    let (rstd, inv_m) = (rstd as f64, 1.0 / m as f64);
    DxCoef {
        q: (-rstd * rstd * a * inv_m) as f32,
        r: (-rstd * b * inv_m) as f32,
    }
}

/// Fused backward. `wb` is `[weight (C), bias (C)]`, `dy` has x's shape. Returns one buffer
/// `[dx (x.len()), dweight (C), dbias (C)]`.
///
/// Per group: statistics (one read of x), then `Σ dy_eff·xhat` and `Σ dy_eff` per channel
/// (one read of x and dy), then dx (a second read of x and dy, from cache when `k = 1`).
/// `dweight[c] = Σ_n Σ_hw dy_eff·xhat` and `dbias[c] = Σ_n Σ_hw dy_eff` are reduced from the
/// per-(n, c) sums at the end, in a fixed order (results are deterministic).
pub(crate) fn backward<T: Elem>(x: &[T], wb: &[T], dy: &[T], call: GnCall) -> Vec<T> {
    let GnCall {
        d,
        eps,
        silu,
        k,
        isa,
    } = call;
    let numel = x.len();
    let mut out = vec![T::ZERO; numel + 2 * d.c];
    let m = d.m();
    if numel == 0 || m == 0 {
        return out;
    }
    let cpg = d.cpg();
    let wbf: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
    let (w, b) = wbf.split_at(d.c);
    let affine = Affine { w, b, d, silu };
    // Per (n, c): (Σ dy_eff * xhat, Σ dy_eff); group gi owns entries gi*cpg .. (gi+1)*cpg.
    let mut per_nc = vec![[0f64; 2]; d.n * d.c];
    let (dx, dwb) = out.split_at_mut(numel);
    let (cs, k) = chunking(m, k);
    if k == 1 {
        dx.par_chunks_mut(m)
            .zip(x.par_chunks(m))
            .zip(dy.par_chunks(m))
            .zip(per_nc.par_chunks_mut(cpg))
            .enumerate()
            .for_each(|(gi, (((dxg, xg), dyg), acc))| {
                let ctx = affine.ctx(gi, moments(isa, xg).mean_rstd(eps));
                let (x, dy, lo) = (xg, dyg, 0);
                dispatch(
                    isa,
                    BwdReduce {
                        x,
                        dy,
                        lo,
                        ctx,
                        acc,
                    },
                );
                let coef = dx_coef(acc, ctx.w, ctx.rstd, m);
                let dx = dxg;
                dispatch(
                    isa,
                    BwdDx {
                        x,
                        dy,
                        dx,
                        lo,
                        ctx,
                        coef,
                    },
                );
            });
    } else {
        let stats = group_stats(isa, x, m, cs, k, eps);
        // Per (group, chunk, local channel) partial sums, merged per group below.
        let mut partial = vec![[0f64; 2]; d.ng() * k * cpg];
        partial
            .par_chunks_mut(k * cpg)
            .zip(x.par_chunks(m))
            .zip(dy.par_chunks(m))
            .enumerate()
            .for_each(|(gi, ((pg, xg), dyg))| {
                pg.par_chunks_mut(cpg)
                    .zip(xg.par_chunks(cs))
                    .zip(dyg.par_chunks(cs))
                    .enumerate()
                    .for_each(|(ci, ((acc, x), dy))| {
                        let ctx = affine.ctx(gi, stats[gi]);
                        dispatch(
                            isa,
                            BwdReduce {
                                x,
                                dy,
                                lo: ci * cs,
                                ctx,
                                acc,
                            },
                        );
                    });
            });
        for (acc, pg) in per_nc.chunks_mut(cpg).zip(partial.chunks(k * cpg)) {
            pg.chunks(cpg).for_each(|pc| add_sums(acc, pc));
        }
        let per_nc = &per_nc;
        dx.par_chunks_mut(m)
            .zip(x.par_chunks(m))
            .zip(dy.par_chunks(m))
            .enumerate()
            .for_each(|(gi, ((dxg, xg), dyg))| {
                let ctx = affine.ctx(gi, stats[gi]);
                let coef = dx_coef(&per_nc[gi * cpg..(gi + 1) * cpg], ctx.w, ctx.rstd, m);
                dxg.par_chunks_mut(cs)
                    .zip(xg.par_chunks(cs))
                    .zip(dyg.par_chunks(cs))
                    .enumerate()
                    .for_each(|(ci, ((dx, x), dy))| {
                        let lo = ci * cs;
                        dispatch(
                            isa,
                            BwdDx {
                                x,
                                dy,
                                dx,
                                lo,
                                ctx,
                                coef,
                            },
                        );
                    });
            });
    }
    write_dw_db(&per_nc, dwb);
    out
}

/// `acc[i] += p[i]` for pairs of sums.
fn add_sums(acc: &mut [[f64; 2]], p: &[[f64; 2]]) {
    for (a, p) in acc.iter_mut().zip(p) {
        a[0] += p[0];
        a[1] += p[1];
    }
}

/// Writes `dwb = [dweight (C), dbias (C)]` from the per-(n, c) sums `per_nc` (`N * C` pairs
/// `(Σ dy_eff * xhat, Σ dy_eff)`), summed over n in order.
fn write_dw_db<T: Elem>(per_nc: &[[f64; 2]], dwb: &mut [T]) {
    let c = dwb.len() / 2;
    let (dw, db) = dwb.split_at_mut(c);
    let mut sum = vec![[0f64; 2]; c];
    for row in per_nc.chunks(c) {
        add_sums(&mut sum, row);
    }
    let mut buf = [0f32; BLK];
    for ((dwc, dbc), sc) in dw
        .chunks_mut(BLK)
        .zip(db.chunks_mut(BLK))
        .zip(sum.chunks(BLK))
    {
        let o = T::out(dwc, &mut buf);
        for (o, s) in o.iter_mut().zip(sc) {
            *o = s[0] as f32;
        }
        T::store(&buf, dwc);
        let o = T::out(dbc, &mut buf);
        for (o, s) in o.iter_mut().zip(sc) {
            *o = s[1] as f32;
        }
        T::store(&buf, dbc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32, scale: f32, offset: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                offset + scale * ((s as f32 / u32::MAX as f32) * 2.0 - 1.0)
            })
            .collect()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
    }

    /// Splitting groups into chunks (the small-batch path) must not change the results.
    #[test]
    fn chunked_matches_unchunked() {
        for &(n, c, hw, groups) in &[(1, 4, 9000, 1), (2, 6, 5001, 3), (1, 2, 40000, 2)] {
            let d = GnDims { n, c, hw, groups };
            let x = data(n * c * hw, 1, 1.0, 1e3);
            let dy = data(n * c * hw, 2, 1.0, 0.0);
            let w = data(c, 3, 1.0, 1.0);
            let mut wb = w.clone();
            wb.extend(data(c, 4, 0.5, 0.0));
            for silu in [false, true] {
                let call = |k| GnCall {
                    d,
                    eps: 1e-5,
                    silu,
                    k,
                    isa: Isa::base(),
                };
                let y1 = forward(&x, &wb[..c], &wb[c..], call(1));
                let g1 = backward(&x, &wb, &dy, call(1));
                for k in [2, 3, 7] {
                    let yk = forward(&x, &wb[..c], &wb[c..], call(k));
                    let gk = backward(&x, &wb, &dy, call(k));
                    assert!(max_diff(&y1, &yk) < 1e-4, "fwd k={k} {d:?}");
                    let numel = x.len();
                    assert!(
                        max_diff(&g1[..numel], &gk[..numel]) < 1e-4,
                        "dx k={k} {d:?}"
                    );
                    let tol = 1e-6 * (n * hw) as f32;
                    assert!(max_diff(&g1[numel..], &gk[numel..]) < tol, "dw/db k={k}");
                }
            }
        }
    }

    #[test]
    fn plan_prefers_whole_groups() {
        assert_eq!(plan_chunks(256, 16384, 2), 1);
        assert_eq!(plan_chunks(1, 1 << 20, 2), 8);
        assert_eq!(plan_chunks(1, 100, 2), 1);
        assert_eq!(plan_chunks(0, 0, 2), 1);
    }
}
