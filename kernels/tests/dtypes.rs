//! Unsupported dtypes are errors that name the op and the dtype, on every op's CPU path
//! (never a silent conversion to f32).

use candle::{DType, Device, Tensor};
use keel_kernels::{conv2d, group_norm, group_norm_silu, Conv2dParams};

fn expect_dtype_error(what: &str, r: candle::Result<Tensor>, dtype: DType) {
    match r {
        Ok(t) => panic!(
            "{what} on {dtype:?} returned a {:?} tensor instead of an error",
            t.dtype()
        ),
        Err(e) => {
            let msg = e.to_string();
            let name = format!("{dtype:?}");
            assert!(
                msg.contains(&name) || msg.to_lowercase().contains(&name.to_lowercase()),
                "{what} on {dtype:?}: the error does not name the dtype: {msg}"
            );
        }
    }
}

#[test]
fn conv2d_rejects_unsupported_dtypes() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    for dtype in [DType::F64, DType::U8, DType::U32, DType::I64] {
        let x = Tensor::ones((1, 2, 5, 5), dtype, &dev)?;
        let w = Tensor::ones((3, 2, 3, 3), dtype, &dev)?;
        expect_dtype_error(
            "conv2d",
            conv2d(&x, &w, None, &Conv2dParams::default()),
            dtype,
        );
    }
    Ok(())
}

#[test]
fn group_norm_rejects_unsupported_dtypes() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    for dtype in [DType::F64, DType::U8, DType::U32, DType::I64] {
        let x = Tensor::ones((1, 4, 3, 3), dtype, &dev)?;
        let w = Tensor::ones(4, dtype, &dev)?;
        let b = Tensor::zeros(4, dtype, &dev)?;
        expect_dtype_error("group_norm", group_norm(&x, &w, &b, 2, 1e-5), dtype);
        expect_dtype_error(
            "group_norm_silu",
            group_norm_silu(&x, &w, &b, 2, 1e-5),
            dtype,
        );
    }
    Ok(())
}
