//! A run's output directory and its discipline, for any trainer: created and checked
//! writable up front, held by one process at a time (a [`RunLock`]), judged before a fresh
//! run writes into it (a directory holding a run, or a run's checkpoints without its
//! config, is never overwritten; what a start that failed before its first checkpoint left
//! may be reused), cleared of stale temp files, and given the run's `config.json`.
//!
//! The layout: `config.json` (the run's settings), `log.jsonl`, `checkpoints/*.safetensors`
//! and the lock file [`LOCK_FILE`]. Messages here name directories and files; a program adds
//! its own option names (the library never speaks a command-line flag).
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::fsio::io_err;
use crate::{remove_stale_temps, write_atomic, RunLock, LOCK_FILE};

/// The run's settings inside its directory.
pub const CONFIG_FILE: &str = "config.json";
/// The run's JSONL log inside its directory.
pub const LOG_FILE: &str = "log.jsonl";
/// The folder of the run's checkpoints inside its directory.
pub const CHECKPOINT_DIR: &str = "checkpoints";

/// Checks that `dir` can be created and written (a probe file, removed again), leaving
/// nothing behind when it cannot. Errors start with the directory:
/// `"{dir}: not writable: {io error}"`.
///
/// ```
/// # let dir = std::env::temp_dir().join(format!("keel-run-dir-writable-{}", std::process::id()));
/// keel_train::run_dir::check_writable(&dir)?;
/// assert!(dir.is_dir() && std::fs::read_dir(&dir).unwrap().next().is_none());
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), candle::Error>(())
/// ```
pub fn check_writable(dir: &Path) -> candle::Result<()> {
    let existed = dir.exists();
    std::fs::create_dir_all(dir)
        .map_err(|e| io_err(format!("{}: cannot create the directory", dir.display()), e))?;
    let probe = dir.join(".keel_write_probe");
    let res = std::fs::write(&probe, b"ok");
    let _ = std::fs::remove_file(&probe);
    if let Err(e) = res {
        if !existed {
            let _ = std::fs::remove_dir(dir);
        }
        let msg = format!("{}: not writable: {e}", dir.display());
        return Err(candle::Error::Msg(msg));
    }
    Ok(())
}

/// What a run directory holds, as a fresh run sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirState {
    /// Nothing of a run: a fresh run may start here.
    Free,
    /// Only what a start that failed before its first checkpoint leaves (`config.json`,
    /// maybe `log.jsonl` and an empty `checkpoints/`, hidden temp files, the lock): a fresh
    /// run may start over here.
    FailedStart,
    /// A run (its `config.json` and more): continue it, or pick another directory.
    HoldsRun,
    /// Checkpoints or a `log.jsonl` but no `config.json` (a run whose config was lost): a
    /// fresh run would overwrite them.
    LostConfig,
}

/// A run directory held by this process: its lock is released when this drops.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    lock: RunLock,
}

impl RunDir {
    /// Takes the lock of the existing directory `path` (see [`RunLock::acquire`]).
    pub fn lock(path: impl AsRef<Path>) -> candle::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let lock = RunLock::acquire(&path)?;
        Ok(Self { path, lock })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pid of a dead process whose stale lock was taken over, if one was.
    pub fn taken_over(&self) -> Option<u32> {
        self.lock.taken_over()
    }

    /// What the directory holds (see [`DirState`]).
    pub fn state(&self) -> candle::Result<DirState> {
        let dir = &self.path;
        if self.failed_start_leftover()? {
            return Ok(DirState::FailedStart);
        }
        if dir.join(CONFIG_FILE).exists() {
            return Ok(DirState::HoldsRun);
        }
        let ckpts = dir.join(CHECKPOINT_DIR);
        let has_ckpt = ckpts.is_dir() && names(&ckpts)?.iter().any(|n| n.ends_with(".safetensors"));
        Ok(if has_ckpt || dir.join(LOG_FILE).exists() {
            DirState::LostConfig
        } else {
            DirState::Free
        })
    }

    /// Whether the directory holds a `config.json` and nothing visible beyond
    /// [`DirState::FailedStart`]'s files.
    fn failed_start_leftover(&self) -> candle::Result<bool> {
        let dir = &self.path;
        if !dir.join(CONFIG_FILE).exists() {
            return Ok(false);
        }
        let visible = |n: &String| !n.starts_with('.');
        for name in names(dir)?.iter().filter(|n| visible(n)) {
            let ok = match name.as_str() {
                CONFIG_FILE | LOG_FILE | LOCK_FILE => true,
                CHECKPOINT_DIR => {
                    let sub = dir.join(name);
                    sub.is_dir() && !names(&sub)?.iter().any(visible)
                }
                _ => false,
            };
            if !ok {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Removes the temp files interrupted writes left in the directory and its
    /// `checkpoints/` (see [`remove_stale_temps`]); returns their paths.
    pub fn remove_stale_temps(&self) -> candle::Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        for dir in [self.path.clone(), self.path.join(CHECKPOINT_DIR)] {
            if dir.is_dir() {
                removed.extend(remove_stale_temps(&dir)?);
            }
        }
        Ok(removed)
    }

    /// Makes `config.json` hold `config` (pretty JSON), writing it atomically only when its
    /// text differs (a fresh run, a config recovered from a checkpoint, an extended run).
    pub fn write_config(&self, config: &impl Serialize) -> candle::Result<()> {
        let path = self.path.join(CONFIG_FILE);
        let text = serde_json::to_string_pretty(config).map_err(|e| {
            candle::Error::Msg(format!("{}: cannot serialize: {e}", path.display()))
        })?;
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            write_atomic(&path, text.as_bytes())?;
        }
        Ok(())
    }
}

/// The entry names of `dir`.
fn names(dir: &Path) -> candle::Result<Vec<String>> {
    let listing = |e| io_err(format!("cannot list {}", dir.display()), e);
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).map_err(listing)? {
        v.push(
            e.map_err(listing)?
                .file_name()
                .to_string_lossy()
                .into_owned(),
        );
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("keel-run-dir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn states_of_a_directory() -> candle::Result<()> {
        let d = tmp("states");
        check_writable(&d)?;
        let dir = RunDir::lock(&d)?;
        assert_eq!(dir.state()?, DirState::Free);
        std::fs::create_dir_all(d.join(CHECKPOINT_DIR)).unwrap();
        dir.write_config(&serde_json::json!({"steps": 3}))?;
        std::fs::write(d.join(LOG_FILE), b"{}\n").unwrap();
        std::fs::write(d.join(".config.json.tmp-123"), b"x").unwrap();
        assert_eq!(dir.state()?, DirState::FailedStart);
        assert_eq!(dir.remove_stale_temps()?.len(), 1);
        std::fs::write(d.join(CHECKPOINT_DIR).join("ckpt-1.safetensors"), b"x").unwrap();
        assert_eq!(dir.state()?, DirState::HoldsRun);
        std::fs::remove_file(d.join(CONFIG_FILE)).unwrap();
        assert_eq!(dir.state()?, DirState::LostConfig);
        drop(dir);
        std::fs::remove_dir_all(&d).unwrap();
        Ok(())
    }

    #[test]
    fn write_config_rewrites_only_a_changed_text() -> candle::Result<()> {
        let d = tmp("config");
        check_writable(&d)?;
        let dir = RunDir::lock(&d)?;
        dir.write_config(&serde_json::json!({"steps": 3}))?;
        let path = d.join(CONFIG_FILE);
        let t0 = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        dir.write_config(&serde_json::json!({"steps": 3}))?;
        assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), t0);
        dir.write_config(&serde_json::json!({"steps": 4}))?;
        assert!(std::fs::read_to_string(&path).unwrap().contains('4'));
        drop(dir);
        std::fs::remove_dir_all(&d).unwrap();
        Ok(())
    }

    #[test]
    fn an_unwritable_directory_is_an_error_naming_it() {
        let err = check_writable(Path::new("/proc/keel-no-such-dir"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/proc/keel-no-such-dir: "), "{err}");
    }
}
