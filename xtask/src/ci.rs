//! `cargo xtask ci`: the whole CI in order, cheapest step first. Every step is a command a
//! person would run by hand; `--skip`, `--no-cuda` and `--cuda-only` pick subsets.

use crate::{cuda_env, ptx, root, run_cmd, step};
use anyhow::{bail, Result};
use std::process::Command;
use std::time::Instant;

const STEPS: [&str; 6] = ["fmt", "ptx", "hostcheck", "clippy", "test", "cuda"];

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
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
    if on("fmt") {
        step("cargo fmt --all -- --check", || {
            run_cmd(cargo().args(["fmt", "--all", "--", "--check"]))
        })?;
    }
    if on("ptx") {
        step("cargo xtask ptx --check", ptx::check)?;
    }
    if on("hostcheck") {
        // The only run the CUDA kernels get without a GPU: the .cu files compiled as host
        // C++ (needs only a C++20 compiler) and checked against a float64 reference.
        step("bash kernels/cuda/host-check/run.sh", || {
            run_cmd(Command::new("bash").arg(root().join("kernels/cuda/host-check/run.sh")))
        })?;
    }
    if on("clippy") {
        step(
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
        step("cargo test --workspace", || {
            run_cmd(cargo().args(["test", "--workspace"]))
        })?;
    }
    if on("cuda") {
        step(
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
