//! CPU building blocks shared by keel's fused kernels: element conversion in blocks, a
//! vectorizable `exp`, runtime ISA selection.
//!
//! Each hot loop is a [`Kernel`] generic over the element type; [`dispatch`] instantiates it
//! a second time inside a `#[target_feature(enable = "avx2,fma")]` function so that LLVM can
//! use 8-wide vectors when the running CPU supports them (the default x86_64 target only
//! guarantees SSE2).

pub(crate) mod group_norm;

use candle::{bail, Layout, Result};
use half::{bf16, f16, slice::HalfFloatSliceExt};

/// The contiguous slice of a storage's data described by `l`, or an error naming the op and
/// the operand (`what`) when the layout is strided or reaches past the data.
pub(crate) fn contiguous<'a, T>(
    op: &str,
    what: &str,
    data: &'a [T],
    l: &Layout,
) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) if b <= data.len() => Ok(&data[a..b]),
        Some((a, b)) => bail!(
            "{op}: {what} layout {l:?} reaches element {b} (from {a}) of a storage of {} elements",
            data.len()
        ),
        None => bail!("{op}: {what} must be contiguous (layout {l:?}); call .contiguous() first"),
    }
}

/// Number of elements converted to `f32` at a time for f16/bf16 inputs (16 KiB of stack for
/// the largest user, which holds four such buffers).
pub(crate) const BLK: usize = 1024;

/// The instruction set a kernel instantiation was compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// Baseline of the compilation target (SSE2 on x86_64).
    Base,
    /// x86_64 with AVX2 and FMA, detected at run time.
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Isa {
    /// The best instruction set supported by the running CPU.
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return Isa::Avx2;
        }
        Isa::Base
    }
}

/// A CPU kernel: its arguments as fields and its body in [`Kernel::run`], which must be
/// `#[inline(always)]` so that [`dispatch`] compiles the whole body once per instruction set.
pub(crate) trait Kernel {
    /// What the kernel returns.
    type Output;
    /// The kernel body; implementations are `#[inline(always)]`.
    fn run(self) -> Self::Output;
}

/// `k.run()` compiled with AVX2 and FMA enabled, so LLVM can use 8-wide vectors in the
/// inlined body.
///
/// # Safety
/// The running CPU must support avx2 and fma.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<K: Kernel>(k: K) -> K::Output {
    k.run()
}

/// Runs `k` compiled for `isa`: the AVX2+FMA instantiation when `isa` is [`Isa::Avx2`],
/// the baseline one otherwise.
///
/// The body reaches the `#[target_feature]` function by `#[inline(always)]` calls only
/// (`Kernel::run` and the generic helpers it calls); a closure called from the body would be
/// a separate function compiled without AVX2 unless LLVM chose to inline it, so kernel
/// bodies write their block loops directly instead of passing closures to helpers.
#[inline(always)]
pub(crate) fn dispatch<K: Kernel>(isa: Isa, k: K) -> K::Output {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 {
        // SAFETY: `Isa::Avx2` is only constructed by `Isa::detect` after run-time detection
        // confirmed that this CPU supports avx2 and fma.
        return unsafe { run_avx2(k) };
    }
    let _ = isa;
    k.run()
}

/// An element type the CPU kernels read and write; all arithmetic happens in `f32`.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    /// The additive identity, used to initialise output buffers.
    const ZERO: Self;
    /// Converts one value to `f32`.
    fn to_f32(self) -> f32;
    /// Views `src` as `f32` values: `src` itself for `f32`, otherwise converted into `buf`.
    /// `src.len()` must be at most [`BLK`].
    fn load<'a>(src: &'a [Self], buf: &'a mut [f32; BLK]) -> &'a [f32];
    /// Where a kernel writes `dst.len()` `f32` results: `dst` itself for `f32`, otherwise
    /// `buf`, whose contents [`Elem::store`] then converts into `dst`.
    fn out<'a>(dst: &'a mut [Self], buf: &'a mut [f32; BLK]) -> &'a mut [f32];
    /// Completes a write started with [`Elem::out`] (a no-op for `f32`).
    fn store(buf: &[f32; BLK], dst: &mut [Self]);
}

impl Elem for f32 {
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn load<'a>(src: &'a [Self], _buf: &'a mut [f32; BLK]) -> &'a [f32] {
        src
    }
    #[inline(always)]
    fn out<'a>(dst: &'a mut [Self], _buf: &'a mut [f32; BLK]) -> &'a mut [f32] {
        dst
    }
    #[inline(always)]
    fn store(_buf: &[f32; BLK], _dst: &mut [Self]) {}
}

macro_rules! impl_half_elem {
    ($t:ty) => {
        impl Elem for $t {
            const ZERO: Self = <$t>::ZERO;
            #[inline(always)]
            fn to_f32(self) -> f32 {
                <$t>::to_f32(self)
            }
            #[inline(always)]
            fn load<'a>(src: &'a [Self], buf: &'a mut [f32; BLK]) -> &'a [f32] {
                let b = &mut buf[..src.len()];
                src.convert_to_f32_slice(b);
                b
            }
            #[inline(always)]
            fn out<'a>(dst: &'a mut [Self], buf: &'a mut [f32; BLK]) -> &'a mut [f32] {
                &mut buf[..dst.len()]
            }
            #[inline(always)]
            fn store(buf: &[f32; BLK], dst: &mut [Self]) {
                dst.convert_from_f32_slice(&buf[..dst.len()]);
            }
        }
    };
}
impl_half_elem!(f16);
impl_half_elem!(bf16);

/// `e^x` in `f32` from Cephes' `expf` polynomial, written with selects and bit casts only so
/// that loops calling it vectorize. Relative error about 2 ulp on [-87, 88]; inputs are
/// clamped to that range (so `exp(-inf)` returns about 1.6e-38 instead of 0, and `exp(inf)`
/// about 1.65e38); NaN propagates.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    let ni = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let scale = f32::from_bits((ni.wrapping_add(127) as u32) << 23);
    e * scale
}

/// Logistic sigmoid `1 / (1 + e^-z)`.
#[inline(always)]
pub(crate) fn sigmoid_f32(z: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-z))
}

/// SiLU `z * sigmoid(z)`, as `z / (1 + e^-z)` (one division, the loop's bottleneck).
#[inline(always)]
pub(crate) fn silu_f32(z: f32) -> f32 {
    z / (1.0 + exp_f32(-z))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let got = exp_f32(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.01357;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(-1e4) >= 0.0 && exp_f32(-1e4) < 1e-37);
        assert!(exp_f32(1e4).is_finite());
    }

    #[test]
    fn half_blocks_roundtrip() {
        let x: Vec<f16> = (0..2500).map(|i| f16::from_f32(i as f32 * 0.25)).collect();
        let mut y = vec![f16::ZERO; x.len()];
        let (mut bx, mut by) = ([0f32; BLK], [0f32; BLK]);
        for (xc, yc) in x.chunks(BLK).zip(y.chunks_mut(BLK)) {
            let a = f16::load(xc, &mut bx);
            for (b, a) in f16::out(yc, &mut by).iter_mut().zip(a) {
                *b = a * 2.0;
            }
            f16::store(&by, yc);
        }
        for (a, b) in x.iter().zip(&y) {
            assert_eq!(b.to_f32(), a.to_f32() * 2.0);
        }
    }
}
