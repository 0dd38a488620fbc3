//! Helpers of the CLI tests that run seg_train (include with `mod common;` next to
//! `#[path = "../examples/seg_train/main.rs"] mod seg_train;` at the test crate's root).
//!
//! Cargo builds no binary for examples that tests could run, so a test crate compiles the
//! example's modules itself and calls `cli::run(args)`, the binary's entry point. Where a
//! real process is needed (signals, the exit code), the test binary re-executes itself with
//! `--exact child_process` and the arguments in `SEG_TRAIN_CHILD_ARGS`; the crate's
//! `child_process` test calls [`child_main`], which runs seg_train and exits like the binary.
#![allow(dead_code)] // reason: each test crate uses a subset

use std::path::Path;
use std::process::Command;

use crate::seg_train::cli;

/// A fresh temp path for this process and `name` (removed if it exists, and again when the
/// test ends, also when it fails).
pub fn tmp(name: &str) -> keel_test_support::TempPath {
    keel_test_support::TempPath::new("keel-seg", name)
}

/// Tiny, fast settings for a CPU smoke run.
pub fn tiny(out: &Path, steps: usize) -> Vec<String> {
    let s = format!(
        "seg_train --quiet --device cpu --norm gn --width 4 --fpn 8 --image-size 32 --train-size 16 --val-size 8 \
         --batch-size 2 --steps {steps} --warmup-steps 2 --lr 0.05 --eval-every 10 --ckpt-every 10 --keep-last 2 --out {}",
        out.display()
    );
    s.split_whitespace().map(String::from).collect()
}

/// Sets flag `k` to `v` in `args` (replacing its value, or appending both).
pub fn set(args: &mut Vec<String>, k: &str, v: &str) {
    match args.iter().position(|a| a == k) {
        Some(i) => args[i + 1] = v.to_string(),
        None => args.extend([k.to_string(), v.to_string()]),
    }
}

/// seg_train's entry point, in this process.
pub fn run_cli(args: &[String]) -> anyhow::Result<()> {
    cli::run(args.to_vec())
}

/// The records of a run's log.jsonl of `kind` ("step", "eval").
pub fn log_records(out: &Path, kind: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(out.join("log.jsonl")).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == kind)
        .collect()
}

/// A float of a log or summary record in keel's lossless encoding (a number, "NaN", "inf").
pub fn lossless(v: &serde_json::Value) -> f64 {
    match v {
        serde_json::Value::String(s) => match s.as_str() {
            "NaN" => f64::NAN,
            "inf" => f64::INFINITY,
            "-inf" => f64::NEG_INFINITY,
            other => panic!("not a lossless float: {other}"),
        },
        v => v.as_f64().unwrap_or_else(|| panic!("not a float: {v}")),
    }
}

/// The step records of a run's log.jsonl: (step, loss).
pub fn step_losses(out: &Path) -> Vec<(u64, f64)> {
    log_records(out, "step")
        .iter()
        .map(|v| (v["step"].as_u64().unwrap(), lossless(&v["loss"])))
        .collect()
}

/// The body of the `child_process` test: runs seg_train with `SEG_TRAIN_CHILD_ARGS` and
/// exits with the binary's code; a no-op in a normal test run.
pub fn child_main() {
    if let Ok(args) = std::env::var("SEG_TRAIN_CHILD_ARGS") {
        let args: Vec<String> = serde_json::from_str(&args).unwrap();
        // As the binary's main: the trainer on rayon's pool.
        let code = match keel::train::threads::try_run_on_pool(|| cli::run(args)) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("seg_train: error: {e:#}");
                keel::train::driver::exit_code(e.as_ref())
            }
        };
        std::process::exit(code);
    }
}

/// This test binary re-executed as seg_train with `args` and the environment `env`.
pub fn child_env(args: &[String], env: &[(&str, &str)]) -> Command {
    let mut c = child(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

/// `args` with `extra` appended.
pub fn with(mut args: Vec<String>, extra: &[&str]) -> Vec<String> {
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// This test binary re-executed as seg_train with `args`.
pub fn child(args: &[String]) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args([
        "--exact",
        "child_process",
        "--nocapture",
        "--test-threads",
        "1",
    ]);
    c.env("SEG_TRAIN_CHILD_ARGS", serde_json::to_string(args).unwrap());
    c
}

/// `seg_train --resume out` on the CPU, in this process.
pub fn resume(out: &Path) -> anyhow::Result<()> {
    run_cli(&[
        "seg_train".into(),
        "--quiet".into(),
        "--device".into(),
        "cpu".into(),
        "--resume".into(),
        out.display().to_string(),
    ])
}

/// Asserts that a resumed run logged `steps` steps with the uninterrupted run's losses, bit
/// for bit.
pub fn assert_same_losses(want: &[(u64, f64)], got: &[(u64, f64)], steps: usize) {
    assert_eq!(got.len(), steps, "log after resume: {got:?}");
    for ((sa, xa), (sb, xb)) in want.iter().zip(got) {
        assert_eq!(sa, sb);
        assert_eq!(
            xa.to_bits(),
            xb.to_bits(),
            "step {sa}: loss {xa} uninterrupted vs {xb} resumed"
        );
    }
}
