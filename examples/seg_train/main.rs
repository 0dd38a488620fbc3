//! seg_train: semantic segmentation training with keel (issue 5).
//!
//! ```text
//! cargo run --release --example seg_train                      # synthetic shapes, GN, CPU/CUDA
//! cargo run --release --example seg_train -- --norm bn --batch-size 2 --out runs/bn
//! cargo run --release --example seg_train -- --resume runs/bn  # continue exactly
//! cargo run --release --example seg_train -- --data-dir VOC2012 --num-classes 21 --image-size 256
//! cargo run --release --example seg_train -- compare --norms bn,gn,ws-gn --batch-sizes 1,2,8 --seeds 3 --steps 300
//! cargo run --release --example seg_train -- bench --width 64 --fpn 128 --batch-size 4 --image-size 128 --vs-torch
//! ```
//!
//! The model is the PyTorch twin of `shared/tools/torch_seg_twin.py` (twin parameter names;
//! `--width 64 --fpn 128 --num-classes 21` is the twin exactly). The example is wiring:
//! norms come from keel::norm (GN + SiLU on the fused kernel), the optimizer recipe and the
//! train state (step, clipping, loss scaling, accumulation, EMA, checkpoint snapshot and
//! restore), metrics, logs, checkpoints and the stability monitor from keel::train and
//! keel::optim, the network (`SegNet`) from keel::models and the loss from keel::kernels.
//! Modules: cli (flags, RunConfig), resume (what `--resume` continues from, checked),
//! output (keel::train::run_dir's states as seg_train's messages), train (one run),
//! compare (the grid's jobs; its table, curves and process pool are keel::train::grid),
//! bench (the step alone, against the PyTorch twin `torch_twin.py`); the data (shapes, voc,
//! loader, Sources) is keel::data; `tests/seg_train.rs` includes them with `#[path]`.
pub(crate) mod bench;
pub(crate) mod cli;
pub(crate) mod compare;
pub(crate) use keel::data;
pub(crate) mod model;
pub(crate) mod output;
pub(crate) mod resume;
pub(crate) mod train;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // The whole trainer on one of rayon's threads (keel::train::threads::run_on_pool).
    if let Err(e) = keel::train::threads::try_run_on_pool(|| cli::run(args)) {
        // A run stopped by SIGINT/SIGTERM exits with 130/143 after its checkpoint.
        let code = keel::train::driver::exit_code(e.as_ref());
        let what = if code == 1 { "error: " } else { "" };
        // clap's messages start with their own "error: ".
        let msg = format!("{e:#}");
        eprintln!(
            "seg_train: {what}{}",
            msg.strip_prefix("error: ").unwrap_or(&msg)
        );
        std::process::exit(code);
    }
}
