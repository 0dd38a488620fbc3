//! Shared helpers: tolerance checks that print the worst element, and device timing.

use anyhow::Result;
use candle::{DType, Device, Tensor};
use std::time::Instant;

/// Benchmark options from the command line.
pub struct BenchOpts {
    /// Timed iterations per measurement (after warmup); fewer for slow ops, see [`time_ms`].
    pub iters: usize,
    /// Only the first shape of each dtype (a smoke run).
    pub quick: bool,
}

impl Default for BenchOpts {
    fn default() -> Self {
        Self {
            iters: 50,
            quick: false,
        }
    }
}

/// Tolerance: `|got - want| <= max(rtol * |want|, atol * max(1, max |want|))`; NaN must
/// match NaN.
#[derive(Clone, Copy, Debug)]
pub struct Tol {
    pub rtol: f32,
    pub atol: f32,
}

/// Outcome of one comparison.
pub struct Cmp {
    pub ok: bool,
    pub msg: String,
}

/// Compares two tensors of the same shape (any dtype, read as f32).
pub fn compare(what: &str, got: &Tensor, want: &Tensor, tol: Tol) -> Result<Cmp> {
    if got.dims() != want.dims() {
        return Ok(Cmp {
            ok: false,
            msg: format!("{what}: shape {:?} != {:?}", got.dims(), want.dims()),
        });
    }
    let g = got.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let w = want.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let scale = w
        .iter()
        .filter(|v| v.is_finite())
        .fold(1f32, |m, v| m.max(v.abs()));
    let atol = tol.atol * scale;
    let (mut worst, mut worst_i, mut bad) = (0f32, None::<usize>, 0usize);
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let nan_mismatch = a.is_nan() != b.is_nan();
        let inf_mismatch =
            !a.is_nan() && !b.is_nan() && (a.is_infinite() || b.is_infinite()) && a != b;
        let err = if a.is_nan() && b.is_nan() {
            0.0
        } else {
            (a - b).abs()
        };
        let lim = (tol.rtol * b.abs()).max(atol);
        // Ratio of the error to its limit: > 1 fails.
        let ratio = if nan_mismatch || inf_mismatch {
            f32::INFINITY
        } else {
            err / lim
        };
        if ratio.is_nan() || ratio > 1.0 {
            bad += 1;
        }
        if worst_i.is_none() || ratio > worst || ratio.is_nan() {
            worst = ratio;
            worst_i = Some(i);
        }
    }
    let msg = match worst_i {
        None => format!("{what}: empty"),
        Some(i) => format!(
            "{what}: {bad}/{} out of tol, worst err/limit {worst:.3} at {i}: got {} want {}",
            g.len(),
            g[i],
            w[i]
        ),
    };
    Ok(Cmp { ok: bad == 0, msg })
}

/// Median wall-clock milliseconds of `f` with a device synchronize before and after each
/// call, after warmup. Slow ops get fewer iterations (about 2 s per measurement at most,
/// never fewer than 5).
pub fn time_ms(dev: &Device, opts: &BenchOpts, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    dev.synchronize()?;
    let t = Instant::now();
    f()?;
    dev.synchronize()?;
    let first = t.elapsed().as_secs_f64() * 1e3;
    for _ in 0..3 {
        f()?;
    }
    dev.synchronize()?;
    let iters = if first > 0.0 {
        ((2000.0 / first) as usize).clamp(5, opts.iters)
    } else {
        opts.iters
    };
    let mut v = Vec::with_capacity(iters);
    for _ in 0..iters {
        dev.synchronize()?;
        let t = Instant::now();
        f()?;
        dev.synchronize()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Ok(v[v.len() / 2])
}

/// Device-to-device copy bandwidth (read + write bytes / time) of a 256 MiB tensor, as a
/// JSON line: the roofline that forward GB/s is compared with.
pub fn bench_copy(dev: &Device, opts: &BenchOpts) -> Result<()> {
    let n = 64 << 20; // f32 elements
    let x = Tensor::zeros(n, DType::F32, dev)?;
    let ms = time_ms(dev, opts, || {
        let _y = x.copy()?;
        Ok(())
    })?;
    let gbps = 2.0 * (n * 4) as f64 / (ms * 1e-3) / 1e9;
    println!(
        r#"{{"kind":"copy","impl":"keel","bytes":{},"ms":{ms:.5},"gbps":{gbps:.1}}}"#,
        n * 4
    );
    Ok(())
}
