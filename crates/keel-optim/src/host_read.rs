//! A count of keel's tensor-to-host reads on the current thread.
//!
//! On a GPU every read of a tensor's value on the host (`to_scalar`, `to_vec*`) waits for
//! all the work queued before it, so a training step that reads its loss or its gradient
//! norm cannot overlap with the next one. candle has no hook on its transfers, so keel
//! counts its own read sites: every place in keel-optim and keel-train's step path that
//! reads a tensor on the host calls [`note`] once per transfer. Tests and benchmarks take
//! the difference of [`count`] around a piece of work.
//!
//! The count is per thread (a training step runs on its caller's thread), so tests running
//! in parallel do not disturb each other.
//!
//! ```
//! use candle::{Device, Tensor, Var};
//! use keel_optim::{clip_grad_norm, host_read};
//! let w = Var::new(&[3f32, 4.0], &Device::Cpu)?;
//! let mut grads = w.as_tensor().sqr()?.sum_all()?.backward()?;
//! let before = host_read::count();
//! clip_grad_norm(&mut grads, &[w], 1.0)?; // reads the norm on the host
//! assert_eq!(host_read::count() - before, 1);
//! # Ok::<(), candle::Error>(())
//! ```
use std::cell::Cell;

thread_local! {
    static READS: Cell<u64> = const { Cell::new(0) };
}

/// Tensor-to-host reads keel made on this thread so far.
pub fn count() -> u64 {
    READS.with(Cell::get)
}

/// Counts one tensor-to-host transfer; keel's read sites call it next to the read.
pub fn note() {
    READS.with(|r| r.set(r.get() + 1));
}
