//! `det_train compare`: the norm x batch-size x seed grid of the detector (issue 15's
//! experiment): every run a child process of this binary (`det_train run-config`, see
//! keel::train::grid::run_children), then `results.md` (final val mAP@.5 mean ± std per
//! cell, loss spikes, grad-norm p99, NaN/skipped steps, verdicts) and `curves.png`.
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};
use keel::models::backbone::{grid_rows, GridRow};
use keel::norm::NormKind;
use keel::train::cli::DeviceArgs;
use keel::train::grid::{self, Cell, ChildRun};
use keel::train::run_dir::check_writable;
use keel::train::write_atomic;

use super::cli::{matches, parse_norm, read_config, with_defaults, Cli};
use super::train;
use keel::train::driver::RunOptions;

/// `det_train compare` flags: the grid's axes and every run flag of det_train (the same for
/// every run; `--norm`, `--batch-size` and `--seed` are the grid's).
#[derive(Parser, Debug)]
#[command(
    name = "det_train compare",
    about = "Run det_train's norm x batch-size x seed grid and write results.md and curves.png"
)]
pub struct CompareArgs {
    /// Comma-separated backbone norms.
    #[arg(long, value_parser = parse_norm, value_delimiter = ',', default_value = "bn,gn,ws-gn")]
    pub norms: Vec<NormKind>,
    /// Comma-separated batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,2,8")]
    pub batch_sizes: Vec<usize>,
    /// Seeds per config (0..N).
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// Runs in parallel (one single-threaded process each).
    #[arg(long, default_value_t = 2)]
    pub jobs: usize,
    /// Comma-separated backbone norms of a ResNet --backbone (frozen-bn, gn, bn, ws-gn): the
    /// grid's rows become `<backbone norm>+gn` (the FCOS head's norm; --norms is the twin's)
    /// for the fine-tuning experiment: `--backbone resnet18 --init FILE --backbone-norms
    /// bn,frozen-bn,gn`.
    #[arg(long, value_parser = parse_norm, value_delimiter = ',')]
    pub backbone_norms: Vec<NormKind>,
    #[command(flatten)]
    pub run: Cli,
}

/// `det_train run-config`: one saved config into `--out`, quietly (compare's children).
#[derive(Parser, Debug)]
#[command(name = "det_train run-config", hide = true)]
pub struct RunConfigArgs {
    #[arg(long)]
    pub config: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub dev: DeviceArgs,
}

/// Parses `argv` (`det_train compare ...` without `compare`) and runs the grid.
pub fn run(argv: Vec<String>) -> anyhow::Result<()> {
    let cmd = with_defaults(CompareArgs::command())
        .mut_arg("out", |a| a.default_value("runs/det_compare"));
    let m = super::cli::matches(cmd, argv)?;
    for id in ["norm", "batch_size", "seed", "resume", "resume_from"] {
        if m.value_source(id) == Some(ValueSource::CommandLine) {
            bail!(
                "det_train compare: --{} is not a grid flag; the grid sets the norm, batch size and seed of each run (--norms, --batch-sizes, --seeds)",
                id.replace('_', "-")
            )
        }
    }
    let args = CompareArgs::from_arg_matches(&m).map_err(|e| anyhow::anyhow!("{e}"))?;
    if !args.backbone_norms.is_empty() && m.value_source("norms") == Some(ValueSource::CommandLine)
    {
        bail!("det_train compare: --norms sets the twin encoder's norm; with --backbone-norms the rows are the ResNet's backbone norms (the FCOS head is always GN)")
    }
    if args.run.fault.is_some() {
        bail!("det_train compare: --fault is for a single run")
    }
    if let Some(w) = args.run.train.warmup_warning(args.run.steps) {
        eprintln!("det_train compare: warning: {w}");
    }
    if args.norms.is_empty() || args.batch_sizes.is_empty() || args.seeds == 0 {
        bail!("det_train compare needs at least one norm, one batch size and one seed")
    }
    let out = &args.run.out;
    let (mut queue, mut cells_of) = (Vec::new(), Vec::new());
    for r in rows(&args)? {
        for &b in &args.batch_sizes {
            for seed in 0..args.seeds {
                let cfg = args.run.config_for(r.norm, r.backbone_norm, b, seed);
                cfg.validate()?; // a typo fails before hours of training
                let name = format!("{}-b{b}-s{seed}", r.label.replace(':', "_"));
                queue.push(ChildRun {
                    label: format!("{} batch {b} seed {seed}", r.label),
                    config: serde_json::to_value(&cfg)?,
                    dir: out.join("runs").join(name),
                });
                cells_of.push((r.label.clone(), b));
            }
        }
    }
    check_writable(out).map_err(|e| anyhow::anyhow!("--out {e}"))?;
    let device = keel::train::cli::pick_device(args.run.dev.device)?; // the children set up their own
    let child_args = args.run.dev.child_args(&device);
    let exe = std::env::current_exe().context("locating the det_train binary")?;
    let pb = grid::grid_progress("det_train compare", queue.len());
    let t0 = Instant::now();
    let child = (exe.as_path(), "run-config", &child_args[..]);
    let summaries = grid::run_children(&queue, args.jobs, child, &pb, |r, s| {
        eprintln!(
            "{}: final mAP@.5 {:.4}, {:.3} s/step, {} spikes, verdict {}",
            r.label, s.final_miou, s.seconds_per_step, s.loss_spikes, s.verdict
        )
    })?;
    pb.finish_and_clear();
    let cells = Cell::group(
        cells_of
            .into_iter()
            .zip(summaries)
            .map(|((n, b), s)| (n, b, s)),
    );
    let md = results_md(&args, &cells, t0.elapsed().as_secs_f64(), &device);
    write_atomic(out.join("results.md"), md.as_bytes())?;
    grid::plot_curves(&out.join("curves.png"), &cells, args.run.steps, "mAP@.5")?;
    println!("{md}");
    println!(
        "wrote {} and {}",
        out.join("results.md").display(),
        out.join("curves.png").display()
    );
    Ok(())
}

/// The grid's rows: `--norms` (the twin's), or with `--backbone-norms` one per backbone
/// norm, labelled `<backbone norm>+gn` (keel::models::backbone::grid_rows).
pub fn rows(args: &CompareArgs) -> anyhow::Result<Vec<GridRow>> {
    let b = &args.run.backbone;
    let pinned = args.run.init.is_some() || b.backbone_norm.is_some();
    if !b.backbone.is_twin() && args.backbone_norms.is_empty() && pinned {
        bail!(
            "compare --backbone {}: the FCOS head is always GN and --norms only sets a from-scratch backbone's norm, so with --init or --backbone-norm every --norms row would be the same run; give the backbone norms to compare with --backbone-norms (e.g. bn,frozen-bn,gn)",
            b.backbone
        )
    }
    let head = NormKind::GroupNorm { groups: None };
    let norms = match args.backbone_norms.is_empty() {
        true => &args.norms[..],
        false => std::slice::from_ref(&head),
    };
    Ok(grid_rows(norms, &args.backbone_norms, &args.run.backbone)?)
}

/// The results table with a header naming the settings every run shared.
pub fn results_md(
    args: &CompareArgs,
    cells: &[Cell],
    seconds: f64,
    device: &candle::Device,
) -> String {
    let c = args.run.config();
    let r = c.recipe();
    let data = match &c.data_dir {
        Some(d) => format!(
            "{} ({:?}, splits {} / {})",
            d.display(),
            c.format,
            c.train_split,
            c.val_split
        ),
        None => format!(
            "synthetic detection shapes ({} train / {} val images)",
            c.train_size, c.val_size
        ),
    };
    let backbone = match c.backbone.backbone.depth() {
        None => format!("the twin encoder (width {})", c.width),
        Some(d) => format!(
            "a {d} backbone {} (freeze-at {}, backbone lr x{}; rows are <backbone norm>+<head norm> when --backbone-norms is given)",
            c.init.as_ref().map_or("from scratch".into(), |p| format!("pretrained from {}", p.display())),
            c.backbone.freeze_at.unwrap_or(0),
            c.backbone_lr_mult()
        ),
    };
    let mut md = String::new();
    let _ = writeln!(md, "# det_train compare\n");
    let _ = writeln!(
        md,
        "FCOS (P3-P5, GN head) on {backbone}, {} ({}px images), fpn {}, head convs {}, {} {} (lr {}), warmup {}, clip {}, amp {}, {} steps per run, seeds 0..{}, device {:?}; grid wall time {:.0} s. The metric is COCO mAP@.5 on the val set (pycocotools' definition, keel_det::coco_eval).\n",
        data, c.image_size, c.fpn, c.head_convs, c.train.optimizer,
        r.decay_name(), r.lr, c.train.warmup_steps,
        c.train.clip_grad.map_or("off".to_string(), |v| v.to_string()), c.train.amp, c.steps, args.seeds, device.location(), seconds
    );
    md.push_str(&grid::table_md(cells, "mAP@.5"));
    md
}

/// `det_train run-config`: runs one saved config (compare's child).
pub fn run_config(argv: Vec<String>) -> anyhow::Result<()> {
    let m = matches(RunConfigArgs::command(), argv)?;
    let a = RunConfigArgs::from_arg_matches(&m).map_err(|e| anyhow::anyhow!("{e}"))?;
    let cfg = read_config(&a.config)?;
    let device = a.dev.setup("det_train")?;
    let opts = RunOptions {
        progress: false,
        ..RunOptions::new("det_train")
    };
    let s = train::run(&cfg, &a.out, None, &device, opts)?;
    Ok(s.run.check_not_stopped()?)
}
