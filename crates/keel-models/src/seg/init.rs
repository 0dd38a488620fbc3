//! Seeded PyTorch-rule initialisation and the parameter count.

use candle::{bail, Result, Tensor};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, HashMap};

/// Sets every variable of `vm` from a seeded RNG with PyTorch's default init rules, so the
/// initial weights depend only on `seed` (candle's CPU `randn` is not seedable): conv
/// weights kaiming-uniform(a = sqrt 5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)); conv
/// biases U(-1/sqrt(fan_in), ..); norm weights 1, biases 0; running mean 0, variance 1.
/// Variables are visited in name order.
///
/// # Errors
/// A variable no rule covers (the message names it and its shape).
///
/// # Example
/// ```
/// use candle::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// use keel_models::seg::{init_weights, ModelConfig, SegNet};
/// let vm = VarMap::new();
/// let cfg = ModelConfig { width: 4, fpn: 8, num_classes: 3, norm: "gn:2".parse()? };
/// let _net = SegNet::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
/// init_weights(&vm, 7)?;
/// let w = vm.data().lock().unwrap()["head.weight"].as_tensor().flatten_all()?.to_vec1::<f32>()?;
/// assert!(w.iter().all(|v| v.abs() <= 1.0 / 8f32.sqrt())); // fan_in = 8
/// # Ok::<(), candle::Error>(())
/// ```
pub fn init_weights(vm: &VarMap, seed: u64) -> Result<()> {
    let data = vm.data().lock().unwrap_or_else(|e| e.into_inner());
    let sorted: BTreeMap<&String, &candle::Var> = data.iter().collect();
    let fan_in: HashMap<String, usize> = sorted
        .iter()
        .filter(|(_, v)| v.rank() == 4)
        .map(|(k, v)| {
            let d = v.dims();
            (
                k.trim_end_matches(".weight").to_string(),
                d[1] * d[2] * d[3],
            )
        })
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (name, var) in sorted {
        let (prefix, leaf) = name.rsplit_once('.').unwrap_or(("", name));
        let n = var.elem_count();
        let values: Vec<f32> = match (leaf, var.rank(), fan_in.get(prefix)) {
            ("weight", 4, Some(&f)) | ("bias", 1, Some(&f)) => {
                let bound = 1.0 / (f as f64).sqrt();
                (0..n)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect()
            }
            ("weight", 1, None) | ("running_var", 1, None) => vec![1.0; n],
            ("bias", 1, None) | ("running_mean", 1, None) => vec![0.0; n],
            _ => bail!(
                "init_weights: no init rule for variable '{name}' of shape {:?}; only conv weights/biases and norm weight/bias/running stats are covered",
                var.dims()
            ),
        };
        let t = Tensor::from_vec(values, var.shape(), var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}

/// Number of trainable parameters (running statistics excluded), like PyTorch's
/// `sum(p.numel() for p in m.parameters())`.
pub fn count_params(vm: &VarMap) -> usize {
    let data = vm.data().lock().unwrap_or_else(|e| e.into_inner());
    data.iter()
        .filter(|(k, _)| !k.ends_with(".running_mean") && !k.ends_with(".running_var"))
        .map(|(_, v)| v.elem_count())
        .sum()
}
