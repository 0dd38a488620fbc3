//! PyTorch parity of keel-norm's layers: forward values and the gradients of the input and of
//! every parameter, against fixtures written by `tests/fixtures/gen_norm.py` (torch 2.15,
//! float64 maths on float32-rounded inputs). Each case's loss is `sum(y * dy)` for a random
//! `dy`, so the gradients are those of `dy` pulled back through the layer.
//!
//! Generating Python, in short (see the script for every case):
//! ```python
//! y = F.group_norm(x, groups, w, b, eps=1e-5); y = F.silu(y)  # _silu cases
//! y = torchvision.ops.FrozenBatchNorm2d(c, eps)(x)             # eps 1e-5 and 0
//! bn = nn.BatchNorm2d(6, momentum=0.1).train(); y = bn(x)       # two steps, then eval
//! y = F.conv2d(x, ws_mmcv(w) or ws_timm(w), b, stride, pad, dil, groups)
//! (y * dy).sum().backward()
//! ```
mod common;

use candle::{DType, Module, ModuleT, Tensor, Var};
use candle_nn::Conv2dConfig;
use common::{fixtures, get};
use keel_norm::{FrozenBatchNorm2d, GroupNorm, WsConfig, WsConv2d};
use keel_test_support::{assert_close, Tol};

const GN_CASES: [&str; 6] = [
    "gn_c48_g6",
    "gn_one_channel_per_group",
    "gn_hw1",
    "gn_odd_c30_g10",
    "gn_far_mean",
    "gn_rank5",
];

/// The fixture key of a case: f16/bf16 cases hold inputs already rounded to that dtype and
/// the exact (f64) result on them, so the comparison measures the kernel, not input rounding.
fn gn_key(case: &str, silu: bool, dtype: DType) -> String {
    let suffix = match dtype {
        DType::F16 => "_f16",
        DType::BF16 => "_bf16",
        _ => "",
    };
    format!("{case}{}{suffix}", if silu { "_silu" } else { "" })
}

/// Runs GroupNorm (or GroupNorm + SiLU) on a fixture in `dtype` and returns
/// (y, dx, dweight, dbias) as f32.
fn run_gn(case: &str, silu: bool, dtype: DType) -> anyhow::Result<[Tensor; 4]> {
    let fx = fixtures();
    let key = gn_key(case, silu, dtype);
    let g = |n: &str| get(&fx, &key, n).to_dtype(dtype);
    let x = Var::from_tensor(&g("x")?)?;
    let w = Var::from_tensor(&g("weight")?)?;
    let b = Var::from_tensor(&g("bias")?)?;
    let groups = get(&fx, &key, "groups").to_vec1::<f32>()?[0] as usize;
    let c = x.dim(1)?;
    let gn = GroupNorm::new(
        w.as_tensor().clone(),
        b.as_tensor().clone(),
        c,
        groups,
        1e-5,
    )?;
    let y = if silu {
        gn.forward_silu(x.as_tensor())?
    } else {
        gn.forward(x.as_tensor())?
    };
    assert_eq!(y.dtype(), dtype, "output keeps the input dtype");
    let loss = (y.to_dtype(DType::F32)? * get(&fx, &key, "dy"))?.sum_all()?;
    let grads = loss.backward()?;
    let grad = |v: &Var| -> anyhow::Result<Tensor> {
        let t = grads
            .get(v)
            .ok_or_else(|| anyhow::anyhow!("{case}: no gradient"))?;
        Ok(t.to_dtype(DType::F32)?)
    };
    Ok([y.to_dtype(DType::F32)?, grad(&x)?, grad(&w)?, grad(&b)?])
}

fn check_gn(dtype: DType, tol: Tol, grad_tol: Tol) -> anyhow::Result<()> {
    let fx = fixtures();
    for case in GN_CASES {
        if dtype != DType::F32 && case == "gn_far_mean" {
            // Mean 1e3 with std 1 cannot even be represented in f16/bf16 (a ulp of 1000 is
            // 0.5 and 8): the input is quantized before the layer sees it. f32 covers it.
            continue;
        }
        for silu in [false, true] {
            let key = gn_key(case, silu, dtype);
            let [y, dx, dw, db] = run_gn(case, silu, dtype)?;
            let what = |n: &str| format!("{key} {dtype:?} {n}");
            let want = |n: &str| get(&fx, &key, n);
            let ey = assert_close(&what("y"), &y, &want("y"), tol);
            let edx = assert_close(&what("dx"), &dx, &want("dx"), grad_tol);
            // dweight/dbias sum over N*H*W elements: scale the tolerance with the count.
            let n = (dx.elem_count() / dw.elem_count()) as f64;
            let red_tol = grad_tol.scale_atol(n.sqrt());
            let edw = assert_close(&what("dweight"), &dw, &want("dweight"), red_tol);
            let edb = assert_close(&what("dbias"), &db, &want("dbias"), red_tol);
            // Printed with --nocapture: the measured errors behind the parity claim.
            eprintln!(
                "{key}: max abs err y {ey:.2e} dx {edx:.2e} dweight {edw:.2e} dbias {edb:.2e}"
            );
        }
    }
    Ok(())
}

#[test]
fn group_norm_f32_matches_pytorch() -> anyhow::Result<()> {
    check_gn(DType::F32, Tol::new(1e-4, 1e-4), Tol::new(1e-3, 1e-4))
}

#[test]
fn group_norm_f16_matches_pytorch() -> anyhow::Result<()> {
    check_gn(DType::F16, Tol::new(2e-3, 2e-3), Tol::F16)
}

#[test]
fn group_norm_bf16_matches_pytorch() -> anyhow::Result<()> {
    check_gn(DType::BF16, Tol::new(1e-2, 1e-2), Tol::BF16)
}

#[test]
fn frozen_batch_norm_matches_torchvision() -> anyhow::Result<()> {
    let fx = fixtures();
    for case in ["frozen_bn_eps1e-5", "frozen_bn_eps0"] {
        let g = |n: &str| get(&fx, case, n);
        let eps = g("eps").to_vec1::<f32>()?[0] as f64;
        // Fully frozen: output and input gradient.
        let x = Var::from_tensor(&g("x"))?;
        let bn = FrozenBatchNorm2d::new(
            g("weight"),
            g("bias"),
            g("running_mean"),
            g("running_var"),
            eps,
        )?;
        assert!(!bn.is_affine_trainable());
        let y = bn.forward(x.as_tensor())?;
        assert_close(&format!("{case} y"), &y, &g("y"), Tol::new(1e-5, 1e-5));
        let grads = (&y * g("dy"))?.sum_all()?.backward()?;
        assert_close(
            &format!("{case} dx"),
            grads.get(&x).unwrap(),
            &g("dx"),
            Tol::new(1e-5, 1e-5),
        );
        // Trainable affine: weight and bias receive the same gradients as in PyTorch.
        let w = Var::from_tensor(&g("weight"))?;
        let b = Var::from_tensor(&g("bias"))?;
        let bn = FrozenBatchNorm2d::new_trainable_affine(
            w.as_tensor().clone(),
            b.as_tensor().clone(),
            g("running_mean"),
            g("running_var"),
            eps,
        )?;
        let y = bn.forward(x.as_tensor())?;
        assert_close(
            &format!("{case} trainable y"),
            &y,
            &g("y"),
            Tol::new(1e-5, 1e-5),
        );
        let grads = (&y * g("dy"))?.sum_all()?.backward()?;
        assert_close(
            &format!("{case} dweight"),
            grads.get(&w).unwrap(),
            &g("dweight"),
            Tol::new(1e-5, 1e-4),
        );
        assert_close(
            &format!("{case} dbias"),
            grads.get(&b).unwrap(),
            &g("dbias"),
            Tol::new(1e-5, 1e-4),
        );
    }
    Ok(())
}

/// candle-nn's BatchNorm train step (output, gradients, momentum-0.1 running mean and
/// unbiased running variance) and its eval forward, against torch.nn.BatchNorm2d.
#[test]
fn candle_batch_norm_train_step_matches_pytorch() -> anyhow::Result<()> {
    let fx = fixtures();
    let g = |n: &str| get(&fx, "bn_train", n);
    let w = Var::from_tensor(&g("weight"))?;
    let b = Var::from_tensor(&g("bias"))?;
    let bn = candle_nn::BatchNorm::new_with_momentum(
        6,
        g("running_mean0"),
        g("running_var0"),
        w.as_tensor().clone(),
        b.as_tensor().clone(),
        1e-5,
        0.1,
    )?;
    for step in 0..2 {
        let s = |n: &str| g(&format!("step{step}.{n}"));
        let x = Var::from_tensor(&s("x"))?;
        let y = bn.forward_t(x.as_tensor(), true)?;
        assert_close(
            &format!("bn step{step} y"),
            &y,
            &s("y"),
            Tol::new(1e-4, 1e-5),
        );
        let grads = (&y * s("dy"))?.sum_all()?.backward()?;
        assert_close(
            &format!("bn step{step} dx"),
            grads.get(&x).unwrap(),
            &s("dx"),
            Tol::new(1e-3, 1e-5),
        );
        assert_close(
            &format!("bn step{step} dweight"),
            grads.get(&w).unwrap(),
            &s("dweight"),
            Tol::new(1e-4, 1e-4),
        );
        assert_close(
            &format!("bn step{step} dbias"),
            grads.get(&b).unwrap(),
            &s("dbias"),
            Tol::new(1e-4, 1e-4),
        );
        assert_close(
            &format!("bn step{step} running_mean"),
            bn.running_mean(),
            &s("running_mean"),
            Tol::new(1e-5, 1e-6),
        );
        assert_close(
            &format!("bn step{step} running_var"),
            bn.running_var(),
            &s("running_var"),
            Tol::new(1e-5, 1e-6),
        );
    }
    let y = bn.forward_t(&g("eval.x"), false)?;
    assert_close("bn eval y", &y, &g("eval.y"), Tol::new(1e-5, 1e-5));
    Ok(())
}

#[test]
fn ws_conv2d_matches_mmcv_and_timm() -> anyhow::Result<()> {
    let fx = fixtures();
    for base in ["ws_3x3", "ws_strided_grouped", "ws_1x1_dilated"] {
        for (conv, ws) in [("mmcv", WsConfig::mmcv()), ("timm", WsConfig::timm())] {
            let case = format!("{base}_{conv}");
            let g = |n: &str| get(&fx, &case, n);
            let cfg = g("config").to_vec1::<f32>()?;
            let (stride, padding, dilation, groups, has_bias) = (
                cfg[0] as usize,
                cfg[1] as usize,
                cfg[2] as usize,
                cfg[3] as usize,
                cfg[4] > 0.5,
            );
            let x = Var::from_tensor(&g("x"))?;
            let w = Var::from_tensor(&g("weight"))?;
            let b = Var::from_tensor(&g("bias"))?;
            let conv_cfg = Conv2dConfig {
                padding,
                stride,
                dilation,
                groups,
                cudnn_fwd_algo: None,
            };
            let layer = WsConv2d::new(
                w.as_tensor().clone(),
                has_bias.then(|| b.as_tensor().clone()),
                conv_cfg,
                ws,
            )?;
            let y = layer.forward(x.as_tensor())?;
            assert_close(&format!("{case} y"), &y, &g("y"), Tol::new(1e-4, 1e-4));
            let grads = (&y * g("dy"))?.sum_all()?.backward()?;
            assert_close(
                &format!("{case} dx"),
                grads.get(&x).unwrap(),
                &g("dx"),
                Tol::new(1e-4, 1e-4),
            );
            assert_close(
                &format!("{case} dweight"),
                grads.get(&w).unwrap(),
                &g("dweight"),
                Tol::new(1e-3, 1e-4),
            );
            if has_bias {
                assert_close(
                    &format!("{case} dbias"),
                    grads.get(&b).unwrap(),
                    &g("dbias"),
                    Tol::new(1e-4, 1e-4),
                );
            } else {
                assert!(grads.get(&b).is_none());
            }
        }
    }
    Ok(())
}
