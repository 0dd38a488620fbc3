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
    let (decay, nesterov) = (h.weight_decay != 0.0, cfg.nesterov);
    let c = SgdConsts {
        wd: h.weight_decay as f32,
        lr: h.lr as f32,
        m: cfg.momentum as f32,
        one_minus_d: (1.0 - cfg.dampening) as f32,
    };
    let out = with_f32s([var.as_tensor(), grad, &buf], |[p, g, b]| {
        let mut new_p = vec![0f32; p.len()];
        let mut new_b = vec![0f32; if momentum { p.len() } else { 0 }];
        match (decay, momentum, nesterov) {
            (false, false, _) => {
                sgd_loop::<false, false, false>(&c, p, g, b, &mut new_p, &mut new_b)
            }
            (true, false, _) => sgd_loop::<true, false, false>(&c, p, g, b, &mut new_p, &mut new_b),
            (false, true, false) => {
                sgd_loop::<false, true, false>(&c, p, g, b, &mut new_p, &mut new_b)
            }
            (true, true, false) => {
                sgd_loop::<true, true, false>(&c, p, g, b, &mut new_p, &mut new_b)
            }
            (false, true, true) => {
                sgd_loop::<false, true, true>(&c, p, g, b, &mut new_p, &mut new_b)
            }
            (true, true, true) => sgd_loop::<true, true, true>(&c, p, g, b, &mut new_p, &mut new_b),
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

/// SGD's hyper-parameters as the candle form rounds them (f32).
struct SgdConsts {
    wd: f32,
    lr: f32,
    m: f32,
    one_minus_d: f32,
}

/// SGD's loop, one instance per option set so that each compiles to a branch-free,
/// vectorizable loop. Without momentum `b` and `new_b` are not read or written.
#[inline(always)]
fn sgd_loop<const DECAY: bool, const MOMENTUM: bool, const NESTEROV: bool>(
    c: &SgdConsts,
    p: &[f32],
    g: &[f32],
    b: &[f32],
    new_p: &mut [f32],
    new_b: &mut [f32],
) {
    let n = p.len();
    let (g, new_p) = (&g[..n], &mut new_p[..n]);
    let (b, new_b) = if MOMENTUM {
        (&b[..n], &mut new_b[..n])
    } else {
        (&b[..0], &mut new_b[..0])
    };
    for i in 0..n {
        let mut d = g[i];
        if DECAY {
            d += affine(p[i], c.wd, 0.0);
        }
        let dir = if MOMENTUM {
            let nb = affine(b[i], c.m, 0.0) + affine(d, c.one_minus_d, 0.0);
            new_b[i] = nb;
            if NESTEROV {
                d + affine(nb, c.m, 0.0)
            } else {
                nb
            }
        } else {
            d
        };
        new_p[i] = p[i] - affine(dir, c.lr, 0.0);
    }
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
    let decay = h.weight_decay != 0.0;
    let bias_correction1 = 1.0 - cfg.beta1.powf(step as f64);
    let bias_correction2 = 1.0 - cfg.beta2.powf(step as f64);
    let c = AdamWConsts {
        keep: (1.0 - h.lr * h.weight_decay) as f32,
        one_minus_b1: (1.0 - cfg.beta1) as f32,
        b2: cfg.beta2 as f32,
        one_minus_b2: (1.0 - cfg.beta2) as f32,
        step_size: (h.lr / bias_correction1) as f32,
        inv_sqrt_bc2: (1.0 / bias_correction2.sqrt()) as f32,
        eps: cfg.eps as f32,
    };
    let out = with_f32s(
        [var.as_tensor(), grad, &s.exp_avg, &s.exp_avg_sq],
        |[p, g, m, v]| {
            let n = p.len();
            let mut new = [vec![0f32; n], vec![0f32; n], vec![0f32; n]];
            match decay {
                true => adamw_loop::<true>(&c, [p, g, m, v], &mut new),
                false => adamw_loop::<false>(&c, [p, g, m, v], &mut new),
            }
            let [new_p, new_m, new_v] = new;
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

/// AdamW's hyper-parameters of one step as the candle form rounds them (f32).
struct AdamWConsts {
    keep: f32,
    one_minus_b1: f32,
    b2: f32,
    one_minus_b2: f32,
    step_size: f32,
    inv_sqrt_bc2: f32,
    eps: f32,
}

/// AdamW's loop over `[p, g, m, v]` into `[new_p, new_m, new_v]`, one instance with and one
/// without decoupled weight decay.
#[inline(always)]
fn adamw_loop<const DECAY: bool>(c: &AdamWConsts, src: [&[f32]; 4], new: &mut [Vec<f32>; 3]) {
    let [p, g, m, v] = src;
    let n = p.len();
    let (g, m, v) = (&g[..n], &m[..n], &v[..n]);
    let [new_p, new_m, new_v] = new;
    let (new_p, new_m, new_v) = (&mut new_p[..n], &mut new_m[..n], &mut new_v[..n]);
    for i in 0..n {
        let mut pi = p[i];
        if DECAY {
            pi = affine(pi, c.keep, 0.0);
        }
        let gi = g[i];
        let mi = m[i] + affine(gi - m[i], c.one_minus_b1, 0.0);
        let vi = affine(v[i], c.b2, 0.0) + affine(gi * gi, c.one_minus_b2, 0.0);
        let denom = affine(affine(vi.sqrt(), c.inv_sqrt_bc2, 0.0), 1.0, c.eps);
        new_p[i] = pi - affine(mi / denom, c.step_size, 0.0);
        new_m[i] = mi;
        new_v[i] = vi;
    }
}
