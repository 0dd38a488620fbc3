//! The process-wide choice of the CPU kernels' instruction set: `KEEL_CPU_ISA` (read once,
//! so each value is tested in a child process running this binary's
//! `cpu_isa_follows_the_environment`) and `set_cpu_isa` (a global, so the tests of this
//! binary hold one lock and it lives apart from the other test binaries).
//!
//! The per-level kernels themselves are tested with explicit levels in the crate's unit tests
//! (`cpu::group_norm_isa_tests`); here the public ops run under each setting and are compared
//! with the composed reference (`Tol::F32`) and, across levels, bit for bit.

use anyhow::{bail, Result};
use candle::{Device, Tensor, Var};
use keel_kernels::{cpu_isa, group_norm_silu, group_norm_silu_slow, set_cpu_isa, CpuIsa};
use keel_test_support::{assert_close, Tol};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

/// Serializes the tests of this binary: they read or set the process-wide level.
static LOCK: Mutex<()> = Mutex::new(());

fn lock() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// What `KEEL_CPU_ISA` as this process sees it should give: `Ok(level)` or `Err(value)`.
fn expected_from_env() -> std::result::Result<CpuIsa, String> {
    match std::env::var("KEEL_CPU_ISA") {
        Err(std::env::VarError::NotPresent) => Ok(CpuIsa::best()),
        Err(std::env::VarError::NotUnicode(v)) => Err(v.to_string_lossy().into_owned()),
        Ok(v) if v.trim().is_empty() => Ok(CpuIsa::best()),
        Ok(v) => match v.parse::<CpuIsa>() {
            Ok(i) if i.is_supported() => Ok(i),
            _ => Err(v),
        },
    }
}

/// Deterministic pseudo-random values in `offset ± scale`.
fn data(len: usize, seed: u64, scale: f32, offset: f32) -> Vec<f32> {
    keel_test_support::xorshift_data(len, seed, scale, offset)
}

/// Awkward inputs x, weight, bias, dy: 17 channels per group, 5x3 spatial.
fn inputs() -> Result<[Tensor; 4]> {
    let t = |seed, scale, offset, shape: &[usize]| {
        let len = shape.iter().product();
        Tensor::from_vec(data(len, seed, scale, offset), shape, &Device::Cpu)
    };
    let x = [2, 34, 5, 3];
    Ok([
        t(1, 2.0, 0.5, &x)?,
        t(2, 0.5, 1.0, &[34])?,
        t(3, 0.5, 0.0, &[34])?,
        t(4, 1.0, 0.0, &x)?,
    ])
}

type GnFn = fn(&Tensor, &Tensor, &Tensor, usize, f64) -> candle::Result<Tensor>;

/// y, dx, dweight, dbias of `f` with loss `sum(y * dy)`, 2 groups.
fn fwd_bwd(f: GnFn, [x, w, b, dy]: &[Tensor; 4]) -> Result<[Tensor; 4]> {
    let (x, w, b) = (
        Var::from_tensor(x)?,
        Var::from_tensor(w)?,
        Var::from_tensor(b)?,
    );
    let y = f(x.as_tensor(), w.as_tensor(), b.as_tensor(), 2, 1e-5)?;
    let grads = (&y * dy)?.sum_all()?.backward()?;
    let mut out = [y.clone(), y.clone(), y.clone(), y];
    for (o, v) in out[1..].iter_mut().zip([&x, &w, &b]) {
        match grads.get(v.as_tensor()) {
            Some(g) => *o = g.clone(),
            None => bail!("no gradient"),
        }
    }
    Ok(out)
}

/// Runs the fused op under the current setting: compared with the composed reference when
/// `expected` is a level, else it must fail with the variable, the value and the CPU's levels.
fn check_op(expected: &std::result::Result<CpuIsa, String>) -> Result<Option<[Tensor; 4]>> {
    let inp = inputs()?;
    match expected {
        Ok(_) => {
            let got = fwd_bwd(group_norm_silu, &inp)?;
            let want = fwd_bwd(group_norm_silu_slow, &inp)?;
            for (k, (g, w)) in ["y", "dx", "dweight", "dbias"]
                .iter()
                .zip(got.iter().zip(&want))
            {
                assert_close(k, g, w, Tol::F32.scale_atol(4.0));
            }
            Ok(Some(got))
        }
        Err(v) => {
            let [x, w, b, _] = &inp;
            let e = match group_norm_silu(x, w, b, 2, 1e-5) {
                Ok(_) => bail!("group_norm_silu ran with KEEL_CPU_ISA={v:?}"),
                Err(e) => e.to_string(),
            };
            assert!(
                e.starts_with("group_norm_silu: KEEL_CPU_ISA=")
                    && e.contains(v.as_str())
                    && e.contains("this CPU supports base"),
                "{e}"
            );
            Ok(None)
        }
    }
}

/// Checks `cpu_isa()` and the op against `KEEL_CPU_ISA` as this process sees it; the parent
/// test below runs it in child processes with each value.
#[test]
fn cpu_isa_follows_the_environment() -> Result<()> {
    let _g = lock();
    let expected = expected_from_env();
    let got = cpu_isa();
    println!(
        "KEEL_CPU_ISA={:?}: cpu_isa() = {:?}",
        std::env::var("KEEL_CPU_ISA").ok(),
        got.as_ref()
            .map_err(|e| e.to_string().lines().next().unwrap_or_default().to_string())
    );
    match (&expected, got) {
        (Ok(want), Ok(got)) => assert_eq!(got, *want),
        (Err(v), Err(e)) => {
            let e = e.to_string();
            assert!(
                e.starts_with("cpu_isa: KEEL_CPU_ISA=") && e.contains(v.as_str()),
                "{e}"
            );
        }
        (want, got) => bail!("expected {want:?}, cpu_isa() gave {got:?}"),
    }
    check_op(&expected)?;
    Ok(())
}

#[test]
fn environment_values_in_child_processes() -> Result<()> {
    let _g = lock();
    let exe = std::env::current_exe()?;
    let best = CpuIsa::best();
    // (value, the level cpu_isa() must report, or None for an error)
    let mut cases: Vec<(&str, Option<CpuIsa>)> = vec![
        ("", Some(best)),
        ("sse9", None),
        ("avx-512", None),
        ("AVX2", CpuIsa::Avx2.is_supported().then_some(CpuIsa::Avx2)),
    ];
    for i in CpuIsa::ALL {
        cases.push((i.name(), i.is_supported().then_some(i)));
    }
    for (value, want) in cases {
        let out = Command::new(&exe)
            .args(["--exact", "cpu_isa_follows_the_environment", "--nocapture"])
            .env("KEEL_CPU_ISA", value)
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let all = format!("{stdout}{stderr}");
        assert!(
            out.status.success(),
            "KEEL_CPU_ISA={value:?}: child failed:\n{all}"
        );
        assert!(
            all.contains("1 passed"),
            "KEEL_CPU_ISA={value:?}: ran no test:\n{all}"
        );
        let line = match want {
            Some(i) => format!("cpu_isa() = Ok({i:?})"),
            None => "cpu_isa() = Err(\"cpu_isa: KEEL_CPU_ISA=".to_string(),
        };
        assert!(
            all.contains(&line),
            "KEEL_CPU_ISA={value:?}: no {line:?} in\n{all}"
        );
        println!(
            "KEEL_CPU_ISA={value:?}: {}",
            want.map_or("error".into(), |i| i.to_string())
        );
    }
    Ok(())
}

/// Resets the override when a test ends, even by a failed assertion.
struct Reset;
impl Drop for Reset {
    fn drop(&mut self) {
        let _ = set_cpu_isa(None);
    }
}

#[test]
fn set_cpu_isa_overrides_and_refuses_what_the_cpu_lacks() -> Result<()> {
    let _g = lock();
    let _reset = Reset;
    let mut base: Option<[Tensor; 4]> = None;
    for i in CpuIsa::ALL {
        if !i.is_supported() {
            let before = cpu_isa().map_err(|e| e.to_string());
            let e = match set_cpu_isa(Some(i)) {
                Ok(()) => bail!("set_cpu_isa({i}) accepted on a CPU without it"),
                Err(e) => e.to_string(),
            };
            assert!(
                e.contains("set_cpu_isa: ") && e.contains("this CPU supports base"),
                "{e}"
            );
            assert_eq!(
                cpu_isa().map_err(|e| e.to_string()),
                before,
                "changed by a refusal"
            );
            println!("set_cpu_isa({i}): refused: {e}");
            continue;
        }
        set_cpu_isa(Some(i))?;
        assert_eq!(cpu_isa()?, i);
        let got = match check_op(&Ok(i))? {
            Some(g) => g,
            None => bail!("no result"),
        };
        match &base {
            None => base = Some(got),
            Some(b) => {
                for (k, (g, w)) in ["y", "dx", "dweight", "dbias"]
                    .iter()
                    .zip(got.iter().zip(b))
                {
                    assert_close(&format!("{k}: {i} vs base"), g, w, Tol::EXACT);
                }
            }
        }
        println!("set_cpu_isa({i}): ran, bit-identical to base");
    }
    set_cpu_isa(None)?;
    assert_eq!(
        cpu_isa().map_err(|_| ()),
        expected_from_env().map_err(|_| ())
    );
    Ok(())
}
