//! `seg_train compare`: the norm x batch-size x seed grid, `results.md` and `curves.png`.
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;

use keel::norm::NormKind;
use keel::train::{grid, write_atomic, RunSummary};

use super::cli::RunConfig;
use super::cli::{parse_norm, CommonArgs};
use super::train;
use keel::train::cli::pick_device;

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
pub type Cell = grid::Cell;

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
    let device = pick_device(args.common.dev.device)?; // the children set up their own
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
    // The children get the device and its modes (`run-config` flags).
    let mut device_args = vec![
        "--device".to_string(),
        if device.is_cpu() { "cpu" } else { "cuda" }.to_string(),
    ];
    let c = &args.common;
    device_args.extend(c.dev.deterministic.then(|| "--deterministic".to_string()));
    device_args.extend(c.dev.tf32.then(|| "--tf32".to_string()));
    let summaries = run_jobs(&queue, args.jobs, &device_args, &pb)?;
    let runs = queue.iter().zip(summaries);
    let cells = Cell::group(runs.map(|(j, s)| (j.norm.clone(), j.batch, s)));
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
    fn spawn(&self, device_args: &[String]) -> anyhow::Result<std::process::Child> {
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
        cmd.arg("run-config")
            .args(device_args)
            .arg("--config")
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
    device_args: &[String],
    pb: &indicatif::ProgressBar,
) -> anyhow::Result<Vec<RunSummary>> {
    let start = |i: usize| {
        let job = &queue[i];
        pb.set_message(format!(
            "{} batch {} seed {}",
            job.norm, job.batch, job.seed
        ));
        job.spawn(device_args)
    };
    let done = |i: usize, status| {
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
        pb.inc(1);
        Ok(s)
    };
    grid::run_pool(queue.len(), jobs, start, done)
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
        c.train_size, c.val_size, c.image_size, c.image_size, c.width, c.fpn, c.train.optimizer,
        recipe.decay_name(), recipe.lr, c.train.warmup_steps,
        if c.train.clip_grad == 0.0 { "off".to_string() } else { c.train.clip_grad.to_string() }, train::amp_label(c.train.amp), args.steps, args.seeds, device.location(), seconds
    );
    md.push_str(&grid::table_md(cells));
    md
}

/// curves.png: see [`grid::plot_curves`].
pub fn plot(path: &Path, cells: &[Cell], steps: usize) -> anyhow::Result<()> {
    Ok(grid::plot_curves(path, cells, steps)?)
}
