//! One-pass CPU updates of f32 parameters for [`crate::Sgd`] and [`crate::AdamW`] (issue 13,
//! item 4: no framework tax on the step).
//!
//! The candle-op form of an update ([`crate::UpdateRule::step`]) runs 6-11 tensor ops per
//! parameter (each a pass over the parameter and an allocation). Here one loop reads the
//! parameter, its gradient and its state once, writes the new state into fresh buffers
//! (never zero-filled first) and the new parameter in place into its [`Var`]'s storage (a
//! candle in-place op; `Var::set` overwrites that storage too, so nothing that shares it sees
//! a difference). Parameters of at least [`PAR_MIN`] values are cut into chunks run on
//! rayon's threads; each element's arithmetic does not depend on the cut. Every operation is
//! the candle form's, in its order and in f32, including candle's `affine` (`x * mul +
//! add`, with `mul` and `add` rounded to f32), so both forms give the same bits
//! (`tests/fused.rs` checks it step by step for every rule option).
//!
//! Taken when the parameter, its gradient and its state are f32, contiguous and on the CPU,
//! and the parameter already has a state (the first step builds it with the candle ops).
//! Anything else (f64 or f16 parameters, CUDA) uses the candle form, which gives the same
//! result. [`crate::Grouped::set_fused`] turns the fast path off (for comparisons), and
//! [`crate::Grouped::fused_updates`] counts the updates it made.

use std::mem::MaybeUninit;
use std::sync::Mutex;

use candle::{CpuStorage, Device, InplaceOp2, Layout, Storage, Tensor, Var};
use rayon::prelude::*;

use crate::adamw::{AdamWConfig, AdamWState};
use crate::grouped::GroupHparams;
use crate::sgd::{SgdConfig, SgdState};

/// Parameters with at least this many values are updated in chunks on rayon's threads.
pub(crate) const PAR_MIN: usize = 1 << 16;

/// `x * mul + add` in f32, candle's `affine` on an f32 element.
#[inline(always)]
fn affine(x: f32, mul: f32, add: f32) -> f32 {
    x * mul + add
}

/// The f32 elements of a contiguous CPU storage, or `None`.
fn f32s<'a>(s: &'a CpuStorage, l: &Layout) -> Option<&'a [f32]> {
    let (start, end) = l.contiguous_offsets()?;
    s.as_slice::<f32>().ok()?.get(start..end)
}

/// A chunk's kernel: `(p, g, states, new_states)` on one range of the parameter.
type Kernel<'k, const S: usize> =
    dyn Fn(&mut [f32], &[f32], [&[f32]; S], [&mut [MaybeUninit<f32>]; S]) + Sync + 'k;

/// Pointers to the new-state buffers, shared by the chunks; each chunk writes a disjoint
/// range of each.
struct OutPtrs<const S: usize>([*mut MaybeUninit<f32>; S]);
// SAFETY: the pointers are only used to build disjoint per-chunk slices (see `run_chunks`).
unsafe impl<const S: usize> Sync for OutPtrs<S> {}
unsafe impl<const S: usize> Send for OutPtrs<S> {}

impl<const S: usize> OutPtrs<S> {
    /// Buffer `i`'s values `[start, start + len)`.
    ///
    /// # Safety
    /// The buffer has capacity `start + len`, and no other reference to that range exists
    /// while the slice lives.
    unsafe fn slice<'s>(&self, i: usize, start: usize, len: usize) -> &'s mut [MaybeUninit<f32>] {
        unsafe { std::slice::from_raw_parts_mut(self.0[i].add(start), len) }
    }
}

/// Runs `kernel` over `p`, `g` and the states in chunks (in parallel from [`PAR_MIN`]
/// values on) and returns the new states, every value written by the kernel.
fn run_chunks<const S: usize>(
    p: &mut [f32],
    g: &[f32],
    states: [&[f32]; S],
    kernel: &Kernel<'_, S>,
) -> [Vec<f32>; S] {
    let n = p.len();
    let mut outs: [Vec<f32>; S] = std::array::from_fn(|_| Vec::with_capacity(n));
    let ptrs = OutPtrs::<S>(std::array::from_fn(|i| {
        outs[i].spare_capacity_mut().as_mut_ptr()
    }));
    let threads = rayon::current_num_threads();
    let chunk = if n >= PAR_MIN && threads > 1 {
        n.div_ceil(4 * threads).next_multiple_of(64)
    } else {
        n.max(1)
    };
    let body = |(c, p_c): (usize, &mut [f32])| {
        let r = c * chunk..c * chunk + p_c.len();
        let st: [&[f32]; S] = std::array::from_fn(|i| &states[i][r.clone()]);
        // SAFETY: `outs[i]` has capacity n >= r.end, and the chunks' ranges are disjoint, so
        // each slice is the only reference to its part of the buffer while the kernel runs.
        let new: [&mut [MaybeUninit<f32>]; S] =
            std::array::from_fn(|i| unsafe { ptrs.slice(i, r.start, r.len()) });
        kernel(p_c, &g[r.clone()], st, new);
    };
    if chunk < n {
        p.par_chunks_mut(chunk).enumerate().for_each(body);
    } else {
        p.chunks_mut(chunk).enumerate().for_each(body);
    }
    for o in &mut outs {
        // SAFETY: the chunks cover 0..n and every kernel writes each new-state value of its
        // range (see the kernels), so the first n values are initialized.
        unsafe { o.set_len(n) };
    }
    outs
}

/// A one-pass update as a candle in-place op on the parameter: the gradient is its operand,
/// the states are read inside; `done` receives the new states, or stays `None` when an
/// operand is not an f32 contiguous CPU tensor of the parameter's length.
struct Update<'a, 'k, const S: usize> {
    name: &'static str,
    states: [&'a Tensor; S],
    kernel: &'a Kernel<'k, S>,
    done: Mutex<Option<[Vec<f32>; S]>>,
}

impl<const S: usize> InplaceOp2 for Update<'_, '_, S> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle::Result<()> {
        let Some((start, end)) = l1.contiguous_offsets() else {
            return Ok(());
        };
        let CpuStorage::F32(all) = s1 else {
            return Ok(());
        };
        let Some(p) = all.get_mut(start..end) else {
            return Ok(());
        };
        let Some(g) = f32s(s2, l2).filter(|g| g.len() == p.len()) else {
            return Ok(());
        };
        let guards: [_; S] = std::array::from_fn(|i| self.states[i].storage_and_layout());
        let mut states: [&[f32]; S] = [&[]; S];
        for (i, (s, l)) in guards.iter().enumerate() {
            let Storage::Cpu(cpu) = &**s else {
                return Ok(());
            };
            match f32s(cpu, l) {
                Some(v) if v.len() == p.len() => states[i] = v,
                _ => return Ok(()),
            }
        }
        let new = run_chunks(p, g, states, self.kernel);
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = Some(new);
        Ok(())
    }
}

/// The address of `t`'s CPU f32 buffer (null for anything else); the storage's lock is
/// released before returning.
fn buffer(t: &Tensor) -> *const f32 {
    let (s, _) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(CpuStorage::F32(v)) => v.as_ptr(),
        _ => std::ptr::null(),
    }
}

/// Updates `var` in place with `kernel` and returns the new states, or `None` (nothing
/// changed) when `var`, `grad` or a state is not an f32 contiguous CPU tensor of `var`'s size.
fn update_in_place<const S: usize>(
    name: &'static str,
    var: &Var,
    grad: &Tensor,
    states: [&Tensor; S],
    kernel: &Kernel<'_, S>,
) -> candle::Result<Option<[Vec<f32>; S]>> {
    let t = var.as_tensor();
    let cpu = |x: &Tensor| x.device().is_cpu() && x.dtype() == candle::DType::F32;
    if !cpu(t) || !cpu(grad) || !states.iter().all(|s| cpu(s)) {
        return Ok(None);
    }
    // An operand that shares the parameter's buffer (a hand-built gradient, say) cannot be
    // read while the parameter is written in place: the candle form handles it.
    let p = buffer(t);
    if [grad].into_iter().chain(states).any(|x| buffer(x) == p) {
        return Ok(None);
    }
    let op = Update {
        name,
        states,
        kernel,
        done: Mutex::new(None),
    };
    t.inplace_op2(grad, &op)?;
    Ok(op.done.into_inner().unwrap_or_else(|e| e.into_inner()))
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
    if !momentum {
        macro_rules! plain {
            ($d:literal) => {
                &|p: &mut [f32], g: &[f32], _: [&[f32]; 0], _: [&mut [MaybeUninit<f32>]; 0]| {
                    sgd_loop::<$d, false, false>(&c, p, g, &[], &mut [])
                }
            };
        }
        let kernel: &Kernel<'_, 0> = if decay { plain!(true) } else { plain!(false) };
        return Ok(update_in_place("sgd_fused", var, grad, [], kernel)?.is_some());
    }
    macro_rules! kernel {
        ($d:literal, $n:literal) => {
            &|p: &mut [f32], g: &[f32], [b]: [&[f32]; 1], [nb]: [&mut [MaybeUninit<f32>]; 1]| {
                sgd_loop::<$d, true, $n>(&c, p, g, b, nb)
            }
        };
    }
    let kernel: &Kernel<'_, 1> = match (decay, nesterov) {
        (false, false) => kernel!(false, false),
        (true, false) => kernel!(true, false),
        (false, true) => kernel!(false, true),
        (true, true) => kernel!(true, true),
    };
    let Some([new_b]) = update_in_place("sgd_fused", var, grad, [&buf], kernel)? else {
        return Ok(false);
    };
    *state = Some(SgdState {
        momentum_buffer: Tensor::from_vec(new_b, var.shape(), &Device::Cpu)?,
    });
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
/// vectorizable loop: `p` is updated in place; with momentum every value of `new_b` (the new
/// momentum buffer) is written, without it `b` and `new_b` are not touched.
#[inline(always)]
fn sgd_loop<const DECAY: bool, const MOMENTUM: bool, const NESTEROV: bool>(
    c: &SgdConsts,
    p: &mut [f32],
    g: &[f32],
    b: &[f32],
    new_b: &mut [MaybeUninit<f32>],
) {
    let n = p.len();
    let g = &g[..n];
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
            new_b[i].write(nb);
            if NESTEROV {
                d + affine(nb, c.m, 0.0)
            } else {
                nb
            }
        } else {
            d
        };
        p[i] -= affine(dir, c.lr, 0.0);
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
    let kernel: &Kernel<'_, 2> = match decay {
        true => &|p, g, [m, v], [nm, nv]| adamw_loop::<true>(&c, p, [g, m, v], [nm, nv]),
        false => &|p, g, [m, v], [nm, nv]| adamw_loop::<false>(&c, p, [g, m, v], [nm, nv]),
    };
    let Some([new_m, new_v]) = update_in_place(
        "adamw_fused",
        var,
        grad,
        [&s.exp_avg, &s.exp_avg_sq],
        kernel,
    )?
    else {
        return Ok(false);
    };
    *state = Some(AdamWState {
        exp_avg: Tensor::from_vec(new_m, var.shape(), &Device::Cpu)?,
        exp_avg_sq: Tensor::from_vec(new_v, var.shape(), &Device::Cpu)?,
        step,
    });
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

/// AdamW's loop: `p` in place, `[g, m, v]` read, every value of `[new_m, new_v]` written;
/// one instance with and one without decoupled weight decay.
#[inline(always)]
fn adamw_loop<const DECAY: bool>(
    c: &AdamWConsts,
    p: &mut [f32],
    [g, m, v]: [&[f32]; 3],
    [new_m, new_v]: [&mut [MaybeUninit<f32>]; 2],
) {
    let n = p.len();
    let (g, m, v) = (&g[..n], &m[..n], &v[..n]);
    let (new_m, new_v) = (&mut new_m[..n], &mut new_v[..n]);
    for i in 0..n {
        let mut pi = p[i];
        if DECAY {
            pi = affine(pi, c.keep, 0.0);
        }
        let gi = g[i];
        let mi = m[i] + affine(gi - m[i], c.one_minus_b1, 0.0);
        let vi = affine(v[i], c.b2, 0.0) + affine(gi * gi, c.one_minus_b2, 0.0);
        let denom = affine(affine(vi.sqrt(), c.inv_sqrt_bc2, 0.0), 1.0, c.eps);
        p[i] = pi - affine(mi / denom, c.step_size, 0.0);
        new_m[i].write(mi);
        new_v[i].write(vi);
    }
}
