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
//! Any tool that reads safetensors can read the tensors; [`load_checkpoint`] also verifies the
//! header and the checksum, so a truncated file or a flipped byte is an error, never a
//! silently different model. Tensor bytes are little-endian, as safetensors specifies.
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use candle::{DType, Device, Tensor};
use safetensors::tensor::{Dtype as StDtype, SafeTensorError, SafeTensors, View};
use sha2::{Digest, Sha256};

/// The `format` value in the header metadata of every keel checkpoint.
pub const CHECKPOINT_FORMAT: &str = "keel-checkpoint";
/// The checkpoint format version this crate writes and reads.
pub const CHECKPOINT_VERSION: &str = "1";
const PREFIX: &str = "ckpt-";
const SUFFIX: &str = ".safetensors";
/// safetensors' own limit on the JSON header.
const MAX_HEADER: u64 = 100_000_000;

/// Everything a training run needs to resume: tensors (weights, optimizer, scaler and EMA
/// state, RNG state as integer tensors...) plus free-form JSON metadata.
///
/// ```
/// use std::collections::HashMap;
/// use candle::{Device, Tensor};
/// use keel_train::Checkpoint;
/// # fn main() -> candle::Result<()> {
/// let mut ckpt = Checkpoint::new(100);
/// ckpt.extend_prefixed("model.", [("conv.weight".to_string(), Tensor::ones((2, 2), candle::DType::F32, &Device::Cpu)?)]);
/// ckpt.meta = serde_json::json!({ "lr": 0.01, "seed": 7 });
/// assert!(ckpt.tensors.contains_key("model.conv.weight"));
/// assert_eq!(ckpt.prefixed("model.").len(), 1);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// The training step the state belongs to (the number of optimizer steps taken).
    pub step: usize,
    /// Named tensors; any device, any dtype candle can store in safetensors except the
    /// sub-byte float formats.
    pub tensors: HashMap<String, Tensor>,
    /// Free-form metadata (config, monitor state, data-loader position...), stored as JSON.
    pub meta: serde_json::Value,
}

impl Checkpoint {
    /// An empty checkpoint at `step` with `null` meta.
    pub fn new(step: usize) -> Self {
        Self {
            step,
            tensors: HashMap::new(),
            meta: serde_json::Value::Null,
        }
    }

    /// Inserts `tensors` under `prefix` + name (e.g. `"model."`, `"optim."`).
    pub fn extend_prefixed(
        &mut self,
        prefix: &str,
        tensors: impl IntoIterator<Item = (String, Tensor)>,
    ) {
        self.tensors.extend(
            tensors
                .into_iter()
                .map(|(k, v)| (format!("{prefix}{k}"), v)),
        );
    }

    /// The tensors whose name starts with `prefix`, with the prefix removed.
    pub fn prefixed(&self, prefix: &str) -> HashMap<String, Tensor> {
        self.tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|s| (s.to_string(), v.clone())))
            .collect()
    }
}

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
}

#[derive(Clone, Debug)]
struct Entry {
    step: usize,
    path: PathBuf,
    metric: Option<f64>,
}

impl CheckpointManager {
    /// A manager for `dir`, created if needed. Errors clearly when `dir` is not a writable
    /// directory or `keep_last` is 0. Existing checkpoints in `dir` are taken over (they count
    /// for pruning and for the best), and temp files left by an interrupted save are removed.
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
        for name in list_names(&dir)? {
            if name.starts_with(&format!(".{PREFIX}")) && name.contains(".tmp-") {
                let _ = fs::remove_file(dir.join(&name));
            }
        }
        let entries = scan(&dir)?;
        Ok(Self {
            dir,
            keep_last,
            entries,
        })
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
    /// deletes the checkpoints that are neither among the last `keep_last` by step nor the
    /// best by `metric` (higher is better; `None` or a non-finite metric never makes a
    /// checkpoint the best). Saving a step that already has a checkpoint replaces it
    /// atomically. Returns the path written.
    ///
    /// The tensors are copied to the CPU once; a tensor named `__metadata__`, or one with a
    /// sub-byte float dtype, is an error before anything is written.
    pub fn save(&mut self, ckpt: &Checkpoint, metric: Option<f64>) -> candle::Result<PathBuf> {
        let metric = metric.filter(|m| m.is_finite());
        let path = self.path_for(ckpt.step);
        let (views, header) = encode(ckpt, metric)?;
        let tmp = self.dir.join(format!(
            ".{}.tmp-{}",
            file_name(ckpt.step),
            std::process::id()
        ));
        if let Err(e) = write_atomic(&views, header, &tmp, &path, &self.dir) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        self.entries.retain(|e| e.step != ckpt.step);
        self.entries.push(Entry {
            step: ckpt.step,
            path: path.clone(),
            metric,
        });
        self.entries.sort_by_key(|e| e.step);
        self.prune(&path)?;
        Ok(path)
    }

    /// The newest checkpoint in the directory by step whose name and header look valid
    /// (full verification happens in [`load_checkpoint`]); temp files and files of other
    /// names are ignored. Rescans the directory, so it sees checkpoints of other processes.
    pub fn latest(&self) -> candle::Result<Option<PathBuf>> {
        Ok(scan(&self.dir)?.pop().map(|e| e.path))
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

    fn prune(&mut self, just_saved: &Path) -> candle::Result<()> {
        let best_step = best_entry(&self.entries).map(|e| e.step);
        let n = self.entries.len();
        let keep_from = n.saturating_sub(self.keep_last);
        let mut kept = Vec::with_capacity(n);
        let mut result = Ok(());
        for (i, e) in std::mem::take(&mut self.entries).into_iter().enumerate() {
            if i >= keep_from || Some(e.step) == best_step || e.path == just_saved {
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

/// Loads a checkpoint written by [`CheckpointManager::save`] onto `device`, verifying the
/// safetensors header, the keel metadata and the checksum.
///
/// A missing, truncated, corrupt or non-keel file is an error naming the file and what is
/// wrong; it never panics.
///
/// ```
/// use candle::Device;
/// use keel_train::load_checkpoint;
/// # let path = std::env::temp_dir().join(format!("keel-train-load-doc-{}", std::process::id()));
/// std::fs::write(&path, b"not a checkpoint").unwrap();
/// let err = load_checkpoint(&path, &Device::Cpu).unwrap_err().to_string();
/// assert!(err.contains("not a valid safetensors file"), "{err}");
/// # std::fs::remove_file(&path).unwrap();
/// ```
pub fn load_checkpoint(path: impl AsRef<Path>, device: &Device) -> candle::Result<Checkpoint> {
    let path = path.as_ref();
    let shown = path.display();
    let bytes = fs::read(path).map_err(|e| io_err(format!("cannot read checkpoint {shown}"), e))?;
    let header_err = |e: SafeTensorError| {
        let what = match e {
            SafeTensorError::HeaderTooSmall | SafeTensorError::InvalidHeaderLength => {
                format!(
                    "its {} bytes end before the header does (truncated, or not safetensors)",
                    bytes.len()
                )
            }
            SafeTensorError::MetadataIncompleteBuffer => format!(
                "its size ({} bytes) does not match the size its header declares (truncated \
                 or extended)",
                bytes.len()
            ),
            e => format!("the header is invalid: {e}"),
        };
        candle::Error::Msg(format!(
            "checkpoint {shown} is not a valid safetensors file: {what}"
        ))
    };
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(header_err)?;
    let md = header.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(&bytes).map_err(header_err)?;
    let bad = |what: String| candle::Error::Msg(format!("checkpoint {shown}: {what}"));
    if md.get("format").map(String::as_str) != Some(CHECKPOINT_FORMAT) {
        return Err(bad(format!(
            "a safetensors file but not a keel checkpoint (no `format: {CHECKPOINT_FORMAT}` \
             header metadata); load plain weights with candle::safetensors::load"
        )));
    }
    let field = |key: &str| {
        md.get(key)
            .ok_or_else(|| bad(format!("header metadata lacks `{key}` (corrupt header)")))
    };
    let version = field("version")?;
    if version != CHECKPOINT_VERSION {
        return Err(bad(format!(
            "format version {version} is not supported (this keel reads version \
             {CHECKPOINT_VERSION})"
        )));
    }
    let step: usize = field("step")?
        .parse()
        .map_err(|e| bad(format!("header `step` is not an integer: {e}")))?;
    let meta_str = field("meta")?;
    let metric = md.get("metric").map(String::as_str);
    let stored = field("checksum")?;
    let mut views: Vec<(String, safetensors::tensor::TensorView<'_>)> = st.tensors();
    views.sort_by(|a, b| a.0.cmp(&b.0));
    let mut hasher = checksum_start(step, meta_str, metric, views.len());
    for (name, view) in &views {
        let dtype = dtype_name(view.dtype()).ok_or_else(|| {
            bad(format!(
                "tensor `{name}` has dtype {:?}, which keel checkpoints do not hold",
                view.dtype()
            ))
        })?;
        checksum_tensor(&mut hasher, name, dtype, view.shape(), view.data());
    }
    let computed = checksum_finish(hasher);
    if &computed != stored {
        return Err(bad(format!(
            "checksum mismatch (stored {stored}, computed {computed}): the file was damaged \
             after it was written; resume from an earlier checkpoint"
        )));
    }
    let meta: serde_json::Value = serde_json::from_str(meta_str)
        .map_err(|e| bad(format!("header `meta` is not valid JSON: {e}")))?;
    let mut tensors = HashMap::with_capacity(views.len());
    for (name, view) in views {
        let dtype =
            DType::try_from(view.dtype()).map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), device)
            .map_err(|e| bad(format!("cannot load tensor `{name}` onto {device:?}: {e}")))?;
        tensors.insert(name, t);
    }
    Ok(Checkpoint {
        step,
        tensors,
        meta,
    })
}

fn io_err(what: String, e: std::io::Error) -> candle::Error {
    candle::Error::Msg(format!("{what}: {e}"))
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
            (hstep == step).then_some(Entry { step, path, metric })
        })
        .collect();
    entries.sort_by_key(|e| e.step);
    Ok(entries)
}

/// Reads only the header: `(step, metric)` when the file is a keel checkpoint whose size
/// matches its header.
fn peek(path: &Path) -> Option<(usize, Option<f64>)> {
    let mut f = File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).ok()?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || n.checked_add(8)? > len {
        return None;
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).ok()?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).ok()?;
    let md = header.get("__metadata__")?.as_object()?;
    if md.get("format")?.as_str()? != CHECKPOINT_FORMAT {
        return None;
    }
    let step = md.get("step")?.as_str()?.parse().ok()?;
    let metric = match md.get("metric") {
        Some(m) => Some(m.as_str()?.parse::<f64>().ok()?),
        None => None,
    };
    let mut end = 0u64;
    for (k, v) in &header {
        if k != "__metadata__" {
            end = end.max(v.get("data_offsets")?.as_array()?.get(1)?.as_u64()?);
        }
    }
    (8 + n + end == len).then_some((step, metric))
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

/// A tensor's little-endian bytes, owned, as a safetensors view.
struct OwnedView {
    dtype: StDtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &OwnedView {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn le_bytes<T, const N: usize>(t: &Tensor, f: impl Fn(T) -> [u8; N]) -> candle::Result<Vec<u8>>
where
    T: candle::WithDType,
{
    Ok(t.to_vec1::<T>()?.into_iter().flat_map(f).collect())
}

fn to_view(name: &str, t: &Tensor) -> candle::Result<OwnedView> {
    let flat = t.flatten_all()?.to_device(&Device::Cpu)?;
    let (dtype, data) = match t.dtype() {
        DType::U8 => (StDtype::U8, flat.to_vec1::<u8>()?),
        DType::U32 => (StDtype::U32, le_bytes(&flat, u32::to_le_bytes)?),
        DType::I16 => (StDtype::I16, le_bytes(&flat, i16::to_le_bytes)?),
        DType::I32 => (StDtype::I32, le_bytes(&flat, i32::to_le_bytes)?),
        DType::I64 => (StDtype::I64, le_bytes(&flat, i64::to_le_bytes)?),
        DType::F16 => (StDtype::F16, le_bytes(&flat, half::f16::to_le_bytes)?),
        DType::BF16 => (StDtype::BF16, le_bytes(&flat, half::bf16::to_le_bytes)?),
        DType::F32 => (StDtype::F32, le_bytes(&flat, f32::to_le_bytes)?),
        DType::F64 => (StDtype::F64, le_bytes(&flat, f64::to_le_bytes)?),
        dt => candle::bail!(
            "checkpoint: tensor `{name}` has dtype {dt:?}; keel checkpoints hold u8, u32, i16, \
             i32, i64, f16, bf16, f32 and f64 tensors (cast it first)"
        ),
    };
    Ok(OwnedView {
        dtype,
        shape: t.dims().to_vec(),
        data,
    })
}

fn dtype_name(dtype: StDtype) -> Option<&'static str> {
    Some(match dtype {
        StDtype::U8 => "U8",
        StDtype::U32 => "U32",
        StDtype::I16 => "I16",
        StDtype::I32 => "I32",
        StDtype::I64 => "I64",
        StDtype::F16 => "F16",
        StDtype::BF16 => "BF16",
        StDtype::F32 => "F32",
        StDtype::F64 => "F64",
        _ => return None,
    })
}

fn hash_bytes(h: &mut Sha256, b: &[u8]) {
    h.update((b.len() as u64).to_le_bytes());
    h.update(b);
}

fn checksum_start(step: usize, meta: &str, metric: Option<&str>, n: usize) -> Sha256 {
    let mut h = Sha256::new();
    hash_bytes(&mut h, CHECKPOINT_FORMAT.as_bytes());
    hash_bytes(&mut h, CHECKPOINT_VERSION.as_bytes());
    h.update((step as u64).to_le_bytes());
    hash_bytes(&mut h, meta.as_bytes());
    hash_bytes(&mut h, metric.unwrap_or("").as_bytes());
    h.update((n as u64).to_le_bytes());
    h
}

fn checksum_tensor(h: &mut Sha256, name: &str, dtype: &str, shape: &[usize], data: &[u8]) {
    hash_bytes(h, name.as_bytes());
    hash_bytes(h, dtype.as_bytes());
    h.update((shape.len() as u64).to_le_bytes());
    for &d in shape {
        h.update((d as u64).to_le_bytes());
    }
    hash_bytes(h, data);
}

fn checksum_finish(h: Sha256) -> String {
    let digest = h.finalize();
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256:");
    for b in digest {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

type Encoded = (Vec<(String, OwnedView)>, HashMap<String, String>);

/// The tensors as owned views (sorted by name) and the header metadata with the checksum.
fn encode(ckpt: &Checkpoint, metric: Option<f64>) -> candle::Result<Encoded> {
    let mut names: Vec<&String> = ckpt.tensors.keys().collect();
    names.sort();
    let mut views = Vec::with_capacity(names.len());
    for name in names {
        if name == "__metadata__" {
            candle::bail!(
                "checkpoint: `__metadata__` is reserved by safetensors; rename the tensor"
            )
        }
        views.push((name.clone(), to_view(name, &ckpt.tensors[name])?));
    }
    let meta = serde_json::to_string(&ckpt.meta)
        .map_err(|e| candle::Error::Msg(format!("checkpoint: cannot serialize meta: {e}")))?;
    let metric = metric.map(|m| m.to_string());
    let mut h = checksum_start(ckpt.step, &meta, metric.as_deref(), views.len());
    for (name, v) in &views {
        let dtype = dtype_name(v.dtype).unwrap_or("?");
        checksum_tensor(&mut h, name, dtype, &v.shape, &v.data);
    }
    let mut header = HashMap::new();
    header.insert("format".to_string(), CHECKPOINT_FORMAT.to_string());
    header.insert("version".to_string(), CHECKPOINT_VERSION.to_string());
    header.insert("step".to_string(), ckpt.step.to_string());
    header.insert("meta".to_string(), meta);
    if let Some(m) = metric {
        header.insert("metric".to_string(), m);
    }
    header.insert("checksum".to_string(), checksum_finish(h));
    Ok((views, header))
}

fn write_atomic(
    views: &[(String, OwnedView)],
    header: HashMap<String, String>,
    tmp: &Path,
    path: &Path,
    dir: &Path,
) -> candle::Result<()> {
    let data = views.iter().map(|(k, v)| (k.as_str(), v));
    safetensors::serialize_to_file(data, Some(header), tmp).map_err(|e| {
        candle::Error::Msg(format!(
            "checkpoint: cannot write {} (for {}): {e}",
            tmp.display(),
            path.display()
        ))
    })?;
    File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err(format!("checkpoint: cannot fsync {}", tmp.display()), e))?;
    fs::rename(tmp, path).map_err(|e| {
        io_err(
            format!(
                "checkpoint: cannot move {} into place as {}",
                tmp.display(),
                path.display()
            ),
            e,
        )
    })?;
    sync_dir(dir)
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> candle::Result<()> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(|e| {
        io_err(
            format!("checkpoint: cannot fsync directory {}", dir.display()),
            e,
        )
    })
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> candle::Result<()> {
    // Directories cannot be opened for fsync on this platform; the rename is still atomic.
    Ok(())
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
