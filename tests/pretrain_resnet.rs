//! pretrain_resnet writes a torchvision-layout ResNet that keel's ResNet loader takes as a
//! pretrained backbone (FrozenBN kept, or converted to GN), and refuses bad flags.
#[allow(dead_code)] // reason: the binary's `main` is not called here
#[path = "../examples/pretrain_resnet.rs"]
mod pretrain;

use candle::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use keel::models::resnet::{ResNet, ResNetConfig, ResNetDepth};

fn args(s: &str) -> Vec<String> {
    s.split_whitespace().map(String::from).collect()
}

#[test]
fn the_pretrained_file_loads_as_a_frozen_bn_or_gn_backbone() -> anyhow::Result<()> {
    let dir = keel_test_support::TempDir::new("pretrain");
    let out = dir.0.join("r18.safetensors");
    let acc = pretrain::run(args(&format!(
        "pretrain_resnet --quiet --device cpu --steps 3 --batch-size 2 --image-size 32 --train-size 8 --val-size 4 --out {}",
        out.display()
    )))?;
    assert!((0.0..=1.0).contains(&acc), "{acc}");
    let sd = candle::safetensors::load(&out, &Device::Cpu)?;
    // torchvision's resnet18 state dict without its 20 num_batches_tracked entries.
    assert_eq!(sd.len(), 102);
    assert!(sd.contains_key("layer4.1.bn2.running_var") && sd["fc.weight"].dims() == [5, 512]);
    for norm in ["frozen-bn", "gn"] {
        let cfg = ResNetConfig::backbone(ResNetDepth::R18, norm.parse()?);
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu).pp("backbone");
        ResNet::from_state_dict(&cfg, sd.clone(), &vm, vb)?;
    }
    // No temp file is left beside the output.
    assert_eq!(dir.names(), ["r18.safetensors"]);
    Ok(())
}

#[test]
fn bad_flags_are_errors_that_name_them() {
    let e = pretrain::run(args("pretrain_resnet --depth 20 --out x.safetensors")).unwrap_err();
    assert!(
        e.to_string()
            .contains("--depth 20: must be 18, 34, 50 or 101"),
        "{e}"
    );
    let e = pretrain::run(args("pretrain_resnet --steps 0 --out x.safetensors")).unwrap_err();
    assert!(e.to_string().contains("must be at least 1"), "{e}");
    let e = pretrain::run(args("pretrain_resnet --radius 0.3 --out x.safetensors")).unwrap_err();
    assert!(e.to_string().contains("--radius [0.3]: give two"), "{e}");
    let e =
        pretrain::run(args("pretrain_resnet --radius 0.3,0.2 --out x.safetensors")).unwrap_err();
    assert!(e.to_string().contains("0 < min_radius < max_radius"), "{e}");
    let e = pretrain::run(args("pretrain_resnet --max-shapes 0 --out x.safetensors")).unwrap_err();
    assert!(e.to_string().contains("shapes per image 1..=0"), "{e}");
}

#[test]
fn the_same_seed_gives_the_same_file() -> anyhow::Result<()> {
    let dir = keel_test_support::TempDir::new("pretrain-seed");
    let run = |name: &str,
               seed: u64|
     -> anyhow::Result<std::collections::HashMap<String, candle::Tensor>> {
        let out = dir.0.join(name);
        pretrain::run(args(&format!(
            "pretrain_resnet --quiet --device cpu --steps 2 --batch-size 2 --image-size 32 --train-size 4 --val-size 2 --seed {seed} --out {}",
            out.display()
        )))?;
        Ok(candle::safetensors::load(&out, &Device::Cpu)?)
    };
    let (a, b, c) = (
        run("a.safetensors", 3)?,
        run("b.safetensors", 3)?,
        run("c.safetensors", 4)?,
    );
    let same = |x: &candle::Tensor, y: &candle::Tensor| -> anyhow::Result<bool> {
        Ok(x.flatten_all()?.to_vec1::<f32>()? == y.flatten_all()?.to_vec1::<f32>()?)
    };
    for k in [
        "conv1.weight",
        "layer4.1.conv2.weight",
        "fc.weight",
        "fc.bias",
    ] {
        assert!(
            same(&a[k], &b[k])?,
            "{k} differs between two runs of seed 3"
        );
        assert!(!same(&a[k], &c[k])?, "{k} is the same for seeds 3 and 4");
    }
    Ok(())
}
