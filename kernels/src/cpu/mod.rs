//! CPU building blocks shared by keel's fused kernels: element conversion in blocks, a
//! vectorizable `exp`, and the instruction-set dispatch.
//!
//! # Instruction sets
//! Each hot loop is a [`Kernel`] generic over the element type, written as plain scalar Rust
//! that LLVM vectorizes. [`dispatch`] compiles it up to three times: for the target's
//! baseline (SSE2 on x86_64), inside `#[target_feature(enable = "avx2,fma")]` (8 `f32`
//! lanes) and inside `#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]`
//! (16 lanes), and runs the one an [`Isa`] names. An op takes its [`Isa`] from
//! [`Isa::current`] once per call: the level set by [`isa::set_cpu_isa`], else the
//! `KEEL_CPU_ISA` environment variable (`base`, `avx2` or `avx512`; read once; an unknown
//! value or a level this CPU lacks is an error from the op), else the best the CPU has
//! (run-time detection, so AVX2-only and older machines run their own level). The
//! instantiations do the same arithmetic in the same order (Rust never contracts `a * b + c`
//! into an FMA, and reductions keep their [`group_norm`] lane count whatever the vector
//! width), so every level gives bit-identical results; the tests check that, per level.

pub(crate) mod group_norm;
#[cfg(test)]
mod group_norm_isa_tests;
pub(crate) mod isa;

pub(crate) use isa::Isa;

use candle::backend::BackendStorage;
use candle::{bail, CpuStorage, DType, Layout, Result, WithDType};
use half::{bf16, f16, slice::HalfFloatSliceExt};
use std::borrow::Cow;

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

/// A CPU op body written once for the float element types (f32, f16, bf16); [`float_op`]
/// runs the instantiation that matches its operands' dtype.
pub(crate) trait FloatOp<const N: usize> {
    /// Runs on the contiguous data of the `N` operands, all of element type `T`.
    fn run<T: Elem + WithDType>(&self, xs: [&[T]; N]) -> Result<CpuStorage>;
}

/// One operand of a [`FloatOp`]: its name in error messages, its storage and its layout.
pub(crate) type Operand<'a> = (&'a str, &'a CpuStorage, &'a Layout);

/// Runs `k` on the contiguous data of `operands`, which must all be f32, all f16 or all
/// bf16; any other dtype or a mix is an error naming `op` and the operands (never a silent
/// conversion).
pub(crate) fn float_op<const N: usize, K: FloatOp<N>>(
    op: &str,
    operands: [Operand<'_>; N],
    k: &K,
) -> Result<CpuStorage> {
    let dtype = operands.first().map(|o| o.1.dtype());
    let same = operands.iter().all(|o| Some(o.1.dtype()) == dtype);
    match dtype {
        Some(DType::F32) if same => run_as::<f32, N, K>(op, operands, k),
        Some(DType::F16) if same => run_as::<f16, N, K>(op, operands, k),
        Some(DType::BF16) if same => run_as::<bf16, N, K>(op, operands, k),
        _ => bail!("{}", dtype_error(op, &operands)),
    }
}

fn run_as<T: Elem + WithDType, const N: usize, K: FloatOp<N>>(
    op: &str,
    operands: [Operand<'_>; N],
    k: &K,
) -> Result<CpuStorage> {
    let mut xs: [&[T]; N] = [&[]; N];
    for (x, (what, s, l)) in xs.iter_mut().zip(operands) {
        *x = contiguous(op, what, T::cpu_storage_as_slice(s)?, l)?;
    }
    k.run(xs)
}

/// The message for operands that are not all f32, all f16 or all bf16.
fn dtype_error(op: &str, operands: &[Operand<'_>]) -> String {
    let names: Vec<&str> = operands.iter().map(|o| o.0).collect();
    let dtypes: Vec<String> = operands
        .iter()
        .map(|o| format!("{:?}", o.1.dtype()))
        .collect();
    match names.as_slice() {
        [] => format!("{op}: no operands"),
        [what] => format!(
            "{op}: unsupported {what} dtype {}; supported: f32, f16, bf16 (cast with .to_dtype first)",
            dtypes[0]
        ),
        [init @ .., last] => format!(
            "{op}: {} and {last} must all be f32, all f16 or all bf16, got {}",
            init.join(", "),
            dtypes.join(", ")
        ),
    }
}

/// Number of elements converted to `f32` at a time for f16/bf16 inputs (16 KiB of stack for
/// the largest user, which holds four such buffers).
pub(crate) const BLK: usize = 1024;

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
    #[cfg(test)]
    trace::record(isa::CpuIsa::Avx2);
    k.run()
}

/// `k.run()` compiled with AVX-512 F/BW/VL (and AVX2, FMA) enabled, so LLVM can use 16-wide
/// vectors (zmm registers) and masked tails in the inlined body. The feature list is
/// [`isa::CpuIsa::features`] of [`isa::CpuIsa::Avx512`].
///
/// # Safety
/// The running CPU must support avx512f, avx512bw, avx512vl, avx2 and fma.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn run_avx512<K: Kernel>(k: K) -> K::Output {
    #[cfg(test)]
    trace::record(isa::CpuIsa::Avx512);
    k.run()
}

/// Runs `k` compiled for `isa`: the AVX-512 instantiation for [`isa::CpuIsa::Avx512`], the
/// AVX2+FMA one for [`isa::CpuIsa::Avx2`], the baseline one otherwise.
///
/// The body reaches the `#[target_feature]` function by `#[inline(always)]` calls only
/// (`Kernel::run` and the generic helpers it calls); a closure called from the body would be
/// a separate function compiled without AVX2 unless LLVM chose to inline it, so kernel
/// bodies write their block loops directly instead of passing closures to helpers.
#[inline(always)]
pub(crate) fn dispatch<K: Kernel>(isa: Isa, k: K) -> K::Output {
    #[cfg(target_arch = "x86_64")]
    match isa.level() {
        // SAFETY: an `Isa` is only constructed by `Isa::checked` / `Isa::current` after
        // run-time detection confirmed every feature of its level (`CpuIsa::features`, the
        // list `run_avx512` enables).
        isa::CpuIsa::Avx512 => return unsafe { run_avx512(k) },
        // SAFETY: as above; the level's features are avx2 and fma.
        isa::CpuIsa::Avx2 => return unsafe { run_avx2(k) },
        isa::CpuIsa::Base => {}
    }
    let _ = isa;
    #[cfg(test)]
    trace::record(isa::CpuIsa::Base);
    k.run()
}

/// Test-only record of the instantiations [`dispatch`] ran on the current thread, so a test
/// can check that a kernel asked for one level ran that level's code.
#[cfg(test)]
pub(crate) mod trace {
    use super::isa::CpuIsa;
    use std::cell::Cell;

    thread_local! {
        static RAN: Cell<u8> = const { Cell::new(0) };
    }

    /// Notes that the instantiation for `isa` ran on this thread.
    pub(crate) fn record(isa: CpuIsa) {
        RAN.with(|r| r.set(r.get() | (1 << isa as u8)));
    }

    /// The levels recorded on this thread since the last call, lowest first; clears them.
    pub(crate) fn take() -> Vec<CpuIsa> {
        let bits = RAN.with(|r| r.replace(0));
        CpuIsa::ALL
            .into_iter()
            .filter(|&i| bits & (1 << i as u8) != 0)
            .collect()
    }
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
    /// All of `src` as `f32`: borrowed for `f32`, converted otherwise.
    fn to_f32_slice(src: &[Self]) -> Cow<'_, [f32]>;
    /// `v` rounded to `Self` (moved, not copied, for `f32`).
    fn from_f32_vec(v: Vec<f32>) -> Vec<Self>;
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
    fn to_f32_slice(src: &[Self]) -> Cow<'_, [f32]> {
        Cow::Borrowed(src)
    }
    fn from_f32_vec(v: Vec<f32>) -> Vec<Self> {
        v
    }
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
            fn to_f32_slice(src: &[Self]) -> Cow<'_, [f32]> {
                let mut v = vec![0f32; src.len()];
                src.convert_to_f32_slice(&mut v);
                Cow::Owned(v)
            }
            fn from_f32_vec(v: Vec<f32>) -> Vec<Self> {
                let mut o = vec![<$t>::ZERO; v.len()];
                o.convert_from_f32_slice(&v);
                o
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

    /// Doubles its operand in `f32`, through the conversions conv's CPU op uses.
    struct Double;
    impl FloatOp<1> for Double {
        fn run<T: Elem + WithDType>(&self, [x]: [&[T]; 1]) -> Result<CpuStorage> {
            let v = T::to_f32_slice(x).iter().map(|v| v * 2.0).collect();
            Ok(T::to_cpu_storage_owned(T::from_f32_vec(v)))
        }
    }

    /// Sums its two operands in `f32`.
    struct Add;
    impl FloatOp<2> for Add {
        fn run<T: Elem + WithDType>(&self, [a, b]: [&[T]; 2]) -> Result<CpuStorage> {
            let v = a
                .iter()
                .zip(b)
                .map(|(a, b)| a.to_f32() + b.to_f32())
                .collect();
            Ok(T::to_cpu_storage_owned(T::from_f32_vec(v)))
        }
    }

    #[test]
    fn float_op_keeps_the_dtype_and_rejects_others() {
        let l = Layout::contiguous(2);
        let run = |s: &CpuStorage| float_op("conv2d", [("x", s, &l)], &Double);
        let err = run(&CpuStorage::F64(vec![0.0; 2])).unwrap_err().to_string();
        assert!(err.contains("conv2d") && err.contains("F64"), "{err}");
        assert!(run(&CpuStorage::U8(vec![0; 2])).is_err());
        // The supported dtypes keep their own dtype.
        let got = run(&CpuStorage::BF16(vec![bf16::ONE; 2])).unwrap();
        assert!(matches!(got, CpuStorage::BF16(ref v) if v[1].to_f32() == 2.0));
        let got = run(&CpuStorage::F16(vec![f16::ONE; 2])).unwrap();
        assert!(matches!(got, CpuStorage::F16(ref v) if v[1].to_f32() == 2.0));
        let got = run(&CpuStorage::F32(vec![1.5, 3.0])).unwrap();
        assert!(matches!(got, CpuStorage::F32(ref v) if v == &[3.0, 6.0]));
        // A mix of dtypes names both operands and both dtypes.
        let (a, b) = (
            CpuStorage::F32(vec![1.0; 2]),
            CpuStorage::F16(vec![f16::ONE; 2]),
        );
        let err = float_op("op", [("x", &a, &l), ("w", &b, &l)], &Add)
            .unwrap_err()
            .to_string();
        assert!(err.contains("x and w") && err.contains("F32, F16"), "{err}");
        let got = float_op("op", [("x", &a, &l), ("w", &a, &l)], &Add).unwrap();
        assert!(matches!(got, CpuStorage::F32(ref v) if v == &[2.0, 2.0]));
        // A layout past the data is an error, not a panic.
        let short = CpuStorage::F32(vec![1.0]);
        assert!(float_op("op", [("x", &short, &l)], &Double).is_err());
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
