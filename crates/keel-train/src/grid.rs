//! A grid of runs (norm x batch size x seed): the runs grouped into cells, each cell's
//! statistics across seeds as a markdown table (final mIoU mean ± std, the grad-norm p99
//! pooled over every step of every seed, the monitor's counts, the speed, the verdicts),
//! the curves as a PNG (feature `plot`), and a pool that runs the grid's jobs as child
//! processes, a few at a time ([`run_pool`]; [`run_children`] for the usual job: the
//! program itself on one saved config, see [`ChildRun`]).
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::series::{mean_std, percentile};
use crate::RunSummary;

/// One (norm, batch size) cell of the grid with its per-seed runs.
#[derive(Clone, Debug, Default)]
pub struct Cell {
    /// The row label: the norm's text form (`bn`, `gn`, `ws-gn`, ...).
    pub norm: String,
    /// The batch size.
    pub batch: usize,
    /// The runs of this cell, one per seed.
    pub runs: Vec<RunSummary>,
}

impl Cell {
    /// Groups `(norm, batch, run)` triples into cells, in order of first appearance.
    ///
    /// ```
    /// use keel_train::{grid::Cell, RunSummary};
    /// let runs = [("gn", 1), ("gn", 1), ("bn", 1)].map(|(n, b)| (n.to_string(), b, RunSummary::default()));
    /// let cells = Cell::group(runs);
    /// assert_eq!((cells.len(), cells[0].runs.len(), cells[1].norm.as_str()), (2, 2, "bn"));
    /// ```
    pub fn group(runs: impl IntoIterator<Item = (String, usize, RunSummary)>) -> Vec<Cell> {
        let mut cells: Vec<Cell> = Vec::new();
        for (norm, batch, s) in runs {
            match cells
                .iter_mut()
                .find(|c| c.norm == norm && c.batch == batch)
            {
                Some(c) => c.runs.push(s),
                None => cells.push(Cell {
                    norm,
                    batch,
                    runs: vec![s],
                }),
            }
        }
        cells
    }

    /// The table row of this cell (see [`table_md`]).
    fn row(&self) -> String {
        let runs = &self.runs;
        let mious: Vec<f64> = runs.iter().map(|r| r.final_miou).collect();
        let (m, s) = mean_std(&mious);
        let per_seed = mious
            .iter()
            .map(|v| format!("{v:.3}"))
            .collect::<Vec<_>>()
            .join(", ");
        let spikes: usize = runs.iter().map(|r| r.loss_spikes).sum();
        let norms = runs.iter().flat_map(|r| r.grad_norms.iter().copied());
        let p99 = percentile(norms.collect(), 99.0);
        let nan: usize = runs.iter().map(|r| r.nonfinite_steps).sum();
        let skipped: usize = runs.iter().map(|r| r.skipped_steps).sum();
        let sps = RunSummary::mean_seconds_per_step(runs);
        let verdicts = runs
            .iter()
            .map(|r| r.verdict.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        format!("| {} | {} | {m:.4} ± {s:.4} | {per_seed} | {spikes} | {p99:.3} | {nan} | {skipped} | {sps:.3} | {verdicts} |", self.norm, self.batch)
    }
}

/// The results table: one row per cell, statistics across its seeds, and a note on how
/// the columns are computed. `metric` names the final validation metric (each run's
/// [`RunSummary::final_miou`]: mIoU for segmentation, mAP@.5 for detection).
///
/// ```
/// use keel_train::{grid::{table_md, Cell}, RunSummary};
/// let run = |m| RunSummary { final_miou: m, grad_norms: vec![1.0, 3.0], verdict: "Healthy".into(), ..Default::default() };
/// let md = table_md(&[Cell { norm: "gn".into(), batch: 2, runs: vec![run(0.5), run(0.7)] }], "mIoU");
/// assert!(md.contains("| gn | 2 | 0.6000 ± 0.1414 | 0.500, 0.700 |"), "{md}");
/// ```
pub fn table_md(cells: &[Cell], metric: &str) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "| norm | batch | final val {metric} (mean ± std) | per seed | loss spikes (total) | grad-norm p99 | NaN/Inf steps | skipped steps | s/step | verdicts |");
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|");
    for cell in cells {
        let _ = writeln!(md, "{}", cell.row());
    }
    let _ = writeln!(
        md,
        "\nLoss spikes, NaN/Inf and skipped steps come from keel::train's StabilityMonitor; the grad-norm p99 pools every step of every seed (pre-clip global L2 norm). Every config runs the same number of optimizer steps, so batch 8 sees 8x the images of batch 1. Curves: curves.png (per batch size: training loss, moving average over 20 steps, and val {metric}, mean over seeds)."
    );
    md
}

/// The grid's curves as a PNG: one row per batch size; left the training loss (moving
/// average over 20 steps), right the validation metric named `metric` (each run's `evals`:
/// mIoU for segmentation, mAP@.5 for detection); a colour per norm; the mean over seeds;
/// the x axis `0..steps`.
#[cfg(feature = "plot")]
pub fn plot_curves(
    path: &std::path::Path,
    cells: &[Cell],
    steps: usize,
    metric: &str,
) -> candle::Result<()> {
    use crate::plot::{plot, Curve, Figure, Panel};
    use crate::series::{mean_series, moving_average};
    let mut batches: Vec<usize> = cells.iter().map(|c| c.batch).collect();
    batches.sort();
    batches.dedup();
    let mut norms: Vec<&str> = Vec::new();
    for c in cells {
        if !norms.contains(&c.norm.as_str()) {
            norms.push(&c.norm);
        }
    }
    let curve = |c: &Cell, points| Curve {
        label: c.norm.clone(),
        colour: norms.iter().position(|n| *n == c.norm).unwrap_or(0),
        points,
    };
    let mut panels = Vec::new();
    for b in batches {
        let row: Vec<&Cell> = cells.iter().filter(|c| c.batch == b).collect();
        let loss: Vec<Curve> = row
            .iter()
            .map(|c| {
                let ma = c.runs.iter().map(|r| moving_average(&r.losses, 20));
                curve(c, mean_series(ma.collect()))
            })
            .collect();
        let ymax = loss
            .iter()
            .flat_map(|c| c.points.iter().map(|p| p.1))
            .fold(0.1f64, f64::max)
            .min(10.0);
        let miou = row
            .iter()
            .map(|c| {
                let evals = c.runs.iter().map(|r| {
                    let pts = r.evals.iter().map(|&(s, m)| (s as f64, m));
                    pts.collect()
                });
                curve(c, mean_series(evals.collect()))
            })
            .collect();
        panels.push(Panel {
            title: format!("batch {b}: training loss (MA 20)"),
            y: 0.0..ymax * 1.05,
            curves: loss,
        });
        panels.push(Panel {
            title: format!("batch {b}: val {metric}"),
            y: 0.0..1.0,
            curves: miou,
        });
    }
    let fig = Figure {
        panels,
        columns: 2,
        x_max: steps as f64,
        x_label: "step".into(),
        panel_size: (600, 320),
    };
    plot(path, &fig)
}

/// Runs `count` jobs as child processes, at most `parallel` at a time (at least one),
/// polling every 200 ms: `start(i)` spawns job `i` (in order), `done(i, status)` receives
/// its exit status when it ends and returns its result. Returns the results in job order;
/// the first error of `start` or `done` ends the pool and kills the children still
/// running.
pub fn run_pool<T, E>(
    count: usize,
    parallel: usize,
    mut start: impl FnMut(usize) -> Result<Child, E>,
    mut done: impl FnMut(usize, ExitStatus) -> Result<T, E>,
) -> Result<Vec<T>, E>
where
    E: From<std::io::Error>,
{
    let mut running: Vec<(Child, usize)> = Vec::new();
    let mut results: Vec<Option<T>> = (0..count).map(|_| None).collect();
    let mut next = 0;
    let outcome = (|| -> Result<(), E> {
        while next < count || !running.is_empty() {
            while next < count && running.len() < parallel.max(1) {
                running.push((start(next)?, next));
                next += 1;
            }
            std::thread::sleep(Duration::from_millis(200));
            let (mut still, mut failed) = (Vec::new(), None);
            for (mut child, i) in std::mem::take(&mut running) {
                if failed.is_some() {
                    still.push((child, i));
                    continue;
                }
                match child.try_wait() {
                    Ok(Some(status)) => match done(i, status) {
                        Ok(r) => results[i] = Some(r),
                        Err(e) => failed = Some(e),
                    },
                    Ok(None) => still.push((child, i)),
                    Err(e) => {
                        still.push((child, i));
                        failed = Some(e.into());
                    }
                }
            }
            running = still;
            if let Some(e) = failed {
                return Err(e);
            }
        }
        Ok(())
    })();
    if outcome.is_err() {
        // The grid has failed: the children still running would only keep writing.
        for (mut child, _) in running {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    outcome.map(|()| results.into_iter().flatten().collect())
}

/// One run of a grid as a child process: `<exe> <subcommand> <args..> --config
/// <dir>.config.json --out <dir>`, where `<dir>.config.json` holds `config` (written
/// atomically before the start). The child's stdout is discarded and its stderr goes to
/// `<dir>.stderr.txt`; when it succeeds, its outcome is `<dir>/summary.json` (a
/// [`RunSummary`]). Children run on one rayon thread each unless `RAYON_NUM_THREADS` is
/// set: candle's CPU ops share one thread pool per process, and one single-threaded
/// process per core beats processes fighting over the same cores.
#[derive(Clone, Debug)]
pub struct ChildRun {
    /// The run's name in messages, e.g. `gn batch 2 seed 0`.
    pub label: String,
    /// The run's config, as the child reads it.
    pub config: serde_json::Value,
    /// The child's output directory (cleared before the start if it exists).
    pub dir: PathBuf,
}

impl ChildRun {
    /// Starts the child (see the type docs).
    pub fn spawn(&self, exe: &Path, subcommand: &str, args: &[String]) -> candle::Result<Child> {
        let err = |what: &str, e: std::io::Error| {
            candle::Error::Msg(format!("grid run {}: {what}: {e}", self.label))
        };
        if self.dir.exists() {
            std::fs::remove_dir_all(&self.dir)
                .map_err(|e| err(&format!("clearing {}", self.dir.display()), e))?;
        }
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| err(&format!("creating {}", self.dir.display()), e))?;
        let cfg_path = self.side_file(".config.json");
        let text = serde_json::to_string_pretty(&self.config)
            .map_err(|e| candle::Error::Msg(format!("grid run {}: config: {e}", self.label)))?;
        crate::write_atomic(&cfg_path, text.as_bytes())?;
        let stderr = std::fs::File::create(self.side_file(".stderr.txt"))
            .map_err(|e| err("creating its stderr file", e))?;
        let mut cmd = Command::new(exe);
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            cmd.env("RAYON_NUM_THREADS", "1");
        }
        cmd.arg(subcommand)
            .args(args)
            .arg("--config")
            .arg(&cfg_path)
            .arg("--out")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| err(&format!("starting {}", exe.display()), e))
    }

    /// `<dir><suffix>`: a file beside the run's directory (appended, not an extension, so
    /// `lr0.01-b2` and `lr0.02-b2` keep files of their own).
    pub fn side_file(&self, suffix: &str) -> PathBuf {
        let mut p = self.dir.clone().into_os_string();
        p.push(suffix);
        PathBuf::from(p)
    }

    /// The summary of the finished child, or an error with its stderr when it failed.
    pub fn summary(&self, status: ExitStatus) -> candle::Result<RunSummary> {
        if !status.success() {
            let err = std::fs::read_to_string(self.side_file(".stderr.txt")).unwrap_or_default();
            candle::bail!("run {} failed ({status}): {}", self.label, err.trim())
        }
        let path = self.dir.join("summary.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| candle::Error::Msg(format!("run {}: no summary.json: {e}", self.label)))?;
        serde_json::from_str(&text)
            .map_err(|e| candle::Error::Msg(format!("run {}: {}: {e}", self.label, path.display())))
    }
}

/// Runs `runs` as children of `exe` ([`ChildRun::spawn`] with `subcommand` and `args`),
/// `parallel` at a time, with `pb` showing the running one and counting the finished;
/// `done(run, summary)` is called as each finishes (e.g. to print a line). Returns the
/// summaries in order; the first failure ends the grid with its error (the children still
/// running are killed). Two runs with one directory are an error before anything starts
/// (a value repeated in a grid's lists).
pub fn run_children(
    runs: &[ChildRun],
    parallel: usize,
    (exe, subcommand, args): (&Path, &str, &[String]),
    pb: &indicatif::ProgressBar,
    mut done: impl FnMut(&ChildRun, &RunSummary),
) -> candle::Result<Vec<RunSummary>> {
    for (i, r) in runs.iter().enumerate() {
        if let Some(other) = runs[..i].iter().find(|o| o.dir == r.dir) {
            candle::bail!(
                "grid: runs `{}` and `{}` would share the directory {} (a value repeated in the grid's lists?); give each value once",
                other.label,
                r.label,
                r.dir.display()
            )
        }
    }
    let start = |i: usize| {
        pb.set_message(runs[i].label.clone());
        runs[i].spawn(exe, subcommand, args)
    };
    let finish = |i: usize, status| {
        let s = runs[i].summary(status)?;
        pb.suspend(|| done(&runs[i], &s));
        pb.inc(1);
        Ok(s)
    };
    run_pool(runs.len(), parallel, start, finish)
}

/// A progress bar for a grid of `total` runs, named `what` (hidden when stderr is not a
/// terminal, as indicatif's are).
pub fn grid_progress(what: &str, total: usize) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(total as u64);
    let template =
        format!("{what} {{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {{msg}} ETA {{eta}}");
    if let Ok(style) = indicatif::ProgressStyle::with_template(&template) {
        pb.set_style(style);
    }
    pb
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_runs_every_job_and_keeps_their_order() -> std::io::Result<()> {
        let mut started = Vec::new();
        let codes = run_pool(
            5,
            2,
            |i| {
                started.push(i);
                // Later jobs end first: the results must still come back in job order.
                let secs = format!("0.{}", 5 - i);
                std::process::Command::new("sh")
                    .args(["-c", &format!("sleep {secs}; exit {i}")])
                    .spawn()
            },
            |i, status| Ok((i, status.code())),
        )?;
        assert_eq!(started, [0, 1, 2, 3, 4]);
        let want: Vec<_> = (0..5).map(|i| (i, Some(i as i32))).collect();
        assert_eq!(codes, want);
        Ok(())
    }

    #[test]
    fn an_error_of_done_ends_the_pool() {
        let r: Result<Vec<()>, std::io::Error> = run_pool(
            3,
            1,
            |_| std::process::Command::new("true").spawn(),
            |i, _| Err(std::io::Error::other(format!("job {i} failed"))),
        );
        assert_eq!(r.unwrap_err().to_string(), "job 0 failed");
    }
}
