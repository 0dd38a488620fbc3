//! Helpers of the CLI tests that run det_train (include with
//! `#[path = "common/det_cli.rs"] mod det_cli;` next to
//! `#[path = "../examples/det_train/main.rs"] mod det_train;` at the test crate's root).
#![allow(dead_code)] // reason: each test crate uses a subset

use std::path::{Path, PathBuf};

use crate::det_train;

/// A fresh temp path for this process and `name`, removed when the test ends.
pub fn tmp(name: &str) -> keel_test_support::TempPath {
    keel_test_support::TempPath::new("keel-det", name)
}

/// Tiny, fast settings: 64-pixel images, a 0.05 M-parameter detector.
pub fn tiny(out: &Path, steps: usize, extra: &[&str]) -> Vec<String> {
    let s = format!(
        "det_train --quiet --device cpu --image-size 64 --width 4 --fpn 8 --head-convs 1 --norm gn:2 \
         --train-size 12 --val-size 4 --batch-size 2 --steps {steps} --warmup-steps 2 --eval-every 4 \
         --keep-last 3 --out {}",
        out.display()
    );
    let mut v: Vec<String> = s.split_whitespace().map(String::from).collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Runs det_train with `args` (program name first) in this process.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    det_train::cli::run(args.to_vec())
}

/// The records of `kind` ("step", "eval") of a run's log.jsonl.
pub fn records(out: &Path, kind: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(out.join("log.jsonl")).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == kind)
        .collect()
}

/// The checkpoint of `step` in run directory `dir`.
pub fn ckpt(dir: &Path, step: usize) -> PathBuf {
    dir.join(format!("checkpoints/ckpt-{step:08}.safetensors"))
}

/// Every tensor of two checkpoints (weights and optimizer state), bit for bit.
pub fn assert_same_tensors(a: &Path, b: &Path) -> anyhow::Result<()> {
    let (ta, tb) = (
        candle::safetensors::load(a, &candle::Device::Cpu)?,
        candle::safetensors::load(b, &candle::Device::Cpu)?,
    );
    let mut names: Vec<&String> = ta.keys().collect();
    names.sort();
    assert_eq!(names.len(), tb.len());
    assert!(
        names.iter().any(|n| n.contains("head.cls_logits.weight")),
        "{names:?}"
    );
    for n in names {
        let (x, y) = (&ta[n], &tb[n]);
        let flat = |t: &candle::Tensor| -> anyhow::Result<Vec<u32>> {
            let v = t
                .to_dtype(candle::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            Ok(v.iter().map(|f| f.to_bits()).collect())
        };
        assert_eq!(flat(x)?, flat(y)?, "tensor {n} differs");
    }
    Ok(())
}

/// The step losses of a run's log.jsonl as bits (an exact resume's check).
pub fn loss_bits(out: &Path) -> Vec<u64> {
    records(out, "step")
        .iter()
        .map(|s| s["loss"].as_f64().unwrap().to_bits())
        .collect()
}

/// `args` with `flag`'s value replaced (clap refuses a flag given twice).
pub fn set(mut args: Vec<String>, flag: &str, value: &str) -> Vec<String> {
    let i = args.iter().position(|a| a == flag).expect("flag in args");
    args[i + 1] = value.to_string();
    args
}
