//! Tests of the convert_checkpoint example under bad input (issue 11, item 2).
//!
//! As in tests/seg_train.rs, this test crate compiles the example itself (`#[path]`) and
//! calls `run(args)`, the binary's entry point; for the exit code and a cwd-relative `./IN`
//! the test binary re-executes itself (`--exact child_process`) with the arguments in
//! `CONVERT_CHILD_ARGS`, and the `child_process` test runs the example's `main` there.
use std::path::Path;
use std::process::Command;

#[allow(dead_code)] // reason: `main` is only called in the re-executed child
#[path = "../examples/convert_checkpoint.rs"]
mod convert_checkpoint;

use candle::{DType, Device, Tensor};
use keel::norm::convert::StateDict;
use keel_test_support::TempDir;

/// Entry point of the re-executed test binary (a no-op in a normal test run).
#[test]
fn child_process() {
    if let Ok(args) = std::env::var("CONVERT_CHILD_ARGS") {
        let args: Vec<String> = serde_json::from_str(&args).unwrap();
        let code = match convert_checkpoint::run(args) {
            Ok(summary) => {
                println!("{summary}");
                0
            }
            Err(e) => {
                eprintln!("convert_checkpoint: error: {e:#}");
                1
            }
        };
        std::process::exit(code);
    }
}

/// A torchvision-style ResNet fragment; `edit` changes it before it is written to `path`.
fn write_resnet_ish(path: &Path, edit: impl FnOnce(&mut StateDict)) {
    let dev = Device::Cpu;
    let mut sd = StateDict::new();
    let ones = |s: &[usize]| Tensor::ones(s, DType::F32, &dev).unwrap();
    sd.insert("conv1.weight".into(), ones(&[4, 3, 1, 1]));
    sd.insert("layer1.0.conv1.weight".into(), ones(&[4, 4, 1, 1]));
    for p in ["bn1", "layer1.0.bn1"] {
        for k in ["weight", "bias", "running_mean", "running_var"] {
            sd.insert(format!("{p}.{k}"), ones(&[4]));
        }
        sd.insert(
            format!("{p}.num_batches_tracked"),
            Tensor::new(3i64, &dev).unwrap(),
        );
    }
    edit(&mut sd);
    candle::safetensors::save(&sd, path).unwrap();
}

fn run(args: &[&Path]) -> anyhow::Result<String> {
    let mut v = vec!["convert_checkpoint".to_string()];
    v.extend(args.iter().map(|a| a.to_string_lossy().into_owned()));
    convert_checkpoint::run(v)
}

fn arg(s: &str) -> &Path {
    Path::new(s)
}

#[test]
fn frozen_bn_without_fold_succeeds() -> anyhow::Result<()> {
    let d = TempDir::new("frozen");
    let (input, out) = (d.0.join("in.safetensors"), d.0.join("out.safetensors"));
    write_resnet_ish(&input, |_| {});
    let summary = run(&[arg("--to"), arg("frozen-bn"), &input, &out])?;
    assert!(summary.contains("converted 2 BatchNorm(s)"), "{summary}");
    let sd = candle::safetensors::load(&out, &Device::Cpu)?;
    assert_eq!(sd.len(), 10);
    assert!(sd.contains_key("bn1.running_var") && !sd.contains_key("bn1.num_batches_tracked"));
    // --fold on one of them
    let folded = d.0.join("folded.safetensors");
    run(&[
        arg("--to"),
        arg("frozen-bn"),
        &input,
        &folded,
        arg("--fold"),
        arg("conv1=bn1"),
    ])?;
    let sd = candle::safetensors::load(&folded, &Device::Cpu)?;
    assert!(sd.contains_key("conv1.bias") && !sd.contains_key("bn1.weight"));
    assert!(sd.contains_key("layer1.0.bn1.running_var"));
    assert_eq!(
        d.names(),
        ["folded.safetensors", "in.safetensors", "out.safetensors"]
    );
    Ok(())
}

#[test]
fn bad_input_errors_and_writes_nothing() {
    let d = TempDir::new("bad");
    let (neg, partial, text) = (
        d.0.join("neg.safetensors"),
        d.0.join("partial.safetensors"),
        d.0.join("notes.safetensors"),
    );
    write_resnet_ish(&neg, |sd| {
        sd.insert(
            "bn1.running_var".into(),
            Tensor::new(&[1f32, -2., 1., 1.], &Device::Cpu).unwrap(),
        );
    });
    write_resnet_ish(&partial, |sd| {
        sd.remove("layer1.0.bn1.running_var");
    });
    std::fs::write(&text, "just some text, not tensors\n").unwrap();
    std::fs::create_dir(d.0.join("dir")).unwrap();
    let before = d.names();
    let out = d.0.join("out.safetensors");
    let (dir, same) = (d.0.join("dir"), d.0.join("./neg.safetensors"));
    let fold = [arg("--fold"), arg("conv1=bn1")];
    let cases: Vec<(Vec<&Path>, &str)> = vec![
        (
            vec![arg("--to"), arg("frozen-bn"), &neg, &out, fold[0], fold[1]],
            "bn1.running_var[1] = -2",
        ),
        (
            vec![arg("--to"), arg("gn"), &partial, &out],
            "'layer1.0.bn1' lacks layer1.0.bn1.running_var",
        ),
        (
            vec![arg("--to"), arg("gn"), &text, &out],
            "is not a safetensors file: text starting",
        ),
        (vec![arg("--to"), arg("gn"), &neg, &dir], "is a directory"),
        (
            vec![arg("--to"), arg("gn"), &neg, &same],
            "is the same file as IN",
        ),
    ];
    for (args, expected) in cases {
        let m = format!("{:#}", run(&args).expect_err("expected an error"));
        assert!(m.contains(expected), "{args:?}: {m}");
        assert_eq!(d.names(), before, "{args:?} wrote something");
    }
}

#[test]
fn relative_out_naming_the_input_fails_with_nonzero_exit() {
    let d = TempDir::new("exit");
    write_resnet_ish(&d.0.join("in.safetensors"), |_| {});
    let before = std::fs::read(d.0.join("in.safetensors")).unwrap();
    let args = [
        "convert_checkpoint",
        "--to",
        "gn",
        "in.safetensors",
        "./in.safetensors",
    ];
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("CONVERT_CHILD_ARGS", serde_json::to_string(&args).unwrap())
        .current_dir(&d.0)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is the same file as IN"), "{stderr}");
    assert_eq!(
        std::fs::read(d.0.join("in.safetensors")).unwrap(),
        before,
        "input untouched"
    );
    assert_eq!(d.names(), ["in.safetensors"]);
}
