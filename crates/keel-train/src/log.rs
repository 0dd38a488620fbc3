//! A JSON Lines training log (<https://jsonlines.org>): one JSON value per line, flushed after
//! every record so that a killed run loses at most the record being written.
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Appends one JSON record per line to a file.
///
/// Each record is serialized with `serde_json` (compact, so it never contains a newline) and
/// written with a single `write_all` followed by a flush. Note that `serde_json` writes a
/// non-finite `f64` (NaN, inf) as `null`; [`crate::StepRecord`] keeps them as the strings
/// `"NaN"`, `"inf"`, `"-inf"` instead.
///
/// ```
/// use keel_train::JsonlLogger;
/// # fn main() -> candle::Result<()> {
/// # let dir = std::env::temp_dir().join(format!("keel-train-log-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// #[derive(serde::Serialize)]
/// struct Rec { step: usize, loss: f64 }
/// let path = dir.join("log.jsonl");
/// let mut log = JsonlLogger::create(&path)?;
/// log.log(&Rec { step: 1, loss: 0.5 })?;
/// drop(log);
/// let mut log = JsonlLogger::append(&path)?; // a resumed run keeps the old lines
/// log.log(&Rec { step: 2, loss: 0.25 })?;
/// let text = std::fs::read_to_string(&path).unwrap();
/// assert_eq!(text, "{\"step\":1,\"loss\":0.5}\n{\"step\":2,\"loss\":0.25}\n");
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct JsonlLogger {
    file: File,
    path: PathBuf,
}

impl JsonlLogger {
    /// Creates `path` (truncating an existing file). The parent directory must exist.
    pub fn create(path: impl AsRef<Path>) -> candle::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::create(&path).map_err(|e| {
            candle::Error::Msg(format!(
                "JsonlLogger: cannot create log file {}: {e}",
                path.display()
            ))
        })?;
        Ok(Self { file, path })
    }

    /// Opens `path` for appending, creating it when missing (for a resumed run).
    ///
    /// If the file ends in an incomplete line (the process was killed while writing a
    /// record), that partial line is cut off first, so the file stays valid JSON Lines.
    pub fn append(path: impl AsRef<Path>) -> candle::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let err = |what: &str, e: std::io::Error| {
            candle::Error::Msg(format!(
                "JsonlLogger: cannot {what} log file {}: {e}",
                path.display()
            ))
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| err("open", e))?;
        let len = file.metadata().map_err(|e| err("stat", e))?.len();
        if len > 0 {
            let keep = complete_prefix_len(&mut file, len).map_err(|e| err("read", e))?;
            if keep != len {
                file.set_len(keep).map_err(|e| err("repair", e))?;
            }
        }
        Ok(Self { file, path })
    }

    /// Opens the log of a run resumed at `step` (the number of steps its checkpoint holds):
    /// keeps the records whose `"step"` field is below `step` (a resumed run logs the later
    /// steps again; records without a step and a torn last line go too), rewritten with
    /// [`crate::write_atomic`], then appends. A missing file is created.
    ///
    /// ```
    /// use keel_train::JsonlLogger;
    /// # fn main() -> candle::Result<()> {
    /// # let dir = std::env::temp_dir().join(format!("keel-train-log-resume-doc-{}", std::process::id()));
    /// # std::fs::create_dir_all(&dir).unwrap();
    /// let path = dir.join("log.jsonl");
    /// std::fs::write(&path, "{\"step\":0}\n{\"step\":1}\n{\"step\":2}\n{\"st").unwrap();
    /// let mut log = JsonlLogger::resume(&path, 2)?; // the checkpoint holds 2 steps
    /// log.log(&serde_json::json!({ "step": 2 }))?;
    /// assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"step\":0}\n{\"step\":1}\n{\"step\":2}\n");
    /// # std::fs::remove_dir_all(&dir).unwrap();
    /// # Ok(()) }
    /// ```
    pub fn resume(path: impl AsRef<Path>, step: usize) -> candle::Result<Self> {
        let path = path.as_ref();
        if path.exists() {
            let text = std::fs::read_to_string(path).map_err(|e| {
                candle::Error::Msg(format!(
                    "JsonlLogger: cannot read log file {}: {e}",
                    path.display()
                ))
            })?;
            let mut kept = String::new();
            for line in text.lines() {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue; // a torn last line
                };
                if v.get("step")
                    .and_then(|s| s.as_u64())
                    .is_some_and(|s| (s as usize) < step)
                {
                    kept.push_str(line);
                    kept.push('\n');
                }
            }
            crate::write_atomic(path, kept.as_bytes())?;
        }
        Self::append(path)
    }

    /// Writes `record` as one line and flushes it.
    pub fn log<T: serde::Serialize>(&mut self, record: &T) -> candle::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(|e| {
            candle::Error::Msg(format!(
                "JsonlLogger: cannot serialize a record for {}: {e}",
                self.path.display()
            ))
        })?;
        line.push(b'\n');
        self.file
            .write_all(&line)
            .and_then(|()| self.file.flush())
            .map_err(|e| {
                candle::Error::Msg(format!(
                    "JsonlLogger: cannot write to {}: {e}",
                    self.path.display()
                ))
            })
    }

    /// The file this logger writes.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The length of the file up to and including its last newline (0 when it has none).
fn complete_prefix_len(file: &mut File, len: u64) -> std::io::Result<u64> {
    const CHUNK: u64 = 64 * 1024;
    let mut end = len;
    let mut buf = vec![0u8; CHUNK as usize];
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        let n = (end - start) as usize;
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut buf[..n])?;
        if let Some(pos) = buf[..n].iter().rposition(|&b| b == b'\n') {
            return Ok(start + pos as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// The log line of one optimizer step, `{"kind":"step","step":..,"loss":..,"lr":..,
/// "grad_norm":..,"loss_scale":..,"skipped":..,"seconds":..}`, the loss and grad norm in
/// the [`crate::lossless_f64`] encoding (a NaN step stays readable).
///
/// ```
/// let line = keel_train::StepLog { step: 3, loss: f64::NAN, lr: 0.1, grad_norm: Some(2.0),
///                                  loss_scale: None, skipped: true, seconds: 0.5 };
/// assert_eq!(serde_json::to_string(&line).unwrap(),
///            r#"{"kind":"step","step":3,"loss":"NaN","lr":0.1,"grad_norm":2.0,"loss_scale":null,"skipped":true,"seconds":0.5}"#);
/// ```
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(tag = "kind", rename = "step")]
pub struct StepLog {
    /// The step index (0-based).
    pub step: usize,
    /// Mean loss over the micro-batches.
    #[serde(with = "crate::lossless_f64")]
    pub loss: f64,
    /// The learning rate.
    pub lr: f64,
    /// Global gradient norm before clipping.
    #[serde(with = "crate::lossless_f64::option")]
    pub grad_norm: Option<f64>,
    /// The loss scale after the step (f16).
    pub loss_scale: Option<f64>,
    /// Whether the optimizer skipped the step.
    pub skipped: bool,
    /// Wall time of the step.
    pub seconds: f64,
}

impl StepLog {
    /// The line of a [`crate::TrainState::step`]'s outcome that took `seconds`.
    pub fn new(out: &crate::StepOutcome, seconds: f64) -> Self {
        Self {
            step: out.step,
            loss: out.loss,
            lr: out.lr,
            grad_norm: Some(out.grad_norm),
            loss_scale: out.loss_scale,
            skipped: out.skipped,
            seconds,
        }
    }
}

/// The log line of a segmentation evaluation, `{"kind":"eval","step":..,"miou":..,
/// "pixel_acc":..,"iou":[..],"classes":[..],"ema":..}` (metrics of a
/// [`crate::ConfusionMatrix`]; mIoU and pixel accuracy in the [`crate::lossless_f64`]
/// encoding, a class absent from the set is `null` in `iou`).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(tag = "kind", rename = "eval")]
pub struct EvalLog<'a> {
    /// The step after which the evaluation ran (0-based).
    pub step: usize,
    /// Mean IoU.
    #[serde(with = "crate::lossless_f64")]
    pub miou: f64,
    /// Pixel accuracy.
    #[serde(with = "crate::lossless_f64")]
    pub pixel_acc: f64,
    /// Per-class IoU.
    pub iou: &'a [Option<f64>],
    /// Class names, in `iou`'s order.
    pub classes: &'a [String],
    /// Whether the weights were the EMA's.
    pub ema: bool,
}

/// One intervention of the [`crate::Guard`] as a log record:
/// `{"kind":"guard", ...the intervention's fields}`.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct GuardLog<'a> {
    kind: &'static str,
    #[serde(flatten)]
    intervention: &'a crate::Intervention,
}

impl<'a> GuardLog<'a> {
    /// The record of `intervention`.
    pub fn new(intervention: &'a crate::Intervention) -> Self {
        Self {
            kind: "guard",
            intervention,
        }
    }
}
