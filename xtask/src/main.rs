//! keel's developer tasks (`cargo xtask <task>`), in the style of matklad/cargo-xtask.
//!
//! - `cargo xtask ptx [--check]`: compile `kernels/cuda/*.cu` to the committed
//!   `kernels/ptx/*.ptx` with the pinned nvcc 13.0.x, or verify (no nvcc needed) that every
//!   committed PTX was generated from its current source.
//! - `cargo xtask ci [--no-cuda] [--cuda-only] [--skip STEP,..]`: the whole CI, cheapest
//!   step first.
//! - `cargo xtask gpu-bundle`: one stripped, xz-compressed `--features cuda` release binary
//!   plus the GPU machine's scripts in `.bundle/`, and the device command to run them.

mod bundle;
mod ci;
mod ptx;

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const USAGE: &str = "\
usage: cargo xtask <task> [options]

tasks:
  ptx [--check]      compile kernels/cuda/*.cu -> kernels/ptx/*.ptx with the pinned nvcc
                     13.0.x (--check: verify the committed PTX against its source, no nvcc)
  ci [options]       fmt --check, ptx --check, clippy -D warnings, test, then the cuda
                     compile check with the pinned toolchain (xtask/setup-nvcc.sh)
      --no-cuda        skip the cuda compile check
      --cuda-only      run only the cuda compile check
      --skip a,b       skip steps by name: fmt, ptx, clippy, test, cuda
  gpu-bundle         build the stripped --features cuda suite binary, xz it into .bundle/
                     with crates/keel-gpu-suite/scripts/*, and print the device `run`
                     command
";

/// The pinned CUDA build toolchain installer, relative to the repository root.
const SETUP_NVCC: &str = "xtask/setup-nvcc.sh";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(task) = args.first() else {
        eprint!("{USAGE}");
        bail!("no task given");
    };
    let rest = &args[1..];
    match task.as_str() {
        "ptx" => match rest {
            [] => ptx::build(),
            [flag] if flag == "--check" => ptx::check(),
            _ => bail!("ptx: unexpected arguments {rest:?}\n{USAGE}"),
        },
        "ci" => ci::run(rest),
        "gpu-bundle" => {
            if !rest.is_empty() {
                bail!("gpu-bundle: unexpected arguments {rest:?}\n{USAGE}");
            }
            bundle::run()
        }
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown task `{other}`\n{USAGE}"),
    }
}

/// The workspace root (the parent of this crate's manifest directory).
pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// Runs `cmd` in the workspace root, failing with its command line if it does not succeed.
pub(crate) fn run_cmd(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .current_dir(root())
        .status()
        .with_context(|| format!("could not start {shown}"))?;
    if !status.success() {
        bail!("command failed ({status}): {shown}");
    }
    Ok(())
}

/// Runs a named step, printing its name before and its duration after.
pub(crate) fn step(name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    eprintln!("\n==> {name}");
    let t = Instant::now();
    let r = f();
    let secs = t.elapsed().as_secs_f64();
    match &r {
        Ok(()) => eprintln!("<== {name}: ok in {secs:.1} s"),
        Err(e) => eprintln!("<== {name}: FAILED after {secs:.1} s: {e:#}"),
    }
    r
}

/// Installs (idempotently) the pinned CUDA 13.0 toolchain with the project's own
/// [`SETUP_NVCC`] and returns the environment it prints
/// (`export KEY="VALUE"` lines): CUDA_HOME, NVCC, PATH, CUDARC_CUDA_VERSION, CUDA_COMPUTE_CAP.
pub(crate) fn cuda_env() -> Result<Vec<(String, String)>> {
    let out = Command::new("bash")
        .arg(root().join(SETUP_NVCC))
        .current_dir(root())
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("could not run {SETUP_NVCC}"))?;
    if !out.status.success() {
        bail!("{SETUP_NVCC} failed ({})", out.status);
    }
    let text = String::from_utf8(out.stdout).context("setup-nvcc.sh printed non-UTF-8")?;
    let mut env = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let kv = line
            .strip_prefix("export ")
            .with_context(|| format!("setup-nvcc.sh: unexpected output line {line:?}"))?;
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("setup-nvcc.sh: no `=` in {line:?}"))?;
        let v = v.trim_matches('"');
        // PATH is printed as "<cuda>/bin:$PATH".
        let v = match v.strip_suffix(":$PATH") {
            Some(head) => format!("{head}:{}", std::env::var("PATH").unwrap_or_default()),
            None => v.to_string(),
        };
        env.push((k.to_string(), v));
    }
    for key in [
        "CUDA_HOME",
        "NVCC",
        "PATH",
        "CUDARC_CUDA_VERSION",
        "CUDA_COMPUTE_CAP",
    ] {
        if !env.iter().any(|(k, _)| k == key) {
            bail!("setup-nvcc.sh did not print {key}");
        }
    }
    Ok(env)
}
