//! `seg_train compare`: the norm x batch-size x seed grid, `results.md` and `curves.png`.
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use keel::train::plot::{Curve, Figure, Panel};

use keel::norm::NormKind;
use keel::train::series::{mean_series, mean_std, moving_average, percentile};
use keel::train::write_atomic;

use super::cli::RunConfig;
use super::cli::{parse_norm, pick_device, CommonArgs};
use super::train::{self, RunSummary};

#[derive(Args, Debug, Clone)]
pub struct CompareArgs {
    /// Comma-separated norms.
    #[arg(long, value_parser = parse_norm, value_delimiter = ',', default_value = "bn,gn,ws-gn")]
    pub norms: Vec<NormKind>,
    /// Comma-separated batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,2,8")]
    pub batch_sizes: Vec<usize>,
    /// Seeds per config (0..N).
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// Optimizer steps per run.
    #[arg(long, default_value_t = 300)]
    pub steps: usize,
    /// Output directory: results.md, curves.png, runs/<norm>-b<B>-s<seed>/.
    #[arg(long, default_value = "runs/compare")]
    pub out: PathBuf,
    /// Runs in parallel (one single-threaded process each).
    #[arg(long, default_value_t = 2)]
    pub jobs: usize,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// One (norm, batch) cell of the grid with its per-seed runs.
pub struct Cell {
    pub norm: String,
    pub batch: usize,
    pub runs: Vec<RunSummary>,
}

pub fn run(args: &CompareArgs) -> anyhow::Result<()> {
    let (norms, batches) = (&args.norms, &args.batch_sizes);
    if norms.is_empty() || batches.is_empty() || args.seeds == 0 {
        bail!("compare needs at least one norm, one batch size and one seed")
    }
    // Validate every config up front: a typo fails before hours of training.
    for &n in norms {
        for &b in batches {
            args.common.config(n, b, args.steps, 0).validate()?;
        }
    }
    let device = pick_device(args.common.device)?;
    super::output::writable(&args.out)?;
    let total = norms.len() * batches.len() * args.seeds as usize;
    let pb = indicatif::ProgressBar::new(total as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "compare {elapsed_precise} [{bar:30}] {pos}/{len} {msg} ETA {eta}",
        )
        .expect("static template"),
    );
    let t0 = Instant::now();
    let mut queue = Vec::new();
    for &n in norms {
        for &b in batches {
            for seed in 0..args.seeds {
                let cfg = args.common.config(n, b, args.steps, seed);
                let dir = args
                    .out
                    .join("runs")
                    .join(format!("{}-b{b}-s{seed}", n.to_string().replace(':', "_")));
                if dir.exists() {
                    std::fs::remove_dir_all(&dir)
                        .with_context(|| format!("clearing {}", dir.display()))?;
                }
                queue.push(Job {
                    norm: n.to_string(),
                    batch: b,
                    seed,
                    cfg,
                    dir,
                });
            }
        }
    }
    let device_flag = if device.is_cpu() { "cpu" } else { "cuda" };
    let summaries = run_jobs(&queue, args.jobs.max(1), device_flag, &pb)?;
    let mut cells: Vec<Cell> = Vec::new();
    for (
        Job {
            norm: n, batch: b, ..
        },
        s,
    ) in queue.iter().zip(summaries)
    {
        match cells.iter_mut().find(|c| c.norm == *n && c.batch == *b) {
            Some(c) => c.runs.push(s),
            None => cells.push(Cell {
                norm: n.clone(),
                batch: *b,
                runs: vec![s],
            }),
        }
    }
    pb.finish_and_clear();
    let md = results_md(args, &cells, t0.elapsed().as_secs_f64(), &device);
    write_atomic(args.out.join("results.md"), md.as_bytes())?;
    plot(&args.out.join("curves.png"), &cells, args.steps)?;
    println!("{md}");
    println!(
        "wrote {} and {}",
        args.out.join("results.md").display(),
        args.out.join("curves.png").display()
    );
    Ok(())
}

/// One run of the grid.
struct Job {
    norm: String,
    batch: usize,
    seed: u64,
    cfg: RunConfig,
    dir: PathBuf,
}

impl Job {
    /// Starts the run as a child process of this binary (`seg_train run-config`).
    fn spawn(&self, device_flag: &str) -> anyhow::Result<std::process::Child> {
        let exe = std::env::current_exe().context("locating the seg_train binary")?;
        std::fs::create_dir_all(&self.dir)?;
        let cfg_path = self.dir.with_extension("config.json");
        write_atomic(
            &cfg_path,
            serde_json::to_string_pretty(&self.cfg)?.as_bytes(),
        )?;
        let mut cmd = std::process::Command::new(&exe);
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            cmd.env("RAYON_NUM_THREADS", "1");
        }
        cmd.args(["run-config", "--device", device_flag, "--config"])
            .arg(&cfg_path)
            .arg("--out")
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(
                self.dir.with_extension("stderr.txt"),
            )?)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))
    }

    /// The summary of the finished run, or its error output.
    fn summary(&self, status: std::process::ExitStatus) -> anyhow::Result<RunSummary> {
        let (n, b, seed) = (&self.norm, self.batch, self.seed);
        if !status.success() {
            let err =
                std::fs::read_to_string(self.dir.with_extension("stderr.txt")).unwrap_or_default();
            bail!(
                "run {n} batch {b} seed {seed} failed ({status}): {}",
                err.trim()
            )
        }
        let text = std::fs::read_to_string(self.dir.join("summary.json"))
            .with_context(|| format!("run {n} batch {b} seed {seed}: no summary.json"))?;
        Ok(serde_json::from_str(&text)?)
    }
}

/// Runs `queue`, `jobs` child processes at a time, each on one rayon thread unless
/// RAYON_NUM_THREADS says otherwise: candle's CPU ops share one global thread pool per
/// process, and at this model size one single-threaded process per core beats two
/// processes fighting over two threads each. Returns the summaries in queue order.
fn run_jobs(
    queue: &[Job],
    jobs: usize,
    device_flag: &str,
    pb: &indicatif::ProgressBar,
) -> anyhow::Result<Vec<RunSummary>> {
    let mut running: Vec<(std::process::Child, usize)> = Vec::new();
    let mut summaries: Vec<Option<RunSummary>> = vec![None; queue.len()];
    let mut next = 0;
    while next < queue.len() || !running.is_empty() {
        while next < queue.len() && running.len() < jobs {
            let job = &queue[next];
            pb.set_message(format!(
                "{} batch {} seed {}",
                job.norm, job.batch, job.seed
            ));
            running.push((job.spawn(device_flag)?, next));
            next += 1;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        let mut still = Vec::new();
        for (mut child, i) in running.drain(..) {
            let Some(status) = child.try_wait()? else {
                still.push((child, i));
                continue;
            };
            let (job, s) = (&queue[i], queue[i].summary(status)?);
            pb.suspend(|| {
                eprintln!(
                    "{:>6} batch {} seed {}: final mIoU {:.4}, {:.3} s/step, {} spikes, verdict {}",
                    job.norm,
                    job.batch,
                    job.seed,
                    s.final_miou,
                    s.seconds_per_step,
                    s.loss_spikes,
                    s.verdict
                )
            });
            summaries[i] = Some(s);
            pb.inc(1);
        }
        running = still;
    }
    Ok(summaries
        .into_iter()
        .map(|s| s.expect("every run finished"))
        .collect())
}

/// The results table (one row per norm and batch size, statistics across seeds).
pub fn results_md(
    args: &CompareArgs,
    cells: &[Cell],
    seconds: f64,
    device: &candle::Device,
) -> String {
    let c = &args.common;
    let recipe = c
        .config(NormKind::GroupNorm { groups: None }, 1, args.steps, 0)
        .recipe();
    let mut md = String::new();
    let _ = writeln!(md, "# seg_train compare\n");
    let _ = writeln!(
        md,
        "Synthetic shapes ({} train / {} val images, {}x{}), width {}, fpn {}, {} {} (lr {}), warmup {}, clip {}, amp {}, {} steps per run, seeds 0..{}, device {:?}; grid wall time {:.0} s.\n",
        c.train_size, c.val_size, c.image_size, c.image_size, c.width, c.fpn, c.optimizer,
        recipe.decay_name(), recipe.lr, c.warmup_steps,
        if c.clip_grad == 0.0 { "off".to_string() } else { c.clip_grad.to_string() }, train::amp_label(c.amp), args.steps, args.seeds, device.location(), seconds
    );
    let _ = writeln!(md, "| norm | batch | final val mIoU (mean ± std) | per seed | loss spikes (total) | grad-norm p99 | NaN/Inf steps | skipped steps | s/step | verdicts |");
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|");
    for cell in cells {
        let mious: Vec<f64> = cell.runs.iter().map(|r| r.final_miou).collect();
        let (m, s) = mean_std(&mious);
        let per_seed = mious
            .iter()
            .map(|v| format!("{v:.3}"))
            .collect::<Vec<_>>()
            .join(", ");
        let spikes: usize = cell.runs.iter().map(|r| r.loss_spikes).sum();
        let p99 = percentile(
            cell.runs
                .iter()
                .flat_map(|r| r.grad_norms.iter().copied())
                .collect(),
            99.0,
        );
        let nan: usize = cell.runs.iter().map(|r| r.nonfinite_steps).sum();
        let skipped: usize = cell.runs.iter().map(|r| r.skipped_steps).sum();
        let sps =
            cell.runs.iter().map(|r| r.seconds_per_step).sum::<f64>() / cell.runs.len() as f64;
        let verdicts = cell
            .runs
            .iter()
            .map(|r| r.verdict.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(md, "| {} | {} | {m:.4} ± {s:.4} | {per_seed} | {spikes} | {p99:.3} | {nan} | {skipped} | {sps:.3} | {verdicts} |", cell.norm, cell.batch);
    }
    let _ = writeln!(
        md,
        "\nLoss spikes, NaN/Inf and skipped steps come from keel::train's StabilityMonitor; the grad-norm p99 pools every step of every seed (pre-clip global L2 norm). Every config runs the same number of optimizer steps, so batch 8 sees 8x the images of batch 1. Curves: curves.png (per batch size: training loss, moving average over 20 steps, and val mIoU, mean over seeds)."
    );
    md
}

/// curves.png: one row per batch size; left the training loss (moving average over 20
/// steps), right val mIoU; a colour per norm; the mean over seeds.
pub fn plot(path: &Path, cells: &[Cell], steps: usize) -> anyhow::Result<()> {
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
                let evals = c
                    .runs
                    .iter()
                    .map(|r| r.evals.iter().map(|&(s, m)| (s as f64, m)).collect());
                curve(c, mean_series(evals.collect()))
            })
            .collect();
        panels.push(Panel {
            title: format!("batch {b}: training loss (MA 20)"),
            y: 0.0..ymax * 1.05,
            curves: loss,
        });
        panels.push(Panel {
            title: format!("batch {b}: val mIoU"),
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
    Ok(keel::train::plot::plot(path, &fig)?)
}
