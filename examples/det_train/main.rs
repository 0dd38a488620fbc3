//! det_train: FCOS object detection training with keel (issue 15).
//!
//! ```text
//! cargo run --release --example det_train                      # synthetic shapes, GN, CPU/CUDA
//! cargo run --release --example det_train -- --norm bn --batch-size 2 --out runs/det_bn
//! cargo run --release --example det_train -- --resume runs/det_train   # continue exactly
//! cargo run --release --example det_train -- --data-dir VOCdevkit/VOC2007 --format voc --image-size 320
//! cargo run --release --example det_train -- --data-dir coco --format coco --train-split train2017 --val-split val2017
//! cargo run --release --example det_train -- bench --batch-size 4 --image-size 128   # the step alone
//! cargo run --release --example det_train -- compare --norms bn,gn,ws-gn --batch-sizes 1,2,8 --seeds 3
//! ```
//!
//! The example is wiring: the backbone is keel-models' SegEncoder (the twin encoder), the
//! FPN, head, targets, loss, inference and COCO evaluation are keel-det's, the data
//! keel-data's (DetShapes / VocDet / CocoDet, validate_det, DetBatches), and the loop
//! parts (TrainState, OptimRecipe, Guard, checkpoints, JSONL log, health report, progress
//! bar, RunDir) keel-train's. Modules: cli (flags, DetConfig, resume), data, model (the
//! detector's composition), eval (inference + COCO mAP), train (one run), bench (the step
//! alone), compare (the norm x batch x seed grid on keel::train::grid).
pub(crate) mod bench;
pub(crate) mod cli;
pub(crate) mod compare;
pub(crate) mod data;
pub(crate) mod eval;
pub(crate) mod model;
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
            "det_train: {what}{}",
            msg.strip_prefix("error: ").unwrap_or(&msg)
        );
        std::process::exit(code);
    }
}
