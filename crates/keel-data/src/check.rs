//! Up-front validation of on-disk sets: every sample decoded once, in parallel (rayon),
//! before training starts, with all bad files reported in one error.
//!
//! What a check catches is what [`Voc::decode`] rejects: an image that does not decode in
//! full (a truncated JPEG is caught: the image is decoded, not only its header), a mask
//! that is not a PNG or not 8-bit (16-bit masks, say), a mask whose size differs from its
//! image's, an RGB mask colour outside the VOC colour map, and a class id that is neither
//! below `num_classes` nor the ignore index 255.
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;

use crate::{Source, Voc};

/// How many bad samples an error from [`validate`] lists; the rest are counted.
pub const MAX_LISTED: usize = 20;

/// A sample that failed its check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadSample {
    /// The image file of the pair.
    pub image: PathBuf,
    /// The mask file of the pair.
    pub mask: PathBuf,
    /// What is wrong, naming the offending file.
    pub reason: String,
}

impl Voc {
    /// Decodes every sample of the split in parallel and returns the bad ones, in split
    /// order. `progress` is called once per sample checked (from rayon's threads).
    pub fn check(&self, progress: Option<&(dyn Fn() + Sync)>) -> Vec<BadSample> {
        (0..self.len())
            .into_par_iter()
            .filter_map(|i| {
                let res = self.decode(i);
                if let Some(p) = progress {
                    p();
                }
                let (image, mask) = self.files()[i].clone();
                res.err().map(|e| BadSample {
                    image,
                    mask,
                    reason: without_backtrace(e).to_string(),
                })
            })
            .collect()
    }
}

/// Checks every sample of `sets` (see [`Voc::check`]; `progress` is called once per sample)
/// and fails with one error that lists every bad sample's reason (the first
/// [`MAX_LISTED`], then a count of the rest) when any is bad.
pub fn validate(sets: &[&Voc], progress: Option<&(dyn Fn() + Sync)>) -> candle::Result<()> {
    let checked = AtomicUsize::new(0);
    let tick = || {
        checked.fetch_add(1, Ordering::Relaxed);
        if let Some(p) = progress {
            p();
        }
    };
    let bad: Vec<BadSample> = sets.iter().flat_map(|s| s.check(Some(&tick))).collect();
    if bad.is_empty() {
        return Ok(());
    }
    let reasons: Vec<&str> = bad.iter().map(|b| b.reason.as_str()).collect();
    Err(listed_error(
        "Voc validation",
        bad.len(),
        &reasons,
        checked.into_inner(),
    ))
}

/// One error for `n_bad` bad samples out of `checked`, listing the `bad` reasons (the first
/// [`MAX_LISTED`], then a count of the rest), without a backtrace: the list is the message.
pub(crate) fn listed_error(
    what: &str,
    n_bad: usize,
    bad: &[&str],
    checked: usize,
) -> candle::Error {
    let mut msg = format!(
        "{what}: {n_bad} of {checked} samples are bad; fix them or remove them from the split lists:"
    );
    for b in bad.iter().take(MAX_LISTED) {
        msg.push_str("\n  ");
        msg.push_str(b);
    }
    if bad.len() > MAX_LISTED {
        msg.push_str(&format!("\n  ... and {} more", bad.len() - MAX_LISTED));
    }
    candle::Error::Msg(msg)
}

/// The error without the backtrace `candle::bail!` attaches under `RUST_BACKTRACE`: a list
/// of bad files stays one line per file.
pub(crate) fn without_backtrace(e: candle::Error) -> candle::Error {
    match e {
        candle::Error::WithBacktrace { inner, .. } => *inner,
        e => e,
    }
}
