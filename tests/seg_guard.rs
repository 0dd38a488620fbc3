//! The guard in seg_train: `--lr 1000` from step 0 never ends HEALTHY. With `--guard
//! rollback` (the default) the run either recovers with a visible intervention or the guard
//! stops it (DIVERGED, an error: the binary's non-zero exit, since main exits 1 on any error
//! of `cli::run`); with `--guard off` it is not HEALTHY either. The example's modules are
//! compiled in as in tests/seg_train.rs.
use std::path::{Path, PathBuf};

#[allow(dead_code)] // reason: the binary's `main` and items only the binary uses
#[path = "../examples/seg_train/main.rs"]
mod seg_train;

use seg_train::cli;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("keel-seg-guard-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A tiny CPU run at `--lr 1000` with `--guard guard`.
fn huge_lr(out: &Path, guard: &str) -> Vec<String> {
    tiny_run(out, guard, "--lr 1000")
}

/// A tiny CPU run with `--guard guard` and the `extra` flags.
fn tiny_run(out: &Path, guard: &str, extra: &str) -> Vec<String> {
    let s = format!(
        "seg_train --quiet --device cpu --norm gn --width 4 --fpn 8 --image-size 32 --train-size 16 --val-size 8 \
         --batch-size 2 --steps 40 --warmup-steps 0 --eval-every 20 --keep-last 1 --guard {guard} {extra} --out {}",
        out.display()
    );
    s.split_whitespace().map(String::from).collect()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn log_records(out: &Path, kind: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == kind)
        .collect()
}

#[test]
fn lr_1000_with_rollback_stops_or_recovers_visibly() -> anyhow::Result<()> {
    let out = tmp("rollback");
    let result = cli::run(huge_lr(&out, "rollback"));
    let health = json(&out.join("health.json"));
    let summary = json(&out.join("summary.json"));
    let interventions = log_records(&out, "guard");
    eprintln!("{result:?}\n{health:#}\n{interventions:?}");
    assert_ne!(health["verdict"], "Healthy");
    assert!(!interventions.is_empty(), "no intervention logged");
    assert_eq!(
        summary["guard_interventions"].as_u64(),
        Some(interventions.len() as u64)
    );
    let listed = health["guard"]["interventions"].as_array().unwrap();
    assert_eq!(listed.len(), interventions.len());
    match result {
        Err(e) => {
            assert!(e.to_string().contains("the guard stopped the run"), "{e:#}");
            assert_eq!(health["verdict"], "Diverged");
            assert_eq!(interventions.last().unwrap()["action"], "stopped");
            assert!(summary["guard_stopped_at"].is_u64());
            assert!(
                summary["final_miou"].as_f64().unwrap() > 0.0,
                "the restored weights were evaluated"
            );
        }
        Ok(()) => assert!(interventions.iter().all(|i| i["action"] == "rolled_back")),
    }
    std::fs::remove_dir_all(&out)?;
    Ok(())
}

#[test]
fn lr_1000_without_guard_is_not_healthy() -> anyhow::Result<()> {
    let out = tmp("off");
    cli::run(huge_lr(&out, "off"))?;
    let health = json(&out.join("health.json"));
    assert_ne!(health["verdict"], "Healthy", "{health:#}");
    assert!(log_records(&out, "guard").is_empty());
    assert!(cli::run(huge_lr(&tmp("bad"), "sometimes"))
        .unwrap_err()
        .to_string()
        .contains("off, skip, rollback"));
    std::fs::remove_dir_all(&out)?;
    Ok(())
}

/// The cost of the guard on seg_train's default model (norm gn, width 16, fpn 32, SGD):
/// one snapshot (deep copy of weights and optimizer state, monitor to JSON), one finite
/// check, next to a training step at the default settings. A measurement, not a check:
/// `cargo test --test seg_guard -- --ignored --nocapture snapshot_cost` (candle itself is
/// built with opt-level 3 in the dev profile).
#[test]
#[ignore]
fn snapshot_cost_on_the_default_model() -> anyhow::Result<()> {
    use clap::Parser;
    use keel::models::seg::{count_params, init_weights, SegNet};
    use keel::train::{named_vars, Guard, GuardConfig, TrainConfig, TrainState};
    use std::time::Instant;
    let args = ["seg_train", "--device", "cpu"].map(String::from);
    let t = cli::Cli::try_parse_from(args)?.train;
    let cfg = t.common.config(t.norm, t.batch_size, t.steps, t.seed);
    let dev = candle::Device::Cpu;
    let vm = candle_nn::VarMap::new();
    let _model = SegNet::new(
        &cfg.model(),
        candle_nn::VarBuilder::from_varmap(&vm, candle::DType::F32, &dev),
    )?;
    init_weights(&vm, cfg.seed)?;
    let opt = cfg.recipe().optimizer(keel::optim::split_no_decay(&vm))?;
    let mut state = TrainState::new(named_vars(&vm), opt, &TrainConfig::default())?;
    let n = 50;
    let t0 = Instant::now();
    for _ in 0..n {
        Guard::new(GuardConfig::for_run(cfg.steps), &mut state)?;
    }
    let per = t0.elapsed().as_secs_f64() / n as f64;
    let out = tmp("cost");
    let run = |guard: &str| -> anyhow::Result<f64> {
        let _ = std::fs::remove_dir_all(&out);
        let s = format!(
            "seg_train --quiet --device cpu --steps 20 --warmup-steps 1 --eval-every 20 --val-size 2 --guard {guard} --out {}",
            out.display()
        );
        cli::run(s.split_whitespace().map(String::from).collect())?;
        Ok(json(&out.join("summary.json"))["seconds_per_step"]
            .as_f64()
            .unwrap())
    };
    let (off, rollback) = (run("off")?, run("rollback")?);
    eprintln!(
        "default model: {} params; snapshot + finite check {:.2} ms; step {:.1} ms (guard off) / {:.1} ms (rollback); snapshot every {} steps",
        count_params(&vm),
        per * 1e3,
        off * 1e3,
        rollback * 1e3,
        GuardConfig::for_run(cfg.steps).snapshot_every
    );
    std::fs::remove_dir_all(&out)?;
    Ok(())
}

/// The guard's history is checkpointed: a run resumed after two rollbacks keeps their LR
/// reduction and counts them, so its next divergences use up the remaining intervention
/// and stop it, listing all of them. `--lr 1e20`: no LR cut heals it (`--lr 1000` now
/// recovers with the early 10x cuts).
#[test]
fn resume_continues_the_guard_history() -> anyhow::Result<()> {
    let out = tmp("resume");
    let args = tiny_run(&out, "rollback", "--lr 1e20 --ckpt-every 8");
    assert!(cli::run(args).is_err(), "the first process is stopped");
    // The newest checkpoint (after step 7) holds the rollbacks at steps 3 and 7 (three
    // non-finite losses in a row each).
    let resumed = format!("seg_train --quiet --device cpu --resume {}", out.display());
    let err = cli::run(resumed.split_whitespace().map(String::from).collect()).unwrap_err();
    assert!(
        err.to_string().contains("the guard stopped the run"),
        "{err:#}"
    );
    let health = json(&out.join("health.json"));
    let listed = health["guard"]["interventions"].as_array().unwrap();
    let steps: Vec<u64> = listed.iter().map(|i| i["step"].as_u64().unwrap()).collect();
    assert_eq!(steps.len(), 4, "{health:#}");
    assert_eq!(
        &steps[..2],
        &[3, 7],
        "the first process's rollbacks: {steps:?}"
    );
    assert!(steps[2] >= 8, "{steps:?}");
    assert_eq!(listed[3]["action"], "stopped");
    let scale = health["guard"]["lr_scale"].as_f64().unwrap();
    assert!(
        (scale - 1e-3).abs() < 1e-15,
        "three early cuts of 10x: {scale}"
    );
    std::fs::remove_dir_all(&out)?;
    Ok(())
}

/// `--fault` (hidden) injects a fault into seg_train's loop: an LR burst of 1000x for 5
/// steps from step 20 is rolled back (visibly, to a snapshot before the burst) and the run
/// finishes; a bad spec is an error naming the flag, the value and the accepted forms.
#[test]
fn fault_flag_injects_an_lr_burst_that_the_guard_rolls_back() -> anyhow::Result<()> {
    let out = tmp("fault");
    cli::run(tiny_run(&out, "rollback", "--fault lr-burst@20"))?;
    let interventions = log_records(&out, "guard");
    let health = json(&out.join("health.json"));
    eprintln!("{health:#}\n{interventions:?}");
    assert!(!interventions.is_empty(), "the burst was not caught");
    let first = &interventions[0];
    assert_eq!(first["action"], "rolled_back");
    assert!(first["step"].as_u64().unwrap() >= 20, "{first}");
    assert!(first["restored_step"].as_u64().unwrap() <= 20, "{first}");
    assert_ne!(health["verdict"], "Healthy");
    let summary = json(&out.join("summary.json"));
    assert!(summary["final_miou"].as_f64().unwrap().is_finite());
    std::fs::remove_dir_all(&out)?;

    let err = cli::run(tiny_run(
        &tmp("bad-fault"),
        "rollback",
        "--fault lr-burst@x",
    ))
    .unwrap_err()
    .to_string();
    for part in ["--fault", "lr-burst@x", "nan-batch@STEP", "huge-lr"] {
        assert!(err.contains(part), "{part} not in: {err}");
    }
    Ok(())
}
