//! keel-gpu-suite: the one binary of keel's GPU bundle (`cargo xtask gpu-bundle`).
//!
//! ```text
//! keel-gpu-suite test  [SUITE..]   CUDA correctness: CUDA vs CPU vs the composed reference,
//!                                   PASS/FAIL per case, exit code 1 on any failure
//! keel-gpu-suite bench [SUITE..]   GPU benchmarks as JSON lines on stdout
//! keel-gpu-suite list              the suites
//! ```
//! Suites: `gn` (fused GroupNorm(+SiLU)), `conv` (conv2d on cuDNN), `det` (keel-det's ops). A new suite (e.g. conv2d) is one module
//! with a `test` and a `bench` function and one entry in [`SUITES`].
//!
//! `test` sets `KEEL_CUDA_POISON_OUTPUTS=1` (read by keel-kernels' CUDA launch code) so that
//! every output buffer is filled with NaN before the kernels run: an element a kernel does
//! not write fails the comparison.

mod conv;
mod det;
mod gn;
mod util;

use anyhow::{bail, Result};
use candle::Device;

/// A suite: name, correctness test (returns the number of failed cases), benchmark.
struct Suite {
    name: &'static str,
    about: &'static str,
    test: fn(&Device) -> Result<usize>,
    bench: fn(&Device, &util::BenchOpts) -> Result<()>,
}

const SUITES: &[Suite] = &[
    Suite {
        name: "gn",
        about: "fused GroupNorm(+SiLU) forward/backward vs CPU, composed reference, candle_nn",
        test: gn::test,
        bench: gn::bench,
    },
    Suite {
        name: "conv",
        about: "conv2d forward/dx/dw/dbias vs CPU (cuDNN), keel vs candle bench",
        test: conv::test,
        bench: conv::bench,
    },
    Suite {
        name: "det",
        about: "keel-det box IoU/GIoU, focal/GIoU losses (values, grads) and NMS vs CPU",
        test: det::test,
        bench: det::bench,
    },
];

const USAGE: &str = "usage: keel-gpu-suite (test|bench|list) [SUITE..] [--iters N] [--quick]";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first().cloned() else {
        bail!("{USAGE}");
    };
    let mut names = Vec::new();
    let mut opts = util::BenchOpts::default();
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--iters" => {
                let v = it.next().map(|s| s.parse::<usize>());
                match v {
                    Some(Ok(n)) if n > 0 => opts.iters = n,
                    _ => bail!("--iters needs a positive integer\n{USAGE}"),
                }
            }
            "--quick" => opts.quick = true,
            s if s.starts_with("--") => bail!("unknown option {s}\n{USAGE}"),
            s => names.push(s.to_string()),
        }
    }
    let selected: Vec<&Suite> = if names.is_empty() {
        SUITES.iter().collect()
    } else {
        let mut v = Vec::new();
        for n in &names {
            match SUITES.iter().find(|s| s.name == n) {
                Some(s) => v.push(s),
                None => bail!("unknown suite `{n}`; run `keel-gpu-suite list`"),
            }
        }
        v
    };
    match cmd.as_str() {
        "list" => {
            for s in SUITES {
                println!("{:8} {}", s.name, s.about);
            }
            Ok(())
        }
        "test" => {
            // Set before any other thread exists (the device, rayon) is created.
            std::env::set_var("KEEL_CUDA_POISON_OUTPUTS", "1");
            let dev = Device::new_cuda(0)?;
            let mut failed = 0;
            keel_kernels::prepare_device(&dev)?;
            match keel_kernels::cuda_pool_release_threshold(&dev)? {
                Some(u64::MAX) => {
                    println!("memory pool: release threshold u64::MAX (freed memory kept)")
                }
                other => {
                    println!("memory pool: FAIL release threshold {other:?}, expected u64::MAX");
                    failed += 1;
                }
            }
            for s in &selected {
                println!("== suite {}: {}", s.name, s.about);
                failed += (s.test)(&dev)?;
            }
            if failed > 0 {
                println!("RESULT: FAIL ({failed} case(s) failed)");
                std::process::exit(1);
            }
            println!("RESULT: PASS");
            Ok(())
        }
        "bench" => {
            let dev = Device::new_cuda(0)?;
            keel_kernels::prepare_device(&dev)?;
            util::bench_copy(&dev, &opts)?;
            for s in &selected {
                (s.bench)(&dev, &opts)?;
            }
            Ok(())
        }
        other => bail!("unknown command `{other}`\n{USAGE}"),
    }
}
