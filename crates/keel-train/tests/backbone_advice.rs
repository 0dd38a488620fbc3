//! The health report's norm advice for a backbone + head model (a pretrained ResNet under a
//! new decoder): keel's decision table for fine-tuning (keel_norm::recommend_plan) part by
//! part: pretrained + batch < 16 -> frozen-bn backbone + gn head.

use keel_norm::NormKind;
use keel_optim::Precision;
use keel_train::{Advice, MonitorConfig, RunContext, StabilityMonitor, Verdict};

fn ctx(head: &str, backbone: &str, batch_size: usize, pretrained: bool) -> RunContext {
    RunContext {
        norm: head.parse().expect("a keel NormKind"),
        batch_size,
        pretrained,
        lr: 0.02,
        clip_grad: Some(2.0),
        precision: Precision::F32,
        steps: 100,
        backbone_norm: Some(backbone.parse().expect("a keel NormKind")),
    }
}

fn report(c: &RunContext) -> keel_train::HealthReport {
    StabilityMonitor::new(MonitorConfig::default()).report(c)
}

const GN: NormKind = NormKind::GroupNorm { groups: None };

#[test]
fn a_trainable_bn_backbone_at_small_batch_is_advised_frozen_bn_with_a_gn_head() {
    let r = report(&ctx("gn", "bn", 2, true));
    assert_eq!(r.verdict, Verdict::Warning, "{}", r.to_text());
    assert_eq!(
        r.advice,
        [Advice::SwitchBackboneNorm {
            from: NormKind::BatchNorm,
            to: NormKind::FrozenBatchNorm,
            head: GN,
            batch_size: 2,
            pretrained: true,
        }]
    );
    let text = r.advice[0].to_string();
    assert!(
        text.starts_with("the pretrained backbone's BatchNorm at batch 2: freeze it (frozen-bn"),
        "{text}"
    );
    assert!(text.contains("with a GroupNorm (gn) head"), "{text}");
    assert!(r
        .to_text()
        .contains("run: norm gn (head), backbone bn pretrained, batch 2"));
    assert!(r
        .findings
        .iter()
        .any(|f| f.starts_with("BatchNorm below 16 images")));
}

#[test]
fn the_recommended_fine_tuning_norms_get_no_norm_advice() {
    for b in [1, 2, 8, 15] {
        let r = report(&ctx("gn", "frozen-bn", b, true));
        assert_eq!(r.verdict, Verdict::Healthy, "batch {b}: {}", r.to_text());
        assert!(r.advice.is_empty(), "batch {b}: {:?}", r.advice);
    }
    // A GroupNorm backbone (converted) is an accepted alternative while the run is healthy.
    assert!(report(&ctx("gn", "gn", 2, true)).advice.is_empty());
}

#[test]
fn a_bn_head_is_judged_as_trained_from_scratch() {
    let r = report(&ctx("bn", "frozen-bn", 4, true));
    assert_eq!(r.advice.len(), 1, "{:?}", r.advice);
    assert!(matches!(
        r.advice[0],
        Advice::SwitchNorm {
            from: NormKind::BatchNorm,
            to: GN,
            batch_size: 4,
            pretrained: false,
            ..
        }
    ));
    // Both parts wrong: the backbone's advice first, then the head's.
    let r = report(&ctx("bn", "bn", 2, true));
    assert!(matches!(
        r.advice[..],
        [
            Advice::SwitchBackboneNorm {
                to: NormKind::FrozenBatchNorm,
                ..
            },
            Advice::SwitchNorm { to: GN, .. }
        ]
    ));
}

#[test]
fn from_scratch_and_at_large_batch_the_table_differs() {
    // From scratch at batch 2: a BN backbone is advised GroupNorm.
    let r = report(&ctx("gn", "bn", 2, false));
    assert!(matches!(
        r.advice[..],
        [Advice::SwitchBackboneNorm {
            to: GN,
            pretrained: false,
            ..
        }]
    ));
    assert!(r.advice[0]
        .to_string()
        .contains("switch it to GroupNorm (gn)"));
    // Batch 32: trainable BN everywhere is the table's pick; nothing to advise.
    assert!(report(&ctx("bn", "bn", 32, true)).advice.is_empty());
}

#[test]
fn the_backbone_advice_and_context_survive_serde_and_old_contexts_read() {
    let c = ctx("gn", "bn", 2, true);
    let json = serde_json::to_string(&c).unwrap();
    assert_eq!(serde_json::from_str::<RunContext>(&json).unwrap(), c);
    let old = json.replace(r#","backbone_norm":"bn""#, "");
    assert!(!old.contains("backbone_norm"));
    let back: RunContext = serde_json::from_str(&old).unwrap();
    assert_eq!(back.backbone_norm, None);
    let a = &report(&c).advice[0];
    let back: Advice = serde_json::from_str(&serde_json::to_string(a).unwrap()).unwrap();
    assert_eq!(&back, a);
}
