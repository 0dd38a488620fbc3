//! `cargo xtask ci`: the whole CI in order, cheapest step first. Every step is a command a
//! person would run by hand; `--skip`, `--no-cuda` and `--cuda-only` pick subsets.

use crate::{cuda_env, ptx, root, run_cmd, step};
use anyhow::{bail, Result};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

const STEPS: [&str; 6] = ["fmt", "ptx", "hostcheck", "clippy", "test", "cuda"];

/// Cargo for CI's steps: incremental compilation off. CI builds everything once; the
/// incremental caches would only take disk (1.9 GB of the test step's build on the dev box).
/// `CARGO_INCREMENTAL` is part of cargo's fingerprint: a `cargo test` after `cargo xtask ci`
/// on a dev box rebuilds keel's own crates (not the dependencies) once.
///
/// The tests run with `CANDLE_NUM_THREADS=1` unless it is set: the test harness runs tests on
/// parallel threads, and candle's own CPU pool would spin at its barrier against them (what
/// keel's trainers avoid the same way: `keel::train::threads`).
fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.env("CARGO_INCREMENTAL", "0");
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        cmd.env("CANDLE_NUM_THREADS", "1");
    }
    cmd
}

/// Bytes under `dir` (files only, links not followed, a hard-linked file counted once, as
/// `du` does: cargo hard-links `examples/foo` to `examples/foo-<hash>`); 0 where it does not
/// exist.
fn dir_bytes(dir: &Path, seen: &mut std::collections::HashSet<(u64, u64)>) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut sum = 0;
    for e in entries.flatten() {
        match e.file_type() {
            Ok(t) if t.is_dir() => sum += dir_bytes(&e.path(), seen),
            Ok(t) if t.is_file() => {
                let Ok(m) = e.metadata() else { continue };
                #[cfg(unix)]
                {
                    use std::os::unix::fs::MetadataExt;
                    if !seen.insert((m.dev(), m.ino())) {
                        continue;
                    }
                }
                sum += m.len();
            }
            _ => {}
        }
    }
    sum
}

/// One line after each step: what `target/` holds and what the disk has left, so a CI log
/// shows where the disk went before a step runs out of it.
fn disk_line() {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    let used = dir_bytes(&target, &mut Default::default()) as f64 / 1e9;
    let free = Command::new("df")
        .args(["-Pk"])
        .arg(root())
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let kb: u64 = text
                .lines()
                .nth(1)?
                .split_whitespace()
                .nth(3)?
                .parse()
                .ok()?;
            Some(format!("{:.1} GB free", kb as f64 * 1024.0 / 1e9))
        })
        .unwrap_or_else(|| "free space unknown (df failed)".into());
    eprintln!("    disk: {} holds {used:.1} GB; {free}", target.display());
}

/// [`step`], then the disk line (also after a failed step: that is when it matters).
fn ci_step(name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    let r = step(name, f);
    disk_line();
    r
}

pub(crate) fn run(args: &[String]) -> Result<()> {
    let mut skip: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--no-cuda" => skip.push("cuda".into()),
            "--cuda-only" => skip.extend(STEPS.iter().filter(|s| **s != "cuda").map(|s| s.to_string())),
            "--skip" => match it.next() {
                Some(list) => skip.extend(list.split(',').map(|s| s.trim().to_string())),
                None => bail!("ci: --skip needs a comma-separated list of steps ({STEPS:?})"),
            },
            other => bail!("ci: unknown option `{other}` (options: --no-cuda, --cuda-only, --skip a,b; steps {STEPS:?})"),
        }
    }
    if let Some(bad) = skip.iter().find(|s| !STEPS.contains(&s.as_str())) {
        bail!("ci: unknown step `{bad}` (steps: {STEPS:?})");
    }
    let on = |s: &str| !skip.iter().any(|k| k == s);
    let t = Instant::now();
    disk_line();
    if on("fmt") {
        ci_step("cargo fmt --all -- --check", || {
            run_cmd(cargo().args(["fmt", "--all", "--", "--check"]))
        })?;
    }
    if on("ptx") {
        ci_step("cargo xtask ptx --check", ptx::check)?;
    }
    if on("hostcheck") {
        // The only run the CUDA kernels get without a GPU: the .cu files compiled as host
        // C++ (needs only a C++20 compiler) and checked against a float64 reference.
        ci_step("bash kernels/cuda/host-check/run.sh", || {
            run_cmd(Command::new("bash").arg(root().join("kernels/cuda/host-check/run.sh")))
        })?;
    }
    if on("clippy") {
        ci_step(
            "cargo clippy --workspace --all-targets -- -D warnings",
            || {
                run_cmd(cargo().args([
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ]))
            },
        )?;
    }
    if on("test") {
        ci_step("cargo test --workspace", || {
            run_cmd(cargo().args(["test", "--workspace"]))
        })?;
    }
    if on("cuda") {
        ci_step(
            "cuda compile check: WITH_CUDNN=1 xtask/setup-nvcc.sh + cargo clippy --workspace --all-targets --features cuda -- -D warnings (CARGO_TARGET_DIR=target/cuda)",
            || {
                // `cuda` includes cuDNN: the setup script installs the pinned cuDNN 9.21 wheels too.
                std::env::set_var("WITH_CUDNN", "1");
                let env = cuda_env()?;
                let mut cmd = cargo();
                cmd.args([
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--features",
                    "cuda",
                    "--",
                    "-D",
                    "warnings",
                ])
                .envs(env)
                .env("CARGO_TARGET_DIR", root().join("target/cuda"));
                run_cmd(&mut cmd)
            },
        )?;
    }
    eprintln!(
        "\nci: all selected steps passed in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
