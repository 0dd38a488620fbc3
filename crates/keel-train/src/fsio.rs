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
    let path = path.as_ref();
    let tmp = temp_path(path)?;
    let res = write_synced(&tmp, bytes).and_then(|()| {
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
