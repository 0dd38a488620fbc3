//! One-pass CPU updates of f32 parameters for [`crate::Sgd`] and [`crate::AdamW`] (issue 13,
//! item 4: no framework tax on the step).
//!
//! The candle-op form of an update ([`crate::UpdateRule::step`]) runs 6-11 tensor ops per
//! parameter (each a pass over the parameter and an allocation). Here one loop reads the
//! parameter, its gradient and its state once and writes the new state and the new
//! parameter; the parameter is then copied into its [`Var`] as before. Every operation is
//! the candle form's, in its order and in f32, including candle's `affine` (`x * mul +
//! add`, with `mul` and `add` rounded to f32), so both forms give the same bits
//! (`tests/fused.rs` checks it step by step for every rule option).
//!
//! Taken when the parameter, its gradient and its state are f32, contiguous and on the CPU,
//! and the parameter already has a state (the first step builds it with the candle ops).
//! Anything else (f64 or f16 parameters, CUDA) uses the candle form, which gives the same
//! result. [`crate::Grouped::set_fused`] turns the fast path off (for comparisons), and
//! [`crate::Grouped::fused_updates`] counts the updates it made.

use candle::{Device, Layout, Storage, Tensor, Var};

use crate::adamw::{AdamWConfig, AdamWState};
use crate::grouped::GroupHparams;
use crate::sgd::{SgdConfig, SgdState};

/// `x * mul + add` in f32, candle's `affine` on an f32 element.
#[inline(always)]
fn affine(x: f32, mul: f32, add: f32) -> f32 {
    x * mul + add
}

/// The f32 elements of a contiguous CPU storage, or `None`.
fn f32s<'a>(s: &'a Storage, l: &Layout) -> Option<&'a [f32]> {
    let Storage::Cpu(cpu) = s else { return None };
    let (start, end) = l.contiguous_offsets()?;
    cpu.as_slice::<f32>().ok()?.get(start..end)
}

/// Runs `f` on the f32 elements of `ts` (contiguous, on the CPU, all of one length), or
/// returns `None` when one of them is not such a tensor. The storages are only read.
fn with_f32s<const N: usize, R>(ts: [&Tensor; N], f: impl FnOnce([&[f32]; N]) -> R) -> Option<R> {
    let guards: [_; N] = std::array::from_fn(|i| ts[i].storage_and_layout());
    let mut slices: [&[f32]; N] = [&[]; N];
    for (i, (s, l)) in guards.iter().enumerate() {
        slices[i] = f32s(s, l)?;
    }
    let n = slices[0].len();
    slices.iter().all(|s| s.len() == n).then(|| f(slices))
}

/// Writes `values` (the new parameter, shaped like `var`) into `var`.
fn set(var: &Var, values: Vec<f32>) -> candle::Result<()> {
    var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu)?)
}

/// SGD's update in one pass (see the module docs); `Ok(false)` when it does not apply.
pub(crate) fn sgd(
    cfg: &SgdConfig,
    h: &GroupHparams,
    var: &Var,
    grad: &Tensor,
    state: &mut Option<SgdState>,
) -> candle::Result<bool> {
    let momentum = cfg.momentum != 0.0;
    let buf = match (momentum, state.as_ref()) {
        (true, None) => return Ok(false), // the first step: the buffer is the gradient
        (true, Some(s)) => s.momentum_buffer.clone(),
        (false, _) => grad.clone(), // unused
    };
    let (wd, lr) = (h.weight_decay as f32, h.lr as f32);
    let (m, one_minus_d) = (cfg.momentum as f32, (1.0 - cfg.dampening) as f32);
    let (decay, nesterov) = (h.weight_decay != 0.0, cfg.nesterov);
    let out = with_f32s([var.as_tensor(), grad, &buf], |[p, g, b]| {
        let mut new_p = Vec::with_capacity(p.len());
        let mut new_b = Vec::with_capacity(if momentum { p.len() } else { 0 });
        for i in 0..p.len() {
            let mut d = g[i];
            if decay {
                d += affine(p[i], wd, 0.0);
            }
            let dir = if momentum {
                let nb = affine(b[i], m, 0.0) + affine(d, one_minus_d, 0.0);
                new_b.push(nb);
                if nesterov {
                    d + affine(nb, m, 0.0)
                } else {
                    nb
                }
            } else {
                d
            };
            new_p.push(p[i] - affine(dir, lr, 0.0));
        }
        (new_p, new_b)
    });
    let Some((new_p, new_b)) = out else {
        return Ok(false);
    };
    if momentum {
        *state = Some(SgdState {
            momentum_buffer: Tensor::from_vec(new_b, var.shape(), &Device::Cpu)?,
        });
    }
    set(var, new_p)?;
    Ok(true)
}

/// AdamW's update in one pass (see the module docs); `Ok(false)` when it does not apply.
pub(crate) fn adamw(
    cfg: &AdamWConfig,
    h: &GroupHparams,
    var: &Var,
    grad: &Tensor,
    state: &mut Option<AdamWState>,
) -> candle::Result<bool> {
    let Some(s) = state.as_ref() else {
        return Ok(false); // the first step: zero moments, built by the candle form
    };
    let step = s.step + 1;
    let lr = h.lr;
    let decay = h.weight_decay != 0.0;
    let keep = (1.0 - lr * h.weight_decay) as f32;
    let (one_minus_b1, b2) = ((1.0 - cfg.beta1) as f32, cfg.beta2 as f32);
    let one_minus_b2 = (1.0 - cfg.beta2) as f32;
    let bias_correction1 = 1.0 - cfg.beta1.powf(step as f64);
    let bias_correction2 = 1.0 - cfg.beta2.powf(step as f64);
    let step_size = (lr / bias_correction1) as f32;
    let inv_sqrt_bc2 = (1.0 / bias_correction2.sqrt()) as f32;
    let eps = cfg.eps as f32;
    let out = with_f32s(
        [var.as_tensor(), grad, &s.exp_avg, &s.exp_avg_sq],
        |[p, g, m, v]| {
            let n = p.len();
            let (mut new_p, mut new_m, mut new_v) = (
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
            );
            for i in 0..n {
                let mut pi = p[i];
                if decay {
                    pi = affine(pi, keep, 0.0);
                }
                let gi = g[i];
                let mi = m[i] + affine(gi - m[i], one_minus_b1, 0.0);
                let vi = affine(v[i], b2, 0.0) + affine(gi * gi, one_minus_b2, 0.0);
                let denom = affine(affine(vi.sqrt(), inv_sqrt_bc2, 0.0), 1.0, eps);
                new_p.push(pi - affine(mi / denom, step_size, 0.0));
                new_m.push(mi);
                new_v.push(vi);
            }
            (new_p, new_m, new_v)
        },
    );
    let Some((new_p, new_m, new_v)) = out else {
        return Ok(false);
    };
    *state = Some(AdamWState {
        exp_avg: Tensor::from_vec(new_m, var.shape(), &Device::Cpu)?,
        exp_avg_sq: Tensor::from_vec(new_v, var.shape(), &Device::Cpu)?,
        step,
    });
    set(var, new_p)?;
    Ok(true)
}
