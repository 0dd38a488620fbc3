//! The two traits a training loop holds its optimization state through:
//! [`StateDict`] (save and restore, shared by every stateful type of this crate) and
//! [`DynOptimizer`], an object-safe optimizer (candle's `Optimizer` has an associated
//! `Config` and a `new` constructor, so `dyn candle_nn::Optimizer` does not exist).
use std::collections::HashMap;
use std::path::Path;

use candle::backprop::GradStore;
use candle::Tensor;

/// State that can be saved to and restored from a map of named tensors (PyTorch's
/// `state_dict()` / `load_state_dict()`), and so to a safetensors file.
pub trait StateDict {
    /// The state as named tensors (scalars as one-element f64 tensors).
    fn state_dict(&self) -> candle::Result<HashMap<String, Tensor>>;

    /// Restores a state from [`StateDict::state_dict`]. On error `self` is unchanged.
    fn load_state_dict(&mut self, state: &HashMap<String, Tensor>) -> candle::Result<()>;

    /// The name errors give this type: its type name without module paths unless the type
    /// says better (keel's optimizers say `Sgd` and `AdamW`, their
    /// [`crate::UpdateRule::NAME`], not `Grouped<SgdConfig>`).
    fn name(&self) -> String {
        let full = std::any::type_name::<Self>();
        let end = full.find('<').unwrap_or(full.len());
        let path = full[..end].rsplit("::").next().unwrap_or(full);
        format!("{path}{}", &full[end..])
    }

    /// Writes [`StateDict::state_dict`] to a safetensors file.
    fn save(&self, path: &Path) -> candle::Result<()> {
        candle::safetensors::save(&self.state_dict()?, path)
    }

    /// Loads a file written by [`StateDict::save`] (read to the CPU; each type moves its
    /// tensors to its parameters' device).
    fn load(&mut self, path: &Path) -> candle::Result<()> {
        let st = candle::safetensors::load(path, &candle::Device::Cpu)?;
        self.load_state_dict(&st)
    }
}

/// An optimizer behind a pointer: `Box<dyn DynOptimizer>` holds SGD or AdamW (or any
/// `candle_nn::Optimizer` that implements [`StateDict`], through the blanket impl), and
/// [`crate::GradScaler::step`] and keel-train's loop take `&mut dyn DynOptimizer`.
///
/// ```
/// use candle::{Device, Var};
/// use keel_optim::{AdamW, AdamWConfig, DynOptimizer, Sgd, SgdConfig};
/// let w = Var::new(&[1f32, -1.0], &Device::Cpu)?;
/// let mut opts: Vec<Box<dyn DynOptimizer>> = vec![
///     Box::new(<Sgd as candle_nn::Optimizer>::new(vec![w.clone()], SgdConfig::default())?),
///     Box::new(<AdamW as candle_nn::Optimizer>::new(vec![w.clone()], AdamWConfig::default())?),
/// ];
/// for o in opts.iter_mut() {
///     o.set_learning_rate(0.01)?;
///     assert_eq!(o.learning_rate(), 0.01);
///     assert!(o.set_learning_rate(f64::NAN).is_err());
///     let grads = w.as_tensor().sqr()?.sum_all()?.backward()?;
///     o.step(&grads)?;
/// }
/// # Ok::<(), candle::Error>(())
/// ```
pub trait DynOptimizer: StateDict {
    /// One update from the gradients in `grads` (parameters without a gradient are left
    /// as they are).
    fn step(&mut self, grads: &GradStore) -> candle::Result<()>;

    /// The current base learning rate.
    fn learning_rate(&self) -> f64;

    /// Sets the base learning rate; a negative or non-finite value is an error (and also
    /// one that is finite in f64 but overflows f32, where the parameters live).
    fn set_learning_rate(&mut self, lr: f64) -> candle::Result<()>;
}

/// Checks a learning rate before an optimizer takes it: finite, non-negative, and finite
/// in f32 too (the parameters are f32; `1e39` would turn every update into inf).
pub(crate) fn check_lr(op: &str, lr: f64) -> candle::Result<()> {
    if !(lr.is_finite() && lr >= 0.0 && (lr as f32).is_finite()) {
        candle::bail!(
            "{op}: lr ({lr}) must be finite and non-negative, also in f32 (at most {:e}); pass the recipe's peak LR, e.g. 0.05 for SGD or 1e-3 for AdamW",
            f32::MAX
        )
    }
    Ok(())
}

impl<T: candle_nn::Optimizer + StateDict> DynOptimizer for T {
    fn step(&mut self, grads: &GradStore) -> candle::Result<()> {
        candle_nn::Optimizer::step(self, grads)
    }

    fn learning_rate(&self) -> f64 {
        candle_nn::Optimizer::learning_rate(self)
    }

    fn set_learning_rate(&mut self, lr: f64) -> candle::Result<()> {
        check_lr(&self.name(), lr)?;
        candle_nn::Optimizer::set_learning_rate(self, lr);
        Ok(())
    }
}
