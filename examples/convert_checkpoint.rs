//! Convert the BatchNorms of a PyTorch checkpoint (safetensors) for small-batch training.
//!
//! ```text
//! cargo run --example convert_checkpoint -- --to gn IN.safetensors OUT.safetensors
//! cargo run --example convert_checkpoint -- --to frozen-bn IN OUT --fold conv1=bn1
//! ```
//! `--to gn` keeps each BatchNorm's weight/bias as the GroupNorm affine and drops the running
//! statistics; `--to frozen-bn` keeps the four tensors and drops `num_batches_tracked`, and
//! `--fold CONV=BN` (repeatable) folds a BatchNorm into the conv before it, for inference.
//! `--prefix P` (repeatable) converts only the named BatchNorms. IN and OUT are checked
//! before any work (OUT may not be IN, however spelled, nor a directory); OUT is written to a
//! temporary file and renamed, so a failed run leaves neither a half-written checkpoint nor a
//! temp file, and nothing is written when a BatchNorm is incomplete or its values are not
//! finite.
use std::path::PathBuf;

use anyhow::bail;
use candle::Device;
use clap::{Parser, ValueEnum};
use keel::norm::convert::{bn_to_frozen_bn, bn_to_group_norm, fold_bn_into_conv, ConvertPaths};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Target {
    /// BatchNorm -> GroupNorm: keep weight/bias, drop the running statistics.
    Gn,
    /// BatchNorm -> FrozenBatchNorm2d: keep the statistics, drop num_batches_tracked.
    FrozenBn,
}

#[derive(Parser, Debug)]
#[command(about = "Convert a checkpoint's BatchNorms to GroupNorm or FrozenBatchNorm2d")]
struct Args {
    /// What the BatchNorms become.
    #[arg(long, value_enum)]
    to: Target,
    /// Only convert these BatchNorm prefixes (default: every key ending in .running_var).
    #[arg(long = "prefix")]
    prefixes: Vec<String>,
    /// With --to frozen-bn: fold BN into the conv before it, as CONV_PREFIX=BN_PREFIX.
    #[arg(long = "fold")]
    folds: Vec<String>,
    /// The BatchNorm epsilon used when folding (checkpoints do not store it).
    #[arg(long, default_value_t = 1e-5)]
    eps: f64,
    /// Input checkpoint (.safetensors).
    input: PathBuf,
    /// Output checkpoint (.safetensors); must differ from the input.
    output: PathBuf,
}

fn main() -> anyhow::Result<()> {
    match run(std::env::args_os()) {
        Ok(summary) => println!("{summary}"),
        // --help, --version and usage errors print and exit as clap does.
        Err(e) => match e.downcast::<clap::Error>() {
            Ok(clap_err) => clap_err.exit(),
            Err(e) => return Err(e),
        },
    }
    Ok(())
}

/// Parses `args` (the program name first), converts IN and writes OUT; returns the summary.
pub fn run<I, T>(args: I) -> anyhow::Result<String>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args = Args::try_parse_from(args)?;
    let paths = ConvertPaths::new(&args.input, &args.output)?;
    if matches!(args.to, Target::Gn) && !args.folds.is_empty() {
        bail!("convert_checkpoint: --fold only applies to --to frozen-bn");
    }
    let pairs = args
        .folds
        .iter()
        .map(|f| match f.split_once('=') {
            Some((conv, bn)) if !conv.is_empty() && !bn.is_empty() => {
                Ok((conv.to_string(), bn.to_string()))
            }
            _ => bail!("convert_checkpoint: --fold takes CONV_PREFIX=BN_PREFIX, got '{f}'"),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut state = paths.load(&Device::Cpu)?;
    let prefixes = (!args.prefixes.is_empty()).then_some(args.prefixes.as_slice());
    let converted = match args.to {
        Target::Gn => bn_to_group_norm(&mut state, prefixes)?,
        Target::FrozenBn => {
            let converted = bn_to_frozen_bn(&mut state, prefixes)?;
            fold_bn_into_conv(&mut state, &pairs, args.eps)?;
            converted
        }
    };
    paths.save(&state)?;
    Ok(format!(
        "converted {} BatchNorm(s) to {:?}: {}; wrote {} tensors to {}",
        converted.len(),
        args.to,
        converted.join(", "),
        state.len(),
        args.output.display()
    ))
}
