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
//!
//! A trainer's own thread (the one running the loop: candle's serial ops, autograd, the
//! optimizer) is a third party to rayon's pool of one thread per core: whenever the loop
//! hands rayon work it blocks, and while it runs serial ops rayon's idle workers spin and
//! yield against it. [`run_on_pool`] runs the whole trainer on one of the pool's threads
//! instead (measured on the 2-core box: seg_train's default training step 17.8-20.3 ms ->
//! 11.8-13.0 ms median, half the system time; BENCHMARKS.md "Session 9").

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

/// Stack size of [`run_on_pool`]'s threads: the trainer runs on one of them, and candle's
/// backprop walks the graph recursively (a main thread has 8 MiB; rayon's threads default
/// to Rust's 2 MiB, `RUST_MIN_STACK`). It is address space; only the pages a thread touches
/// are used.
pub const POOL_STACK_BYTES: usize = 32 << 20;

/// Runs `f` (a trainer: its whole loop) on a thread of a rayon pool that also runs keel's
/// kernels, so the loop's thread is one of the pool's threads rather than one more thread
/// competing with them (see the module docs), and returns `f`'s result.
///
/// The pool has `RAYON_NUM_THREADS` threads if set, else one per core (rayon's default), a
/// [`POOL_STACK_BYTES`] stack each and threads named `keel-0`, `keel-1`, ...; the rayon
/// calls that `f` makes on the pool's threads (keel's kernels, `gemm`) use it. A thread
/// that `f` spawns itself (a data loader, say) is not one of them: a rayon call there would
/// start rayon's global pool. [`candle_pool_single_thread`] is called first, before any
/// thread starts. The pool's threads are joined before this returns, so their thread-local
/// state (e.g. CUDA handles) is dropped while the process is still whole. A panic in `f`
/// propagates to the caller. An error only when the operating system refuses the threads.
///
/// ```
/// let (on_pool, threads) = keel_train::threads::run_on_pool(|| {
///     (rayon::current_thread_index().is_some(), rayon::current_num_threads())
/// })?;
/// assert!(on_pool && threads >= 1);
/// # Ok::<(), candle::Error>(())
/// ```
pub fn run_on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> candle::Result<R> {
    candle_pool_single_thread();
    install_on_pool(f)
}

/// [`run_on_pool`] for a trainer that returns a `Result`: a refused pool becomes that
/// `Result`'s error (`E` from `candle::Error`, e.g. `anyhow::Error`), so `main` handles one
/// error path.
///
/// ```
/// let n = keel_train::threads::try_run_on_pool(|| -> anyhow::Result<usize> {
///     Ok(rayon::current_num_threads())
/// })?;
/// assert!(n >= 1);
/// # Ok::<(), anyhow::Error>(())
/// ```
pub fn try_run_on_pool<T: Send, E: From<candle::Error> + Send>(
    f: impl FnOnce() -> Result<T, E> + Send,
) -> Result<T, E> {
    run_on_pool(f)?
}

/// [`run_on_pool`] without the environment write.
fn install_on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> candle::Result<R> {
    rayon::ThreadPoolBuilder::new()
        .stack_size(POOL_STACK_BYTES)
        .thread_name(|i| format!("keel-{i}"))
        .build_scoped(|thread| thread.run(), |pool| pool.install(f))
        .map_err(|e| {
            candle::Error::Msg(format!(
                "run_on_pool: cannot start the rayon threads ({e}); check RAYON_NUM_THREADS, \
                 the thread limit (ulimit -u) and the address-space limit (ulimit -v: each \
                 thread reserves a {} MiB stack)",
                POOL_STACK_BYTES >> 20
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::install_on_pool;

    /// Sums 1..=n by recursion with a 1 KiB frame: ~n KiB of stack.
    #[inline(never)]
    fn deep(n: u64) -> u64 {
        let pad = std::hint::black_box([n as u8; 1024]);
        if n == 0 {
            0
        } else {
            n + deep(n - 1) + u64::from(pad[0] ^ n as u8)
        }
    }

    #[test]
    fn runs_on_a_named_pool_thread_with_a_large_stack() {
        let (name, sum) = install_on_pool(|| {
            let name = std::thread::current().name().map(str::to_owned);
            // ~8 MiB of stack: overflows rayon's default 2 MiB threads, not this pool's.
            (name, deep(8_000))
        })
        .unwrap();
        assert!(
            name.as_deref().is_some_and(|n| n.starts_with("keel-")),
            "{name:?}"
        );
        assert_eq!(sum, 8_000 * 8_001 / 2);
    }

    #[test]
    fn a_panic_reaches_the_caller() {
        let r = std::panic::catch_unwind(|| install_on_pool(|| panic!("boom")));
        assert!(r.is_err());
    }
}
