//! Atomic file writes: temp file in the same directory, fsync, rename, fsync of the
//! directory (the protocol of LevelDB/SQLite and of PyTorch Lightning's `atomic_save`).
//! A reader sees the old file or the new one, never a torn mix; a crash leaves at most a
//! hidden temp file behind.
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` atomically: to `.{name}.tmp-{pid}` beside it, fsynced, renamed
/// over `path`, then the directory fsynced. On error the temp file is removed and an
/// existing `path` is left as it was.
///
/// ```
/// # let dir = std::env::temp_dir().join(format!("keel-train-atomic-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("summary.json");
/// keel_train::write_atomic(&path, b"{\"miou\": 0.5}")?;
/// keel_train::write_atomic(&path, b"{\"miou\": 0.6}")?;
/// assert_eq!(std::fs::read(&path).unwrap(), b"{\"miou\": 0.6}");
/// assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1); // no temp file left
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), candle::Error>(())
/// ```
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> candle::Result<()> {
    write_atomic_paused(path.as_ref(), bytes, None)
}

/// [`write_atomic`] that sleeps for `pause` between writing the temp file and renaming it
/// (tests use it to kill a process while a checkpoint is being written).
pub(crate) fn write_atomic_paused(
    path: &Path,
    bytes: &[u8],
    pause: Option<std::time::Duration>,
) -> candle::Result<()> {
    let tmp = temp_path(path)?;
    let res = write_synced(&tmp, bytes).and_then(|()| {
        if let Some(d) = pause {
            std::thread::sleep(d);
        }
        fs::rename(&tmp, path).map_err(|e| {
            io_err(
                format!(
                    "write_atomic: cannot move {} into place as {}",
                    tmp.display(),
                    path.display()
                ),
                e,
            )
        })
    });
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// The temp file `write_atomic` uses for `path`: `.{name}.tmp-{pid}` in the same directory
/// (the same file system, so the rename is atomic).
pub(crate) fn temp_path(path: &Path) -> candle::Result<PathBuf> {
    let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
        candle::Error::Msg(format!(
            "write_atomic: {} has no file name; pass a file path",
            path.display()
        ))
    })?;
    Ok(path.with_file_name(format!(".{name}.tmp-{}", std::process::id())))
}

fn write_synced(tmp: &Path, bytes: &[u8]) -> candle::Result<()> {
    let mut f = File::create(tmp)
        .map_err(|e| io_err(format!("write_atomic: cannot create {}", tmp.display()), e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| io_err(format!("write_atomic: cannot write {}", tmp.display()), e))
}

/// Removes the temp files an interrupted write left in `dir` (not recursive) and returns
/// their paths: keel's own (`.{name}.tmp-{pid}`, from [`write_atomic`]) and those of the
/// `tempfile` crate that safetensors' `serialize_to_file` and `candle::safetensors::save`
/// write before renaming (`.tmp` and six letters or digits). Call it only while no other
/// process writes into `dir` (hold a [`crate::RunLock`]): it cannot tell a stale temp file
/// from one being written.
///
/// ```
/// # let dir = std::env::temp_dir().join(format!("keel-train-temps-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// for name in [".ckpt-00000010.safetensors.tmp-4242", ".tmpA1b2C3", "ckpt-00000010.safetensors", ".tmp-notes"] {
///     std::fs::write(dir.join(name), b"x").unwrap();
/// }
/// let removed = keel_train::remove_stale_temps(&dir)?;
/// assert_eq!(removed.len(), 2);
/// let mut left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
/// left.sort();
/// assert_eq!(left, [".tmp-notes", "ckpt-00000010.safetensors"]);
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), candle::Error>(())
/// ```
pub fn remove_stale_temps(dir: impl AsRef<Path>) -> candle::Result<Vec<PathBuf>> {
    let dir = dir.as_ref();
    let listing = |e| {
        io_err(
            format!("cannot list {} for stale temp files", dir.display()),
            e,
        )
    };
    let mut removed = Vec::new();
    for entry in fs::read_dir(dir).map_err(listing)? {
        let entry = entry.map_err(listing)?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if !is_temp_name(&name) || !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        match fs::remove_file(entry.path()) {
            Ok(()) => removed.push(entry.path()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(io_err(
                    format!(
                        "cannot remove the stale temp file {}",
                        entry.path().display()
                    ),
                    e,
                ))
            }
        }
    }
    Ok(removed)
}

/// `.{name}.tmp-{digits}` (keel) or `.tmp{6 alphanumerics}` (the `tempfile` crate).
fn is_temp_name(name: &str) -> bool {
    let keel = name.starts_with('.')
        && name.rsplit_once(".tmp-").is_some_and(|(head, pid)| {
            head.len() > 1 && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())
        });
    let tempfile = name
        .strip_prefix(".tmp")
        .is_some_and(|r| r.len() == 6 && r.bytes().all(|b| b.is_ascii_alphanumeric()));
    keel || tempfile
}

pub(crate) fn io_err(what: String, e: std::io::Error) -> candle::Error {
    candle::Error::Msg(format!("{what}: {e}"))
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> candle::Result<()> {
    // An empty parent (a bare file name) means the current directory.
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir).and_then(|f| f.sync_all()).map_err(|e| {
        io_err(
            format!("write_atomic: cannot fsync directory {}", dir.display()),
            e,
        )
    })
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> candle::Result<()> {
    // Directories cannot be opened for fsync on this platform; the rename is still atomic.
    Ok(())
}
