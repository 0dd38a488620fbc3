//! Training checkpoints as verified safetensors files (<https://huggingface.co/docs/safetensors>),
//! written atomically: temp file, fsync, rename, fsync of the directory (the protocol of
//! LevelDB/SQLite and of PyTorch Lightning's `atomic_save`).
//!
//! # File format
//! A keel checkpoint is a plain safetensors file named `ckpt-{step:08}.safetensors` whose
//! header metadata (`__metadata__`) holds:
//!
//! | key | value |
//! |---|---|
//! | `format` | `keel-checkpoint` |
//! | `version` | `1` |
//! | `step` | the step, decimal |
//! | `meta` | the [`Checkpoint::meta`] JSON |
//! | `metric` | the metric given to [`CheckpointManager::save`], when finite |
//! | `checksum` | `sha256:<hex>` over step, meta, metric and every tensor's name, dtype, shape and bytes |
//!
//! Any tool that reads safetensors can read the tensors; [`crate::load_checkpoint`] also
//! verifies the
//! header and the checksum, so a truncated file or a flipped byte is an error, never a
//! silently different model. Tensor bytes are little-endian, as safetensors specifies.
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use candle::{DType, Device};

use crate::ckpt_file::{load_verified, peek, to_bytes, Checkpoint, LoadFailure};
use crate::fsio::{io_err, remove_stale_temps, write_atomic_paused};

const PREFIX: &str = "ckpt-";
const SUFFIX: &str = ".safetensors";

/// Writes checkpoints into one directory, keeps the last `keep_last` of them plus the best
/// one, and finds the newest for resuming.
///
/// The best checkpoint is the one saved with the highest `metric` (e.g. val mIoU). It is not
/// copied: it stays one of the `ckpt-*.safetensors` files, exempt from pruning, and its
/// metric is in its header, so a new manager on the same directory (a resumed run) finds it
/// again. No index file is needed, and none can go stale.
///
/// Guarantees: a checkpoint is written to a temp file (`.ckpt-*.tmp-*`, ignored by
/// [`CheckpointManager::latest`]), fsynced, renamed into place, and the directory fsynced,
/// before any older checkpoint is deleted; a failed save removes its temp file and leaves
/// every existing checkpoint as it was.
///
/// ```
/// use std::collections::HashMap;
/// use candle::{Device, Tensor};
/// use keel_train::{load_checkpoint, Checkpoint, CheckpointManager};
/// # fn main() -> candle::Result<()> {
/// # let dir = std::env::temp_dir().join(format!("keel-train-ckpt-doc-{}", std::process::id()));
/// let mut mgr = CheckpointManager::new(&dir, 2)?;
/// for (step, miou) in [(100, 0.5), (200, 0.7), (300, 0.6), (400, 0.65)] {
///     let mut ckpt = Checkpoint::new(step);
///     ckpt.tensors.insert("w".into(), Tensor::new(&[step as f32], &Device::Cpu)?);
///     mgr.save(&ckpt, Some(miou))?;
/// }
/// // Last two (300, 400) plus the best (200).
/// assert_eq!(mgr.best(), Some(dir.join("ckpt-00000200.safetensors")));
/// let latest = mgr.latest()?.unwrap();
/// assert_eq!(latest, dir.join("ckpt-00000400.safetensors"));
/// assert!(!dir.join("ckpt-00000100.safetensors").exists());
/// let back = load_checkpoint(&latest, &Device::Cpu)?;
/// assert_eq!(back.step, 400);
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct CheckpointManager {
    dir: PathBuf,
    keep_last: usize,
    /// Valid-looking checkpoints in `dir`, sorted by step.
    entries: Vec<Entry>,
    /// Test knob: a sleep between writing a checkpoint's temp file and renaming it.
    write_pause: Option<std::time::Duration>,
}

/// The checkpoint [`CheckpointManager::load_latest`] found, with the newer files it had to
/// skip.
#[derive(Debug)]
pub struct Resume {
    /// The newest checkpoint that verified.
    pub checkpoint: Checkpoint,
    /// Its file.
    pub path: PathBuf,
    /// Newer checkpoint files that failed verification, newest first.
    pub skipped: Vec<PathBuf>,
    /// What was wrong with each file of [`Resume::skipped`], in the same order.
    pub skip_reasons: Vec<String>,
}

impl Resume {
    /// Resumes from the named checkpoint `file` (loaded and verified, see
    /// [`crate::load_checkpoint`]): nothing skipped.
    pub fn from_file(file: &Path, device: &Device) -> candle::Result<Self> {
        Ok(Self {
            checkpoint: crate::load_checkpoint(file, device)?,
            path: file.to_path_buf(),
            skipped: Vec::new(),
            skip_reasons: Vec::new(),
        })
    }
}

/// Loads the newest checkpoint of `dir` that verifies (header and checksum, see
/// [`crate::load_checkpoint`]) onto `device`, for resuming; reads only, so a program can
/// look before it takes the directory over. Newer checkpoint files whose content does not
/// verify (truncated by a crash, a checksum mismatch from a damaged disk, not a keel
/// checkpoint) are skipped and listed in [`Resume::skipped`] with the reason, so the caller
/// can warn about them.
///
/// `Ok(None)` when the directory holds no checkpoint file at all; an error naming the
/// newest file and what is wrong with it when files exist but none verifies. A file that
/// cannot be read at all (permission denied, an I/O error, a directory of a checkpoint's
/// name) is an error naming it, never skipped: its content may be fine, and falling back
/// would silently lose the steps after the older checkpoint.
pub fn load_latest_checkpoint(
    dir: impl AsRef<Path>,
    device: &Device,
) -> candle::Result<Option<Resume>> {
    let dir = dir.as_ref();
    let mut files: Vec<(usize, PathBuf)> = list_names(dir)?
        .into_iter()
        .filter_map(|name| Some((parse_file_name(&name)?, dir.join(name))))
        .collect();
    files.sort();
    let (mut skipped, mut skip_reasons) = (Vec::new(), Vec::new());
    while let Some((_, path)) = files.pop() {
        match load_verified(&path, device) {
            Ok(checkpoint) => {
                return Ok(Some(Resume {
                    checkpoint,
                    path,
                    skipped,
                    skip_reasons,
                }))
            }
            Err(LoadFailure::Corrupt(e)) => {
                skip_reasons.push(e.to_string());
                skipped.push(path);
            }
            Err(LoadFailure::Fatal(e)) => candle::bail!(
                "{e}; fix the file's permissions or the disk, or move the file away to resume \
                 from an older checkpoint"
            ),
        }
    }
    match (skipped.first(), skip_reasons.first()) {
        (Some(newest), Some(e)) => candle::bail!(
            "CheckpointManager: no valid checkpoint in {}; the newest, {}, is corrupt or \
             truncated: {e}; restart the run or restore a checkpoint from a backup",
            dir.display(),
            newest.display()
        ),
        _ => Ok(None),
    }
}

#[derive(Clone, Debug)]
struct Entry {
    step: usize,
    path: PathBuf,
    metric: Option<f64>,
    /// Whether every float tensor is finite; `None` until known (a file taken over from
    /// the directory is read only when pruning needs to know).
    finite: Option<bool>,
}

impl CheckpointManager {
    /// A manager for `dir`, created if needed. Errors clearly when `dir` is not a writable
    /// directory or `keep_last` is 0. Existing checkpoints in `dir` are taken over (they count
    /// for pruning and for the best), and temp files left by an interrupted save are removed
    /// (keel's and the safetensors library's, see [`crate::remove_stale_temps`]): one
    /// manager per directory at a time; a program that may run twice on one directory
    /// takes a [`crate::RunLock`] first.
    pub fn new(dir: impl Into<PathBuf>, keep_last: usize) -> candle::Result<Self> {
        let dir = dir.into();
        if keep_last == 0 {
            candle::bail!(
                "CheckpointManager: keep_last must be at least 1 (resuming needs the latest \
                 checkpoint), got 0"
            )
        }
        if dir.exists() && !dir.is_dir() {
            candle::bail!(
                "CheckpointManager: {} exists and is not a directory; choose another \
                 checkpoint directory",
                dir.display()
            )
        }
        fs::create_dir_all(&dir).map_err(|e| {
            io_err(
                format!("cannot create checkpoint directory {}", dir.display()),
                e,
            )
        })?;
        let probe = dir.join(format!(".keel-write-probe-{}", std::process::id()));
        File::create(&probe)
            .and_then(|f| f.sync_all())
            .map_err(|e| {
                io_err(
                    format!("checkpoint directory {} is not writable", dir.display()),
                    e,
                )
            })?;
        let _ = fs::remove_file(&probe);
        remove_stale_temps(&dir)?;
        let entries = scan(&dir)?;
        Ok(Self {
            dir,
            keep_last,
            entries,
            write_pause: None,
        })
    }

    /// For tests of crash safety only: every [`CheckpointManager::save`] sleeps for `pause`
    /// after writing its temp file and before renaming it into place, so a test can kill
    /// the process while a checkpoint is being written.
    #[doc(hidden)]
    pub fn set_write_pause(&mut self, pause: Option<std::time::Duration>) {
        self.write_pause = pause;
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path `save` writes the checkpoint of `step` to.
    pub fn path_for(&self, step: usize) -> PathBuf {
        self.dir.join(file_name(step))
    }

    /// Writes `ckpt` to `ckpt-{step:08}.safetensors` atomically (see the type docs), then
    /// deletes the checkpoints that are neither among the last `keep_last` by step, nor the
    /// best by `metric` (higher is better; `None` or a non-finite metric never makes a
    /// checkpoint the best), nor the newest one whose float tensors are all finite (a run
    /// that diverged without a guard writes NaN checkpoints; pruning never deletes the last
    /// finite one, so there is always a state to go back to). Saving a step that already has
    /// a checkpoint replaces it atomically. Returns the path written.
    ///
    /// The tensors are copied to the CPU once; a tensor named `__metadata__`, or one with a
    /// sub-byte float dtype, is an error before anything is written.
    pub fn save(&mut self, ckpt: &Checkpoint, metric: Option<f64>) -> candle::Result<PathBuf> {
        let metric = metric.filter(|m| m.is_finite());
        let path = self.path_for(ckpt.step);
        let finite = tensors_finite(ckpt)?;
        write_atomic_paused(&path, &to_bytes(ckpt, metric)?, self.write_pause)?;
        self.entries.retain(|e| e.step != ckpt.step);
        self.entries.push(Entry {
            step: ckpt.step,
            path: path.clone(),
            metric,
            finite: Some(finite),
        });
        self.entries.sort_by_key(|e| e.step);
        self.prune(&path)?;
        Ok(path)
    }

    /// The newest checkpoint in the directory by step whose name and header look valid
    /// (full verification happens in [`crate::load_checkpoint`]); temp files and files of other
    /// names are ignored. Rescans the directory, so it sees checkpoints of other processes.
    pub fn latest(&self) -> candle::Result<Option<PathBuf>> {
        Ok(scan(&self.dir)?.pop().map(|e| e.path))
    }

    /// [`load_latest_checkpoint`] of this manager's directory.
    ///
    /// ```
    /// use candle::{Device, Tensor};
    /// use keel_train::{Checkpoint, CheckpointManager};
    /// # fn main() -> candle::Result<()> {
    /// # let dir = std::env::temp_dir().join(format!("keel-train-resume-doc-{}", std::process::id()));
    /// let mut mgr = CheckpointManager::new(&dir, 3)?;
    /// assert!(mgr.load_latest(&Device::Cpu)?.is_none());
    /// for step in [10, 20] {
    ///     let mut ckpt = Checkpoint::new(step);
    ///     ckpt.tensors.insert("w".into(), Tensor::new(&[step as f32], &Device::Cpu)?);
    ///     mgr.save(&ckpt, None)?;
    /// }
    /// std::fs::write(dir.join("ckpt-00000020.safetensors"), b"torn").unwrap();
    /// let r = mgr.load_latest(&Device::Cpu)?.unwrap();
    /// assert_eq!(r.checkpoint.step, 10);
    /// assert_eq!(r.skipped, vec![dir.join("ckpt-00000020.safetensors")]);
    /// # std::fs::remove_dir_all(&dir).unwrap();
    /// # Ok(()) }
    /// ```
    pub fn load_latest(&self, device: &Device) -> candle::Result<Option<Resume>> {
        load_latest_checkpoint(&self.dir, device)
    }

    /// The checkpoint saved with the highest metric so far (the earliest one on ties), if any
    /// was saved with a finite metric.
    pub fn best(&self) -> Option<PathBuf> {
        best_entry(&self.entries).map(|e| e.path.clone())
    }

    /// The metric of [`CheckpointManager::best`].
    pub fn best_metric(&self) -> Option<f64> {
        best_entry(&self.entries).and_then(|e| e.metric)
    }

    /// The checkpoints this manager keeps, oldest first.
    pub fn checkpoints(&self) -> Vec<PathBuf> {
        self.entries.iter().map(|e| e.path.clone()).collect()
    }

    /// The step of the newest checkpoint whose float tensors are all finite; reads the
    /// files taken over from the directory (newest first) until it finds one, so it costs
    /// nothing while the newest checkpoint saved is finite. A file that does not load is
    /// not finite.
    fn last_finite_step(&mut self) -> Option<usize> {
        for e in self.entries.iter_mut().rev() {
            let finite = *e.finite.get_or_insert_with(|| {
                load_verified(&e.path, &Device::Cpu)
                    .ok()
                    .and_then(|ck| tensors_finite(&ck).ok())
                    .unwrap_or(false)
            });
            if finite {
                return Some(e.step);
            }
        }
        None
    }

    fn prune(&mut self, just_saved: &Path) -> candle::Result<()> {
        let best_step = best_entry(&self.entries).map(|e| e.step);
        let finite_step = self.last_finite_step();
        let n = self.entries.len();
        let keep_from = n.saturating_sub(self.keep_last);
        let mut kept = Vec::with_capacity(n);
        let mut result = Ok(());
        for (i, e) in std::mem::take(&mut self.entries).into_iter().enumerate() {
            let protected = Some(e.step) == best_step || Some(e.step) == finite_step;
            if i >= keep_from || protected || e.path == just_saved {
                kept.push(e);
                continue;
            }
            match fs::remove_file(&e.path) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => {
                    if result.is_ok() {
                        result = Err(io_err(
                            format!(
                                "checkpoint {} was saved, but removing the old checkpoint {} \
                                 failed",
                                just_saved.display(),
                                e.path.display()
                            ),
                            err,
                        ));
                    }
                    kept.push(e);
                }
            }
        }
        self.entries = kept;
        result
    }
}

fn file_name(step: usize) -> String {
    format!("{PREFIX}{step:08}{SUFFIX}")
}

/// The step of a `ckpt-{digits}.safetensors` name.
fn parse_file_name(name: &str) -> Option<usize> {
    let digits = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    if digits.len() < 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn list_names(dir: &Path) -> candle::Result<Vec<String>> {
    let rd = fs::read_dir(dir).map_err(|e| {
        io_err(
            format!("cannot list checkpoint directory {}", dir.display()),
            e,
        )
    })?;
    let mut names = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| {
            io_err(
                format!("cannot list checkpoint directory {}", dir.display()),
                e,
            )
        })?;
        if let Ok(name) = entry.file_name().into_string() {
            names.push(name);
        }
    }
    Ok(names)
}

/// The valid-looking checkpoints of `dir`, sorted by step.
fn scan(dir: &Path) -> candle::Result<Vec<Entry>> {
    let mut entries: Vec<Entry> = list_names(dir)?
        .into_iter()
        .filter_map(|name| {
            let step = parse_file_name(&name)?;
            let path = dir.join(&name);
            let (hstep, metric) = peek(&path)?;
            (hstep == step).then_some(Entry {
                step,
                path,
                metric,
                finite: None,
            })
        })
        .collect();
    entries.sort_by_key(|e| e.step);
    Ok(entries)
}

/// Whether every float tensor of `ckpt` is finite: its f32 sum is (as
/// [`crate::TrainState::weights_finite`], values so large that the sum overflows count as
/// non-finite: such a run has diverged).
fn tensors_finite(ckpt: &Checkpoint) -> candle::Result<bool> {
    for t in ckpt.tensors.values() {
        if t.dtype().is_float()
            && !t
                .to_dtype(DType::F32)?
                .sum_all()?
                .to_scalar::<f32>()?
                .is_finite()
        {
            return Ok(false);
        }
    }
    Ok(true)
}

fn best_entry(entries: &[Entry]) -> Option<&Entry> {
    let mut best: Option<&Entry> = None;
    for e in entries {
        if let Some(m) = e.metric {
            if best.and_then(|b| b.metric).is_none_or(|b| m > b) {
                best = Some(e);
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_round_trip() {
        assert_eq!(file_name(42), "ckpt-00000042.safetensors");
        assert_eq!(parse_file_name("ckpt-00000042.safetensors"), Some(42));
        assert_eq!(
            parse_file_name("ckpt-123456789.safetensors"),
            Some(123456789)
        );
        assert_eq!(parse_file_name(".ckpt-00000042.safetensors.tmp-1"), None);
        assert_eq!(parse_file_name("ckpt-42.safetensors"), None);
        assert_eq!(parse_file_name("ckpt-0000004x.safetensors"), None);
    }
}
