//! Heap accounting for benchmarks: [`CountingAlloc`], a [`GlobalAlloc`] that forwards to
//! [`System`] and keeps the current and peak heap bytes, so a program can report the peak
//! memory of a training step on CPU.
//!
//! A program installs it as its global allocator (a library cannot):
//!
//! ```
//! use keel_train::mem::CountingAlloc;
//! #[global_allocator]
//! static ALLOC: CountingAlloc = CountingAlloc::new();
//! # fn main() {
//! let base = ALLOC.reset_peak();
//! let v = vec![0u8; 1 << 20];
//! assert!(ALLOC.peak() - base >= 1 << 20);
//! # drop(v);
//! # }
//! ```
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The process's heap, counted: current and peak bytes (two relaxed atomics per
/// allocation).
pub struct CountingAlloc {
    current: AtomicUsize,
    peak: AtomicUsize,
}

impl CountingAlloc {
    /// A counter at zero (`const`, for a `static`).
    pub const fn new() -> Self {
        Self {
            current: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        }
    }

    /// Restarts the peak at the current level; returns that level.
    pub fn reset_peak(&self) -> usize {
        let now = self.current.load(Ordering::Relaxed);
        self.peak.store(now, Ordering::Relaxed);
        now
    }

    /// The most bytes allocated at once since the last [`CountingAlloc::reset_peak`].
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// The bytes allocated now (as counted by this allocator).
    pub fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed)
    }
}

impl Default for CountingAlloc {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: every call forwards to `System` with the caller's layout and pointer unchanged;
// the counters are bookkeeping only.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is passed on to System.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = self.current.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            self.peak.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `alloc` above (System) with this layout.
        unsafe { System.dealloc(ptr, layout) };
        self.current.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Used directly (not as the global allocator): the counters follow alloc/dealloc.
    #[test]
    fn counts_current_and_peak() {
        let a = CountingAlloc::new();
        let (l1, l2) = (
            Layout::from_size_align(1000, 8).unwrap(),
            Layout::from_size_align(500, 8).unwrap(),
        );
        // SAFETY: non-zero sizes; each pointer is freed once with its own layout.
        unsafe {
            let p = a.alloc(l1);
            let q = a.alloc(l2);
            assert_eq!((a.current(), a.peak()), (1500, 1500));
            a.dealloc(p, l1);
            assert_eq!((a.current(), a.peak()), (500, 1500));
            assert_eq!(a.reset_peak(), 500);
            assert_eq!(a.peak(), 500);
            a.dealloc(q, l2);
        }
        assert_eq!(a.current(), 0);
    }
}
