//! A third optimizer is one config and one per-parameter step: two rules written here
//! against the public [`UpdateRule`] / [`ParamState`] traits train through [`Grouped`]
//! (groups, skipped params, state dict, `Box<dyn DynOptimizer>`) and match hand
//! computations.
mod common;

use anyhow::Result;
use candle::{Device, Tensor, Var};
use candle_nn::Optimizer;
use common::values;
use keel_optim::{
    DynOptimizer, GroupHparams, Grouped, ParamGroup, ParamState, SavedState, StateDict, UpdateRule,
};
use keel_test_support::{assert_close, Tol};

/// Plain SGD without momentum, L2 weight decay: `p -= lr * (g + wd * p)`. Stateless.
#[derive(Clone, Copy, Debug)]
struct Plain {
    lr: f64,
    weight_decay: f64,
}

impl UpdateRule for Plain {
    const NAME: &'static str = "Plain";
    type State = ();

    fn hparams(&self) -> GroupHparams {
        GroupHparams {
            lr: self.lr,
            weight_decay: self.weight_decay,
        }
    }

    fn step(
        &self,
        h: &GroupHparams,
        param: Tensor,
        grad: Tensor,
        _state: &mut Option<()>,
    ) -> candle::Result<Tensor> {
        let d_p = (grad + param.affine(h.weight_decay, 0.0)?)?;
        param - d_p.affine(h.lr, 0.0)?
    }
}

#[test]
fn plain_sgd_rule_matches_hand_computation() -> Result<()> {
    let dev = Device::Cpu;
    let (a, b, c) = (
        Var::new(&[1f32, -2.0], &dev)?,
        Var::new(&[4f32], &dev)?,
        Var::new(&[3f32], &dev)?,
    );
    let groups = vec![
        ParamGroup::new(vec![a.clone()]),
        ParamGroup::new(vec![b.clone(), c.clone()]).with_lr_mult(2.0),
    ];
    let rule = Plain {
        lr: 0.1,
        weight_decay: 0.5,
    };
    let mut opt: Box<dyn DynOptimizer> = Box::new(Grouped::with_groups(groups, rule)?);
    for _ in 0..2 {
        // grad 2p for a and b; c gets no gradient and must stay.
        let loss = (a.as_tensor().sqr()?.sum_all()? + b.as_tensor().sqr()?.sum_all()?)?;
        opt.step(&loss.backward()?)?;
    }
    // group 0: p *= 1 - 0.1 * (2 + 0.5) = 0.75 per step; group 1 (lr 0.2): p *= 0.5.
    assert_close(
        "a",
        &values(a.as_tensor())?[..],
        &[0.5625, -1.125][..],
        Tol::new(1e-6, 0.0),
    );
    assert_close(
        "b",
        &values(b.as_tensor())?[..],
        &[1.0][..],
        Tol::new(1e-6, 0.0),
    );
    assert_eq!(c.to_vec1::<f32>()?, vec![3.0]);
    // A stateless rule saves only the prologue.
    let mut keys: Vec<_> = opt.state_dict()?.into_keys().collect();
    keys.sort();
    assert_eq!(keys, ["group_sizes", "lr", "num_params"]);
    // The core validates the rule's lr like Sgd's and AdamW's.
    let err = Grouped::new(
        vec![a.clone()],
        Plain {
            lr: -1.0,
            weight_decay: 0.0,
        },
    )
    .expect_err("a negative lr must be refused");
    assert!(err.to_string().contains("Plain: lr (-1)"), "{err}");
    Ok(())
}

/// Adagrad (Duchi et al. 2011): `sum += g^2; p -= lr * g / (sqrt(sum) + eps)`, with a
/// per-parameter step count, to exercise a state with a tensor and a count.
#[derive(Clone, Copy, Debug)]
struct Adagrad {
    lr: f64,
    eps: f64,
}

#[derive(Clone, Debug)]
struct AdagradState {
    sum: Tensor,
    step: usize,
}

impl ParamState for AdagradState {
    fn save(&self) -> candle::Result<Vec<(&'static str, Tensor)>> {
        let step = Tensor::new(&[self.step as f64], &Device::Cpu)?;
        Ok(vec![("sum", self.sum.clone()), ("step", step)])
    }

    fn load(saved: &SavedState<'_>) -> candle::Result<Option<Self>> {
        if !saved.has("step") {
            return Ok(None);
        }
        Ok(Some(Self {
            sum: saved.tensor("sum")?,
            step: saved.count("step")?,
        }))
    }
}

impl UpdateRule for Adagrad {
    const NAME: &'static str = "Adagrad";
    type State = AdagradState;

    fn hparams(&self) -> GroupHparams {
        GroupHparams {
            lr: self.lr,
            weight_decay: 0.0,
        }
    }

    fn validate(&self) -> candle::Result<()> {
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            candle::bail!(
                "Adagrad: eps ({}) must be finite and >= 0; use 1e-10",
                self.eps
            )
        }
        Ok(())
    }

    fn step(
        &self,
        h: &GroupHparams,
        param: Tensor,
        grad: Tensor,
        state: &mut Option<AdagradState>,
    ) -> candle::Result<Tensor> {
        let (sum, step) = match state.take() {
            Some(s) => ((s.sum + grad.sqr()?)?, s.step + 1),
            None => (grad.sqr()?, 1),
        };
        let new = (&param - (&grad / sum.sqrt()?.affine(1.0, self.eps)?)?.affine(h.lr, 0.0)?)?;
        *state = Some(AdagradState { sum, step });
        Ok(new)
    }
}

/// One Adagrad step of loss `w^2` in f64 from `(w, sum)`.
fn adagrad_by_hand(w: f64, sum: f64, lr: f64) -> (f64, f64) {
    let g = 2.0 * w;
    let sum = sum + g * g;
    (w - lr * g / sum.sqrt(), sum)
}

#[test]
fn stateful_rule_matches_hand_computation_and_resumes_exactly() -> Result<()> {
    let dev = Device::Cpu;
    let rule = Adagrad { lr: 0.1, eps: 0.0 };
    let w = Var::new(&[1f32, -0.5], &dev)?;
    let mut opt = Grouped::new(vec![w.clone()], rule)?;
    let loss = |w: &Var| w.as_tensor().sqr()?.sum_all();
    let mut want = [(1.0, 0.0), (-0.5, 0.0)];
    for _ in 0..2 {
        opt.backward_step(&loss(&w)?)?;
        want = want.map(|(x, s)| adagrad_by_hand(x, s, 0.1));
    }
    assert_close(
        "w",
        &values(w.as_tensor())?[..],
        &want.map(|p| p.0)[..],
        Tol::new(1e-6, 0.0),
    );
    let st = opt.state_dict()?;
    assert_close(
        "sum",
        &values(&st["state.0.sum"])?[..],
        &want.map(|p| p.1)[..],
        Tol::new(1e-6, 0.0),
    );
    assert_eq!(values(&st["state.0.step"])?, vec![2.0]);

    // Resume into a fresh optimizer over a copy: the next step is bit-identical.
    let w2 = Var::from_tensor(&w.as_tensor().copy()?)?;
    let mut resumed = Grouped::new(vec![w2.clone()], Adagrad { lr: 0.5, eps: 0.0 })?;
    resumed.load_state_dict(&st)?;
    assert_eq!(
        candle_nn::Optimizer::learning_rate(&resumed),
        0.1,
        "the saved lr is restored"
    );
    opt.backward_step(&loss(&w)?)?;
    resumed.backward_step(&loss(&w2)?)?;
    assert_eq!(w.to_vec1::<f32>()?, w2.to_vec1::<f32>()?);

    // A broken state names the rule and leaves the optimizer as it was.
    let mut broken = st.clone();
    broken.remove("state.0.sum");
    let err = resumed
        .load_state_dict(&broken)
        .expect_err("a missing entry must be refused");
    assert!(
        err.to_string()
            .contains("Adagrad: state entry `state.0.sum` is missing"),
        "{err}"
    );
    assert_eq!(values(&resumed.state_dict()?["state.0.step"])?, vec![3.0]);
    Ok(())
}
