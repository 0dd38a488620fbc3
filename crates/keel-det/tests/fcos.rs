//! FCOS targets, losses and gradients vs a PyTorch copy of the reference `loss.py`
//! (tianzhi0549/FCOS), plus unit tests of locations, hand-computed targets, empty images,
//! border boxes, the head's state-dict names, the FPN and inference.
//!
//! Fixtures: `tests/fixtures/gen_fcos.py`, whose core is
//! ```python
//! labels, reg_targets = prepare_targets(points, gts, sois, strides, radius, norm_reg)
//! cls_loss, reg_loss, ctr_loss, ... = fcos_loss(cls, [r / s for r, s in ...], ctr, labels, reg_targets)
//! (cls_loss + 0.7 * reg_loss + 1.3 * ctr_loss).backward()   # float64 leaves
//! ```
//! Tolerance: `|got - want| <= max(rtol * |want|, atol)`; keel computes in f32.

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use keel_det::fcos::*;
use keel_test_support::{assert_close, Tol};

const LOSS_TOL: Tol = Tol::new(1e-5, 1e-6);
const GRAD_TOL: Tol = Tol::new(1e-4, 1e-7);
const TARGET_TOL: Tol = Tol::new(1e-6, 1e-5);

struct Fx(HashMap<String, Tensor>);

impl Fx {
    fn load() -> Result<Fx> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/fcos.safetensors"
        );
        Ok(Fx(candle::safetensors::load(path, &Device::Cpu)?))
    }
    fn get(&self, key: &str) -> Result<Tensor> {
        self.0
            .get(key)
            .cloned()
            .with_context(|| format!("fixture {key} missing; rerun gen_fcos.py"))
    }
    fn i64s(&self, key: &str) -> Result<Vec<i64>> {
        Ok(self.get(key)?.flatten_all()?.to_vec1::<i64>()?)
    }
    fn f32s(&self, key: &str) -> Result<Vec<f32>> {
        Ok(self.get(key)?.flatten_all()?.to_vec1::<f32>()?)
    }
}

fn gts(fx: &Fx) -> Result<Vec<GtBoxes>> {
    (0..2)
        .map(|i| {
            let boxes = fx.get(&format!("gt{i}.boxes"))?.to_vec2::<f32>()?;
            Ok(GtBoxes {
                boxes: boxes
                    .into_iter()
                    .map(|b| [b[0], b[1], b[2], b[3]])
                    .collect(),
                classes: fx
                    .i64s(&format!("gt{i}.classes"))?
                    .into_iter()
                    .map(|c| c as u32)
                    .collect(),
            })
        })
        .collect()
}

fn case_config(fx: &Fx, case: &str) -> Result<(FcosTargetConfig, Vec<(usize, usize)>)> {
    let strides: Vec<usize> = fx
        .i64s("strides")?
        .into_iter()
        .map(|s| s as usize)
        .collect();
    let sois = fx
        .get(&format!("{case}.sizes_of_interest"))?
        .to_vec2::<f32>()?;
    let cfg = FcosTargetConfig {
        sizes_of_interest: sois.into_iter().map(|r| (r[0], r[1])).collect(),
        center_sampling_radius: fx.f32s(&format!("{case}.radius"))?[0],
        norm_reg_targets: fx.f32s(&format!("{case}.norm_reg"))?[0] > 0.5,
        ..FcosTargetConfig::new(&strides)
    };
    let hw = fx.i64s("image_size")?;
    let sizes = strides
        .iter()
        .map(|&s| ((hw[0] as usize).div_ceil(s), (hw[1] as usize).div_ceil(s)))
        .collect();
    Ok((cfg, sizes))
}

#[test]
fn targets_losses_and_gradients_match_the_reference() -> Result<()> {
    let fx = Fx::load()?;
    let gts = gts(&fx)?;
    for case in ["a", "b", "c"] {
        let (cfg, sizes) = case_config(&fx, case)?;
        let t = prepare_targets(&sizes, &gts, &cfg, &Device::Cpu)?;
        let labels: Vec<i64> = t
            .labels
            .to_vec1::<u32>()?
            .into_iter()
            .map(i64::from)
            .collect();
        assert_eq!(
            labels,
            fx.i64s(&format!("{case}.labels"))?,
            "case {case}: labels"
        );
        // Image 1's 20x1 and 5x5 boxes both hold (12, 4) of P3 (index H0 * W0 + 1): the
        // reference's BoxList.area() (+1 per side, 42 vs 36) gives it to the square, class 0.
        let (h0, w0) = sizes[0];
        assert_eq!(
            labels[h0 * w0 + 1],
            1,
            "case {case}: area tie-break at (12, 4)"
        );
        let pos: Vec<i64> = t.pos_inds.iter().map(|&i| i64::from(i)).collect();
        assert_eq!(
            pos,
            fx.i64s(&format!("{case}.pos_inds"))?,
            "case {case}: positives"
        );
        assert_close(
            &format!("{case}.reg_targets"),
            &t.reg_targets,
            &fx.get(&format!("{case}.reg_targets"))?,
            TARGET_TOL,
        );
        let pos_t = Tensor::new(t.pos_inds.as_slice(), &Device::Cpu)?;
        let ctr = t.centerness.index_select(&pos_t, 0)?;
        assert_close(
            &format!("{case}.centerness_targets"),
            &ctr,
            &fx.get(&format!("{case}.centerness_targets"))?,
            TARGET_TOL,
        );

        let var = |k: String| -> Result<Var> { Ok(Var::from_tensor(&fx.get(&k)?)?) };
        let (mut cls, mut reg, mut ctrv) = (vec![], vec![], vec![]);
        for l in 0..sizes.len() {
            cls.push(var(format!("cls{l}"))?);
            reg.push(var(format!("reg{l}"))?);
            ctrv.push(var(format!("ctr{l}"))?);
        }
        let scale = |l: usize| {
            if cfg.norm_reg_targets {
                cfg.strides[l] as f64
            } else {
                1.0
            }
        };
        let out = FcosOutputs {
            cls_logits: cls.iter().map(|v| v.as_tensor().clone()).collect(),
            bbox_reg: reg
                .iter()
                .enumerate()
                .map(|(l, v)| v.as_tensor() / scale(l))
                .collect::<candle::Result<_>>()?,
            centerness: ctrv.iter().map(|v| v.as_tensor().clone()).collect(),
        };
        let losses = fcos_loss(&out, &t, &FcosLossConfig::default())?;
        for (name, got) in [
            ("cls_loss", &losses.cls),
            ("reg_loss", &losses.reg),
            ("ctr_loss", &losses.centerness),
        ] {
            assert_close(
                &format!("{case}.{name}"),
                got,
                &fx.get(&format!("{case}.{name}"))?,
                LOSS_TOL,
            );
        }
        let total = ((&losses.cls + (&losses.reg * 0.7)?)? + (&losses.centerness * 1.3)?)?;
        let grads = total.backward()?;
        for (prefix, vars) in [("cls", &cls), ("reg", &reg), ("ctr", &ctrv)] {
            for (l, v) in vars.iter().enumerate() {
                let key = format!("{case}.{prefix}{l}.grad");
                let g = grads
                    .get(v)
                    .with_context(|| format!("no gradient for {key}"))?;
                assert_close(&key, g, &fx.get(&key)?, GRAD_TOL);
            }
        }
    }
    Ok(())
}

#[test]
fn locations_are_stride_centers_row_major() -> Result<()> {
    let locs = compute_locations(&[(2, 3), (1, 1)], &[8, 16], &Device::Cpu)?;
    assert_eq!(
        locs[0].to_vec2::<f32>()?,
        [
            [4., 4.],
            [12., 4.],
            [20., 4.],
            [4., 12.],
            [12., 12.],
            [20., 12.]
        ]
    );
    assert_eq!(locs[1].to_vec2::<f32>()?, [[8., 8.]]);
    // An odd stride: the reference's integer stride // 2.
    assert_eq!(
        compute_locations(&[(1, 2)], &[3], &Device::Cpu)?[0].to_vec2::<f32>()?,
        [[1., 1.], [4., 1.]]
    );
    assert!(compute_locations(&[(1, 1)], &[8, 16], &Device::Cpu).is_err());
    Ok(())
}

#[test]
fn single_box_targets_by_hand() -> Result<()> {
    // One 4x4 level of stride 8 (locations 4, 12, 20, 28), one box [6, 2, 26, 30], class 1.
    // Center (16, 16), radius 1.5 * 8 = 12: region [6, 4, 26, 28] (clipped to the box).
    // Inside strictly: x in {12, 20}, y in {12, 20} (y = 4 is on the region's edge: t = 0).
    let gt = GtBoxes {
        boxes: vec![[6., 2., 26., 30.]],
        classes: vec![1],
    };
    let cfg = FcosTargetConfig::new(&[8]);
    let t = prepare_targets(&[(4, 4)], &[gt], &cfg, &Device::Cpu)?;
    let labels = t.labels.to_vec1::<u32>()?;
    let want_pos = [5u32, 6, 9, 10];
    for (i, &l) in labels.iter().enumerate() {
        assert_eq!(
            l,
            if want_pos.contains(&(i as u32)) { 2 } else { 0 },
            "location {i}"
        );
    }
    assert_eq!(t.pos_inds, want_pos);
    let reg = t.reg_targets.to_vec2::<f32>()?;
    // Location 5 = (12, 12): l = 6, t = 10, r = 14, b = 18.
    assert_eq!(reg[5], [6., 10., 14., 18.]);
    let ctr = t.centerness.to_vec1::<f32>()?;
    let want = ((6f32 / 14.) * (10. / 18.)).sqrt();
    assert!((ctr[5] - want).abs() < 1e-6, "{} vs {want}", ctr[5]);
    assert_eq!(ctr[0], 0.0);
    // Without center sampling every location strictly inside the box is positive.
    let cfg0 = FcosTargetConfig {
        center_sampling_radius: 0.0,
        ..cfg.clone()
    };
    let gt = GtBoxes {
        boxes: vec![[6., 2., 26., 30.]],
        classes: vec![1],
    };
    let t0 = prepare_targets(&[(4, 4)], &[gt], &cfg0, &Device::Cpu)?;
    assert_eq!(t0.pos_inds, [1, 2, 5, 6, 9, 10, 13, 14]);
    // norm_reg_targets divides by the stride.
    let cfgn = FcosTargetConfig {
        norm_reg_targets: true,
        ..cfg
    };
    let gt = GtBoxes {
        boxes: vec![[6., 2., 26., 30.]],
        classes: vec![1],
    };
    let tn = prepare_targets(&[(4, 4)], &[gt], &cfgn, &Device::Cpu)?;
    assert_eq!(
        tn.reg_targets.to_vec2::<f32>()?[5],
        [0.75, 1.25, 1.75, 2.25]
    );
    Ok(())
}

#[test]
fn ambiguous_locations_go_to_the_smaller_box() -> Result<()> {
    let big = [0f32, 0., 32., 32.];
    let small = [8f32, 8., 24., 24.];
    for boxes in [vec![big, small], vec![small, big]] {
        let classes = if boxes[0] == big {
            vec![0, 1]
        } else {
            vec![1, 0]
        };
        let gt = GtBoxes { boxes, classes };
        let cfg = FcosTargetConfig {
            center_sampling_radius: 0.0,
            ..FcosTargetConfig::new(&[8])
        };
        let t = prepare_targets(&[(4, 4)], &[gt], &cfg, &Device::Cpu)?;
        let labels = t.labels.to_vec1::<u32>()?;
        // (12, 12) is in both: the small box (class 1) wins; (4, 4) only in the big one.
        assert_eq!(labels[5], 2);
        assert_eq!(labels[0], 1);
    }
    Ok(())
}

fn tiny_outputs(
    n: usize,
    classes: usize,
    sizes: &[(usize, usize)],
) -> Result<(Vec<Var>, FcosOutputs)> {
    let dev = Device::Cpu;
    let mut vars = vec![];
    let mut out = FcosOutputs {
        cls_logits: vec![],
        bbox_reg: vec![],
        centerness: vec![],
    };
    for &(h, w) in sizes {
        let c = Var::from_tensor(&Tensor::randn(0f32, 1., (n, classes, h, w), &dev)?)?;
        let r = Var::from_tensor(&(Tensor::randn(0f32, 0.3, (n, 4, h, w), &dev)?.exp()? * 8.0)?)?;
        let z = Var::from_tensor(&Tensor::randn(0f32, 1., (n, 1, h, w), &dev)?)?;
        out.cls_logits.push(c.as_tensor().clone());
        out.bbox_reg.push(r.as_tensor().clone());
        out.centerness.push(z.as_tensor().clone());
        vars.extend([c, r, z]);
    }
    Ok((vars, out))
}

#[test]
fn images_without_positives_give_zero_box_losses_and_finite_gradients() -> Result<()> {
    let sizes = [(4, 4), (2, 2)];
    let cfg = FcosTargetConfig::with_base(&[8, 16], 16.0);
    let (vars, out) = tiny_outputs(2, 3, &sizes)?;
    let empty = [GtBoxes::default(), GtBoxes::default()];
    let t = prepare_targets(&sizes, &empty, &cfg, &Device::Cpu)?;
    assert!(t.pos_inds.is_empty());
    assert_eq!(t.labels.to_vec1::<u32>()?, vec![0; 2 * 16 + 2 * 4]);
    assert_eq!(t.reg_targets.sum_all()?.to_scalar::<f32>()?, 0.0);
    let losses = fcos_loss(&out, &t, &FcosLossConfig::default())?;
    assert_eq!(losses.reg.to_scalar::<f32>()?, 0.0);
    assert_eq!(losses.centerness.to_scalar::<f32>()?, 0.0);
    // The focal loss over all negatives, normalized by max(0, 1) = 1.
    let cls = losses.cls.to_scalar::<f32>()?;
    assert!(cls.is_finite() && cls > 0.0);
    let grads = losses.total()?.backward()?;
    for (i, v) in vars.iter().enumerate() {
        let g = grads.get(v).context("gradient missing")?;
        let max = g.abs()?.max_all()?.to_scalar::<f32>()?;
        // vars are (cls, reg, ctr) per level: the box and centerness outputs get zeros.
        if i % 3 == 0 {
            assert!(max.is_finite() && max > 0.0);
        } else {
            assert_eq!(max, 0.0);
        }
    }
    // One empty image beside one with a box: only the second has positives.
    let mixed = [
        GtBoxes::default(),
        GtBoxes {
            boxes: vec![[0., 0., 12., 12.]],
            classes: vec![2],
        },
    ];
    let t = prepare_targets(&sizes, &mixed, &cfg, &Device::Cpu)?;
    assert!(!t.pos_inds.is_empty() && t.pos_inds.iter().all(|&i| (16..32).contains(&i)));
    Ok(())
}

#[test]
fn boxes_touching_the_borders_get_positives_and_finite_targets() -> Result<()> {
    // A 32x32 image, one level of stride 8; boxes on the top-left and bottom-right corners.
    let gt = GtBoxes {
        boxes: vec![[0., 0., 10., 10.], [20., 22., 32., 32.]],
        classes: vec![0, 1],
    };
    let cfg = FcosTargetConfig::new(&[8]);
    let t = prepare_targets(&[(4, 4)], &[gt], &cfg, &Device::Cpu)?;
    let labels = t.labels.to_vec1::<u32>()?;
    assert_eq!(labels[0], 1, "(4, 4) is inside the corner box");
    assert_eq!(labels[15], 2, "(28, 28) is inside the bottom-right box");
    assert_eq!(t.pos_inds, [0, 15]);
    let reg = t.reg_targets.to_vec2::<f32>()?;
    assert_eq!(reg[0], [4., 4., 6., 6.]);
    assert_eq!(reg[15], [8., 6., 4., 4.]);
    let ctr = t.centerness.to_vec1::<f32>()?;
    assert!(ctr.iter().all(|c| c.is_finite() && (0.0..=1.0).contains(c)));
    let (_, out) = tiny_outputs(1, 2, &[(4, 4)])?;
    let l = fcos_loss(&out, &t, &FcosLossConfig::default())?
        .total()?
        .to_scalar::<f32>()?;
    assert!(l.is_finite());
    Ok(())
}

#[test]
fn bad_inputs_are_reported() -> Result<()> {
    let dev = Device::Cpu;
    let cfg = FcosTargetConfig::new(&[8]);
    let inverted = GtBoxes {
        boxes: vec![[10., 0., 2., 4.]],
        classes: vec![0],
    };
    let e = prepare_targets(&[(2, 2)], &[inverted], &cfg, &dev)
        .unwrap_err()
        .to_string();
    assert!(e.contains("image 0 box 0"), "{e}");
    let unlabeled = GtBoxes {
        boxes: vec![[0., 0., 2., 4.]],
        classes: vec![],
    };
    assert!(prepare_targets(&[(2, 2)], &[unlabeled], &cfg, &dev).is_err());
    assert!(prepare_targets(&[(2, 2), (1, 1)], &[], &cfg, &dev).is_err());
    let overflow = GtBoxes {
        boxes: vec![[0., 0., 2., 4.]],
        classes: vec![u32::MAX],
    };
    assert!(prepare_targets(&[(2, 2)], &[overflow], &cfg, &dev).is_err());
    let (_, out) = tiny_outputs(1, 2, &[(2, 2)])?;
    // Inference: bad image sizes and per-level shapes are errors, not panics.
    let icfg = FcosInferenceConfig::default();
    let e = fcos_detections(&out, &[8], &[(f32::NAN, 16.0)], &icfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("image 0's size"), "{e}");
    let mut cut = out.clone();
    cut.centerness[0] = cut.centerness[0].narrow(3, 0, 1)?;
    let e = fcos_detections(&cut, &[8], &[(16.0, 16.0)], &icfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("level 0"), "{e}");
    let gt = GtBoxes {
        boxes: vec![[0., 0., 16., 16.]],
        classes: vec![5],
    };
    let t = prepare_targets(&[(2, 2)], &[gt], &cfg, &dev)?;
    let e = fcos_loss(&out, &t, &FcosLossConfig::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("beyond 2 classes"), "{e}");
    let t = prepare_targets(&[(3, 2)], &[GtBoxes::default()], &cfg, &dev)?;
    assert!(fcos_loss(&out, &t, &FcosLossConfig::default()).is_err());
    Ok(())
}

#[test]
fn head_uses_the_reference_state_dict_names_and_init() -> Result<()> {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let cfg = FcosHeadConfig {
        num_convs: 2,
        num_levels: 3,
        ..FcosHeadConfig::new(3, 32)
    };
    let head = fcos_head(cfg, vb)?;
    let data = vm.data().lock().unwrap();
    let mut names: Vec<&str> = data.keys().map(String::as_str).collect();
    names.sort();
    let mut want = vec![
        "bbox_pred.bias",
        "bbox_pred.weight",
        "centerness.bias",
        "centerness.weight",
        "cls_logits.bias",
        "cls_logits.weight",
        "scales.0.scale",
        "scales.1.scale",
        "scales.2.scale",
    ];
    for tower in ["bbox_tower", "cls_tower"] {
        for i in [0, 1, 3, 4] {
            for p in ["weight", "bias"] {
                want.push(Box::leak(format!("{tower}.{i}.{p}").into_boxed_str()));
            }
        }
    }
    want.sort();
    assert_eq!(names, want);
    let prior = -((1.0f32 - 0.01) / 0.01).ln();
    for b in data["cls_logits.bias"].as_tensor().to_vec1::<f32>()? {
        assert!((b - prior).abs() < 1e-6);
    }
    assert_eq!(head.scales()[1].scale().to_vec1::<f32>()?, [1.0]);
    Ok(())
}

#[test]
fn head_forward_with_silu_and_backward_reach_every_parameter() -> Result<()> {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let cfg = FcosHeadConfig {
        num_convs: 1,
        num_levels: 2,
        act: keel_norm::Activation::Silu,
        ..FcosHeadConfig::new(2, 16)
    };
    let head = fcos_head(cfg, vb)?;
    let feats = [
        Tensor::randn(0f32, 1., (1, 16, 4, 4), &Device::Cpu)?,
        Tensor::randn(0f32, 1., (1, 16, 2, 2), &Device::Cpu)?,
    ];
    let out = head.forward_t(&feats, true)?;
    assert!(
        out.bbox_reg[0].min_all()?.to_scalar::<f32>()? > 0.0,
        "exp keeps distances positive"
    );
    let gt = GtBoxes {
        boxes: vec![[2., 2., 20., 26.]],
        classes: vec![1],
    };
    let t = prepare_targets(
        &out.feature_sizes()?,
        &[gt],
        &FcosTargetConfig::with_base(&[8, 16], 16.0),
        &Device::Cpu,
    )?;
    let grads = fcos_loss(&out, &t, &FcosLossConfig::default())?
        .total()?
        .backward()?;
    for (name, var) in vm.data().lock().unwrap().iter() {
        assert!(grads.get(var).is_some(), "no gradient for {name}");
    }
    assert!(head.forward_t(&feats[..1], true).is_err());
    Ok(())
}

#[test]
fn fpn_names_and_odd_sizes() -> Result<()> {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let cfg = FpnConfig {
        in_channels: [4, 8, 16],
        out_channels: 8,
        norm: Some("gn:4".parse()?),
        extra_levels: 2,
    };
    let f = fpn(&cfg, vb)?;
    {
        let data = vm.data().lock().unwrap();
        for k in [
            "fpn_inner2.0.weight",
            "fpn_inner2.1.weight",
            "fpn_layer4.1.bias",
            "top_blocks.p6.weight",
            "top_blocks.p7.bias",
        ] {
            assert!(data.contains_key(k), "missing {k}");
        }
    }
    let c = |ch, h, w| Tensor::randn(0f32, 1., (1, ch, h, w), &Device::Cpu);
    let p = f.forward_t(&[c(4, 7, 5)?, c(8, 4, 3)?, c(16, 2, 2)?], true)?;
    let dims: Vec<(usize, usize)> = p
        .iter()
        .map(|t| (t.dim(2).unwrap(), t.dim(3).unwrap()))
        .collect();
    assert_eq!(dims, [(7, 5), (4, 3), (2, 2), (1, 1), (1, 1)]);
    let grads = p
        .iter()
        .try_fold(Tensor::new(0f32, &Device::Cpu)?, |acc, t| {
            acc + t.sum_all()?
        })?
        .backward()?;
    assert!(grads
        .get(&vm.data().lock().unwrap()["fpn_inner2.0.weight"])
        .is_some());
    assert!(f
        .forward_t(&[c(4, 9, 9)?, c(8, 4, 4)?, c(16, 2, 2)?], true)
        .is_err());
    Ok(())
}

/// The top-down path's merged maps feed both their level's output conv and the upsampling
/// to the level below; the gradient must reach the laterals from both. Without a norm the
/// FPN is affine in `fpn_inner4.bias`, so a finite difference along the all-ones direction
/// equals the sum of the autograd gradient up to rounding. (candle 0.11's
/// `upsample_nearest2d` backward overwrites its input's gradient instead of adding to it:
/// with it taken straight from the merged map, fpn_inner3/4 lost the output convs' share,
/// about half the gradient.)
#[test]
fn fpn_gradients_reach_the_laterals_from_both_uses() -> Result<()> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let cfg = FpnConfig {
        in_channels: [4, 6, 8],
        out_channels: 4,
        norm: None,
        extra_levels: 0,
    };
    let f = fpn(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    let c = [
        Tensor::randn(0f32, 1., (2, 4, 8, 8), &dev)?,
        Tensor::randn(0f32, 1., (2, 6, 4, 4), &dev)?,
        Tensor::randn(0f32, 1., (2, 8, 2, 2), &dev)?,
    ];
    let w: Vec<Tensor> = [8, 4, 2]
        .iter()
        .map(|&s| Tensor::randn(0f32, 1., (2, 4, s, s), &dev))
        .collect::<candle::Result<_>>()?;
    let loss = || -> Result<Tensor> {
        let p = f.forward_t(&c, true)?;
        let terms = p.iter().zip(&w).map(|(p, w)| (p * w)?.sum_all());
        Ok(terms
            .collect::<candle::Result<Vec<_>>>()?
            .iter()
            .try_fold(Tensor::new(0f32, &dev)?, |acc, t| acc + t)?)
    };
    for name in ["fpn_inner4.bias", "fpn_inner3.bias", "fpn_inner2.bias"] {
        let var = vm.data().lock().unwrap()[name].clone();
        let l0 = loss()?;
        let grad = l0.backward()?.get(&var).context("no gradient")?.sum_all()?;
        let b = var.as_tensor().copy()?;
        var.set(&(&b + 1.0)?)?;
        let fd = (loss()? - &l0)?;
        var.set(&b)?;
        let (g, fd) = (grad.to_scalar::<f32>()?, fd.to_scalar::<f32>()?);
        assert!(
            (g - fd).abs() <= 1e-3 * fd.abs().max(1.0),
            "{name}: autograd {g}, finite difference {fd}"
        );
    }
    Ok(())
}

/// Head outputs whose one confident location predicts a known box.
fn planted_outputs() -> Result<FcosOutputs> {
    let dev = Device::Cpu;
    let mut cls = vec![-10f32; 2 * 4 * 4];
    cls[16 + 5] = 3.0; // class 1 at location 5 = (12, 12)
    cls[6] = 2.0; // class 0 at location 6 = (20, 12)
    cls[16 + 6] = 2.5; // class 1 at (20, 12): overlaps the first, same class
    let mut reg = vec![1f32; 4 * 16];
    for (k, v) in [(0, 10.), (1, 10.), (2, 30.), (3, 4.)] {
        reg[k * 16 + 5] = v; // (2, 2, 42 -> clipped 32, 16)
    }
    for k in 0..4 {
        reg[k * 16 + 6] = 9.0; // (11, 3, 29, 21)
    }
    Ok(FcosOutputs {
        cls_logits: vec![Tensor::from_vec(cls, (1, 2, 4, 4), &dev)?],
        bbox_reg: vec![Tensor::from_vec(reg, (1, 4, 4, 4), &dev)?],
        centerness: vec![Tensor::zeros((1, 1, 4, 4), DType::F32, &dev)?],
    })
}

#[test]
fn inference_decodes_clips_thresholds_and_suppresses_per_class() -> Result<()> {
    let out = planted_outputs()?;
    let cfg = FcosInferenceConfig {
        nms_threshold: 0.3,
        ..Default::default()
    };
    let det = fcos_detections(&out, &[8], &[(32.0, 32.0)], &cfg)?;
    let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
    // (12, 12) class 1 and (20, 12) class 0 survive; (20, 12) class 1 overlaps the first
    // (IoU 0.34 > 0.3) in the same class and is suppressed.
    assert_eq!(det[0].classes, [1, 0]);
    assert_eq!(det[0].boxes, [[2., 2., 32., 16.], [11., 3., 29., 21.]]);
    let want = (sig(3.0) * 0.5).sqrt();
    assert!((det[0].scores[0] - want).abs() < 1e-6);
    let det1 = fcos_detections(
        &out,
        &[8],
        &[(32.0, 32.0)],
        &FcosInferenceConfig {
            max_detections: 1,
            ..cfg
        },
    )?;
    assert_eq!(det1[0].classes, [1]);
    let none = fcos_detections(
        &out,
        &[8],
        &[(32.0, 32.0)],
        &FcosInferenceConfig {
            score_threshold: 0.99,
            ..cfg
        },
    )?;
    assert!(none[0].boxes.is_empty());
    assert!(fcos_detections(&out, &[8, 16], &[(32.0, 32.0)], &cfg).is_err());
    assert!(fcos_detections(&out, &[8], &[], &cfg).is_err());
    Ok(())
}

#[test]
fn sizes_of_interest_follow_the_paper() {
    assert_eq!(
        sizes_of_interest(5, 64.0),
        [
            (-1., 64.),
            (64., 128.),
            (128., 256.),
            (256., 512.),
            (512., INF)
        ]
    );
    assert_eq!(
        sizes_of_interest(3, 16.0),
        [(-1., 16.), (16., 32.), (32., INF)]
    );
}

#[test]
fn head_and_loss_fit_one_image_and_inference_finds_its_box() -> Result<()> {
    use candle_nn::Optimizer;
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let cfg = FcosHeadConfig {
        num_convs: 1,
        num_levels: 2,
        ..FcosHeadConfig::new(2, 16)
    };
    let head = fcos_head(cfg, vb)?;
    // candle's CPU rng cannot be seeded: replace the random conv weights and features by
    // fixed pseudo-random values so the run is deterministic.
    let wave = |shape: &[usize], freq: f64, amp: f64| -> Result<Tensor> {
        let n: usize = shape.iter().product();
        Ok(
            ((Tensor::arange(0u32, n as u32, &dev)?.to_dtype(DType::F32)? * freq)?.sin()? * amp)?
                .reshape(shape)?,
        )
    };
    for (name, var) in vm.data().lock().unwrap().iter() {
        if name.ends_with(".0.weight")
            || name.ends_with("bbox_pred.weight")
            || name.ends_with("logits.weight")
            || name.ends_with("centerness.weight")
        {
            var.set(&wave(var.dims(), 1.37, 0.01)?)?;
        }
    }
    let feats = [
        wave(&[1, 16, 4, 4], 0.71, 1.0)?,
        wave(&[1, 16, 2, 2], 0.53, 1.0)?,
    ];
    let gt = GtBoxes {
        boxes: vec![[4., 6., 22., 26.]],
        classes: vec![1],
    };
    let tcfg = FcosTargetConfig::with_base(&[8, 16], 16.0);
    let t = prepare_targets(&[(4, 4), (2, 2)], &[gt], &tcfg, &dev)?;
    let mut opt = candle_nn::AdamW::new_lr(vm.all_vars(), 0.05)?;
    let mut first = None;
    let mut last = 0.0;
    for _ in 0..60 {
        let loss = fcos_loss(
            &head.forward_t(&feats, true)?,
            &t,
            &FcosLossConfig::default(),
        )?
        .total()?;
        last = loss.to_scalar::<f32>()?;
        first.get_or_insert(last);
        opt.backward_step(&loss)?;
    }
    let first = first.unwrap_or_default();
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    let det = fcos_detections(
        &head.forward_t(&feats, false)?,
        &[8, 16],
        &[(32., 32.)],
        &FcosInferenceConfig::default(),
    )?;
    assert_eq!(det[0].classes.first(), Some(&1));
    let b = det[0].boxes[0];
    let iou = {
        let (ix, iy) = (
            (b[2].min(22.) - b[0].max(4.)).max(0.),
            (b[3].min(26.) - b[1].max(6.)).max(0.),
        );
        let inter = ix * iy;
        inter / ((b[2] - b[0]) * (b[3] - b[1]) + 18. * 20. - inter)
    };
    assert!(iou > 0.5, "top box {b:?} IoU {iou}");
    Ok(())
}

/// Perturbs every `{tower}.*` variable so its output changes.
fn perturb_tower(vm: &VarMap, tower: &str) -> Result<()> {
    for (name, var) in vm.data().lock().unwrap().iter() {
        if name.starts_with(tower) && name.ends_with("weight") && name.contains(".0.") {
            var.set(&(var.as_tensor() * 3.0)?.affine(1.0, 0.05)?)?;
        }
    }
    Ok(())
}

#[test]
fn centerness_follows_the_cls_tower_by_default_and_the_reg_tower_on_request() -> Result<()> {
    // The reference's CENTERNESS_ON_REG = False (defaults.py): centerness from cls_tower.
    assert!(!FcosHeadConfig::new(2, 16).centerness_on_reg);
    let feats = [Tensor::randn(0f32, 1., (1, 16, 4, 4), &Device::Cpu)?];
    for on_reg in [false, true] {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let cfg = FcosHeadConfig {
            num_convs: 1,
            num_levels: 1,
            centerness_on_reg: on_reg,
            ..FcosHeadConfig::new(2, 16)
        };
        let head = fcos_head(cfg, vb)?;
        let before = head.forward_t(&feats, false)?;
        perturb_tower(&vm, "bbox_tower")?;
        let after_reg = head.forward_t(&feats, false)?;
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?)
        };
        assert!(diff(&before.bbox_reg[0], &after_reg.bbox_reg[0])? > 0.0);
        let ctr_moved = diff(&before.centerness[0], &after_reg.centerness[0])? > 0.0;
        assert_eq!(ctr_moved, on_reg, "centerness_on_reg = {on_reg}");
        perturb_tower(&vm, "cls_tower")?;
        let after_cls = head.forward_t(&feats, false)?;
        let ctr_moved = diff(&after_reg.centerness[0], &after_cls.centerness[0])? > 0.0;
        assert_eq!(ctr_moved, !on_reg, "centerness_on_reg = {on_reg}");
        assert!(diff(&after_reg.cls_logits[0], &after_cls.cls_logits[0])? > 0.0);
    }
    Ok(())
}

#[test]
fn fpn_init_is_kaiming_uniform_a1_with_zero_bias() -> Result<()> {
    // make_layers.py conv_with_kaiming_uniform / fpn.py LastLevelP6P7:
    // kaiming_uniform_(w, a=1) = U(-b, b), b = sqrt(3 / fan_in); bias 0.
    for norm in [None, Some("gn:4".parse()?)] {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let cfg = FpnConfig {
            in_channels: [4, 8, 16],
            out_channels: 8,
            norm,
            extra_levels: 2,
        };
        fpn(&cfg, vb)?;
        let data = vm.data().lock().unwrap();
        let mut convs = 0;
        for (name, var) in data.iter() {
            let t = var.as_tensor();
            if t.rank() == 4 {
                convs += 1;
                let (cin, k) = (t.dim(1)?, t.dim(2)?);
                let b = (3.0 / (cin * k * k) as f64).sqrt() as f32;
                let max = t.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(max <= b, "{name}: max |w| {max} > {b}");
                // 32+ draws from U(-b, b) reach well past b / 2.
                assert!(
                    max > 0.5 * b,
                    "{name}: max |w| {max} too small for U(-{b}, {b})"
                );
                let std = t
                    .flatten_all()?
                    .sqr()?
                    .mean_all()?
                    .sqrt()?
                    .to_scalar::<f32>()?;
                // U(-b, b) has std b / sqrt(3) = 0.577 b; candle_nn::conv2d's default
                // (kaiming normal, std sqrt(2 / fan_in)) would give 0.816 b.
                assert!(
                    (std - b / 3f32.sqrt()).abs() < 0.12 * b,
                    "{name}: std {std}, want about {}",
                    b / 3f32.sqrt()
                );
            } else if name.ends_with("bias") && !name.contains(".1.") {
                // conv biases (norm biases are `.1.bias`, also zero-initialized)
                assert_eq!(t.abs()?.max_all()?.to_scalar::<f32>()?, 0.0, "{name}");
            }
        }
        assert_eq!(convs, 8, "6 lateral/output convs + P6 + P7");
        if norm.is_none() {
            assert!(data.contains_key("top_blocks.p6.bias"));
            assert!(data.contains_key("fpn_inner3.bias"));
        }
    }
    Ok(())
}
