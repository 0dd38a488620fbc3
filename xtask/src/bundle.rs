//! `cargo xtask gpu-bundle`: everything one device call needs, in `.bundle/` (git-ignored):
//! the stripped, xz-compressed `--features cuda` (CUDA + cuDNN) release builds of
//! `keel-gpu-suite` and the `seg_train` and `det_train` examples (see [`BINS`]; built with the pinned
//! toolchain, CARGO_TARGET_DIR=target/cuda) and the GPU machine's scripts from
//! `crates/keel-gpu-suite/scripts/` (see [`SCRIPTS`]). Prints the exact device command.

use crate::{cuda_env, root, run_cmd, step};
use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::process::Command;

/// The binaries of the bundle: (file name, cargo build target args, path under
/// `target/cuda/release`).
const BINS: [(&str, &[&str], &str); 3] = [
    (
        "keel-gpu-suite",
        &["-p", "keel-gpu-suite", "--bin", "keel-gpu-suite"],
        "keel-gpu-suite",
    ),
    (
        "seg_train",
        &["-p", "keel", "--example", "seg_train"],
        "examples/seg_train",
    ),
    (
        "det_train",
        &["-p", "keel", "--example", "det_train"],
        "examples/det_train",
    ),
];
/// Where the GPU machine's scripts live, beside the suite they serve.
const SCRIPTS_DIR: &str = "crates/keel-gpu-suite/scripts";
/// Files of [`SCRIPTS_DIR`] copied next to the binaries.
const SCRIPTS: [&str; 7] = [
    "run.sh",
    "torch_gn_bench.py",
    "report.py",
    "torch_conv_bench.py",
    "report_conv.py",
    "report_all.py",
    "compare_runs.py",
];

/// The paths of [`SCRIPTS`], checked to exist: a moved script fails here, before the
/// long release build, not after it.
fn script_paths() -> Result<Vec<std::path::PathBuf>> {
    let dir = root().join(SCRIPTS_DIR);
    SCRIPTS
        .iter()
        .map(|s| {
            let p = dir.join(s);
            anyhow::ensure!(p.is_file(), "gpu-bundle: {} is missing", p.display());
            Ok(p)
        })
        .collect()
}

pub(crate) fn run() -> Result<()> {
    let root = root();
    let scripts = script_paths()?;
    let bundle = root.join(".bundle");
    let target = root.join("target/cuda");
    for (name, args, _) in BINS {
        step(
            &format!(
                "pinned CUDA toolchain (+ cuDNN) + cargo build --release --features cuda {}",
                args.join(" ")
            ),
            || {
                // cuDNN wheels too: `cuda` includes keel's cuDNN convolutions.
                std::env::set_var("WITH_CUDNN", "1");
                let env = cuda_env()?;
                run_cmd(
                    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                        .args(["build", "--release", "--features", "cuda"])
                        .args(args)
                        .envs(env)
                        .env("CARGO_TARGET_DIR", &target),
                )
                .with_context(|| format!("building {name}"))
            },
        )?;
    }
    step("strip + xz into .bundle/", || {
        if bundle.exists() {
            std::fs::remove_dir_all(&bundle).context("clearing .bundle/")?;
        }
        std::fs::create_dir_all(&bundle)?;
        let mut manifest = String::new();
        for (name, _, path) in BINS {
            manifest += &pack(&target.join("release").join(path), &bundle, name)?;
        }
        for (s, path) in SCRIPTS.iter().zip(&scripts) {
            std::fs::copy(path, bundle.join(s))
                .with_context(|| format!("copying {}", path.display()))?;
        }
        let commit = Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .current_dir(&root)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let dirty = Command::new("git")
            .args(["status", "--porcelain", "--untracked-files=no"])
            .current_dir(&root)
            .output()
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(false);
        manifest += &format!(
            "git={commit}{}\n",
            if dirty {
                " (working tree had uncommitted changes)"
            } else {
                ""
            }
        );
        std::fs::write(bundle.join("MANIFEST"), manifest)?;
        Ok(())
    })?;
    println!(
        "\nGPU bundle ready in .bundle/. On the GPU machine run (device tool):\n  run(command=\"bash .bundle/run.sh\", carry=[\".bundle\"], timeout_s=540)\nIt runs the CUDA correctness suites, the GN/conv benchmarks against candle and PyTorch, seg_train's and det_train's steps against their PyTorch twins, a killed-and-resumed seg_train run, then prints one ratio table."
    );
    Ok(())
}

/// Copies `bin` to `bundle/name`, strips and xz-compresses it; returns its MANIFEST line.
fn pack(bin: &std::path::Path, bundle: &std::path::Path, name: &str) -> Result<String> {
    let dst = bundle.join(name);
    std::fs::copy(bin, &dst).with_context(|| format!("copying {}", bin.display()))?;
    run_cmd(Command::new("strip").arg("--strip-all").arg(&dst))?;
    let stripped = std::fs::metadata(&dst)?.len();
    let hash: String = Sha256::digest(std::fs::read(&dst)?)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    run_cmd(Command::new("xz").args(["-6", "-T1", "-f"]).arg(&dst))?;
    let xz = std::fs::metadata(bundle.join(format!("{name}.xz")))?.len();
    eprintln!(
        "bundle: {name} stripped {:.1} MiB -> {:.1} MiB xz",
        stripped as f64 / 1048576.0,
        xz as f64 / 1048576.0
    );
    Ok(format!(
        "binary={name} sha256(stripped)={hash} stripped_bytes={stripped} xz_bytes={xz}\n"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gpu_scripts_and_the_toolchain_installer_are_where_xtask_looks() {
        assert_eq!(script_paths().unwrap().len(), SCRIPTS.len());
        assert!(root().join(crate::SETUP_NVCC).is_file());
    }
}
