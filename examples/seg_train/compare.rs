//! `seg_train compare`: the norm x batch-size x seed grid, `results.md` and `curves.png`.
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;

use keel::models::backbone::grid_rows;
use keel::norm::NormKind;
use keel::train::grid::{self, ChildRun};
use keel::train::write_atomic;

use super::cli::{parse_norm, CommonArgs, RunConfig};
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
    /// Comma-separated backbone norms of a ResNet --backbone (frozen-bn, gn, bn, ws-gn): the
    /// grid's rows become `<backbone norm>+<head norm>` for every --norms entry (the
    /// fine-tuning experiment: `--backbone resnet18 --init FILE --backbone-norms
    /// bn,frozen-bn,gn --norms gn`).
    #[arg(long, value_parser = parse_norm, value_delimiter = ',')]
    pub backbone_norms: Vec<NormKind>,
    /// Pretrained weights for every run (as seg_train's --init).
    #[arg(long)]
    pub init: Option<PathBuf>,
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
    let rows = grid_rows(norms, &args.backbone_norms, &args.common.backbone)?;
    if let Some(w) = args.common.train.warmup_warning(args.steps) {
        eprintln!("seg_train compare: warning: {w}");
    }
    // Validate every config up front: a typo fails before hours of training.
    for r in &rows {
        for &b in batches {
            config(args, r.norm, r.backbone_norm, b, 0).validate()?;
        }
    }
    let device = pick_device(args.common.dev.device)?; // the children set up their own
    super::output::writable(&args.out)?;
    let total = rows.len() * batches.len() * args.seeds as usize;
    let pb = grid::grid_progress("compare", total);
    let t0 = Instant::now();
    let (mut queue, mut cells_of) = (Vec::new(), Vec::new());
    for r in &rows {
        let label = &r.label;
        for &b in batches {
            for seed in 0..args.seeds {
                let cfg = config(args, r.norm, r.backbone_norm, b, seed);
                let dir = args
                    .out
                    .join("runs")
                    .join(format!("{}-b{b}-s{seed}", label.replace(':', "_")));
                queue.push(ChildRun {
                    label: format!("{label} batch {b} seed {seed}"),
                    config: serde_json::to_value(&cfg)?,
                    dir,
                });
                cells_of.push((label.clone(), b));
            }
        }
    }
    // The children get the device and its modes (`run-config` flags).
    let c = &args.common;
    let mut device_args = c.dev.child_args(&device);
    if let Some(n) = c.log_every {
        device_args.extend(["--log-every".to_string(), n.to_string()]);
    }
    let exe = std::env::current_exe().context("locating the seg_train binary")?;
    let child = (exe.as_path(), "run-config", &device_args[..]);
    let summaries = grid::run_children(&queue, args.jobs, child, &pb, |run, s| {
        eprintln!(
            "{}: final mIoU {:.4}, {:.3} s/step, {} spikes, verdict {}",
            run.label, s.final_miou, s.seconds_per_step, s.loss_spikes, s.verdict
        )
    })?;
    let runs = cells_of.into_iter().zip(summaries);
    let cells = Cell::group(runs.map(|((norm, b), s)| (norm, b, s)));
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

/// The config of one run of the grid: the common flags, the row's norms, --init.
fn config(
    args: &CompareArgs,
    norm: NormKind,
    bb: Option<NormKind>,
    batch: usize,
    seed: u64,
) -> RunConfig {
    let mut cfg = args.common.config(norm, batch, args.steps, seed);
    cfg.init = args.init.clone();
    if bb.is_some() {
        cfg.backbone.backbone_norm = bb;
    }
    cfg.with_backbone_defaults()
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
    let model = match c.backbone.backbone.depth() {
        None => match &args.init {
            Some(p) => format!(
                "width {}, fpn {}, initialised from {}",
                c.width,
                c.fpn,
                p.display()
            ),
            None => format!("width {}, fpn {}", c.width, c.fpn),
        },
        Some(_) => {
            let r = config(
                args,
                NormKind::GroupNorm { groups: None },
                args.backbone_norms.first().copied(),
                1,
                0,
            )
            .backbone;
            let from = match &args.init {
                Some(p) => format!("pretrained from {}", p.display()),
                None => "from scratch".into(),
            };
            format!(
                "{} backbone {from} (freeze-at {}, backbone lr x{}), fpn {}; rows are <backbone norm>+<head norm> when --backbone-norms is given",
                c.backbone.backbone,
                r.freeze_at.unwrap_or(0),
                r.backbone_lr_mult.unwrap_or(1.0),
                c.fpn
            )
        }
    };
    let data = match &c.data_dir {
        Some(d) => format!("Pascal VOC at {}", d.display()),
        None => format!(
            "Synthetic shapes ({} train / {} val images)",
            c.train_size, c.val_size
        ),
    };
    let _ = writeln!(
        md,
        "{data} ({}x{} crops), {model}, {} {} (lr {}), warmup {}, clip {}, amp {}, {} steps per run, seeds 0..{}, device {:?}; grid wall time {:.0} s.\n",
        c.image_size, c.image_size, c.train.optimizer,
        recipe.decay_name(), recipe.lr, c.train.warmup_steps,
        if c.train.clip_grad == 0.0 { "off".to_string() } else { c.train.clip_grad.to_string() }, train::amp_label(c.train.amp), args.steps, args.seeds, device.location(), seconds
    );
    md.push_str(&grid::table_md(cells, "mIoU"));
    md
}

/// curves.png: see [`grid::plot_curves`].
pub fn plot(path: &Path, cells: &[Cell], steps: usize) -> anyhow::Result<()> {
    Ok(grid::plot_curves(path, cells, steps, "mIoU")?)
}
