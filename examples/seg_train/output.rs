//! seg_train's output-directory helpers beside keel-train's run driver (which claims a run's
//! directory, [`keel::train::driver::claim`]): `--out` checked writable before a grid starts,
//! and the checkpoint save pause tests use to kill a process mid-save.
use std::path::Path;

use anyhow::{anyhow, Context};
use keel::train::run_dir::check_writable;

/// Test knob, read once when a run opens its checkpoints (never in the step loop): every
/// checkpoint save pauses this many milliseconds between its temp file and the rename, so a
/// test can SIGKILL the process in the middle of a save.
pub const SAVE_PAUSE_ENV: &str = "SEG_TRAIN_TEST_SAVE_PAUSE_MS";

/// `--out` created and writable (nothing left behind when it is not).
pub fn writable(out: &Path) -> anyhow::Result<()> {
    check_writable(out).map_err(|e| anyhow!("--out {e}"))
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
