//! candle's own CPU thread pool, kept out of the way of keel's.
//!
//! candle 0.11 runs its element-wise CPU ops (binary maps and the like) on a pool of its own
//! whose calling thread busy-waits at a barrier until every worker is done. keel's GEMMs,
//! convolutions and GroupNorm kernels run on rayon's pool, and a trainer's data loader has a
//! thread too; when those threads, or another process, hold the cores, candle's barrier spins
//! while the worker it waits for is descheduled. On the 2-core dev box, with a second process
//! training on the same cores, seg_train's step at the twin widths took 799-826 ms (median)
//! with candle's pool at 2 threads and 351-352 ms with `CANDLE_NUM_THREADS=1`; on the quiet
//! box the two were equal (BENCHMARKS.md "candle's CPU pool"). [`candle_pool_single_thread`] sets that variable.

/// The variable candle reads, once, at its first CPU op, for the size of its own pool.
pub const CANDLE_NUM_THREADS: &str = "CANDLE_NUM_THREADS";

/// Makes candle run its element-wise CPU ops on the calling thread (`CANDLE_NUM_THREADS=1`)
/// unless `CANDLE_NUM_THREADS` is already set (the user's choice wins); returns whether it
/// set the variable. Matmuls and keel's kernels keep rayon's threads (`RAYON_NUM_THREADS`).
///
/// candle reads the variable once, at the first CPU op that uses its pool, so call this at
/// the start of `main`, before any tensor op and before other threads read the environment
/// ([`crate::cli::setup_device`] calls it for keel's trainers).
///
/// ```
/// use keel_train::threads::{candle_pool_single_thread, CANDLE_NUM_THREADS};
/// // A doctest is a process of its own, with no other thread reading the environment.
/// std::env::remove_var(CANDLE_NUM_THREADS);
/// assert!(candle_pool_single_thread());
/// assert_eq!(std::env::var(CANDLE_NUM_THREADS).as_deref(), Ok("1"));
/// // A value already there (the user's, or the first call's) is left alone.
/// std::env::set_var(CANDLE_NUM_THREADS, "2");
/// assert!(!candle_pool_single_thread());
/// assert_eq!(std::env::var(CANDLE_NUM_THREADS).as_deref(), Ok("2"));
/// ```
pub fn candle_pool_single_thread() -> bool {
    if std::env::var_os(CANDLE_NUM_THREADS).is_some() {
        return false;
    }
    std::env::set_var(CANDLE_NUM_THREADS, "1");
    true
}
