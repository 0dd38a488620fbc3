//! [`TempDir`]: a fresh directory per test, removed on drop; [`TempPath`]: a fresh path a
//! test hands to the code under test (which creates it: a run directory or a file), removed
//! on drop.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A fresh, empty directory under the system temp dir, unique to this process, thread and
/// call, removed (with its content) on drop. The path is the public field.
///
/// ```
/// use keel_test_support::TempDir;
/// let path = {
///     let tmp = TempDir::new("doc");
///     std::fs::write(tmp.0.join("b"), b"").unwrap();
///     std::fs::write(tmp.0.join("a"), b"").unwrap();
///     assert_eq!(tmp.names(), ["a", "b"]);
///     tmp.0.clone()
/// };
/// assert!(!path.exists());
/// ```
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates `{temp}/keel-test-{name}-{pid}-{thread}-{n}`, emptied first if it exists.
    pub fn new(name: &str) -> Self {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let thread = format!("{:?}", std::thread::current().id());
        let thread: String = thread.chars().filter(char::is_ascii_digit).collect();
        let dir = std::env::temp_dir().join(format!(
            "keel-test-{name}-{}-{thread}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("TempDir: cannot create {}: {e}", dir.display()));
        Self(dir)
    }

    /// The names of the entries in the directory, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap_or_else(|e| panic!("TempDir: cannot list {}: {e}", self.0.display()))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh path `{temp}/{prefix}-{pid}-{name}` that does not exist yet (anything there is
/// removed first), for a run directory or a file the code under test creates itself;
/// removed (a directory with its content) on drop, also when the test fails. It derefs to
/// [`Path`].
///
/// ```
/// use keel_test_support::TempPath;
/// let kept = {
///     let out = TempPath::new("keel-doc", "run");
///     assert!(!out.exists());
///     std::fs::create_dir_all(out.join("checkpoints")).unwrap();
///     out.to_path_buf()
/// };
/// assert!(!kept.exists());
/// let file = TempPath::new("keel-doc", "state.safetensors");
/// std::fs::write(&file, b"").unwrap();
/// let kept = file.to_path_buf();
/// drop(file);
/// assert!(!kept.exists());
/// ```
#[derive(Debug)]
pub struct TempPath(PathBuf);

/// Removes `path`: a directory with its content, or a file; nothing there is fine.
fn remove(path: &Path) {
    let _ = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
}

impl TempPath {
    /// `{temp}/{prefix}-{pid}-{name}`, removed first if it exists.
    pub fn new(prefix: &str, name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{name}", std::process::id()));
        remove(&path);
        Self(path)
    }
}

impl std::ops::Deref for TempPath {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempPath {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        remove(&self.0);
    }
}
