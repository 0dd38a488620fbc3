//! Shared helpers for state dicts: scalars stored as f64 tensors, checked lookups.

use std::collections::HashMap;

use candle::{DType, Device, Tensor};

/// A scalar as a one-element f64 tensor (exact for counts below 2^53).
pub(crate) fn scalar(v: f64) -> candle::Result<Tensor> {
    Tensor::new(&[v], &Device::Cpu)
}

/// A state map holding the named scalars (the prologue every state dict starts with).
pub(crate) fn scalars(entries: &[(&str, f64)]) -> candle::Result<HashMap<String, Tensor>> {
    entries
        .iter()
        .map(|&(k, v)| Ok((k.to_string(), scalar(v)?)))
        .collect()
}

/// Reads a scalar written by [`scalar`].
pub(crate) fn get_scalar(
    op: &str,
    state: &HashMap<String, Tensor>,
    key: &str,
) -> candle::Result<f64> {
    let t = get(op, state, key)?;
    if t.elem_count() != 1 {
        candle::bail!(
            "{op}: state entry `{key}` has shape {:?}, expected one element; was it saved by {op}?",
            t.dims()
        )
    }
    t.flatten_all()?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()
        .map(|v| v[0])
}

/// Reads a count written by [`scalar`].
pub(crate) fn get_count(
    op: &str,
    state: &HashMap<String, Tensor>,
    key: &str,
) -> candle::Result<usize> {
    let v = get_scalar(op, state, key)?;
    if !(v >= 0.0 && v.fract() == 0.0 && v < 9.0e15) {
        candle::bail!("{op}: state entry `{key}` ({v}) must be a non-negative integer; the state file is corrupt")
    }
    Ok(v as usize)
}

/// A required entry.
pub(crate) fn get<'a>(
    op: &str,
    state: &'a HashMap<String, Tensor>,
    key: &str,
) -> candle::Result<&'a Tensor> {
    state.get(key).ok_or_else(|| {
        candle::Error::Msg(format!(
            "{op}: state entry `{key}` is missing; load a state saved by {op} for the same parameters"
        ))
    })
}

/// A tensor entry that must match `like`'s shape, moved to its device as `dtype`.
pub(crate) fn get_like(
    op: &str,
    state: &HashMap<String, Tensor>,
    key: &str,
    like: &Tensor,
    dtype: DType,
) -> candle::Result<Tensor> {
    let t = get(op, state, key)?;
    if t.dims() != like.dims() {
        candle::bail!(
            "{op}: state entry `{key}` has shape {:?} but the parameter has shape {:?}; the parameters differ from the saved run",
            t.dims(),
            like.dims()
        )
    }
    // `copy` so the loaded state never aliases the caller's map.
    t.to_device(like.device())?.to_dtype(dtype)?.copy()
}

/// Checks the saved parameter count against the current one.
pub(crate) fn check_count(
    op: &str,
    state: &HashMap<String, Tensor>,
    n: usize,
) -> candle::Result<()> {
    let saved = get_count(op, state, "num_params")?;
    if saved != n {
        candle::bail!(
            "{op}: the state holds {saved} parameters but the optimizer has {n}; build it over the same vars in the same order"
        )
    }
    Ok(())
}

/// The dtype in which optimizer state and arithmetic live for a parameter dtype:
/// f64 stays f64, everything else (f32, f16, bf16) uses f32.
pub(crate) fn compute_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}
