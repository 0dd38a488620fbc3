//! `seg_train --backbone resnet18 --init FILE` (issue 14, item 4): fine-tuning from a
//! torchvision-layout checkpoint on the CPU, an exact resume, and bad checkpoints refused
//! before anything is written. Same harness as tests/seg_train.rs (the example's modules
//! compiled in, `cli::run` called).
//!
//! The checkpoint is made here from keel's own ResNet-18 (BatchNorm, with `fc` and the
//! `num_batches_tracked` tensors torchvision's state dict holds), saved under torchvision's
//! names: a real converted checkpoint is 45 MB, too large to commit. That a file written by
//! `scripts/torchvision_to_safetensors.py` loads the same way was checked by hand (README).
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use keel::models::resnet::ResNetDepth;
use keel::models::seg::{ModelConfig, SegNet};
use keel::norm::NormKind;

mod common;

#[allow(dead_code)] // reason: the binary's `main` and items only the binary uses
#[path = "../examples/seg_train/main.rs"]
mod seg_train;

use common::seg_cli::{child_main, run_cli, set, step_losses, tiny, tmp, with};
use common::torchvision::{save, torchvision_state_dict};

/// Entry point of the re-executed test binary (a no-op in a normal test run).
#[test]
fn child_process() {
    child_main();
}

/// Tiny fine-tuning settings: ResNet-18 with --init, 32x32 images, batch 2.
fn finetune(out: &Path, init: &Path, steps: usize) -> Vec<String> {
    let mut a = tiny(out, steps);
    set(&mut a, "--warmup-steps", "1");
    set(&mut a, "--eval-every", "2");
    set(&mut a, "--ckpt-every", "2");
    set(&mut a, "--keep-last", "4");
    set(&mut a, "--val-size", "2");
    with(
        a,
        &[
            "--backbone",
            "resnet18",
            "--init",
            &init.display().to_string(),
        ],
    )
}

fn ckpt(dir: &Path, step: usize) -> PathBuf {
    dir.join(format!("checkpoints/ckpt-{step:08}.safetensors"))
}

fn err_of(args: &[String]) -> String {
    format!("{:#}", run_cli(args).unwrap_err())
}

#[test]
fn resnet18_fine_tunes_from_a_torchvision_checkpoint_and_resumes_bit_for_bit() -> anyhow::Result<()>
{
    let dir = tmp("bb-finetune");
    let init = dir.join("r18.safetensors");
    let sd = torchvision_state_dict(ResNetDepth::R18)?;
    save(&sd, &init)?;
    let run = dir.join("run");
    run_cli(&finetune(&run, &init, 4))?;
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json"))?)?;
    // The defaults with --init: frozen-bn backbone, detectron2's freeze_at 2, LR x0.1.
    assert_eq!(config["backbone"], "resnet18");
    assert_eq!(config["backbone_norm"], "frozen-bn");
    assert_eq!(config["freeze_at"], 2);
    assert_eq!(config["backbone_lr_mult"], 0.1);
    let losses = step_losses(&run);
    assert_eq!(losses.len(), 4);
    assert!(losses.iter().all(|(_, l)| l.is_finite()), "{losses:?}");
    let end = keel::train::load_checkpoint(ckpt(&run, 4), &Device::Cpu)?;
    // The pretrained weights were loaded: the frozen stem and FrozenBN statistics are the
    // checkpoint's, unchanged by training; a trained stage moved.
    for k in [
        "conv1.weight",
        "layer1.0.conv1.weight",
        "layer3.1.bn2.running_var",
    ] {
        let got = end.tensors[&format!("backbone.{k}")].flatten_all()?;
        let want = sd[k].flatten_all()?;
        assert_eq!(got.to_vec1::<f32>()?, want.to_vec1::<f32>()?, "{k}");
    }
    let moved = (&end.tensors["backbone.layer3.0.conv1.weight"] - &sd["layer3.0.conv1.weight"])?
        .abs()?
        .sum_all()?
        .to_scalar::<f32>()?;
    assert!(moved > 0.0, "layer3 did not train");
    // Optimizer state only for the trainable variables: the head's 13 (4 lateral convs, the
    // smoothing conv and its GroupNorm, the classifier) and layer2-layer4's 15 conv weights
    // (FrozenBatchNorm, stem and layer1 frozen).
    let buffers = end
        .tensors
        .keys()
        .filter(|k| k.starts_with("optim.state.") && k.ends_with(".momentum_buffer"))
        .count();
    assert_eq!(buffers, 13 + 15);

    // Resume from the step-2 checkpoint: the same losses and final weights, bit for bit.
    let c2 = ckpt(&run, 2).display().to_string();
    let resume = format!("seg_train --quiet --device cpu --resume {}", run.display());
    let resume: Vec<String> = resume.split_whitespace().map(String::from).collect();
    run_cli(&with(resume.clone(), &["--resume-from", &c2]))?;
    let again = step_losses(&run);
    assert_eq!(again.len(), 4);
    for ((sa, a), (sb, b)) in losses.iter().zip(&again) {
        assert_eq!(
            (sa, a.to_bits()),
            (sb, b.to_bits()),
            "step {sa}: {a} vs {b}"
        );
    }
    let end2 = keel::train::load_checkpoint(ckpt(&run, 4), &Device::Cpu)?;
    assert_eq!(end.tensors.len(), end2.tensors.len());
    for (k, t) in &end.tensors {
        let (a, b) = (t.flatten_all()?, end2.tensors[k].flatten_all()?);
        let same = a.dtype() != DType::F32 || a.to_vec1::<f32>()? == b.to_vec1::<f32>()?;
        assert!(same, "{k} differs after resume");
    }
    // The backbone flags are the run's: another one is named.
    let e = err_of(&with(resume.clone(), &["--freeze-at", "3", "--steps", "6"]));
    assert!(e.contains("--freeze-at 3 (the run has 2)"), "{e}");
    let e = err_of(&with(resume, &["--backbone", "twin", "--steps", "6"]));
    assert!(e.contains("--backbone twin"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

/// Runs `args` expecting an error before anything is written to `out`.
fn refused(args: &[String], out: &Path) -> String {
    let e = err_of(args);
    assert!(!out.exists(), "{} was created: {e}", out.display());
    e
}

#[test]
fn bad_checkpoints_are_refused_naming_the_first_bad_key_before_anything_is_written(
) -> anyhow::Result<()> {
    let dir = tmp("bb-bad");
    let out = dir.join("run");
    let good = torchvision_state_dict(ResNetDepth::R18)?;

    let mut missing = good.clone();
    missing.remove("layer3.0.conv2.weight");
    let f = dir.join("missing.safetensors");
    save(&missing, &f)?;
    let e = refused(&finetune(&out, &f, 2), &out);
    assert!(
        e.contains("lacks 'layer3.0.conv2.weight' (shape [256, 256, 3, 3])"),
        "{e}"
    );

    let mut shape = good.clone();
    shape.insert(
        "conv1.weight".into(),
        Tensor::zeros((64, 3, 3, 3), DType::F32, &Device::Cpu)?,
    );
    let f = dir.join("shape.safetensors");
    save(&shape, &f)?;
    let e = refused(&finetune(&out, &f, 2), &out);
    assert!(
        e.contains("'conv1.weight' has shape [64, 3, 3, 3]") && e.contains("expects [64, 3, 7, 7]"),
        "{e}"
    );

    // A ResNet-34 checkpoint given to a ResNet-18: its extra blocks are named.
    let f = dir.join("r34.safetensors");
    save(&torchvision_state_dict(ResNetDepth::R34)?, &f)?;
    let e = refused(&finetune(&out, &f, 2), &out);
    assert!(e.contains("the checkpoint has 'layer1.2."), "{e}");

    // Twin (SegNet) names given to a ResNet.
    let vm = VarMap::new();
    let twin = ModelConfig {
        width: 4,
        fpn: 8,
        num_classes: 5,
        norm: NormKind::BatchNorm,
    };
    SegNet::new(
        &twin,
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )?;
    let sd: HashMap<String, Tensor> = keel::train::named_vars(&vm)
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().clone()))
        .collect();
    let f = dir.join("twin.safetensors");
    save(&sd, &f)?;
    let e = refused(&finetune(&out, &f, 2), &out);
    assert!(
        e.contains("lacks 'conv1.weight'") && e.contains("SegNet (twin) names"),
        "{e}"
    );

    // Flags that need a ResNet backbone, and the amp limit of trainable BatchNorm.
    let mut twin_args = tiny(&out, 2);
    set(&mut twin_args, "--warmup-steps", "1");
    let e = refused(
        &with(twin_args.clone(), &["--backbone-lr-mult", "0.5"]),
        &out,
    );
    assert!(
        e.contains("--backbone-lr-mult applies to a ResNet backbone"),
        "{e}"
    );
    let f = dir.join("good.safetensors");
    save(&good, &f)?;
    let e = refused(
        &with(
            finetune(&out, &f, 2),
            &["--backbone-norm", "bn", "--amp", "f16"],
        ),
        &out,
    );
    assert!(e.contains("trains in f32 only"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

#[test]
fn compare_grids_backbone_norms_of_a_resnet_and_checks_the_flags() -> anyhow::Result<()> {
    use clap::Parser;
    let args = |s: &str| -> Vec<String> { s.split_whitespace().map(String::from).collect() };
    let e = run_cli(&args(
        "seg_train compare --backbone-norms bn --norms gn --out /nonexistent/x",
    ))
    .unwrap_err();
    assert!(
        format!("{e:#}").contains("--backbone-norms needs a ResNet --backbone"),
        "{e:#}"
    );
    let e = run_cli(&args(
        "seg_train compare --backbone resnet18 --backbone-norm gn --backbone-norms bn --norms gn --out /nonexistent/x",
    ))
    .unwrap_err();
    assert!(format!("{e:#}").contains("give one of them"), "{e:#}");
    let cli = seg_train::cli::Cli::try_parse_from(args(
        "seg_train compare --backbone resnet18 --init /x/r18.safetensors --backbone-norms bn,frozen-bn --norms gn --batch-sizes 2 --seeds 1",
    ))?;
    let Some(seg_train::cli::Command::Compare(c)) = cli.command else {
        panic!("not compare")
    };
    let md = seg_train::compare::results_md(&c, &[], 1.0, &Device::Cpu);
    assert!(
        md.contains(
            "resnet18 backbone pretrained from /x/r18.safetensors (freeze-at 2, backbone lr x0.1)"
        ),
        "{md}"
    );
    Ok(())
}
