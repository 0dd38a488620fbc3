//! seg_train `--log-every N` (the windowed step, issue 9 section 3): a run that reads its
//! scalars once per window logs, monitors, rolls back and ends exactly like the run that
//! reads every step; `seg_train bench` times windows, with the `--amp` copy cast once per
//! optimizer step.
use std::collections::HashMap;
use std::path::Path;

#[allow(dead_code)] // reason: the binary's `main` and items only the binary uses
#[path = "../examples/seg_train/main.rs"]
mod seg_train;

mod common;

use candle::{DType, Device, Tensor};
use common::seg_cli::{child_main, log_records, run_cli, set, tiny, tmp};

/// Entry point of the re-executed test binary (a no-op in a normal test run).
#[test]
fn child_process() {
    child_main();
}

/// Every tensor of the final checkpoint (weights, optimizer state), as f32 bits.
fn final_checkpoint(out: &Path, steps: usize) -> anyhow::Result<HashMap<String, Vec<u32>>> {
    let path = out.join(format!("checkpoints/ckpt-{steps:08}.safetensors"));
    let tensors = candle::safetensors::load(&path, &Device::Cpu)?;
    let mut bits = HashMap::new();
    for (k, t) in tensors {
        let t: Tensor = t.to_dtype(DType::F32)?.flatten_all()?;
        bits.insert(k, t.to_vec1::<f32>()?.iter().map(|x| x.to_bits()).collect());
    }
    Ok(bits)
}

/// The log's step records without their wall time.
fn steps_logged(out: &Path) -> Vec<serde_json::Value> {
    let mut v = log_records(out, "step");
    for r in v.iter_mut() {
        r.as_object_mut().unwrap().remove("seconds");
    }
    v
}

/// An LR burst diverges a tiny run mid-way; with `--log-every 7` the guard reads it in the
/// middle of a window, rolls back, drops the rest of the window and rewinds the loader. Every
/// step record, rollback, eval and the final checkpoint equal the per-step run's, bit for
/// bit.
#[test]
fn log_every_gives_the_per_step_run() -> anyhow::Result<()> {
    let steps = 40;
    let run = |name: &str, log_every: &str| -> anyhow::Result<keel_test_support::TempPath> {
        let out = tmp(name);
        let mut args = tiny(&out, steps);
        set(&mut args, "--warmup-steps", "0");
        set(&mut args, "--eval-every", "20");
        set(&mut args, "--fault", "lr-burst@20");
        set(&mut args, "--log-every", log_every);
        run_cli(&args)?;
        Ok(out)
    };
    let a = run("win-1", "1")?;
    let b = run("win-7", "7")?;
    let guard = log_records(&a, "guard");
    assert!(!guard.is_empty(), "the burst was not rolled back");
    let alarm = guard[0]["step"].as_u64().unwrap() as usize;
    assert!(
        !(alarm + 1).is_multiple_of(7) && !(alarm + 1).is_multiple_of(10),
        "the alarm (step {alarm}) should fall inside a window"
    );
    assert_eq!(guard, log_records(&b, "guard"));
    let (sa, sb) = (steps_logged(&a), steps_logged(&b));
    assert_eq!(
        sa.len(),
        steps,
        "one record per step, none of the discarded launches"
    );
    assert_eq!(sa, sb);
    assert_eq!(log_records(&a, "eval"), log_records(&b, "eval"));
    assert_eq!(final_checkpoint(&a, steps)?, final_checkpoint(&b, steps)?);
    for out in [a, b] {
        std::fs::remove_dir_all(out)?;
    }
    Ok(())
}

/// `seg_train bench --log-every 2` times windows of launched steps (f16 with a GradScaler,
/// 4 micro-batches per step) and reports a time per step; a zero `--log-every` counts as 1.
#[test]
fn bench_times_windows() -> anyhow::Result<()> {
    let dir = tmp("bench-window");
    std::fs::create_dir_all(&dir)?;
    for log_every in ["2", "0"] {
        let json = dir.join(format!("bench-{log_every}.json"));
        let args: Vec<String> = format!(
            "seg_train bench --device cpu --width 4 --fpn 8 --image-size 32 --batch-size 1 --warmup 1 --steps 4 \
             --amp f16 --accum-steps 4 --log-every {log_every} --json {}",
            json.display()
        )
        .split_whitespace()
        .map(String::from)
        .collect();
        run_cli(&args)?;
        let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
        let (median, min) = (&report["keel"]["median_ms"], &report["keel"]["min_ms"]);
        let (median, min) = (median.as_f64().unwrap(), min.as_f64().unwrap());
        assert!(
            median.is_finite() && min > 0.0 && min <= median,
            "{report:#}"
        );
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
