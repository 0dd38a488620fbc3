//! Graceful stop on Ctrl-C: SIGINT and SIGTERM become a flag a training loop polls once per
//! step, so it can finish the step, write a checkpoint and its report, and exit with the
//! shell's code for the signal (128 + the signal number: 130 for SIGINT, 143 for SIGTERM).
//! A second signal while the first is pending exits at once with that code (the double
//! Ctrl-C of a stuck shutdown). The handlers come from `signal-hook`; they only touch atomics
//! and call `_exit`, both async-signal-safe.
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::low_level;

/// The termination signal that asked a run to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StopSignal {
    /// SIGINT (Ctrl-C in a terminal).
    Interrupt,
    /// SIGTERM (`kill PID`, a job scheduler's stop, a container shutdown).
    Terminate,
}

impl StopSignal {
    /// The signal's number (`SIGINT` is 2, `SIGTERM` 15 on Linux and macOS).
    pub fn number(self) -> i32 {
        match self {
            StopSignal::Interrupt => SIGINT,
            StopSignal::Terminate => SIGTERM,
        }
    }

    /// The exit status a shell reports for a process stopped by this signal: 128 + its
    /// number (130 for SIGINT, 143 for SIGTERM). A program that stops gracefully exits with
    /// it, so scripts see the same code as for an abrupt stop.
    pub fn exit_code(self) -> i32 {
        128 + self.number()
    }

    fn from_number(n: usize) -> Option<Self> {
        [StopSignal::Interrupt, StopSignal::Terminate]
            .into_iter()
            .find(|s| usize::try_from(s.number()).ok() == Some(n))
    }
}

impl fmt::Display for StopSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StopSignal::Interrupt => "SIGINT",
            StopSignal::Terminate => "SIGTERM",
        })
    }
}

/// How many [`Interrupt`]s are alive: with none, a signal has its default effect.
static LIVE: AtomicUsize = AtomicUsize::new(0);
/// The number of the pending signal, 0 when none.
static PENDING: AtomicUsize = AtomicUsize::new(0);
/// The handlers are registered once per process and stay (signal-hook cannot restore the
/// previous handler; they fall back to the default action while no [`Interrupt`] lives).
static HANDLERS: OnceLock<Result<(), String>> = OnceLock::new();

/// The handler of SIGINT and SIGTERM; async-signal-safe (atomics, `_exit`, re-raise).
fn on_signal(signal: i32) {
    if LIVE.load(Ordering::SeqCst) == 0 {
        // Nobody polls: terminate as if no handler were installed.
        if low_level::emulate_default_handler(signal).is_err() {
            low_level::exit(128 + signal);
        }
        return;
    }
    let number = usize::try_from(signal).unwrap_or(0);
    if PENDING.swap(number, Ordering::SeqCst) != 0 {
        // The second signal: the graceful stop is taking too long for the user.
        low_level::exit(128 + signal);
    }
}

fn register_handlers() -> Result<(), String> {
    for signal in [SIGINT, SIGTERM] {
        // SAFETY: `on_signal` is async-signal-safe: it loads and swaps lock-free atomics and
        // calls `_exit` (signal-hook's `low_level::exit`) or signal-hook's
        // `emulate_default_handler`, which is written to be called from a signal handler.
        unsafe { low_level::register(signal, move || on_signal(signal)) }
            .map_err(|e| format!("Interrupt::install: cannot handle signal {signal}: {e}"))?;
    }
    Ok(())
}

/// A graceful-stop request from SIGINT or SIGTERM, polled by a training loop.
///
/// While an `Interrupt` lives, the first SIGINT/SIGTERM does not stop the process: it sets
/// the flag that [`Interrupt::requested`] reads, and the loop decides when to stop (after the
/// current step, with a checkpoint). A second signal before the process ends exits at once
/// with [`StopSignal::exit_code`] of that signal. When the last `Interrupt` is dropped the
/// signals terminate the process again, as by default. The flag is process-wide: every live
/// `Interrupt` sees the same request.
///
/// ```
/// use keel_train::{Interrupt, StopSignal};
/// let stop = Interrupt::install()?;
/// for step in 0..100 {
///     // ... one training step ...
///     if step == 3 {
///         stop.request(StopSignal::Terminate); // what `kill PID` does
///     }
///     if let Some(signal) = stop.requested() {
///         // ... write a checkpoint and the report ...
///         assert_eq!((step, signal.exit_code()), (3, 143));
///         break; // and exit with signal.exit_code()
///     }
/// }
/// # Ok::<(), candle::Error>(())
/// ```
#[derive(Debug)]
pub struct Interrupt {
    _private: (),
}

impl Interrupt {
    /// Installs the SIGINT and SIGTERM handlers (once per process) and arms them. A request
    /// left over from an earlier `Interrupt` that has since been dropped is cleared.
    pub fn install() -> candle::Result<Self> {
        HANDLERS
            .get_or_init(register_handlers)
            .clone()
            .map_err(candle::Error::Msg)?;
        if LIVE.fetch_add(1, Ordering::SeqCst) == 0 {
            PENDING.store(0, Ordering::SeqCst);
        }
        Ok(Self { _private: () })
    }

    /// The signal that asked to stop, if one arrived (or [`Interrupt::request`] was called).
    pub fn requested(&self) -> Option<StopSignal> {
        StopSignal::from_number(PENDING.load(Ordering::SeqCst))
    }

    /// Asks for a stop as `signal` would, without sending it (a GUI's stop button, tests).
    /// Unlike a second signal, a second request does not exit.
    pub fn request(&self, signal: StopSignal) {
        let number = usize::try_from(signal.number()).unwrap_or(0);
        let _ = PENDING.compare_exchange(0, number, Ordering::SeqCst, Ordering::SeqCst);
    }
}

impl Drop for Interrupt {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test for the whole module: the flag is process-wide.
    #[test]
    fn a_signal_sets_the_flag_and_a_new_install_clears_it() -> candle::Result<()> {
        assert_eq!(StopSignal::Interrupt.exit_code(), 130);
        assert_eq!(StopSignal::Terminate.exit_code(), 143);
        assert_eq!(StopSignal::Terminate.to_string(), "SIGTERM");
        let stop = Interrupt::install()?;
        assert_eq!(stop.requested(), None);
        // A real signal to this process: the handler records it, the process lives on.
        low_level::raise(SIGTERM).map_err(candle::Error::wrap)?;
        assert_eq!(stop.requested(), Some(StopSignal::Terminate));
        // A second live handle sees the same request; a programmatic request keeps the first.
        let other = Interrupt::install()?;
        other.request(StopSignal::Interrupt);
        assert_eq!(other.requested(), Some(StopSignal::Terminate));
        drop((stop, other));
        let fresh = Interrupt::install()?;
        assert_eq!(
            fresh.requested(),
            None,
            "a new run starts without a request"
        );
        fresh.request(StopSignal::Interrupt);
        assert_eq!(fresh.requested(), Some(StopSignal::Interrupt));
        Ok(())
    }
}
