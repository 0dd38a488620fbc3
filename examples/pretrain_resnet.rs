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
//! pixel). The images come from keel's shapes renderer (textured shapes on noisy cluttered
//! gradients) with seeds of their own, so the segmentation runs that fine-tune from the
//! result never see these images. The output is a safetensors state dict under torchvision's
//! names (`conv1.weight`, `bn1.running_mean`, ..., `fc.weight`), the layout
//! `scripts/torchvision_to_safetensors.py` writes, so seg_train's `--init` reads both the
//! same way. It prints the validation accuracy at the end (`--log-every N` adds the train
//! curve, `--diagnose` the label frequencies, the train-set accuracy and the accuracy with
//! batch statistics).
//!
//! The defaults are a recipe that learns (BENCHMARKS.md, case B: val accuracy 0.68, chance
//! 0.25, train 0.82, in 2000 steps, 41 min on the loaded 2-core CPU box): ONE shape per
//! image, radius 0.2-0.4 of a 32x32 image (6-13 px, the pixel size of the segmentation set's
//! shapes at 64x64: radius 0.10-0.25 of 64), SGD at a peak LR of 0.005. The first version
//! (1-3 shapes of radius 0.10-0.25 at 64x64, LR 0.1) predicted the majority class (0.30):
//! the dominant shape of overlapping small shapes is a pixel-count comparison, and LR 0.1
//! (and 0.02) threw the loss above chance's; one shape at LR 0.02, or AdamW at 1e-3, stayed
//! at chance for 300 steps too.
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use candle::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use clap::Parser;
use keel::data::{
    eval_batches, HostBatch, Loader, LoaderConfig, Sample, Shapes, ShapesConfig, Source,
};
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
    #[arg(long, default_value_t = 2000)]
    steps: usize,
    /// Image side.
    #[arg(long, default_value_t = 32)]
    image_size: usize,
    /// Peak learning rate (SGD momentum 0.9, weight decay 1e-4, poly decay, a linear warmup
    /// over the first tenth of the steps, at most 100).
    #[arg(long, default_value_t = 0.005)]
    lr: f64,
    /// Shapes per image: 1 to this many (the segmentation set has 1-3; more than one makes
    /// the label a pixel-count comparison of overlapping shapes).
    #[arg(long, default_value_t = 1)]
    max_shapes: usize,
    /// Shape radius range as fractions of the side, `MIN,MAX` (the segmentation set's is
    /// 0.10,0.25).
    #[arg(long, value_delimiter = ',', default_values_t = [0.2, 0.4])]
    radius: Vec<f32>,
    /// Paint every shape in one solid colour (no stripes, checker or speckle).
    #[arg(long)]
    plain: bool,
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
    /// Print the mean train loss and train-batch accuracy every N steps (0: never).
    #[arg(long, default_value_t = 0)]
    log_every: usize,
    /// After writing --out: the label frequencies, the train-set accuracy and the val
    /// accuracy with batch statistics (BN in train mode) beside the running statistics'.
    #[arg(long)]
    diagnose: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    dev: DeviceArgs,
}

/// The dominant shape of every sample of `b`: `(N,)` u32 labels (ties to the lower class
/// id; 0 for a mask without shape pixels).
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

/// Top-1 accuracy of `net` on `val`; `batch_stats` normalizes with each batch's statistics
/// (BN in train mode: it also moves the running statistics).
fn accuracy(
    net: &ResNet,
    val: &dyn Source,
    size: usize,
    dev: &Device,
    batch_stats: bool,
) -> anyhow::Result<f64> {
    let (mut right, mut total) = (0usize, 0usize);
    for b in eval_batches(val, 64, size) {
        let b = b?;
        let (x, _) = b.to_tensors(dev)?;
        let logits = net
            .forward(&x, batch_stats)?
            .logits
            .context("the network has no fc")?;
        right += count_right(&logits, &labels(&b))?;
        total += b.n;
    }
    Ok(right as f64 / total.max(1) as f64)
}

/// How many rows of `logits` have their argmax at `labels` (a host read of the argmax).
fn count_right(logits: &Tensor, labels: &[u32]) -> candle::Result<usize> {
    let pred = logits.argmax(1)?.to_vec1::<u32>()?;
    Ok(pred.iter().zip(labels).filter(|(p, l)| p == l).count())
}

fn main() -> anyhow::Result<()> {
    // The whole run on one of rayon's threads (keel::train::threads::run_on_pool).
    let args = std::env::args().collect();
    keel::train::threads::try_run_on_pool(|| run(args)).map(drop)
}

/// Parses `argv` (program name first), pretrains and writes `--out`; returns the validation
/// accuracy.
pub fn run(argv: Vec<String>) -> anyhow::Result<f64> {
    let a = Args::try_parse_from(argv)?;
    if [a.batch_size, a.steps, a.train_size, a.val_size].contains(&0) {
        bail!("--batch-size, --steps, --train-size and --val-size must be at least 1")
    }
    if a.radius.len() != 2 {
        bail!(
            "--radius {:?}: give two fractions of the side, MIN,MAX (e.g. 0.10,0.25)",
            a.radius
        )
    }
    let shapes = ShapesConfig {
        min_shapes: 1,
        max_shapes: a.max_shapes,
        min_radius: a.radius[0],
        max_radius: a.radius[1],
        textured: !a.plain,
    };
    shapes.validate()?;
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
    let train: Arc<dyn Source> = Arc::new(Shapes::generate_with(
        a.train_size,
        a.image_size,
        TRAIN_SEED,
        shapes,
    )?);
    let val = Shapes::generate_with(a.val_size, a.image_size, VAL_SEED, shapes)?;
    let loader_cfg = LoaderConfig {
        batch: a.batch_size,
        size: a.image_size,
        seed: a.seed,
        start: 0,
        end: a.steps,
        workers: 1,
        prefetch: 4,
    };
    let mut loader = Loader::new(train.clone(), loader_cfg);
    let ce = CrossEntropyConfig::default();
    let pb = progress_bar(!a.quiet, a.steps, 0);
    let (mut win_loss, mut win_right, mut win_n) = (0.0, 0usize, 0usize);
    while state.step < a.steps {
        let lr = schedule.lr(state.step);
        let mut right = 0usize;
        let mut n = 0usize;
        let out = state.step(lr, Some(5.0), |_| {
            let b = loader
                .next()
                .context("the loader ended early")
                .map_err(candle::Error::wrap)??;
            let (x, _) = b.to_tensors(&dev)?;
            let lab = labels(&b);
            let y = Tensor::new(lab.as_slice(), &dev)?;
            let logits = net
                .forward(&x, true)?
                .logits
                .ok_or_else(|| candle::Error::Msg("no fc".into()))?;
            // The train-batch accuracy is only printed with --log-every: no host read of the
            // argmax on the step otherwise.
            if a.log_every > 0 {
                right = count_right(&logits, &lab)?;
            }
            n = b.n;
            cross_entropy(&logits, &y, &ce)
        })?;
        (win_loss, win_right, win_n) = (win_loss + out.loss, win_right + right, win_n + n);
        if a.log_every > 0 && (out.step + 1) % a.log_every == 0 {
            pb.suspend(|| {
                println!(
                    "step {}: loss {:.4} train-batch accuracy {:.3} lr {:.2e}",
                    out.step + 1,
                    win_loss / a.log_every as f64,
                    win_right as f64 / win_n.max(1) as f64,
                    out.lr
                )
            });
            (win_loss, win_right, win_n) = (0.0, 0, 0);
        }
        if !out.loss.is_finite() {
            bail!("step {}: the loss is {} (lower --lr)", out.step, out.loss)
        }
        pb.set_message(format!("loss {:.4} lr {:.2e}", out.loss, out.lr));
        pb.inc(1);
    }
    pb.finish_and_clear();
    let acc = accuracy(&net, &val, a.image_size, &dev, false)?;
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
    if a.diagnose {
        diagnose(&net, &*train, &val, a.image_size, &dev)?;
    }
    Ok(acc)
}

/// The first `.1` samples of a source.
struct First<'a>(&'a dyn Source, usize);

impl Source for First<'_> {
    fn len(&self) -> usize {
        self.1
    }

    fn load(
        &self,
        idx: usize,
        size: usize,
        aug: Option<&mut rand_chacha::ChaCha8Rng>,
    ) -> candle::Result<Sample> {
        self.0.load(idx, size, aug)
    }

    fn in_memory(&self) -> bool {
        self.0.in_memory()
    }
}

/// The label frequencies of both sets, the train-set accuracy (running statistics) and the
/// val accuracy with batch statistics (this moves the running statistics: run it after the
/// file is written).
fn diagnose(
    net: &ResNet,
    train: &dyn Source,
    val: &Shapes,
    size: usize,
    dev: &Device,
) -> anyhow::Result<()> {
    for (name, src) in [("train", train), ("val", val as &dyn Source)] {
        let mut freq = [0usize; CLASSES];
        for b in eval_batches(src, 64, size) {
            for l in labels(&b?) {
                freq[l as usize] += 1;
            }
        }
        println!("{name} labels (none, circle, rectangle, triangle, ring): {freq:?}");
    }
    let sub = train.len().min(val.len());
    let sub_src = First(train, sub);
    println!(
        "train accuracy (first {sub} images, running statistics): {:.4}",
        accuracy(net, &sub_src, size, dev, false)?
    );
    println!(
        "val accuracy with batch statistics (BN in train mode, batches of 64): {:.4}",
        accuracy(net, val, size, dev, true)?
    );
    Ok(())
}
