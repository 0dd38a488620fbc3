//! A residual sum and its activation in one op: `silu(a + b)` ([`add_silu`]) and
//! `relu(a + b)` ([`add_relu`]), the end of a ResNet basic block.
//!
//! Composed from candle ops, `(a + b).silu()` is two graph nodes whose backward runs about
//! ten tensor passes (candle's SiLU backward alone is `neg`, `exp`, `+ 1`, `recip`, `1 - y`,
//! two `mul`s and two `add`s, each allocating), plus one zero-filled gradient accumulator
//! per edge. Here the forward is one pass and one node, and the backward one pass that
//! recomputes `z = a + b` and returns `dz` for both inputs.
//!
//! # Contract
//! - `a` and `b` have the same shape and dtype (f32, f16 or bf16); non-contiguous inputs are
//!   copied to contiguous ones first. Arithmetic is in f32 (f16/bf16 are converted once and
//!   the result rounded once).
//! - SiLU is candle's: `z / (1 + exp(-z))`; its derivative `s (1 + z (1 - s))` with
//!   `s = 1 / (1 + exp(-z))`. ReLU's derivative is `z > 0`: 0 at exactly 0, as PyTorch's
//!   (candle's `relu` backward gives 1 there).
//! - CPU: the fused ops (in rayon chunks of 32 Ki values from 64 Ki values on). Other
//!   devices: the candle composition (`(a + b)?.silu()` / `.relu()`), which candle
//!   differentiates; the results agree to rounding, except ReLU's gradient where `a + b` is
//!   exactly 0 (1 there, candle's).

use candle::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::cpu::{float_op, Elem, FloatOp};

/// Elements per rayon chunk; tensors of at least twice as many run in parallel.
const CHUNK: usize = 1 << 15;

/// The activation after the sum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Act {
    Silu,
    Relu,
}

/// `silu(a + b)`, differentiable in `a` and `b`, with one graph node (see the module docs).
///
/// # Example
/// ```
/// use candle::{Device, Tensor, Var};
/// let dev = Device::Cpu;
/// let a = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 4, 5), &dev)?)?;
/// let b = Tensor::randn(0f32, 1.0, (2, 3, 4, 5), &dev)?;
/// let y = keel_kernels::add_silu(&a, &b)?;
/// let reference = (a.as_tensor() + &b)?.silu()?;
/// assert!((&y - &reference)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
/// let g = y.sum_all()?.backward()?;
/// assert_eq!(g.get(&a).unwrap().dims(), &[2, 3, 4, 5]);
/// # Ok::<(), candle::Error>(())
/// ```
pub fn add_silu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    add_act("add_silu", a, b, Act::Silu)
}

/// `relu(a + b)`, differentiable in `a` and `b`, with one graph node (see the module docs).
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    add_act("add_relu", a, b, Act::Relu)
}

fn add_act(op: &str, a: &Tensor, b: &Tensor, act: Act) -> Result<Tensor> {
    if a.shape() != b.shape() {
        bail!(
            "{op}: a has shape {:?} and b {:?}; the residual sum needs equal shapes (project \
             the skip path with a 1x1 conv first)",
            a.dims(),
            b.dims()
        )
    }
    if a.dtype() != b.dtype() {
        bail!(
            "{op}: a is {:?} and b {:?}; cast one with .to_dtype first",
            a.dtype(),
            b.dtype()
        )
    }
    if !a.device().same_device(b.device()) {
        bail!(
            "{op}: a is on {:?} and b on {:?}; move them to one device",
            a.device().location(),
            b.device().location()
        )
    }
    if !a.device().is_cpu() {
        let z = (a + b)?;
        return match act {
            Act::Silu => z.silu(),
            Act::Relu => z.relu(),
        };
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, AddActOp(act))
}

/// Forward: `(a, b) -> act(a + b)`.
#[derive(Clone, Copy, Debug)]
struct AddActOp(Act);

/// Backward: `(a, b, dy) -> dy * act'(a + b)`.
#[derive(Clone, Copy, Debug)]
struct AddActBwdOp(Act);

#[inline(always)]
fn sigmoid(z: f32) -> f32 {
    1.0 / ((-z).exp() + 1.0)
}

/// `f` applied element by element to the `N` equally long inputs (converted to f32), in
/// rayon chunks of [`CHUNK`] from `2 * CHUNK` values on, rounded back to `T`.
fn map<T: Elem + WithDType, const N: usize>(
    xs: [&[T]; N],
    f: impl Fn([f32; N]) -> f32 + Sync,
) -> CpuStorage {
    let xs = xs.map(T::to_f32_slice);
    let mut out = vec![0f32; xs.first().map_or(0, |x| x.len())];
    let run = |start: usize, o: &mut [f32]| {
        let xs: [&[f32]; N] = std::array::from_fn(|k| &xs[k][start..start + o.len()]);
        for (i, o) in o.iter_mut().enumerate() {
            *o = f(std::array::from_fn(|k| xs[k][i]));
        }
    };
    if out.len() >= 2 * CHUNK {
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, o)| run(c * CHUNK, o));
    } else {
        run(0, &mut out);
    }
    T::to_cpu_storage_owned(T::from_f32_vec(out))
}

impl FloatOp<2> for AddActOp {
    fn run<T: Elem + WithDType>(&self, xs: [&[T]; 2]) -> Result<CpuStorage> {
        Ok(match self.0 {
            Act::Silu => map(xs, |[x, y]| {
                let z = x + y;
                z / ((-z).exp() + 1.0)
            }),
            Act::Relu => map(xs, |[x, y]| (x + y).max(0.0)),
        })
    }
}

impl FloatOp<3> for AddActBwdOp {
    fn run<T: Elem + WithDType>(&self, xs: [&[T]; 3]) -> Result<CpuStorage> {
        Ok(match self.0 {
            Act::Silu => map(xs, |[x, y, g]| {
                let z = x + y;
                let s = sigmoid(z);
                g * (s * (1.0 + z * (1.0 - s)))
            }),
            Act::Relu => map(xs, |[x, y, g]| if x + y > 0.0 { g } else { 0.0 }),
        })
    }
}

fn name(act: Act, bwd: bool) -> &'static str {
    match (act, bwd) {
        (Act::Silu, false) => "add_silu",
        (Act::Relu, false) => "add_relu",
        (Act::Silu, true) => "add_silu_bwd",
        (Act::Relu, true) => "add_relu_bwd",
    }
}

impl CustomOp2 for AddActOp {
    fn name(&self) -> &'static str {
        name(self.0, false)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let out = float_op(op, [("a", s1, l1), ("b", s2, l2)], self)?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dz = a.apply_op3(b, &grad.contiguous()?, AddActBwdOp(self.0))?;
        Ok((Some(dz.clone()), Some(dz)))
    }
}

impl CustomOp3 for AddActBwdOp {
    fn name(&self) -> &'static str {
        name(self.0, true)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        if l3.shape() != l1.shape() {
            bail!(
                "{op}: dy has shape {:?}, expected {:?}",
                l3.shape().dims(),
                l1.shape().dims()
            )
        }
        let out = float_op(op, [("a", s1, l1), ("b", s2, l2), ("dy", s3, l3)], self)?;
        Ok((out, l1.shape().clone()))
    }
}
