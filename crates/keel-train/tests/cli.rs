//! keel_train::cli: `--resume` planning for any trainer's config (a small one here), the
//! run-directory rules of `--resume-from`, and advice rendered as flags.
use std::path::{Path, PathBuf};

use candle::{Device, Tensor};
use clap::{Args, CommandFactory, FromArgMatches, Parser};
use keel_test_support::TempDir;
use keel_train::cli::{advice_flags, plan_resume, ResumableConfig, ResumeArgs, ResumeRequest};
use keel_train::{Advice, Checkpoint, CheckpointManager};
use serde::{Deserialize, Serialize};

/// A trainer's config: field names are its flags' names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Cfg {
    steps: usize,
    lr: f64,
    batch_size: usize,
}

impl ResumableConfig for Cfg {
    fn steps(&self) -> usize {
        self.steps
    }
    fn set_steps(&mut self, steps: usize) {
        self.steps = steps;
    }
}

#[derive(Parser, Debug)]
struct Cli {
    #[arg(long, default_value_t = 10)]
    steps: usize,
    #[arg(long, default_value_t = 0.1)]
    lr: f64,
    #[arg(long, default_value_t = 2)]
    batch_size: usize,
    #[arg(long, default_value = "runs/x")]
    out: PathBuf,
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    resume: ResumeArgs,
}

/// A run directory with `config.json` (unless `cfg_file` is None) and one checkpoint at
/// `step` whose meta holds `stored` at `user.config`.
fn run_dir(
    name: &str,
    stored: &Cfg,
    cfg_file: Option<&Cfg>,
    step: usize,
) -> anyhow::Result<TempDir> {
    let dir = TempDir::new(name);
    let mut m = CheckpointManager::new(dir.0.join("checkpoints"), 2)?;
    let mut c = Checkpoint::new(step);
    c.tensors
        .insert("w".into(), Tensor::new(&[1f32, 2.0], &Device::Cpu)?);
    c.meta = serde_json::json!({ "user": { "config": stored } });
    m.save(&c, None)?;
    if let Some(f) = cfg_file {
        std::fs::write(dir.0.join("config.json"), serde_json::to_string(f)?)?;
    }
    Ok(dir)
}

/// Parses `args` and plans the resume of `dir`.
fn plan(dir: &Path, args: &str) -> candle::Result<(Cfg, usize, Vec<String>)> {
    let mut warnings = Vec::new();
    let (cfg, at) = plan_with(dir, args, &mut warnings)?;
    Ok((cfg, at, warnings))
}

/// [`plan`], its warnings collected into `warnings` whether it succeeds or not.
fn plan_with(dir: &Path, args: &str, warnings: &mut Vec<String>) -> candle::Result<(Cfg, usize)> {
    let argv = std::iter::once("trainer".to_string())
        .chain(std::iter::once(format!("--resume={}", dir.display())))
        .chain(args.split_whitespace().map(String::from));
    let matches = Cli::command().get_matches_from(argv);
    let cli = Cli::from_arg_matches(&matches).unwrap();
    let given = Cfg {
        steps: cli.steps,
        lr: cli.lr,
        batch_size: cli.batch_size,
    };
    let req = ResumeRequest {
        tool: "trainer",
        dir,
        args: &cli.resume,
        given,
        out: &cli.out,
        matches: &matches,
        not_config: &["resume", "resume_from", "quiet", "out"],
    };
    let p = plan_resume(req, &Device::Cpu, |w| warnings.push(w.to_string()))?;
    Ok((p.config, p.found.checkpoint.step))
}

const RUN: Cfg = Cfg {
    steps: 10,
    lr: 0.5,
    batch_size: 4,
};

#[test]
fn the_runs_config_is_kept_and_only_steps_may_change() -> anyhow::Result<()> {
    let dir = run_dir("cli-keep", &RUN, Some(&RUN), 4)?;
    // Flags left at their defaults do not count, although the defaults differ from the run.
    let (cfg, at, warnings) = plan(&dir.0, "--quiet")?;
    assert_eq!((cfg, at), (RUN, 4));
    assert!(warnings.is_empty(), "{warnings:?}");
    // A flag given with the run's value is fine; --steps extends.
    let (cfg, _, _) = plan(&dir.0, "--lr 0.5 --steps 30")?;
    assert_eq!(cfg.steps, 30);
    // A flag that differs is named with both values, every one of them.
    let e = plan(&dir.0, "--lr 0.1 --batch-size 8")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--batch-size 8 (the run has 4), --lr 0.1 (the run has 0.5) differ"),
        "{e}"
    );
    let e = plan(&dir.0, "--out elsewhere").unwrap_err().to_string();
    assert!(e.contains("--out elsewhere (the run is in"), "{e}");
    // --steps at or below the checkpoint cannot continue.
    let e = plan(&dir.0, "--steps 4").unwrap_err().to_string();
    assert!(
        e.contains("the checkpoint is at step 4; pass a larger --steps"),
        "{e}"
    );
    Ok(())
}

#[test]
fn a_finished_run_must_be_extended() -> anyhow::Result<()> {
    let dir = run_dir("cli-finished", &RUN, Some(&RUN), 10)?;
    let e = plan(&dir.0, "").unwrap_err().to_string();
    assert!(e.contains("already finished its 10 steps"), "{e}");
    assert_eq!(plan(&dir.0, "--steps 12")?.0.steps, 12);
    Ok(())
}

#[test]
fn config_json_is_checked_against_the_checkpoint_or_recovered() -> anyhow::Result<()> {
    let edited = Cfg { lr: 0.05, ..RUN };
    let dir = run_dir("cli-edited", &RUN, Some(&edited), 4)?;
    let e = plan(&dir.0, "").unwrap_err().to_string();
    assert!(
        e.contains("config.json differs") && e.contains("lr (config.json 0.05, checkpoint 0.5)"),
        "{e}"
    );
    // An extension whose first checkpoint is not written yet: a larger steps is fine.
    let dir = run_dir("cli-extended", &RUN, Some(&Cfg { steps: 20, ..RUN }), 4)?;
    assert_eq!(plan(&dir.0, "")?.0.steps, 20);
    let dir = run_dir("cli-missing", &RUN, None, 4)?;
    let (cfg, _, warnings) = plan(&dir.0, "")?;
    assert_eq!(cfg, RUN);
    assert!(
        warnings.len() == 1 && warnings[0].contains("no config.json; recovered"),
        "{warnings:?}"
    );
    Ok(())
}

#[test]
fn a_checkpoint_of_another_program_or_none_is_an_error() -> anyhow::Result<()> {
    let dir = run_dir("cli-other", &RUN, Some(&RUN), 4)?;
    let mut m = CheckpointManager::new(dir.0.join("checkpoints"), 2)?;
    let mut c = Checkpoint::new(6);
    c.tensors
        .insert("w".into(), Tensor::new(&[1f32], &Device::Cpu)?);
    c.meta = serde_json::json!({ "user": { "something": 1 } });
    m.save(&c, None)?;
    let e = plan(&dir.0, "").unwrap_err().to_string();
    assert!(
        e.contains("holds no trainer config in its meta (not a trainer checkpoint?)"),
        "{e}"
    );
    let empty = TempDir::new("cli-empty");
    let e = plan(&empty.0, "").unwrap_err().to_string();
    assert!(e.contains("cannot list checkpoint directory"), "{e}");
    std::fs::create_dir(empty.0.join("checkpoints"))?;
    let e = plan(&empty.0, "").unwrap_err().to_string();
    assert!(e.contains("no checkpoint in"), "{e}");
    Ok(())
}

#[test]
fn a_corrupt_newer_checkpoint_is_skipped_with_a_warning() -> anyhow::Result<()> {
    let dir = run_dir("cli-corrupt", &RUN, Some(&RUN), 4)?;
    std::fs::write(
        dir.0.join("checkpoints/ckpt-00000008.safetensors"),
        b"not a checkpoint",
    )?;
    let (_, at, warnings) = plan(&dir.0, "")?;
    assert_eq!(at, 4);
    assert!(
        warnings.len() == 1 && warnings[0].starts_with("skipping"),
        "{warnings:?}"
    );
    Ok(())
}

#[derive(Parser, Debug)]
struct OnlyResume {
    #[command(flatten)]
    resume: ResumeArgs,
}

#[test]
fn resume_from_names_its_run_or_says_how() -> anyhow::Result<()> {
    let parse = |s: &str| -> ResumeArgs {
        let argv = std::iter::once("t").chain(s.split_whitespace());
        OnlyResume::parse_from(argv).resume
    };
    assert_eq!(parse("").run_dir()?, None);
    assert_eq!(parse("--resume r").run_dir()?, Some(PathBuf::from("r")));
    let from = parse("--resume-from runs/a/checkpoints/ckpt-00000004.safetensors");
    assert_eq!(from.run_dir()?, Some(PathBuf::from("runs/a")));
    let e = parse("--resume-from elsewhere/ckpt.safetensors")
        .run_dir()
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("name the run too: --resume DIR --resume-from"),
        "{e}"
    );
    // The flag ids are the ones a trainer's NOT_CONFIG lists.
    let cmd = OnlyResume::command();
    let ids: Vec<&str> = cmd.get_arguments().map(|a| a.get_id().as_str()).collect();
    assert!(
        ids.contains(&"resume") && ids.contains(&"resume_from"),
        "{ids:?}"
    );
    let _ = ResumeArgs::augment_args(clap::Command::new("x"));
    Ok(())
}

#[test]
fn advice_renders_as_the_shared_flags() {
    let lr = Advice::LowerLr {
        from: 0.1,
        to: 0.01,
        cause: keel_train::LrCause::LossSpikes { batch_size: 2 },
    };
    assert_eq!(advice_flags(&lr).as_deref(), Some("--lr 0.01"));
    let bf16 = Advice::UseBf16 {
        cause: keel_train::Bf16Cause::ScalerOverflows,
    };
    assert_eq!(advice_flags(&bf16).as_deref(), Some("--amp bf16"));
}
