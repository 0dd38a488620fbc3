//! One process per run directory: a lock file holding the holder's pid, created with
//! `O_EXCL` (the pid-file convention of daemons, e.g. PostgreSQL's `postmaster.pid`).
//! A lock whose process is gone (a crash, SIGKILL) is taken over; the caller is told so it
//! can warn.
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::fsio::io_err;

/// The lock file's name inside the locked directory.
pub const LOCK_FILE: &str = "keel.lock";

/// A held lock on a run directory; released (the file removed) on drop.
///
/// ```
/// use keel_train::RunLock;
/// # let dir = std::env::temp_dir().join(format!("keel-train-lock-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// let lock = RunLock::acquire(&dir)?;
/// assert_eq!(lock.taken_over(), None);
/// // A second holder is refused while the first lives (here: the same process).
/// let err = RunLock::acquire(&dir).unwrap_err().to_string();
/// assert!(err.contains("is in use by process"), "{err}");
/// drop(lock);
/// assert!(RunLock::acquire(&dir).is_ok());
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), candle::Error>(())
/// ```
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
    taken_over: Option<u32>,
}

impl RunLock {
    /// Takes the lock of `dir` (which must exist): creates `dir/keel.lock` holding this
    /// process's pid. When the file exists and names a live process (this one included),
    /// the error names the directory, the pid and the fix; when it names a process that no
    /// longer runs, or holds no pid at all (a crash while it was being written), the lock is
    /// taken over and [`RunLock::taken_over`] says from which pid.
    ///
    /// Liveness is checked through `/proc/{pid}` on Linux and `kill -0` on other Unix
    /// systems; elsewhere a lock file is always taken to be held. A takeover is best effort:
    /// two processes taking over the same stale lock at the same instant can both succeed.
    pub fn acquire(dir: impl AsRef<Path>) -> candle::Result<Self> {
        let path = dir.as_ref().join(LOCK_FILE);
        let mut taken_over = None;
        loop {
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    let pid = std::process::id();
                    f.write_all(format!("{pid}\n").as_bytes())
                        .and_then(|()| f.sync_all())
                        .map_err(|e| io_err(format!("cannot write lock {}", path.display()), e))?;
                    return Ok(Self { path, taken_over });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err(format!("cannot create lock {}", path.display()), e)),
            }
            let text = match fs::read_to_string(&path) {
                Ok(t) => t,
                // Released between our create and our read: try again.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(format!("cannot read lock {}", path.display()), e)),
            };
            let holder = text.trim().parse::<u32>().ok();
            if let Some(pid) = holder.filter(|&p| alive(p)) {
                candle::bail!(
                    "{} is in use by process {pid} (lock file {}); wait for that run to end, \
                     or stop it, before starting another run on this directory (if no such \
                     run exists, delete the lock file)",
                    path.parent().unwrap_or(Path::new(".")).display(),
                    path.display()
                )
            }
            if taken_over.is_some() {
                candle::bail!(
                    "cannot take over the stale lock {}: another process took it at the same \
                     time; try again",
                    path.display()
                )
            }
            taken_over = Some(holder.unwrap_or(0));
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(io_err(
                        format!("cannot remove the stale lock {}", path.display()),
                        e,
                    ))
                }
            }
        }
    }

    /// The pid of the dead process whose stale lock this one replaced (0 when the stale
    /// file held no readable pid), `None` when the directory was free.
    pub fn taken_over(&self) -> Option<u32> {
        self.taken_over
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Remove the file only while it is still ours (a user may have deleted it and
        // another run taken the directory since).
        let ours = fs::read_to_string(&self.path)
            .is_ok_and(|t| t.trim().parse::<u32>().ok() == Some(std::process::id()));
        if ours {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Whether process `pid` exists (a zombie counts until it is reaped).
fn alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    #[cfg(target_os = "linux")]
    {
        Path::new(&format!("/proc/{pid}")).exists()
    }
    #[cfg(all(unix, not(target_os = "linux")))]
    {
        std::process::Command::new("kill")
            .args(["-0", &pid.to_string()])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
    #[cfg(not(unix))]
    {
        true
    }
}
