//! The output directory of a run: one process at a time (a [`RunLock`]), no stale temp
//! files, no overwriting of a run that lost its `config.json`, and the `config.json` a
//! resumed run continues with.
use std::path::Path;

use anyhow::{bail, Context};
use keel::train::{remove_stale_temps, write_atomic, RunLock, LOCK_FILE};

use super::cli::RunConfig;

/// Test knob, read once when a run opens its checkpoints (never in the step loop): every
/// checkpoint save pauses this many milliseconds between its temp file and the rename, so a
/// test can SIGKILL the process in the middle of a save.
pub const SAVE_PAUSE_ENV: &str = "SEG_TRAIN_TEST_SAVE_PAUSE_MS";

/// Makes `out` this process's: creates it (checking it is writable), takes its lock
/// (warning when a dead run's lock is taken over), refuses a fresh run into a directory
/// that holds a run or its leftovers, and removes stale temp files. The lock is held until
/// the returned guard drops.
pub fn claim(out: &Path, resume: bool) -> anyhow::Result<RunLock> {
    check_writable(out)?;
    let lock = RunLock::acquire(out).with_context(|| format!("--out {}", out.display()))?;
    if let Some(pid) = lock.taken_over() {
        eprintln!(
            "warning: {} held a stale lock of process {pid}, which no longer runs (a crash?); \
             taking the directory over",
            out.display()
        );
    }
    if !resume {
        refuse_used(out)?;
    }
    for dir in [out.to_path_buf(), out.join("checkpoints")] {
        if dir.is_dir() {
            for p in remove_stale_temps(&dir)? {
                eprintln!(
                    "note: removed the stale temp file {} (an interrupted write)",
                    p.display()
                );
            }
        }
    }
    Ok(lock)
}

/// A fresh run must not write into another run's directory.
fn refuse_used(out: &Path) -> anyhow::Result<()> {
    let shown = out.display();
    if failed_start_leftover(out)? {
        return Ok(());
    }
    if out.join("config.json").exists() {
        bail!("--out {shown} already holds a run; continue it with --resume {shown} or pick another --out")
    }
    let ckpts = out.join("checkpoints");
    let has_ckpt = ckpts.is_dir()
        && std::fs::read_dir(&ckpts)?
            .any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".safetensors")));
    if has_ckpt || out.join("log.jsonl").exists() {
        bail!(
            "--out {shown} holds checkpoints or a log.jsonl but no config.json (a run whose \
             config was lost?); a fresh run would overwrite them: continue it with --resume \
             {shown} (the config is recovered from its newest checkpoint), or pick another --out"
        )
    }
    Ok(())
}

/// Checks that `out` can be created and written, leaving nothing behind when it cannot.
pub fn check_writable(out: &Path) -> anyhow::Result<()> {
    let existed = out.exists();
    std::fs::create_dir_all(out)
        .with_context(|| format!("--out {}: cannot create the directory", out.display()))?;
    let probe = out.join(".seg_train_write_probe");
    let res = std::fs::write(&probe, b"ok");
    let _ = std::fs::remove_file(&probe);
    if let Err(e) = res {
        if !existed {
            let _ = std::fs::remove_dir(out);
        }
        bail!("--out {}: not writable: {e}", out.display())
    }
    Ok(())
}

/// Whether `out` holds only what a fresh start that failed before its first checkpoint
/// leaves (`config.json`, maybe `log.jsonl` and an empty `checkpoints/`, hidden temp files,
/// this run's lock): a
/// plain re-run may then start over in it. Anything else (a checkpoint, a foreign file)
/// means a run worth keeping. Says so on stderr when it starts over.
fn failed_start_leftover(out: &Path) -> anyhow::Result<bool> {
    if !out.join("config.json").exists() {
        return Ok(false);
    }
    let names = |dir: &Path| -> anyhow::Result<Vec<String>> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(dir).with_context(|| format!("--out {}", dir.display()))? {
            v.push(e?.file_name().to_string_lossy().into_owned());
        }
        Ok(v)
    };
    let visible = |n: &String| !n.starts_with('.');
    for name in names(out)?.iter().filter(|n| visible(n)) {
        let ok = match name.as_str() {
            "config.json" | "log.jsonl" | LOCK_FILE => true,
            "checkpoints" => {
                let dir = out.join(name);
                dir.is_dir() && !names(&dir)?.iter().any(visible)
            }
            _ => false,
        };
        if !ok {
            return Ok(false);
        }
    }
    eprintln!(
        "seg_train: --out {} holds a run that stopped before its first checkpoint; starting it afresh",
        out.display()
    );
    Ok(true)
}

/// A resumed run's `config.json` is `cfg`: rewritten when it was recovered from the
/// checkpoint or `--steps` extended the run.
pub fn sync_config(out: &Path, cfg: &RunConfig) -> anyhow::Result<()> {
    let path = out.join("config.json");
    let text = serde_json::to_string_pretty(cfg)?;
    if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
        write_atomic(&path, text.as_bytes())?;
    }
    Ok(())
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
