//! Mixed precision with f32 master weights (Micikevicius et al. 2018).
//!
//! The `Var`s stay f32; each forward reads them through a cast to f16 or bf16. candle's
//! `to_dtype` is differentiable, so the gradients land on the f32 vars in f32 and the
//! optimizer updates the master copy. With f16 use a [`crate::GradScaler`]; bf16 has
//! f32's exponent range and needs none.
//!
//! candle 0.11's CPU backend has no bf16 matmul (so no bf16 linear or conv): bf16
//! training runs on CUDA; f16 works on both.
//!
//! Build the model inside the forward from [`cast_var_builder`] (candle layers are cheap
//! structs over tensors), or cast individual vars with [`cast_vars`]. Compute the loss in
//! f32 (`logits.to_dtype(DType::F32)`).

use std::collections::HashMap;

use candle::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

/// A `VarBuilder` over the current values of `varmap`'s (f32) vars that hands out
/// `dtype` tensors, cast on every `get`. Gradients of those tensors flow back to the
/// vars. Build it (and the model) once per forward.
///
/// ```
/// use candle::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use keel_optim::mixed::cast_var_builder;
/// let dev = Device::Cpu;
/// let vm = VarMap::new();
/// let _master = candle_nn::linear(4, 2, VarBuilder::from_varmap(&vm, DType::F32, &dev).pp("fc"))?;
/// let fc = candle_nn::linear(4, 2, cast_var_builder(&vm, DType::F16, &dev).pp("fc"))?;
/// let x = Tensor::ones((3, 4), DType::F16, &dev)?;
/// let loss = fc.forward(&x)?.to_dtype(DType::F32)?.sum_all()?;
/// let grads = loss.backward()?;
/// for var in vm.all_vars() {
///     assert_eq!(grads.get(&var).unwrap().dtype(), DType::F32); // lands on the master
/// }
/// # Ok::<(), candle::Error>(())
/// ```
pub fn cast_var_builder(varmap: &VarMap, dtype: DType, device: &Device) -> VarBuilder<'static> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let tensors: HashMap<String, Tensor> = data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    VarBuilder::from_tensors(tensors, dtype, device)
}

/// The vars cast to `dtype` (differentiably: the gradients land on the vars).
///
/// ```
/// use candle::{DType, Device, Var};
/// use keel_optim::mixed::cast_vars;
/// let w = Var::new(&[1f32, 2.0], &Device::Cpu)?;
/// let w16 = cast_vars(std::slice::from_ref(&w), DType::BF16)?;
/// let grads = w16[0].sqr()?.sum_all()?.to_dtype(DType::F32)?.backward()?;
/// assert_eq!(grads.get(&w).unwrap().to_vec1::<f32>()?, vec![2.0, 4.0]);
/// # Ok::<(), candle::Error>(())
/// ```
pub fn cast_vars(vars: &[Var], dtype: DType) -> candle::Result<Vec<Tensor>> {
    vars.iter().map(|v| v.as_tensor().to_dtype(dtype)).collect()
}
