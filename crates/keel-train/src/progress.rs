//! A terminal progress bar for a training loop (indicatif): elapsed time, the bar,
//! steps done of all, the caller's message (loss, LR), steps per second and the ETA.

/// A bar over `steps` steps starting at `at` (a resumed run), or a hidden bar when `show`
/// is false (every call on it does nothing). `set_message` puts the loss and LR on it;
/// `suspend` prints a line above it.
///
/// ```
/// let pb = keel_train::progress_bar(false, 100, 40);
/// pb.inc(1);
/// assert!(pb.is_hidden());
/// assert_eq!(keel_train::progress_bar(true, 100, 40).position(), 40);
/// ```
pub fn progress_bar(show: bool, steps: usize, at: usize) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(steps as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} {msg} {per_sec} ETA {eta}",
        )
        .expect("a valid static template")
        .progress_chars("=> "),
    );
    pb.set_position(at as u64);
    pb
}
