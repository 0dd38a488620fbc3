//! keel-train's run driver on a tiny regression task: the files a run writes, windows of
//! launched steps equal to reading every step, a fresh run refusing a run's directory, and
//! the exit code of a stopped run's error. (The graceful stop and exact resume are in
//! driver_stop.rs: the stop flag is process-wide.)
mod common;
mod driver_task;

use driver_task::{log_kinds, open, quiet, Cfg, STEPS};
use keel_train::driver::{exit_code, Interrupted, RunEnd};
use keel_train::{RunSummary, StopSignal};

fn finished(end: RunEnd) -> anyhow::Result<RunSummary> {
    match end {
        RunEnd::Finished(s) => Ok(s),
        RunEnd::Interrupted(i) => anyhow::bail!("unexpected stop: {i}"),
    }
}

#[test]
fn a_run_writes_its_files_and_learns() -> anyhow::Result<()> {
    let dir = tempfile_dir("files")?;
    let cfg = Cfg::new(STEPS);
    let mut run = open(&cfg, &dir, false, quiet(1))?;
    let s = finished(run.train()?)?;
    assert_eq!(run.task.seeks, vec![0], "the data is put at step 0 once");
    assert_eq!(s.losses.len(), STEPS);
    assert_eq!(
        s.evals.iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![4, 8, 12]
    );
    assert!(
        s.evals[2].1 > s.evals[0].1,
        "the metric improves: {:?} {:?}",
        s.evals,
        s.losses
    );
    assert!(
        s.losses[STEPS - 1].1 < 0.5 * s.losses[0].1,
        "{:?}",
        s.losses
    );
    let kinds = log_kinds(&dir)?;
    assert_eq!(kinds.iter().filter(|k| *k == "step").count(), STEPS);
    assert_eq!(kinds.iter().filter(|k| *k == "eval").count(), 3);
    for f in ["config.json", "health.json", "summary.json"] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let cfg_back: Cfg = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    assert_eq!(cfg_back.steps, STEPS);
    let summary: RunSummary =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json"))?)?;
    assert_eq!(summary.losses, s.losses);
    // keep_last 2 plus the best (the last eval is the best here: the same file).
    let ckpts: Vec<_> = std::fs::read_dir(dir.join("checkpoints"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    assert!(!ckpts.is_empty() && ckpts.len() <= 3, "{ckpts:?}");
    Ok(())
}

#[test]
fn windows_of_launched_steps_log_what_reading_every_step_logs() -> anyhow::Result<()> {
    let cfg = Cfg::new(STEPS);
    let (a, b) = (tempfile_dir("win1")?, tempfile_dir("win5")?);
    let every = finished(open(&cfg, &a, false, quiet(1))?.train()?)?;
    // 5 does not divide the eval interval (4): windows are cut short at each eval.
    let windowed = finished(open(&cfg, &b, false, quiet(5))?.train()?)?;
    assert_eq!(every.losses, windowed.losses);
    assert_eq!(every.grad_norms, windowed.grad_norms);
    assert_eq!(every.evals, windowed.evals);
    assert_eq!(log_kinds(&a)?, log_kinds(&b)?);
    Ok(())
}

#[test]
fn a_fresh_run_refuses_a_directory_holding_a_run() -> anyhow::Result<()> {
    let dir = tempfile_dir("refuse")?;
    let cfg = Cfg::new(4);
    finished(open(&cfg, &dir, false, quiet(1))?.train()?)?;
    let err = open(&cfg, &dir, false, quiet(1)).err().expect("refused");
    let msg = err.to_string();
    assert!(
        msg.contains("already holds a run") && msg.contains("--resume"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn a_checkpoint_beyond_the_runs_steps_is_refused() -> anyhow::Result<()> {
    let dir = tempfile_dir("beyond")?;
    finished(open(&Cfg::new(8), &dir, false, quiet(1))?.train()?)?;
    let shorter = Cfg::new(4);
    let err = open(&shorter, &dir, true, quiet(1)).err().expect("refused");
    let msg = err.to_string();
    assert!(msg.contains("at step 8, beyond the run's 4 steps"), "{msg}");
    Ok(())
}

#[test]
fn exit_code_finds_the_stop_in_an_error_chain() {
    let i = Interrupted {
        signal: StopSignal::Terminate,
        step: 3,
        checkpoint: "c".into(),
        out: "o".into(),
    };
    let e = anyhow::Error::from(i).context("running");
    assert_eq!(exit_code(e.as_ref()), 143);
    let other = anyhow::anyhow!("disk full");
    assert_eq!(exit_code(other.as_ref()), 1);
}

/// A fresh directory under the target's temp dir.
fn tempfile_dir(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("keel_driver_{}_{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    Ok(d)
}
