//! Seeded initialisation of an [`Fpn`](super::Fpn) and an [`FcosHead`](super::FcosHead):
//! the reference's distributions (see their module docs), drawn from a ChaCha8 RNG seeded
//! by the caller instead of candle's RNG (not seedable on the CPU), so a detector's initial
//! weights depend only on the seed.
//!
//! - FPN conv weights (`{fpn}.*.weight`, rank 4): `kaiming_uniform_(a=1)`,
//!   `U(-sqrt(3 / fan_in), sqrt(3 / fan_in))`;
//! - head conv weights (`{head}.*.weight`, rank 4): `N(0, 0.01)` (Box-Muller);
//! - everything else (biases, the classification prior, norms, scales) is constant at
//!   build time and left as built.
use candle::{bail, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Re-draws the random weights of the FPN (variables named `{fpn_prefix}.…`) and the FCOS
/// head (`{head_prefix}.…`) among `params` (name, variable) from `seed`, in name order.
///
/// # Errors
/// No variable under either prefix (a wrong prefix), or a failed set.
///
/// ```
/// use candle::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// use keel_det::fcos::{fcos_head, seeded_init, FcosHeadConfig};
/// # fn main() -> candle::Result<()> {
/// let weights = |seed| -> candle::Result<Vec<f32>> {
///     let vm = VarMap::new();
///     let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
///     fcos_head(FcosHeadConfig { num_convs: 1, num_levels: 1, ..FcosHeadConfig::new(2, 8) }, vb.pp("head"))?;
///     let params: Vec<_> = vm.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
///     seeded_init(&params, "fpn", "head", seed)?;
///     let w = vm.data().lock().unwrap()["head.cls_logits.weight"].flatten_all()?.to_vec1::<f32>()?;
///     Ok(w)
/// };
/// assert_eq!(weights(3)?, weights(3)?);
/// assert_ne!(weights(3)?, weights(4)?);
/// # Ok(()) }
/// ```
pub fn seeded_init(
    params: &[(String, Var)],
    fpn_prefix: &str,
    head_prefix: &str,
    seed: u64,
) -> Result<()> {
    let (fpn, head) = (format!("{fpn_prefix}."), format!("{head_prefix}."));
    let mut sorted: Vec<&(String, Var)> = params
        .iter()
        .filter(|(n, _)| n.starts_with(&fpn) || n.starts_with(&head))
        .collect();
    if sorted.is_empty() {
        bail!("fcos::seeded_init: no variable is named '{fpn}…' or '{head}…'; pass the prefixes the FPN and the head were built under")
    }
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (name, var) in sorted {
        if !name.ends_with(".weight") || var.rank() != 4 {
            continue;
        }
        let d = var.dims();
        let n = var.elem_count();
        let values: Vec<f32> = if name.starts_with(&fpn) {
            let b = (3.0 / (d[1] * d[2] * d[3]) as f64).sqrt();
            (0..n).map(|_| rng.random_range(-b..b) as f32).collect()
        } else {
            (0..n)
                .map(|_| 0.01 * standard_normal(&mut rng) as f32)
                .collect()
        };
        let t = Tensor::from_vec(values, var.shape(), var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}

/// One N(0, 1) draw (Box-Muller, the cosine branch).
fn standard_normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]: ln is finite
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};

    #[test]
    fn draws_follow_the_reference_distributions() -> Result<()> {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let cfg = crate::fcos::FpnConfig {
            in_channels: [8, 16, 32],
            out_channels: 16,
            norm: None,
            extra_levels: 0,
        };
        crate::fcos::fpn(&cfg, vb.pp("fpn"))?;
        let head_cfg = crate::fcos::FcosHeadConfig::new(3, 16);
        crate::fcos::fcos_head(head_cfg, vb.pp("head"))?;
        let params = keel_params(&vm);
        seeded_init(&params, "fpn", "head", 0)?;
        let get = |k: &str| -> Result<Vec<f32>> {
            vm.data().lock().unwrap()[k].flatten_all()?.to_vec1::<f32>()
        };
        // fpn_layer2: 3x3 from 16 channels: bound sqrt(3 / 144).
        let w = get("fpn.fpn_layer2.weight")?;
        let bound = (3.0f32 / 144.0).sqrt();
        assert!(w.iter().all(|v| v.abs() <= bound));
        assert!(w.iter().any(|v| v.abs() > 0.8 * bound));
        let w = get("head.cls_tower.0.weight")?;
        let std = (w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32).sqrt();
        assert!((std - 0.01).abs() < 0.001, "std {std}");
        // Constants untouched: the prior bias and the scales.
        let prior = -((1.0f32 - 0.01) / 0.01).ln();
        assert!(get("head.cls_logits.bias")?
            .iter()
            .all(|&b| (b - prior).abs() < 1e-6));
        assert_eq!(get("head.scales.0.scale")?, [1.0]);
        assert!(seeded_init(&params, "neck", "box_head", 0).is_err());
        Ok(())
    }

    fn keel_params(vm: &VarMap) -> Vec<(String, Var)> {
        let data = vm.data().lock().unwrap();
        data.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}
