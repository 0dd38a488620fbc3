//! Checkpoint conversion: the static-Rust answer to PyTorch's module-walking
//! `convert_bn_to_gn` / `FrozenBatchNorm2d.convert_frozen_batchnorm`.
//!
//! The functions work on a state dict (`name -> Tensor`, as loaded from safetensors with
//! [`candle::safetensors::load`]). A BatchNorm is found by its `<prefix>.running_var` key, or
//! named explicitly by prefix. Conversions:
//! - to FrozenBatchNorm: keys stay (`weight`, `bias`, `running_mean`, `running_var`),
//!   `num_batches_tracked` goes; optionally the BN is folded into the conv before it;
//! - to GroupNorm: `weight`/`bias` stay as GroupNorm's affine, the running statistics and
//!   `num_batches_tracked` go (a GroupNorm checkpoint has no group count to store).
//!
//! Every conversion checks before it changes anything: a BatchNorm group that has some of its
//! keys but not `weight`, `bias`, `running_mean` and `running_var` is an error naming the
//! prefix and the missing keys, and the tensors a conversion keeps or folds must be finite
//! (with `running_var >= 0`). On error the state dict is unchanged. [`load_state_dict`] and
//! [`ConvertPaths`] read and write the files with the same care: a file that is not
//! safetensors is named as such, OUT may not be IN (compared as files, not strings) nor a
//! directory, and OUT is written through a temp file that is removed on any failure.
use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle::{DType, Device, Result, Tensor};

use crate::FrozenBatchNorm2d;

/// A state dict: parameter name to tensor, PyTorch names.
pub type StateDict = HashMap<String, Tensor>;

/// The keys a BatchNorm needs to be converted.
const BN_KEYS: [&str; 4] = ["weight", "bias", "running_mean", "running_var"];
/// The keys only a BatchNorm has: any of them marks `<prefix>` as a BatchNorm.
const BN_MARKERS: [&str; 3] = ["running_mean", "running_var", "num_batches_tracked"];

/// The prefixes of every BatchNorm in `state`, found by a `<prefix>.running_mean`,
/// `<prefix>.running_var` or `<prefix>.num_batches_tracked` key, sorted. A prefix found here
/// may still lack keys; the conversions report that.
pub fn find_batch_norms(state: &StateDict) -> Vec<String> {
    let set: BTreeSet<String> = state
        .keys()
        .filter_map(|k| {
            let (prefix, last) = k.rsplit_once('.')?;
            BN_MARKERS.contains(&last).then(|| prefix.to_string())
        })
        .collect();
    set.into_iter().collect()
}

/// The BatchNorm prefixes to convert: `prefixes` when given, else all found; each checked
/// for the four keys (every incomplete group is reported at once) and their shapes.
fn select(state: &StateDict, prefixes: Option<&[String]>) -> Result<Vec<String>> {
    let selected = match prefixes {
        Some([]) => candle::bail!(
            "convert: the list of BatchNorm prefixes is empty; pass None to convert every \
             BatchNorm found, or name at least one prefix"
        ),
        Some(p) => p.to_vec(),
        None => find_batch_norms(state),
    };
    if selected.is_empty() {
        candle::bail!(
            "convert: no BatchNorm found (no key ends in .running_mean, .running_var or \
             .num_batches_tracked); nothing to convert"
        )
    }
    let incomplete: Vec<String> = selected
        .iter()
        .filter_map(|prefix| {
            let missing: Vec<String> = BN_KEYS
                .iter()
                .map(|k| format!("{prefix}.{k}"))
                .filter(|k| !state.contains_key(k))
                .collect();
            (!missing.is_empty()).then(|| format!("'{prefix}' lacks {}", missing.join(", ")))
        })
        .collect();
    if !incomplete.is_empty() {
        candle::bail!(
            "convert: incomplete BatchNorm: {}; a BatchNorm needs \
             <prefix>.{{weight,bias,running_mean,running_var}} (is the prefix right, is this \
             layer not a BatchNorm, or was the checkpoint edited?); nothing was converted",
            incomplete.join("; ")
        )
    }
    for prefix in &selected {
        let key = |k: &str| format!("{prefix}.{k}");
        let c = state[&key("weight")].dims().to_vec();
        if c.len() != 1 {
            candle::bail!("convert: {prefix}.weight has shape {c:?}, a BatchNorm's is (C,)")
        }
        for k in BN_KEYS {
            if state[&key(k)].dims() != c.as_slice() {
                candle::bail!(
                    "convert: {} has shape {:?}, expected {c:?} like {prefix}.weight",
                    key(k),
                    state[&key(k)].dims()
                )
            }
        }
    }
    Ok(selected)
}

/// The first element of `t` (named `name`) that is not finite, or is negative when
/// `non_negative`: an error naming the tensor, the index and the value.
fn check_values(name: &str, t: &Tensor, non_negative: bool) -> Result<()> {
    let values = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let bad = values
        .iter()
        .position(|v| !v.is_finite() || (non_negative && *v < 0.0));
    if let Some(i) = bad {
        let v = values[i];
        let why = if v.is_finite() {
            "a variance cannot be negative"
        } else {
            "it is not finite"
        };
        candle::bail!(
            "convert: {name}[{i}] = {v} ({why}); the checkpoint is damaged or was saved after \
             training diverged: convert an earlier checkpoint; nothing was converted"
        )
    }
    Ok(())
}

/// Checks that the BatchNorm tensors `keys` of every prefix are finite, `running_var >= 0`.
fn check_bn_values(state: &StateDict, prefixes: &[String], keys: &[&str]) -> Result<()> {
    for p in prefixes {
        for k in keys {
            let name = format!("{p}.{k}");
            check_values(&name, &state[&name], *k == "running_var")?;
        }
    }
    Ok(())
}

/// Turns BatchNorms into FrozenBatchNorm2d entries: their four tensors stay under the same
/// keys and `num_batches_tracked` is dropped. `prefixes = None` converts every BatchNorm
/// found. Returns the converted prefixes. Errors on an incomplete BatchNorm and on
/// non-finite values or a negative `running_var`; on error `state` is unchanged.
pub fn bn_to_frozen_bn(state: &mut StateDict, prefixes: Option<&[String]>) -> Result<Vec<String>> {
    let selected = select(state, prefixes)?;
    check_bn_values(state, &selected, &BN_KEYS)?;
    for p in &selected {
        state.remove(&format!("{p}.num_batches_tracked"));
    }
    Ok(selected)
}

/// Turns BatchNorms into GroupNorm entries: `weight` and `bias` stay (GroupNorm's affine),
/// `running_mean`, `running_var` and `num_batches_tracked` are dropped. Returns the converted
/// prefixes. Errors on an incomplete BatchNorm and on a non-finite `weight` or `bias`; on
/// error `state` is unchanged.
///
/// ```
/// use candle::{Device, Tensor};
/// use keel_norm::convert::{bn_to_group_norm, StateDict};
/// # fn main() -> candle::Result<()> {
/// let dev = Device::Cpu;
/// let mut sd = StateDict::new();
/// for k in ["weight", "bias", "running_mean", "running_var"] {
///     sd.insert(format!("bn1.{k}"), Tensor::ones(4, candle::DType::F32, &dev)?);
/// }
/// sd.insert("conv1.weight".into(), Tensor::ones((4, 3, 3, 3), candle::DType::F32, &dev)?);
/// assert_eq!(bn_to_group_norm(&mut sd, None)?, ["bn1"]);
/// assert!(sd.contains_key("bn1.weight") && !sd.contains_key("bn1.running_var"));
/// # Ok(()) }
/// ```
pub fn bn_to_group_norm(state: &mut StateDict, prefixes: Option<&[String]>) -> Result<Vec<String>> {
    let selected = select(state, prefixes)?;
    check_bn_values(state, &selected, &["weight", "bias"])?;
    for p in &selected {
        for k in ["running_mean", "running_var", "num_batches_tracked"] {
            state.remove(&format!("{p}.{k}"));
        }
    }
    Ok(selected)
}

/// Folds BatchNorms into the convolutions before them, for inference: for each
/// `(conv_prefix, bn_prefix)` pair `conv.weight` and `conv.bias` (created if absent) are
/// replaced by the folded ones ([`FrozenBatchNorm2d::fold_into_conv`]) and every key of the
/// BatchNorm is removed. A model loading the result must have no norm layer there. `eps` is
/// the BatchNorm's epsilon (it is not stored in checkpoints; PyTorch's default is 1e-5).
/// No pairs fold nothing. Errors on an incomplete BatchNorm, a missing conv, non-finite
/// values, a negative `running_var` or `running_var + eps == 0`; on error `state` is
/// unchanged.
pub fn fold_bn_into_conv(
    state: &mut StateDict,
    pairs: &[(String, String)],
    eps: f64,
) -> Result<()> {
    if pairs.is_empty() {
        return Ok(());
    }
    let bns: Vec<String> = pairs.iter().map(|(_, bn)| bn.clone()).collect();
    select(state, Some(&bns))?;
    check_bn_values(state, &bns, &BN_KEYS)?;
    let mut folded = Vec::with_capacity(pairs.len());
    for (conv, bn) in pairs {
        let get = |k: &str| state[&format!("{bn}.{k}")].clone();
        let frozen = FrozenBatchNorm2d::new(
            get("weight"),
            get("bias"),
            get("running_mean"),
            get("running_var"),
            eps,
        )?;
        let Some(w) = state.get(&format!("{conv}.weight")) else {
            candle::bail!("convert: conv '{conv}' has no '{conv}.weight' in the state dict")
        };
        let b = state.get(&format!("{conv}.bias"));
        check_values(&format!("{conv}.weight"), w, false)?;
        if let Some(b) = b {
            check_values(&format!("{conv}.bias"), b, false)?;
        }
        let (w, b) = frozen.fold_into_conv(w, b).map_err(|e| {
            candle::Error::Msg(format!("convert: folding '{bn}' into '{conv}': {e}"))
        })?;
        for (name, t) in [("weight", &w), ("bias", &b)] {
            check_values(
                &format!("{conv}.{name} folded with '{bn}' (eps {eps})"),
                t,
                false,
            )
            .map_err(|e| {
                candle::Error::Msg(format!(
                    "{e} (a running_var of 0 needs eps > 0: pass the model's eps)"
                ))
            })?;
        }
        folded.push((conv.clone(), bn.clone(), w, b));
    }
    for (conv, bn, w, b) in folded {
        state.insert(format!("{conv}.weight"), w);
        state.insert(format!("{conv}.bias"), b);
        for k in BN_KEYS.iter().chain(&["num_batches_tracked"]) {
            state.remove(&format!("{bn}.{k}"));
        }
    }
    Ok(())
}

/// How to get a safetensors file from PyTorch, for error messages.
const TORCH_HINT: &str = "from PyTorch: `from safetensors.torch import save_file; \
     save_file(model.state_dict(), \"model.safetensors\")` (for a .pth state dict: \
     `save_file(torch.load(\"model.pth\", map_location=\"cpu\"), \"model.safetensors\")`)";

/// Reads a safetensors state dict onto `device`. A file that is not safetensors (text, a
/// `torch.save` zip or pickle, a truncated file) is an error naming the path, its size and
/// what it starts with, and how to write a safetensors file from PyTorch.
pub fn load_state_dict(path: impl AsRef<Path>, device: &Device) -> Result<StateDict> {
    let path = path.as_ref();
    let shown = path.display();
    let io = |e: std::io::Error| candle::Error::Msg(format!("convert: cannot read {shown}: {e}"));
    let size = fs::metadata(path).map_err(io)?.len();
    let mut head = Vec::with_capacity(16);
    fs::File::open(path)
        .map_err(io)?
        .take(16)
        .read_to_end(&mut head)
        .map_err(io)?;
    if let Some(found) = not_safetensors(&head, size) {
        candle::bail!("convert: {shown} is not a safetensors file: {found}; write one {TORCH_HINT}")
    }
    candle::safetensors::load(path, device).map_err(|e| {
        candle::Error::Msg(format!(
            "convert: {shown} ({size} bytes) is not a valid safetensors file: {e} (truncated \
             or damaged? write it again {TORCH_HINT})"
        ))
    })
}

/// What the first bytes of a `size`-byte file show when they are not a safetensors header
/// (an 8-byte little-endian header length, then a JSON object), or `None` when they are.
fn not_safetensors(head: &[u8], size: u64) -> Option<String> {
    let starts = || match head {
        [b'P', b'K', 3, 4, ..] => "a zip archive (a torch.save checkpoint?)".to_string(),
        [0x80, ..] => "a pickle (a legacy torch.save checkpoint?)".to_string(),
        h if h
            .iter()
            .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace()) =>
        {
            format!("text starting {:?}", String::from_utf8_lossy(h))
        }
        h => format!("bytes starting {h:02x?}"),
    };
    if size < 8 {
        return Some(format!(
            "it has {size} bytes, fewer than the 8-byte header length"
        ));
    }
    let n = u64::from_le_bytes(head[..8].try_into().expect("8 bytes checked above"));
    if n > size - 8 || head.get(8) != Some(&b'{') {
        return Some(format!(
            "{}, {size} bytes, whose first 8 bytes would declare a {n}-byte header",
            starts()
        ));
    }
    None
}

/// The input and output files of a conversion, checked before any work is done: IN is a
/// readable file, OUT is not IN (compared as files: `./IN`, another relative spelling, a
/// symlink or a hard link to IN are all refused), not a directory, and its directory exists.
/// [`ConvertPaths::save`] writes OUT through a temp file beside it, renamed into place and
/// removed on any failure, so a failed run leaves neither a half-written OUT nor a temp file.
#[derive(Clone, Debug)]
pub struct ConvertPaths {
    input: PathBuf,
    output: PathBuf,
    tmp: PathBuf,
}

impl ConvertPaths {
    /// Checks `input` and `output` (see [`ConvertPaths`]).
    pub fn new(input: impl Into<PathBuf>, output: impl Into<PathBuf>) -> Result<Self> {
        let (input, output) = (input.into(), output.into());
        let (i, o) = (input.display(), output.display());
        let meta = fs::metadata(&input)
            .map_err(|e| candle::Error::Msg(format!("convert: cannot read IN {i}: {e}")))?;
        if !meta.is_file() {
            candle::bail!("convert: IN {i} is not a file; name a .safetensors file")
        }
        let Some(name) = output.file_name() else {
            candle::bail!("convert: OUT {o} names no file; name a file such as model.safetensors")
        };
        if output.is_dir() {
            let suggest = output.join(input.file_name().unwrap_or(name));
            candle::bail!(
                "convert: OUT {o} is a directory; name a file in it, e.g. {}",
                suggest.display()
            )
        }
        let dir = match output.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dir.is_dir() {
            candle::bail!(
                "convert: the directory of OUT {o} ({}) does not exist; create it first",
                dir.display()
            )
        }
        let tmp = dir.join(format!(
            ".{}.tmp-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        for (what, p) in [("OUT", &output), ("the temp file", &tmp)] {
            if same_file(&input, p)? {
                candle::bail!(
                    "convert: {what} {} is the same file as IN {i}; writing it would destroy the \
                     input: name another OUT",
                    p.display()
                )
            }
        }
        Ok(Self { input, output, tmp })
    }

    /// The input file.
    pub fn input(&self) -> &Path {
        &self.input
    }

    /// The output file.
    pub fn output(&self) -> &Path {
        &self.output
    }

    /// Reads IN with [`load_state_dict`].
    pub fn load(&self, device: &Device) -> Result<StateDict> {
        load_state_dict(&self.input, device)
    }

    /// Writes `state` to OUT atomically (temp file, fsync, rename); on any failure the temp
    /// file is removed and OUT is untouched.
    pub fn save(&self, state: &StateDict) -> Result<()> {
        let (o, t) = (self.output.display(), self.tmp.display());
        let written = candle::safetensors::save(state, &self.tmp)
            .map_err(|e| candle::Error::Msg(format!("convert: cannot write {t} (for {o}): {e}")))
            .and_then(|()| {
                fs::File::open(&self.tmp)
                    .and_then(|f| f.sync_all())
                    .and_then(|()| fs::rename(&self.tmp, &self.output))
                    .map_err(|e| {
                        candle::Error::Msg(format!(
                            "convert: cannot move {t} into place as {o}: {e}"
                        ))
                    })
            });
        if written.is_err() {
            let _ = fs::remove_file(&self.tmp);
        }
        written
    }
}

/// Whether `a` and `b` are one file: same device and inode on Unix, same canonical path
/// elsewhere. A `b` that does not exist is not `a`.
fn same_file(a: &Path, b: &Path) -> Result<bool> {
    let Ok(mb) = fs::metadata(b) else {
        return Ok(false);
    };
    let ma = fs::metadata(a)
        .map_err(|e| candle::Error::Msg(format!("convert: cannot read {}: {e}", a.display())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Ok(ma.dev() == mb.dev() && ma.ino() == mb.ino())
    }
    #[cfg(not(unix))]
    {
        let _ = (ma, mb);
        Ok(fs::canonicalize(a)
            .ok()
            .is_some_and(|ca| fs::canonicalize(b).ok() == Some(ca)))
    }
}
