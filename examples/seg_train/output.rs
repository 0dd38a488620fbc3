//! The output directory of a run, on keel-train's [`RunDir`]: one process at a time, no
//! stale temp files, no overwriting of a run (or of one that lost its `config.json`); this
//! module renders its states as seg_train's messages and flags.
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use keel::train::run_dir::{check_writable, DirState, RunDir};

/// Test knob, read once when a run opens its checkpoints (never in the step loop): every
/// checkpoint save pauses this many milliseconds between its temp file and the rename, so a
/// test can SIGKILL the process in the middle of a save.
pub const SAVE_PAUSE_ENV: &str = "SEG_TRAIN_TEST_SAVE_PAUSE_MS";

/// `--out` created and writable (nothing left behind when it is not).
pub fn writable(out: &Path) -> anyhow::Result<()> {
    check_writable(out).map_err(|e| anyhow!("--out {e}"))
}

/// Makes `out` this process's: creates it (checking it is writable), takes its lock
/// (warning when a dead run's lock is taken over), refuses a fresh run into a directory
/// that holds a run or its leftovers, and removes stale temp files. The lock is held until
/// the returned directory drops.
pub fn claim(out: &Path, resume: bool) -> anyhow::Result<RunDir> {
    writable(out)?;
    let dir = RunDir::lock(out).with_context(|| format!("--out {}", out.display()))?;
    let shown = out.display();
    if let Some(pid) = dir.taken_over() {
        eprintln!(
            "warning: {shown} held a stale lock of process {pid}, which no longer runs (a crash?); \
             taking the directory over"
        );
    }
    let state = match resume {
        true => DirState::Free,
        false => dir.state().with_context(|| format!("--out {shown}"))?,
    };
    match state {
        DirState::Free => {}
        DirState::FailedStart => eprintln!(
            "seg_train: --out {shown} holds a run that stopped before its first checkpoint; starting it afresh"
        ),
        DirState::HoldsRun => bail!("--out {shown} already holds a run; continue it with --resume {shown} or pick another --out"),
        DirState::LostConfig => bail!(
            "--out {shown} holds checkpoints or a log.jsonl but no config.json (a run whose \
             config was lost?); a fresh run would overwrite them: continue it with --resume \
             {shown} (the config is recovered from its newest checkpoint), or pick another --out"
        ),
    }
    for p in dir.remove_stale_temps()? {
        eprintln!(
            "note: removed the stale temp file {} (an interrupted write)",
            p.display()
        );
    }
    Ok(dir)
}

/// The save pause of [`SAVE_PAUSE_ENV`], if set.
pub fn save_pause() -> anyhow::Result<Option<std::time::Duration>> {
    match std::env::var(SAVE_PAUSE_ENV) {
        Ok(v) => {
            let ms: u64 = v
                .parse()
                .with_context(|| format!("{SAVE_PAUSE_ENV}={v}: not a number of milliseconds"))?;
            Ok(Some(std::time::Duration::from_millis(ms)))
        }
        Err(_) => Ok(None),
    }
}
