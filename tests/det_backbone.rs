//! `det_train --backbone resnet18 --init FILE` (issue 15, item 1): FCOS on a torchvision
//! ResNet backbone fine-tuned from a torchvision-layout checkpoint on the CPU: finite losses,
//! frozen stages unchanged, the backbone's LR multiplier honoured, the defaults resolved in
//! config.json, an exact resume, `compare --backbone-norms` rows, and bad flags and
//! checkpoints refused (named) before anything is written. Same harness as tests/det_train.rs;
//! the checkpoint comes from tests/common/torchvision.rs (keel's own seeded ResNet saved
//! under torchvision's names, as tests/seg_backbone.rs uses).
use std::collections::HashMap;
use std::path::Path;

use candle::{Device, Tensor};
use keel::models::resnet::ResNetDepth;

#[allow(dead_code)] // reason: the binary's `main`
#[path = "../examples/det_train/main.rs"]
mod det_train;

#[path = "common/det_cli.rs"]
mod det_cli;

#[path = "common/torchvision.rs"]
mod torchvision;

use det_cli::{assert_same_tensors, ckpt, loss_bits, records, run, set, tiny, tmp};
use torchvision::{save, torchvision_state_dict};

/// A ResNet-18 checkpoint in torchvision's layout written to `dir/r18.safetensors`.
fn r18_checkpoint(dir: &Path) -> anyhow::Result<(std::path::PathBuf, HashMap<String, Tensor>)> {
    let path = dir.join("r18.safetensors");
    let sd = torchvision_state_dict(ResNetDepth::R18)?;
    save(&sd, &path)?;
    Ok((path, sd))
}

/// [`tiny`] with a ResNet-18 backbone initialised from `init`.
fn resnet(out: &Path, steps: usize, init: &Path, extra: &[&str]) -> Vec<String> {
    let init = init.display().to_string();
    let mut a = tiny(out, steps, &["--backbone", "resnet18", "--init", &init]);
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn err_of(args: &[String]) -> String {
    format!("{:#}", run(args).unwrap_err())
}

/// `name`'s change from the checkpoint `sd` (torchvision names) to the run's final weights
/// (`backbone.` names): the sum of absolute differences.
fn moved(end: &HashMap<String, Tensor>, sd: &HashMap<String, Tensor>, k: &str) -> f32 {
    let d = (&end[&format!("backbone.{k}")] - &sd[k]).unwrap();
    d.abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn resnet18_fine_tunes_from_a_torchvision_checkpoint_and_resumes_exactly() -> anyhow::Result<()> {
    let dir = tmp("bb-r18");
    let (init, sd) = r18_checkpoint(&dir)?;
    let (full, half) = (dir.join("full"), dir.join("half"));
    // Four steps, an evaluation and a checkpoint every two.
    let args = |out: &Path| set(resnet(out, 4, &init, &[]), "--eval-every", "2");
    run(&args(&full))?;
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(full.join("config.json"))?)?;
    // The defaults with --init: frozen-bn backbone, detectron2's freeze_at 2, LR x0.1.
    assert_eq!(config["backbone"], "resnet18");
    assert_eq!(config["backbone_norm"], "frozen-bn");
    assert_eq!(config["freeze_at"], 2);
    assert_eq!(config["backbone_lr_mult"], 0.1);
    assert_eq!(config["init"], init.display().to_string());
    let steps = records(&full, "step");
    assert_eq!(steps.len(), 4);
    assert!(steps
        .iter()
        .all(|s| s["loss"].as_f64().is_some_and(f64::is_finite)));
    let health: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(full.join("health.json"))?)?;
    let ctx = health.to_string();
    assert!(ctx.contains("\"pretrained\":true"), "{ctx}");
    assert!(ctx.contains("\"backbone_norm\":\"frozen-bn\""), "{ctx}");

    // The checkpoint was loaded, the frozen stem and layer1 and the FrozenBN statistics kept
    // it; a trained stage moved.
    let end = candle::safetensors::load(ckpt(&full, 4), &Device::Cpu)?;
    for k in [
        "conv1.weight",
        "bn1.weight",
        "layer1.0.conv1.weight",
        "layer1.1.bn2.bias",
        "layer3.1.bn2.running_var",
    ] {
        assert_eq!(moved(&end, &sd, k), 0.0, "{k} changed");
    }
    assert!(
        moved(&end, &sd, "layer3.0.conv1.weight") > 0.0,
        "layer3 did not train"
    );

    // Resume from step 2: the same losses and weights, bit for bit.
    run(&args(&half))?;
    std::fs::remove_file(ckpt(&half, 4))?;
    let resume = format!("det_train --quiet --device cpu --resume {}", half.display());
    let resume: Vec<String> = resume.split_whitespace().map(String::from).collect();
    run(&resume)?;
    assert_same_tensors(&ckpt(&full, 4), &ckpt(&half, 4))?;
    assert_eq!(loss_bits(&full), loss_bits(&half));
    // A backbone flag that differs from the run's config is named.
    let mut other = resume.clone();
    other.extend(["--freeze-at", "3", "--steps", "6"].map(String::from));
    let e = err_of(&other);
    assert!(e.contains("--freeze-at 3 (the run has 2)"), "{e}");
    Ok(())
}

/// One AdamW step from the same weights and batch: the head moves the same whatever the
/// multiplier, the trainable backbone by the multiplier's ratio (AdamW's first step is
/// linear in the LR), the frozen stages not at all.
#[test]
fn the_backbone_lr_multiplier_scales_the_backbone_step() -> anyhow::Result<()> {
    let dir = tmp("bb-lr");
    let (init, sd) = r18_checkpoint(&dir)?;
    let one_step = |name: &str, mult: &str| -> anyhow::Result<HashMap<String, Tensor>> {
        let out = dir.join(name);
        // --warmup-steps 2 is lowered to 0 for one step: the full LR.
        run(&resnet(&out, 1, &init, &["--backbone-lr-mult", mult]))?;
        Ok(candle::safetensors::load(ckpt(&out, 1), &Device::Cpu)?)
    };
    let (a, b) = (one_step("x1", "1")?, one_step("x025", "0.25")?);
    for k in [
        "layer2.0.conv1.weight",
        "layer4.1.conv2.weight",
        "layer3.0.downsample.0.weight",
    ] {
        let (ma, mb) = (moved(&a, &sd, k), moved(&b, &sd, k));
        assert!(ma > 0.0, "{k} did not train");
        assert!((mb / ma - 0.25).abs() < 1e-3, "{k}: {mb} / {ma}");
    }
    assert_eq!(moved(&b, &sd, "layer1.0.conv2.weight"), 0.0);
    // The head's init is seeded (the same in both runs), and so is its step.
    for head in ["head.cls_logits.weight", "fpn.fpn_inner2.weight"] {
        let d = (&a[head] - &b[head])?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(d, 0.0, "{head}'s step depends on the backbone multiplier");
    }
    Ok(())
}

#[test]
fn bad_backbone_flags_and_checkpoints_are_named_before_anything_is_written() -> anyhow::Result<()> {
    let dir = tmp("bb-bad");
    let (init, _) = r18_checkpoint(&dir)?;
    let out = dir.join("run");
    let shown = init.display().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            tiny(&out, 2, &["--freeze-at", "1"]),
            "--freeze-at applies to a ResNet backbone",
        ),
        (
            tiny(&out, 2, &["--init", &shown]),
            "det_train loads a torchvision checkpoint into a ResNet backbone",
        ),
        (
            resnet(&out, 2, &init, &["--backbone-lr-mult=-1"]),
            "--backbone-lr-mult -1: must be a finite number >= 0",
        ),
        (resnet(&out, 2, &init, &["--freeze-at", "6"]), "freeze_at"),
        (
            resnet(&out, 2, &dir.join("nope.safetensors"), &[]),
            "nope.safetensors: no such file",
        ),
        (
            resnet(&out, 2, &init, &["--backbone-norm", "bn", "--amp", "f16"]),
            "trains in f32 only",
        ),
        (
            with_backbone(tiny(&out, 2, &["--init", &shown]), "resnet34"),
            "not a torchvision resnet34 checkpoint for this backbone",
        ),
    ];
    for (args, want) in cases {
        let e = err_of(&args);
        assert!(e.contains(want), "{want}: {e}");
        assert!(!out.exists(), "{want}: the run directory was created");
    }
    // A checkpoint of another depth names the first key that does not fit.
    let e = err_of(&with_backbone(
        tiny(&out, 2, &["--init", &shown]),
        "resnet34",
    ));
    assert!(e.contains("layer1.2."), "{e}");
    Ok(())
}

fn with_backbone(mut a: Vec<String>, backbone: &str) -> Vec<String> {
    a.extend(["--backbone".to_string(), backbone.to_string()]);
    a
}

/// `compare --backbone resnet18 --init FILE --backbone-norms bn,frozen-bn,gn`: one row per
/// backbone norm (`<backbone norm>+gn`), each run's config with its backbone norm and the
/// defaults resolved; results.md names the backbone and the checkpoint; misuse is named.
#[test]
fn compare_rows_are_backbone_norms_and_results_name_the_backbone() -> anyhow::Result<()> {
    use det_train::compare::{results_md, rows, CompareArgs};
    let dir = tmp("bb-cmp");
    let (init, _) = r18_checkpoint(&dir)?;
    let shown = init.display().to_string();
    let argv = |extra: &[&str]| -> Vec<String> {
        let base = [
            "det_train compare",
            "--backbone",
            "resnet18",
            "--init",
            &shown,
        ];
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let args: CompareArgs = det_train::cli::parse(argv(&["--backbone-norms", "bn,frozen-bn,gn"]))?;
    let rows = rows(&args)?;
    let labels: Vec<&str> = rows.iter().map(|r| r.label.as_str()).collect();
    assert_eq!(labels, ["bn+gn", "frozen-bn+gn", "gn+gn"]);
    // With --init and no --backbone-norms every --norms row would be the same frozen-bn run.
    let e = det_train::compare::rows(&det_train::cli::parse(argv(&[]))?).unwrap_err();
    assert!(
        e.to_string()
            .contains("every --norms row would be the same run"),
        "{e:#}"
    );
    let cfg = args
        .run
        .config_for(rows[0].norm, rows[0].backbone_norm, 2, 1);
    let bb = &cfg.backbone;
    assert_eq!(bb.backbone_norm, Some(keel::norm::NormKind::BatchNorm));
    assert_eq!((bb.freeze_at, bb.backbone_lr_mult), (Some(2), Some(0.1)));
    let md = results_md(&args, &[], 1.0, &Device::Cpu);
    assert!(
        md.contains(&format!("a resnet18 backbone pretrained from {shown}")),
        "{md}"
    );
    // det_train's entry point: `compare` as its own argument.
    let mut both = vec!["det_train".to_string()];
    both.extend(argv(&["--backbone-norms", "bn", "--norms", "gn"]));
    both[1] = "compare".into();
    let e = run(&both).unwrap_err();
    assert!(format!("{e:#}").contains("--norms sets the twin"), "{e:#}");
    let twin = ["det_train", "compare", "--backbone-norms", "bn"].map(String::from);
    let e = run(&twin).unwrap_err();
    assert!(
        format!("{e:#}").contains("--backbone-norms needs a ResNet --backbone"),
        "{e:#}"
    );
    Ok(())
}
