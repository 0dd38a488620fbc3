//! Differentiable 2D resizing of NCHW tensors with PyTorch's `F.interpolate` semantics:
//! `mode="nearest"` (the legacy nearest: `src = floor(dst * in / out)`) and
//! `mode="bilinear", align_corners=False` (half-pixel centres,
//! `src = max(0, (dst + 0.5) * in / out - 0.5)`, two taps per axis), for any up- or
//! down-sampling factor, integer or not.
//!
//! # Contract
//! - Forward: `cpu::ResizeOp` is a `CustomOp1` on x contiguous `(N, C, H, W)` in f32, f16
//!   or bf16, returning `(N, C, oh, ow)` in x's dtype; the taps and weights are computed in
//!   `f32` as PyTorch's CPU kernel does, and so is the arithmetic.
//! - Backward: `cpu::ResizeBwdOp` is a `CustomOp1` on dy `(N, C, oh, ow)` that scatters
//!   each output gradient onto its taps (`f32` accumulation per plane), returning dx
//!   `(N, C, H, W)`. Both maps are linear and each other's adjoint, so the backward op's own
//!   backward is the forward resize (double backward works where candle keeps the
//!   gradient graph, i.e. with `CANDLE_GRAD_DO_NOT_DETACH=1`).
//! - The fused CPU ops cache nothing: the taps of an axis are recomputed per call
//!   (O(oh + ow)). The composed twins keep their index vectors and interpolation matrices
//!   per (mode, out, in, device) in a small process-wide cache ([`CACHE_CAP`] entries; a
//!   full cache starts over), so a training step that resizes to the same shapes every time
//!   builds and uploads them once, not on every forward (on CUDA each upload is a
//!   host-to-device copy).
//!
//! # Devices
//! The fused ops have CPU kernels only. On other devices the public functions run the
//! composed twins [`resize_nearest_slow`] (two `index_select`s) and
//! [`resize_bilinear_slow`] (two f32 matmuls with the `(out, in)` interpolation matrices),
//! which candle differentiates; candle's own `upsample_nearest2d` / `upsample_bilinear2d`
//! are not used (no backward for non-integer factors or bilinear in candle 0.11).
//!
//! # Edge semantics
//! - A resize to the input's own size returns x unchanged (a clone of the handle).
//! - `oh`, `ow`, `H` and `W` must be at least 1; `N * C = 0` gives an empty output.

mod cpu;

use candle::{bail, DType, Device, Result, Tensor};

/// Interpolation mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// PyTorch's legacy `nearest`.
    Nearest,
    /// `bilinear` with `align_corners=False`.
    Bilinear,
}

/// One output index's two source taps along an axis: `value = l0 * in[i0] + l1 * in[i1]`
/// (nearest: `i1 = i0`, `l0 = 1`, `l1 = 0`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Tap {
    pub(crate) i0: usize,
    pub(crate) i1: usize,
    pub(crate) l0: f32,
    pub(crate) l1: f32,
}

/// The taps of every output index along one axis of `inp -> out` elements, computed in
/// `f32` like PyTorch's CPU kernels (`scale = in / out`).
pub(crate) fn taps(mode: Mode, out: usize, inp: usize) -> Vec<Tap> {
    let scale = inp as f32 / out as f32;
    (0..out)
        .map(|d| match mode {
            Mode::Nearest => {
                let i = ((d as f32 * scale).floor() as usize).min(inp - 1);
                Tap {
                    i0: i,
                    i1: i,
                    l0: 1.0,
                    l1: 0.0,
                }
            }
            Mode::Bilinear => {
                let src = (scale * (d as f32 + 0.5) - 0.5).max(0.0);
                let i0 = (src.floor() as usize).min(inp - 1);
                let l1 = (src - i0 as f32).clamp(0.0, 1.0);
                let i1 = if i0 < inp - 1 { i0 + 1 } else { i0 };
                Tap {
                    i0,
                    i1,
                    l0: 1.0 - l1,
                    l1,
                }
            }
        })
        .collect()
}

fn op_name(mode: Mode, slow: bool) -> &'static str {
    match (mode, slow) {
        (Mode::Nearest, false) => "resize_nearest",
        (Mode::Nearest, true) => "resize_nearest_slow",
        (Mode::Bilinear, false) => "resize_bilinear",
        (Mode::Bilinear, true) => "resize_bilinear_slow",
    }
}

/// Checks a resize call and returns `(N, C, H, W)`.
fn check(op: &str, x: &Tensor, (oh, ow): (usize, usize)) -> Result<(usize, usize, usize, usize)> {
    let dtype = x.dtype();
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        bail!("{op}: unsupported dtype {dtype:?}; supported: f32, f16, bf16 (convert with x.to_dtype(DType::F32))")
    }
    let (n, c, h, w) = match x.dims() {
        &[n, c, h, w] => (n, c, h, w),
        d => bail!(
            "{op}: x must have shape (N, C, H, W), got {d:?}; add a batch dim with x.unsqueeze(0)"
        ),
    };
    if h == 0 || w == 0 {
        bail!("{op}: x has an empty spatial size {h}x{w} (shape {:?}); there is nothing to interpolate from", x.dims())
    }
    if oh == 0 || ow == 0 {
        bail!("{op}: output size ({oh}, {ow}) must be at least (1, 1)")
    }
    Ok((n, c, h, w))
}

/// The most index vectors / interpolation matrices the composed twins keep (see the module
/// docs); a model resizes between a handful of shapes, so this is never reached in training.
pub(crate) const CACHE_CAP: usize = 64;

thread_local! {
    /// Tables this thread built so far (the tests count uploads with it).
    static BUILDS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// One cached table: (is a matrix, mode, out, in) on a device.
type Table = ((bool, Mode, usize, usize), Tensor);

/// The table `(matrix, mode, out, inp)` on `dev`, built by `build` the first time.
fn cached(
    key: (bool, Mode, usize, usize),
    dev: &Device,
    build: impl FnOnce() -> Result<Tensor>,
) -> Result<Tensor> {
    static CACHE: std::sync::Mutex<Vec<Table>> = std::sync::Mutex::new(Vec::new());
    let find = |c: &Vec<Table>| {
        c.iter()
            .find(|(k, t)| *k == key && t.device().same_device(dev))
            .map(|(_, t)| t.clone())
    };
    if let Some(t) = CACHE.lock().ok().and_then(|c| find(&c)) {
        return Ok(t);
    }
    let t = build()?;
    BUILDS.with(|b| b.set(b.get() + 1));
    if let Ok(mut c) = CACHE.lock() {
        if c.len() >= CACHE_CAP {
            c.clear();
        }
        if find(&c).is_none() {
            c.push((key, t.clone()));
        }
    }
    Ok(t)
}

fn fused(x: &Tensor, size: (usize, usize), mode: Mode) -> Result<Tensor> {
    let (_, _, h, w) = check(op_name(mode, false), x, size)?;
    if (h, w) == size {
        return Ok(x.clone());
    }
    if !matches!(x.device(), Device::Cpu) {
        return slow(x, size, mode);
    }
    x.contiguous()?.apply_op1(cpu::ResizeOp { mode, out: size })
}

/// The `(out, in)` f32 interpolation matrix of one axis (row `d` holds output `d`'s taps),
/// cached.
fn matrix(mode: Mode, out: usize, inp: usize, dev: &Device) -> Result<Tensor> {
    cached((true, mode, out, inp), dev, || {
        let mut m = vec![0f32; out * inp];
        for (d, t) in taps(mode, out, inp).into_iter().enumerate() {
            m[d * inp + t.i0] += t.l0;
            m[d * inp + t.i1] += t.l1;
        }
        Tensor::from_vec(m, (out, inp), dev)
    })
}

fn slow(x: &Tensor, (oh, ow): (usize, usize), mode: Mode) -> Result<Tensor> {
    let (n, c, h, w) = check(op_name(mode, true), x, (oh, ow))?;
    if (h, w) == (oh, ow) {
        return Ok(x.clone());
    }
    let dev = x.device();
    match mode {
        Mode::Nearest => {
            let index = |out, inp| {
                cached((false, mode, out, inp), dev, || {
                    let idx: Vec<u32> = taps(mode, out, inp).iter().map(|t| t.i0 as u32).collect();
                    Tensor::new(idx, dev)
                })
            };
            x.index_select(&index(oh, h)?, 2)?
                .index_select(&index(ow, w)?, 3)
        }
        Mode::Bilinear => {
            // In f32 for every dtype, rounded once at the end, like the fused op: in f16/bf16
            // the weights and the intermediate rows would be rounded too.
            let mw = matrix(mode, ow, w, dev)?.t()?; // (w, ow)
            let mh = matrix(mode, oh, h, dev)?; // (oh, h)
            let xf = x.to_dtype(DType::F32)?;
            let y = xf.reshape((n * c * h, w))?.matmul(&mw)?; // (n c h, ow)
            let y = y.reshape((n * c, h, ow))?;
            mh.broadcast_left(n * c)?
                .matmul(&y)?
                .reshape((n, c, oh, ow))?
                .to_dtype(x.dtype())
        }
    }
}

/// Nearest-neighbour resize of `(N, C, H, W)` to `(N, C, oh, ow)`, as PyTorch's
/// `F.interpolate(x, size=(oh, ow), mode="nearest")`, differentiable for any sizes; fused
/// on CPU, [`resize_nearest_slow`] elsewhere (see the module docs).
///
/// # Shapes
/// - x: `(N, C, H, W)`, H, W >= 1; f32, f16 or bf16.
/// - output: `(N, C, oh, ow)`, x's dtype.
///
/// # Errors
/// Rank other than 4, an empty spatial size, an output size with a 0, an unsupported dtype.
///
/// # Example
/// ```
/// use candle::{Device, Tensor};
/// let x = Tensor::new(&[[0f32, 1.], [2., 3.]], &Device::Cpu)?.reshape((1, 1, 2, 2))?;
/// let y = keel_kernels::resize_nearest(&x, (3, 5))?;
/// // rows [0, 0, 1], columns [0, 0, 0, 1, 1], as PyTorch.
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, [0., 0., 0., 1., 1., 0., 0., 0., 1., 1., 2., 2., 2., 3., 3.]);
/// # Ok::<(), candle::Error>(())
/// ```
pub fn resize_nearest(x: &Tensor, size: (usize, usize)) -> Result<Tensor> {
    fused(x, size, Mode::Nearest)
}

/// Bilinear resize of `(N, C, H, W)` to `(N, C, oh, ow)`, as PyTorch's
/// `F.interpolate(x, size=(oh, ow), mode="bilinear", align_corners=False)`, differentiable
/// for any sizes; fused on CPU, [`resize_bilinear_slow`] elsewhere (see the module docs).
///
/// # Shapes
/// - x: `(N, C, H, W)`, H, W >= 1; f32, f16 or bf16.
/// - output: `(N, C, oh, ow)`, x's dtype.
///
/// # Errors
/// As [`resize_nearest`].
///
/// # Example
/// ```
/// use candle::{Device, Tensor, Var};
/// let x = Var::from_tensor(&Tensor::new(&[[0f32, 1.], [2., 3.]], &Device::Cpu)?.reshape((1, 1, 2, 2))?)?;
/// let y = keel_kernels::resize_bilinear(&x, (4, 4))?;
/// let row0 = y.flatten_all()?.to_vec1::<f32>()?[..4].to_vec();
/// assert_eq!(row0, [0., 0.25, 0.75, 1.]);
/// // Every input pixel's weights sum to (4 * 4) / (2 * 2) = 4 in the gradient of sum(y).
/// let g = y.sum_all()?.backward()?.get(&x).unwrap().flatten_all()?.to_vec1::<f32>()?;
/// assert_eq!(g, [4., 4., 4., 4.]);
/// # Ok::<(), candle::Error>(())
/// ```
pub fn resize_bilinear(x: &Tensor, size: (usize, usize)) -> Result<Tensor> {
    fused(x, size, Mode::Bilinear)
}

/// Reference nearest resize composed from two `index_select`s (differentiable through
/// candle's autograd on every device); the path [`resize_nearest`] takes off the CPU.
/// Same semantics, shapes and errors as [`resize_nearest`].
///
/// # Example
/// ```
/// use candle::{Device, Tensor};
/// let x = Tensor::randn(0f32, 1.0, (2, 3, 5, 7), &Device::Cpu)?;
/// let a = keel_kernels::resize_nearest(&x, (4, 11))?;
/// let b = keel_kernels::resize_nearest_slow(&x, (4, 11))?;
/// assert_eq!(a.flatten_all()?.to_vec1::<f32>()?, b.flatten_all()?.to_vec1::<f32>()?);
/// # Ok::<(), candle::Error>(())
/// ```
pub fn resize_nearest_slow(x: &Tensor, size: (usize, usize)) -> Result<Tensor> {
    slow(x, size, Mode::Nearest)
}

/// Reference bilinear resize composed from two matmuls with the `(out, in)` interpolation
/// matrices (differentiable through candle's autograd on every device); the path
/// [`resize_bilinear`] takes off the CPU. Same semantics, shapes and errors as
/// [`resize_bilinear`]; equal to it within f32 rounding (the matmul sums the taps in
/// another order).
///
/// # Example
/// ```
/// use candle::{Device, Tensor};
/// let x = Tensor::randn(0f32, 1.0, (1, 2, 6, 5), &Device::Cpu)?;
/// let a = keel_kernels::resize_bilinear(&x, (9, 3))?;
/// let b = keel_kernels::resize_bilinear_slow(&x, (9, 3))?;
/// assert!((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);
/// # Ok::<(), candle::Error>(())
/// ```
pub fn resize_bilinear_slow(x: &Tensor, size: (usize, usize)) -> Result<Tensor> {
    slow(x, size, Mode::Bilinear)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
    }

    /// One test (one thread): the build count is per thread, and only this test fills the
    /// process-wide cache, so no other test can clear it in between.
    #[test]
    fn the_composed_twins_build_their_tables_once_per_shape_and_a_full_cache_starts_over(
    ) -> Result<()> {
        let builds = || BUILDS.with(|b| b.get());
        let x = Tensor::arange(0f32, 2. * 3. * 7. * 5., &Device::Cpu)?.reshape((2, 3, 7, 5))?;
        let size = (13, 11);
        let first = resize_bilinear_slow(&x, size)?;
        let near = resize_nearest_slow(&x, size)?;
        let before = builds();
        for _ in 0..3 {
            assert_eq!(max_diff(&resize_bilinear_slow(&x, size)?, &first)?, 0.0);
            assert_eq!(max_diff(&resize_nearest_slow(&x, size)?, &near)?, 0.0);
        }
        assert_eq!(
            builds(),
            before,
            "identical resizes built their tables again"
        );
        assert!(max_diff(&first, &resize_bilinear(&x, size)?)? < 1e-4);
        // More distinct shapes than the cache holds: it starts over, results stay right.
        let x = Tensor::arange(0f32, 4. * 6., &Device::Cpu)?.reshape((1, 1, 4, 6))?;
        for k in 1..(CACHE_CAP + 10) {
            let size = (k % 17 + 1, k % 19 + 2);
            let d = max_diff(
                &resize_bilinear_slow(&x, size)?,
                &resize_bilinear(&x, size)?,
            )?;
            assert!(d < 1e-4, "size {size:?}: {d}");
        }
        Ok(())
    }
}
