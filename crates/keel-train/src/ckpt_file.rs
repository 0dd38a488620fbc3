//! The keel checkpoint file: safetensors with verified header metadata, written
//! atomically by [`crate::write_atomic`].
//!
//! See [`crate::CheckpointManager`] for the layout of the header metadata.
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Read;
use std::path::Path;

use candle::{DType, Device, Tensor};
use safetensors::tensor::{Dtype as StDtype, SafeTensorError, SafeTensors, View};
use sha2::{Digest, Sha256};

use crate::fsio::io_err;

/// The `format` value in the header metadata of every keel checkpoint.
pub const CHECKPOINT_FORMAT: &str = "keel-checkpoint";
/// The checkpoint format version this crate writes and reads.
pub const CHECKPOINT_VERSION: &str = "1";
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

/// Loads a checkpoint written by [`crate::CheckpointManager::save`] onto `device`, verifying the
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
    load_verified(path.as_ref(), device).map_err(LoadFailure::into_error)
}

/// Why a checkpoint file did not load: its content is damaged (a reader may fall back to an
/// older checkpoint), or reading it failed for a reason that is not the file's content
/// (permission denied, an I/O error, a device error, a newer format), which must stop.
#[derive(Debug)]
pub(crate) enum LoadFailure {
    /// Truncated, not safetensors, not a keel checkpoint, corrupt header, checksum mismatch.
    Corrupt(candle::Error),
    /// Anything else.
    Fatal(candle::Error),
}

impl LoadFailure {
    pub(crate) fn into_error(self) -> candle::Error {
        match self {
            Self::Corrupt(e) | Self::Fatal(e) => e,
        }
    }
}

/// [`load_checkpoint`], telling damaged content from other failures.
pub(crate) fn load_verified(path: &Path, device: &Device) -> Result<Checkpoint, LoadFailure> {
    let shown = path.display();
    let bytes = fs::read(path)
        .map_err(|e| LoadFailure::Fatal(io_err(format!("cannot read checkpoint {shown}"), e)))?;
    let ckpt = decode(&bytes, &shown.to_string()).map_err(LoadFailure::Corrupt)?;
    let mut tensors = HashMap::with_capacity(ckpt.views.len());
    for (name, dtype, shape, data) in ckpt.views {
        let t = Tensor::from_raw_buffer(data, dtype, &shape, device).map_err(|e| {
            LoadFailure::Fatal(candle::Error::Msg(format!(
                "checkpoint {shown}: cannot load tensor `{name}` onto {device:?}: {e}"
            )))
        })?;
        tensors.insert(name, t);
    }
    Ok(Checkpoint {
        step: ckpt.step,
        tensors,
        meta: ckpt.meta,
    })
}

/// A verified checkpoint file's content, tensors still as bytes.
struct Decoded<'a> {
    step: usize,
    meta: serde_json::Value,
    views: Vec<(String, DType, Vec<usize>, &'a [u8])>,
}

/// Parses and verifies the file bytes (header, keel metadata, checksum); every error means
/// the content is not a keel checkpoint this keel can read (damage, another file, or another
/// format version), so a reader may fall back to an older checkpoint.
fn decode<'a>(bytes: &'a [u8], shown: &str) -> candle::Result<Decoded<'a>> {
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
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(header_err)?;
    let md = header.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(bytes).map_err(header_err)?;
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
    let mut out = Vec::with_capacity(views.len());
    for (name, view) in views {
        let dtype =
            DType::try_from(view.dtype()).map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        let (shape, data) = (view.shape().to_vec(), view.data());
        out.push((name, dtype, shape, data));
    }
    Ok(Decoded {
        step,
        meta,
        views: out,
    })
}

/// Reads only the header: `(step, metric)` when the file is a keel checkpoint whose size
/// matches its header.
pub(crate) fn peek(path: &Path) -> Option<(usize, Option<f64>)> {
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

/// A tensor's little-endian bytes, owned, as a safetensors view.
pub(crate) struct OwnedView {
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

/// The file bytes of `ckpt`: safetensors with the keel header metadata.
pub(crate) fn to_bytes(ckpt: &Checkpoint, metric: Option<f64>) -> candle::Result<Vec<u8>> {
    let (views, header) = encode(ckpt, metric)?;
    let data = views.iter().map(|(k, v)| (k.as_str(), v));
    safetensors::serialize(data, Some(header)).map_err(|e| {
        candle::Error::Msg(format!(
            "checkpoint: cannot serialize step {}: {e}",
            ckpt.step
        ))
    })
}
