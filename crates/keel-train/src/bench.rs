//! Step timing for benchmarks: untimed warm-up steps (allocator, caches, cuDNN algorithm
//! search), then timed steps, each ended by a device synchronize so asynchronous (CUDA)
//! work is inside its time; the median and the minimum, and the heap peak of the timed
//! steps when a [`CountingAlloc`] counts the process's allocations; [`run_twin`] runs the
//! same step in another framework (a script that prints its timing as one JSON line).
use std::path::Path;
use std::time::Instant;

use candle::Device;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::mem::CountingAlloc;
use crate::stats::median;

/// Step times of a benchmark (milliseconds) and its peak memory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    /// The median step time.
    pub median_ms: f64,
    /// The fastest step.
    pub min_ms: f64,
    /// Peak memory in MiB: for [`time_steps`], the heap bytes allocated above the level
    /// before the timed steps (CPU), the most bytes of the CUDA memory pool in use at once
    /// (CUDA), NaN when not counted (a CPU run without an allocator).
    pub peak_mib: f64,
}

/// Runs `step(i)` for `i` in `0..warmup + steps` on `device` and times the last `steps`
/// (a [`Device::synchronize`] before the first timed step and after every step). The peak
/// memory of the timed steps is measured too: on a CPU device with `alloc`, the heap bytes
/// above the level before them; on CUDA, the most bytes of the device's memory pool in use
/// at once (weights and optimizer state included, like PyTorch's
/// `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`).
///
/// ```
/// use keel_train::bench::time_steps;
/// let mut calls = 0;
/// let t = time_steps(&candle::Device::Cpu, 2, 5, None, |_| { calls += 1; Ok(()) })?;
/// assert_eq!(calls, 7);
/// assert!(t.min_ms <= t.median_ms && t.peak_mib.is_nan());
/// # Ok::<(), candle::Error>(())
/// ```
pub fn time_steps(
    device: &Device,
    warmup: usize,
    steps: usize,
    alloc: Option<&CountingAlloc>,
    mut step: impl FnMut(usize) -> candle::Result<()>,
) -> candle::Result<Timing> {
    if steps == 0 {
        candle::bail!(
            "time_steps: steps must be at least 1 (got 0); pass the number of timed steps"
        )
    }
    let mut times = Vec::with_capacity(steps);
    let mut base = 0;
    for i in 0..warmup + steps {
        if i == warmup {
            device.synchronize()?;
            base = alloc.map_or(0, CountingAlloc::reset_peak);
            keel_kernels::reset_cuda_pool_peak(device)?;
        }
        let t0 = Instant::now();
        step(i)?;
        device.synchronize()?;
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    let mib = (1u64 << 20) as f64;
    let peak_mib = match (alloc, keel_kernels::cuda_pool_peak(device)?) {
        (_, Some(bytes)) => bytes as f64 / mib,
        (Some(a), None) if device.is_cpu() => (a.peak() - base) as f64 / mib,
        _ => f64::NAN,
    };
    Ok(Timing {
        min_ms: times.iter().copied().fold(f64::INFINITY, f64::min),
        median_ms: median(times).unwrap_or(f64::NAN),
        peak_mib,
    })
}

/// A benchmark of one training step: keel's timing, optionally beside a twin's in another
/// framework (see [`run_twin`]). Serializes as the benchmark's JSON record.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// The configuration in words (model, batch, precision, device, threads).
    pub config: String,
    /// Trainable parameters of keel's model (the twin's count must match).
    pub params: usize,
    /// keel's timing; its peak memory is the heap bytes allocated above the level before the
    /// timed steps (CPU) or the CUDA memory pool's high watermark (see [`time_steps`]).
    pub keel: Timing,
    /// Images per second of keel's median step.
    pub keel_images_per_s: f64,
    /// The twin: the process's peak RSS (CPU) or the CUDA allocator's peak.
    pub torch: Option<Timing>,
    /// keel median / twin median.
    pub ratio: Option<f64>,
}

impl BenchReport {
    /// The report of `keel`'s timing at `batch` images per step, and the twin's if any.
    pub fn new(
        config: String,
        params: usize,
        batch: usize,
        keel: Timing,
        torch: Option<Timing>,
    ) -> Self {
        Self {
            keel_images_per_s: batch as f64 * 1e3 / keel.median_ms,
            ratio: torch.as_ref().map(|t| keel.median_ms / t.median_ms),
            config,
            params,
            keel,
            torch,
        }
    }

    /// The report as lines for a terminal, after `warmup` untimed and `steps` timed steps.
    ///
    /// ```
    /// use keel_train::bench::{BenchReport, Timing};
    /// let t = |ms| Timing { median_ms: ms, min_ms: ms, peak_mib: 1.0 };
    /// let r = BenchReport::new("gn batch 2".into(), 1_000_000, 2, t(20.0), Some(t(10.0)));
    /// let text = r.to_text(5, 20);
    /// assert!(text.contains("100.0 images/s") && text.ends_with("keel / torch step time: 2.00x"), "{text}");
    /// ```
    pub fn to_text(&self, warmup: usize, steps: usize) -> String {
        let mib = |v: f64| {
            if v.is_finite() {
                format!("{v:.1} MiB")
            } else {
                "not measured on CUDA yet".into()
            }
        };
        let mut lines = vec![
            format!(
                "bench: {}, {:.3} M params ({warmup} warm-up + {steps} timed steps)",
                self.config,
                self.params as f64 / 1e6,
            ),
            format!(
                "keel   step median {:.2} ms, min {:.2} ms, {:.1} images/s, heap peak above start {}",
                self.keel.median_ms,
                self.keel.min_ms,
                self.keel_images_per_s,
                mib(self.keel.peak_mib)
            ),
        ];
        if let (Some(t), Some(ratio)) = (&self.torch, self.ratio) {
            lines.push(format!(
                "torch  step median {:.2} ms, min {:.2} ms, peak {:.1} MiB (process RSS on CPU, allocator on CUDA)",
                t.median_ms, t.min_ms, t.peak_mib
            ));
            lines.push(format!("keel / torch step time: {ratio:.2}x"));
        }
        lines.join("\n")
    }
}

/// Runs `program script args..` (the twin of a benchmarked step in another framework, e.g.
/// `python3 torch_twin.py --steps 20`) and parses the last line of its stdout as JSON `T`.
/// Errors: `program` cannot start (`"cannot run {program}: ..."`), it exits non-zero (its
/// stderr is in the error), or its last line is not a `T`.
///
/// ```
/// # let script = std::env::temp_dir().join(format!("keel-twin-doc-{}.sh", std::process::id()));
/// std::fs::write(&script, "echo warming up; echo \"{\\\"median_ms\\\": $1}\"")?;
/// #[derive(serde::Deserialize)]
/// struct Out { median_ms: f64 }
/// let out: Out = keel_train::bench::run_twin("sh", &script, &["2.5".to_string()])?;
/// assert_eq!(out.median_ms, 2.5);
/// # std::fs::remove_file(&script)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn run_twin<T: DeserializeOwned>(
    program: &str,
    script: &Path,
    args: &[String],
) -> candle::Result<T> {
    let out = std::process::Command::new(program)
        .arg(script)
        .args(args)
        .output()
        .map_err(|e| candle::Error::Msg(format!("cannot run {program}: {e}")))?;
    if !out.status.success() {
        // No backtrace (`bail!` adds one under RUST_BACKTRACE): the stderr is the message.
        return Err(candle::Error::Msg(format!(
            "{program} {} failed ({}): {}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).map_err(|e| {
        candle::Error::Msg(format!(
            "{program} {}: unexpected output {line:?} ({e})",
            script.display()
        ))
    })
}

/// A twin script's JSON line (see [`run_twin`]): its timing, its model's trainable parameter
/// count and, where the twin reports them, the losses of its first steps (extra fields are
/// ignored).
#[derive(Clone, Debug, Deserialize)]
pub struct TwinOut {
    /// The twin's step timing.
    #[serde(flatten)]
    pub timing: Timing,
    /// Trainable parameters of the twin's model.
    pub params: usize,
    /// The losses of the twin's first steps, in order (empty when it reports none).
    #[serde(default)]
    pub losses: Vec<f64>,
}

/// [`run_twin`] for a [`TwinOut`], checked to have keel's `params` trainable parameters;
/// the error names the script and `model`, keel's model it no longer mirrors.
///
/// ```
/// # let script = std::env::temp_dir().join(format!("keel-twin-params-{}.sh", std::process::id()));
/// std::fs::write(&script, "echo '{\"median_ms\": 2, \"min_ms\": 1, \"peak_mib\": 0, \"params\": 7}'")?;
/// let out = keel_train::bench::run_twin_checked("sh", &script, &[], 7, "Net")?;
/// assert_eq!((out.timing.median_ms, out.losses.len()), (2.0, 0));
/// let err = keel_train::bench::run_twin_checked("sh", &script, &[], 8, "Net").unwrap_err();
/// assert!(err.to_string().contains("the twin has 7 parameters, keel's model 8"), "{err}");
/// # std::fs::remove_file(&script)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn run_twin_checked(
    program: &str,
    script: &Path,
    args: &[String],
    params: usize,
    model: &str,
) -> candle::Result<TwinOut> {
    let out: TwinOut = run_twin(program, script, args)?;
    if out.params != params {
        let name = script.file_name().unwrap_or(script.as_os_str());
        candle::bail!(
            "the twin has {} parameters, keel's model {params}: {} no longer mirrors {model}",
            out.params,
            name.to_string_lossy()
        )
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_only_the_timed_steps_and_stops_on_error() -> candle::Result<()> {
        let dev = Device::Cpu;
        let t = time_steps(&dev, 1, 3, None, |i| {
            // The warm-up step is slow; the timed ones are not.
            std::thread::sleep(std::time::Duration::from_millis(if i == 0 {
                200
            } else {
                1
            }));
            Ok(())
        })?;
        assert!(t.median_ms >= 1.0 && t.median_ms < 150.0, "{t:?}");
        assert!(t.min_ms <= t.median_ms);
        let mut seen = Vec::new();
        let err = time_steps(&dev, 0, 5, None, |i| {
            seen.push(i);
            if i == 2 {
                candle::bail!("step {i} failed")
            }
            Ok(())
        })
        .unwrap_err();
        assert_eq!(seen, vec![0, 1, 2]);
        assert!(err.to_string().starts_with("step 2 failed"), "{err}");
        let zero = time_steps(&dev, 0, 0, None, |_| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(zero.contains("steps must be at least 1"), "{zero}");
        Ok(())
    }

    #[test]
    fn heap_peak_of_the_timed_steps() -> candle::Result<()> {
        // A private counter fed by hand: the warm-up allocates 4 MiB, each timed step 2 MiB;
        // the peak is measured from the first timed step, so only the 2 MiB count.
        use std::alloc::{GlobalAlloc, Layout};
        let a = CountingAlloc::new();
        let t = time_steps(&Device::Cpu, 1, 2, Some(&a), |i| {
            let mib = if i == 0 { 4 } else { 2 };
            let layout = Layout::from_size_align(mib << 20, 8).expect("layout");
            // SAFETY: a non-zero layout; the pointer is freed at once with the same layout.
            unsafe { a.dealloc(a.alloc(layout), layout) };
            Ok(())
        })?;
        assert_eq!(t.peak_mib, 2.0);
        Ok(())
    }

    #[test]
    fn run_twin_reports_a_failing_or_missing_program() {
        let err = run_twin::<f64>("/nonexistent/python", Path::new("x.py"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("cannot run /nonexistent/python"), "{err}");
        let script = std::env::temp_dir().join(format!("keel-twin-fail-{}.sh", std::process::id()));
        std::fs::write(&script, "echo oops >&2; exit 3").unwrap();
        let err = run_twin::<f64>("sh", &script, &[]).unwrap_err().to_string();
        assert!(err.contains("failed") && err.ends_with("oops"), "{err}");
        std::fs::write(&script, "echo not-json").unwrap();
        let err = run_twin::<f64>("sh", &script, &[]).unwrap_err().to_string();
        assert!(err.contains("unexpected output \"not-json\""), "{err}");
        std::fs::remove_file(&script).unwrap();
    }
}
