//! Helpers shared by the CLI tests of seg_train (`tests/seg_train.rs`, `tests/seg_data.rs`,
//! `tests/seg_resume.rs`):
//! scratch directories, tiny run flags, and the re-executed child process that runs
//! seg_train's entry point like the binary.
//!
//! Each test file keeps a `#[test] fn child_process()` that calls [`child_main`]: the
//! re-executed test binary is started with `--exact child_process`.
#![allow(dead_code)] // reason: each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::Command;

/// A fresh (removed) scratch path for `name`, unique to this process.
pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("keel-seg-train-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
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

/// The body of each test binary's `child_process` test: a no-op in a normal test run; in
/// the re-executed binary, runs `run` on the arguments in `SEG_TRAIN_CHILD_ARGS` and exits
/// like seg_train's binary (error on stderr, exit code 1).
pub fn child_main(run: fn(Vec<String>) -> anyhow::Result<()>) {
    if let Ok(args) = std::env::var("SEG_TRAIN_CHILD_ARGS") {
        let args: Vec<String> = serde_json::from_str(&args).unwrap();
        let code = match run(args) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("seg_train: error: {e:#}");
                1
            }
        };
        std::process::exit(code);
    }
}

/// The test binary re-executed as seg_train with `args` (see [`child_main`]).
pub fn child(args: &[String], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args([
        "--exact",
        "child_process",
        "--nocapture",
        "--test-threads",
        "1",
    ]);
    c.env("SEG_TRAIN_CHILD_ARGS", serde_json::to_string(args).unwrap());
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

/// The records of kind `kind` ("step", "eval") of a run's log.jsonl.
pub fn records(out: &Path, kind: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == kind)
        .collect()
}

/// The step records of a run's log.jsonl: (step, loss).
pub fn step_losses(out: &Path) -> Vec<(u64, f64)> {
    records(out, "step")
        .iter()
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

/// `args` with `extra` appended.
pub fn with(mut args: Vec<String>, extra: &[&str]) -> Vec<String> {
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}
