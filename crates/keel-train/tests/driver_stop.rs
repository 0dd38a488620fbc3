//! keel-train's run driver stopped by a SIGTERM-like request mid-run (the process-wide stop
//! flag, so this binary holds one test): the run ends after the step with a checkpoint and a
//! health report, and its resume ends bit-for-bit where an uninterrupted run ends.
mod common;
mod driver_task;

use driver_task::{log_kinds, open, quiet, Cfg, STEPS};
use keel_train::driver::RunEnd;
use keel_train::StopSignal;

#[test]
fn a_stopped_run_resumes_bit_for_bit() -> anyhow::Result<()> {
    let base = std::env::temp_dir().join(format!("keel_driver_stop_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let cfg = Cfg::new(STEPS);
    let whole = match open(&cfg, &base.join("whole"), false, quiet(1))?.train()? {
        RunEnd::Finished(s) => s,
        RunEnd::Interrupted(i) => anyhow::bail!("unexpected stop: {i}"),
    };
    let dir = base.join("stopped");
    let mut run = open(&cfg, &dir, false, quiet(1))?;
    run.task.stop_at = Some(5);
    let i = match run.train()? {
        RunEnd::Interrupted(i) => i,
        RunEnd::Finished(_) => anyhow::bail!("the stop request was ignored"),
    };
    assert_eq!((i.signal, i.step), (StopSignal::Terminate, 6));
    assert!(i.checkpoint.is_file() && dir.join("health.json").is_file());
    assert!(
        !dir.join("summary.json").exists(),
        "a stopped run has no summary yet"
    );
    drop(run); // the lock goes with the run
    let mut resumed = open(&cfg, &dir, true, quiet(1))?;
    assert_eq!(resumed.state.step, 6);
    let s = match resumed.train()? {
        RunEnd::Finished(s) => s,
        RunEnd::Interrupted(i) => anyhow::bail!("stopped again: {i}"),
    };
    assert_eq!(s.losses, whole.losses);
    assert_eq!(s.grad_norms, whole.grad_norms);
    assert_eq!(s.evals, whole.evals);
    assert_eq!(log_kinds(&dir)?, log_kinds(&base.join("whole"))?);
    // A stop asked during the last step finishes the run (a run stopped after its last step
    // would have nothing left to resume).
    let mut last = open(&cfg, &base.join("last"), false, quiet(1))?;
    last.task.stop_at = Some(STEPS - 1);
    match last.train()? {
        RunEnd::Finished(s) => assert_eq!(s.losses, whole.losses),
        RunEnd::Interrupted(i) => anyhow::bail!("the last step was stopped: {i}"),
    }
    assert!(base.join("last/summary.json").is_file());
    Ok(())
}
