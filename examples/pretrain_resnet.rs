//! pretrain_resnet: a pretrained ResNet made the honest way, for the fine-tuning experiment
//! (issue 14, case B) on a machine that cannot download ImageNet weights.
//!
//! ```text
//! cargo run --release --example pretrain_resnet -- --out r18_pre.safetensors
//! cargo run --release --example seg_train -- --backbone resnet18 --init r18_pre.safetensors
//! ```
//!
//! Trains a torchvision-layout ResNet with BatchNorm (`keel::models::resnet`, batch 32 by
//! default) to classify synthetic shape images by their dominant shape: the class with the
//! most pixels among circle, rectangle, triangle and ring (class 0 when an image has no shape
//! pixel). The images come from keel's shapes renderer with seeds of their own, so the
//! segmentation runs that fine-tune from the result never see these images. The output is a
//! safetensors state dict under torchvision's names (`conv1.weight`, `bn1.running_mean`, ...,
//! `fc.weight`), the layout `scripts/torchvision_to_safetensors.py` writes, so seg_train's
//! `--init` reads both the same way. It prints the validation accuracy at the end.
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use candle::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use clap::Parser;
use keel::data::{eval_batches, HostBatch, Loader, LoaderConfig, Shapes, Source};
use keel::kernels::{cross_entropy, CrossEntropyConfig};
use keel::models::resnet::{ResNet, ResNetConfig, ResNetDepth};
use keel::models::seg::init_weights;
use keel::norm::NormKind;
use keel::optim::{split_no_decay, LrSchedule, OptimizerKind};
use keel::train::cli::DeviceArgs;
use keel::train::{named_vars, progress_bar, write_atomic, OptimRecipe, TrainConfig, TrainState};

/// Classes: 0 = no shape, then the shapes set's circle, rectangle, triangle, ring.
const CLASSES: usize = 5;
/// Seeds of the pretraining images (not the segmentation sets' seeds).
const TRAIN_SEED: u64 = 0x7e57_c1a5_0001;
const VAL_SEED: u64 = 0x7e57_c1a5_0002;

#[derive(Parser, Debug)]
#[command(about = "Pretrain a torchvision-layout ResNet on synthetic shape classification")]
struct Args {
    /// ResNet depth: 18, 34, 50 or 101.
    #[arg(long, default_value_t = 18)]
    depth: usize,
    /// Images per step.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Optimizer steps.
    #[arg(long, default_value_t = 1500)]
    steps: usize,
    /// Image side.
    #[arg(long, default_value_t = 64)]
    image_size: usize,
    /// Peak learning rate (SGD momentum 0.9, poly decay, a linear warmup over the first
    /// tenth of the steps, at most 100).
    #[arg(long, default_value_t = 0.1)]
    lr: f64,
    /// Training images (rendered once, then drawn in a seeded order with flips).
    #[arg(long, default_value_t = 8000)]
    train_size: usize,
    /// Validation images.
    #[arg(long, default_value_t = 500)]
    val_size: usize,
    /// Seed of the weights' init and the sample order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The safetensors file to write (torchvision names).
    #[arg(long)]
    out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    dev: DeviceArgs,
}

/// The dominant shape of every sample of `b`: `(N,)` u32 labels.
fn labels(b: &HostBatch) -> Vec<u32> {
    b.targets
        .chunks(b.size * b.size)
        .map(|mask| {
            let mut count = [0usize; CLASSES];
            for &c in mask {
                if (1..CLASSES as u32).contains(&c) {
                    count[c as usize] += 1;
                }
            }
            let (best, n) = (1..CLASSES)
                .map(|c| (c, count[c]))
                .max_by_key(|&(c, n)| (n, std::cmp::Reverse(c)))
                .unwrap_or((0, 0));
            if n == 0 {
                0
            } else {
                best as u32
            }
        })
        .collect()
}

fn depth(d: usize) -> anyhow::Result<ResNetDepth> {
    Ok(match d {
        18 => ResNetDepth::R18,
        34 => ResNetDepth::R34,
        50 => ResNetDepth::R50,
        101 => ResNetDepth::R101,
        d => bail!("--depth {d}: must be 18, 34, 50 or 101"),
    })
}

/// Seeded init of every variable (candle's own init draws from an unseeded generator): the
/// convs and norms by keel-models' PyTorch rules (`init_weights`), `fc` as PyTorch's
/// `nn.Linear` (weight and bias uniform in +-1/sqrt(fan_in)) from the same seed.
fn seeded_init(vm: &VarMap, seed: u64) -> anyhow::Result<()> {
    use rand::{Rng, SeedableRng};
    let params = named_vars(vm);
    let body = VarMap::new();
    {
        let mut data = body.data().lock().unwrap_or_else(|e| e.into_inner());
        for (k, v) in params.iter().filter(|(k, _)| !k.starts_with("fc.")) {
            data.insert(k.clone(), v.clone());
        }
    }
    init_weights(&body, seed)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0xfc);
    let fan_in = params
        .iter()
        .find(|(k, _)| k == "fc.weight")
        .map(|(_, v)| v.dims()[1])
        .context("the network has no fc.weight")?;
    let bound = 1.0 / (fan_in as f64).sqrt();
    for (_, v) in params.iter().filter(|(k, _)| k.starts_with("fc.")) {
        let values: Vec<f32> = (0..v.elem_count())
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        v.set(&Tensor::from_vec(values, v.dims(), v.device())?)?;
    }
    Ok(())
}

/// Top-1 accuracy of `net` on `val`.
fn accuracy(net: &ResNet, val: &dyn Source, size: usize, dev: &Device) -> anyhow::Result<f64> {
    let (mut right, mut total) = (0usize, 0usize);
    for b in eval_batches(val, 64, size) {
        let b = b?;
        let (x, _) = b.to_tensors(dev)?;
        let logits = net
            .forward(&x, false)?
            .logits
            .context("the network has no fc")?;
        let pred = logits.argmax(1)?.to_vec1::<u32>()?;
        right += pred
            .iter()
            .zip(labels(&b))
            .filter(|(p, l)| **p == *l)
            .count();
        total += b.n;
    }
    Ok(right as f64 / total.max(1) as f64)
}

fn main() -> anyhow::Result<()> {
    run(std::env::args().collect()).map(drop)
}

/// Parses `argv` (program name first), pretrains and writes `--out`; returns the validation
/// accuracy.
pub fn run(argv: Vec<String>) -> anyhow::Result<f64> {
    let a = Args::try_parse_from(argv)?;
    if [a.batch_size, a.steps, a.train_size, a.val_size].contains(&0) {
        bail!("--batch-size, --steps, --train-size and --val-size must be at least 1")
    }
    let dev = a.dev.setup("pretrain_resnet")?;
    let cfg = ResNetConfig {
        with_fc: true,
        num_classes: CLASSES,
        ..ResNetConfig::backbone(depth(a.depth)?, NormKind::BatchNorm)
    };
    let vm = VarMap::new();
    let net = ResNet::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    seeded_init(&vm, a.seed)?;
    let recipe = OptimRecipe {
        lr: a.lr,
        ..OptimRecipe::new(OptimizerKind::Sgd, a.steps)
    }
    .with_warmup((a.steps / 10).min(100));
    let schedule = recipe.schedule()?;
    let mut state = TrainState::new(
        named_vars(&vm),
        recipe.optimizer(split_no_decay(&vm))?,
        &TrainConfig::default(),
    )?;
    let train: Arc<dyn Source> = Arc::new(Shapes::generate(a.train_size, a.image_size, TRAIN_SEED));
    let val = Shapes::generate(a.val_size, a.image_size, VAL_SEED);
    let loader_cfg = LoaderConfig {
        batch: a.batch_size,
        size: a.image_size,
        seed: a.seed,
        start: 0,
        end: a.steps,
        workers: 1,
        prefetch: 4,
    };
    let mut loader = Loader::new(train, loader_cfg);
    let ce = CrossEntropyConfig::default();
    let pb = progress_bar(!a.quiet, a.steps, 0);
    while state.step < a.steps {
        let lr = schedule.lr(state.step);
        let out = state.step(lr, Some(5.0), |_| {
            let b = loader
                .next()
                .context("the loader ended early")
                .map_err(candle::Error::wrap)??;
            let (x, _) = b.to_tensors(&dev)?;
            let y = Tensor::new(labels(&b), &dev)?;
            let logits = net
                .forward(&x, true)?
                .logits
                .ok_or_else(|| candle::Error::Msg("no fc".into()))?;
            cross_entropy(&logits, &y, &ce)
        })?;
        if !out.loss.is_finite() {
            bail!("step {}: the loss is {} (lower --lr)", out.step, out.loss)
        }
        pb.set_message(format!("loss {:.4} lr {:.2e}", out.loss, out.lr));
        pb.inc(1);
    }
    pb.finish_and_clear();
    let acc = accuracy(&net, &val, a.image_size, &dev)?;
    let tensors: Vec<(String, Tensor)> = named_vars(&vm)
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().clone()))
        .collect();
    let tmp = a.out.with_extension("safetensors.partial");
    candle::safetensors::save(&tensors.into_iter().collect(), &tmp)?;
    let bytes = std::fs::read(&tmp)?;
    std::fs::remove_file(&tmp)?;
    write_atomic(&a.out, &bytes).with_context(|| format!("--out {}", a.out.display()))?;
    println!(
        "pretrain_resnet: resnet{} (bn, batch {}, {} steps at {}x{}): val accuracy {:.4} on {} images (chance {:.2}); wrote {}",
        a.depth, a.batch_size, a.steps, a.image_size, a.image_size, acc, a.val_size, 1.0 / (CLASSES - 1) as f64, a.out.display()
    );
    Ok(acc)
}
