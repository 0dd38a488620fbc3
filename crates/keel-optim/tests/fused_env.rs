//! `KEEL_OPTIM_FUSED` (read when an optimizer is built): `0` turns the one-pass CPU updates
//! off, `1` or unset leaves them on, anything else is an error naming the variable. Each
//! value runs in a child process (this binary re-run on `child`), so no test of another
//! binary sees it.
use candle::{Device, Var};
use candle_nn::Optimizer;
use keel_optim::{Sgd, SgdConfig};
use std::process::Command;

/// What the child checks for its `KEEL_OPTIM_FUSED`: `Ok(())` or what went wrong.
fn check(want: &str) -> Result<(), String> {
    let w = Var::new(&[1f32, -2.0, 3.0], &Device::Cpu).map_err(|e| e.to_string())?;
    let cfg = SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        ..Default::default()
    };
    let mut opt = match (Sgd::new(vec![w.clone()], cfg), want) {
        (Err(e), "error") => {
            let e = e.to_string();
            return match e.contains("KEEL_OPTIM_FUSED=\"yes\"") && e.contains("use 1") {
                true => Ok(()),
                false => Err(format!("unclear error: {e}")),
            };
        }
        (Err(e), _) => return Err(e.to_string()),
        (Ok(_), "error") => return Err("no error".into()),
        (Ok(o), _) => o,
    };
    for _ in 0..3 {
        let loss = w.as_tensor().sqr().and_then(|t| t.sum_all());
        opt.backward_step(&loss.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    // The first step builds the momentum buffer with candle ops; steps 2 and 3 are fused.
    let fused = opt.fused_updates();
    match (want, fused) {
        ("on", 2) | ("off", 0) => Ok(()),
        _ => Err(format!("want {want}, {fused} fused updates")),
    }
}

#[test]
fn child() {
    if let Ok(want) = std::env::var("FUSED_ENV_WANT") {
        if let Err(e) = check(&want) {
            eprintln!(
                "KEEL_OPTIM_FUSED={:?}: {e}",
                std::env::var("KEEL_OPTIM_FUSED")
            );
            std::process::exit(1);
        }
        std::process::exit(0);
    }
}

#[test]
fn keel_optim_fused_switches_the_one_pass_form_and_a_bad_value_is_an_error() {
    for (value, want) in [
        (None, "on"),
        (Some("1"), "on"),
        (Some("0"), "off"),
        (Some("yes"), "error"),
    ] {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "child", "--nocapture"])
            .env("FUSED_ENV_WANT", want)
            .env_remove("KEEL_OPTIM_FUSED");
        if let Some(v) = value {
            cmd.env("KEEL_OPTIM_FUSED", v);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{value:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
