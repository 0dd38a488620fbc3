//! grid::run_children: a grid's runs as child processes (here a shell script standing in
//! for a trainer: it copies its config to summary.json, or fails), results in order,
//! failures named with the child's stderr.
#![cfg(unix)]
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use keel_test_support::TempDir;
use keel_train::grid::{grid_progress, run_children, ChildRun};
use keel_train::RunSummary;

/// A "trainer": `child SUBCOMMAND [ARGS..] --config FILE --out DIR`. It checks the
/// subcommand and the one-thread default, fails for a directory named `bad*`, and otherwise
/// writes its config as the run's summary.json.
const CHILD: &str = r#"#!/bin/sh
[ "$1" = run-config ] || { echo "wrong subcommand $1" >&2; exit 4; }
[ "$RAYON_NUM_THREADS" = 1 ] || { echo "RAYON_NUM_THREADS=$RAYON_NUM_THREADS" >&2; exit 5; }
while [ $# -gt 0 ]; do
  case "$1" in --config) cfg="$2"; shift ;; --out) out="$2"; shift ;; esac
  shift
done
case "$(basename "$out")" in
  bad*) sleep 1; echo "the loss is NaN at step 3" >&2; exit 3 ;;
  slow*) sleep 4; touch "$out/finished"; exit 0 ;;
esac
[ -e "$out/stale" ] && { echo "stale file left" >&2; exit 6; }
cp "$cfg" "$out/summary.json"
"#;

fn child(dir: &Path) -> std::path::PathBuf {
    let exe = dir.join("child.sh");
    std::fs::write(&exe, CHILD).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    exe
}

fn run(dir: &Path, name: &str, miou: f64) -> ChildRun {
    let s = RunSummary {
        final_miou: miou,
        verdict: "Healthy".into(),
        ..Default::default()
    };
    ChildRun {
        label: format!("run {name}"),
        config: serde_json::to_value(&s).unwrap(),
        dir: dir.join("runs").join(name),
    }
}

#[test]
fn children_run_in_parallel_and_return_their_summaries_in_order() -> anyhow::Result<()> {
    std::env::remove_var("RAYON_NUM_THREADS");
    let tmp = TempDir::new("grid-children");
    let exe = child(&tmp.0);
    // Names with a dot: each run keeps its own config and stderr files beside its directory.
    let runs: Vec<ChildRun> = (0..5)
        .map(|i| run(&tmp.0, &format!("lr0.0{i}-b2"), i as f64 / 10.0))
        .collect();
    // A stale directory from an earlier grid is cleared before its run starts.
    std::fs::create_dir_all(runs[2].dir.join("stale"))?;
    let mut seen = Vec::new();
    let pb = grid_progress("test", runs.len());
    let out = run_children(
        &runs,
        3,
        (&exe, "run-config", &["--device".into(), "cpu".into()]),
        &pb,
        |r, s| seen.push((r.label.clone(), s.final_miou)),
    )?;
    let mious: Vec<f64> = out.iter().map(|s| s.final_miou).collect();
    assert_eq!(mious, [0.0, 0.1, 0.2, 0.3, 0.4]);
    assert_eq!(seen.len(), 5);
    for r in &runs {
        assert!(r.side_file(".config.json").is_file(), "{}", r.dir.display());
    }
    assert_eq!(
        runs[1].side_file(".config.json").file_name().unwrap(),
        "lr0.01-b2.config.json"
    );
    Ok(())
}

#[test]
fn a_repeated_directory_is_refused_before_anything_starts() -> anyhow::Result<()> {
    let tmp = TempDir::new("grid-children-dup");
    let exe = child(&tmp.0);
    let runs = [run(&tmp.0, "gn-b2-s0", 0.5), run(&tmp.0, "gn-b2-s0", 0.5)];
    let pb = grid_progress("test", runs.len());
    let e = run_children(&runs, 2, (&exe, "run-config", &[]), &pb, |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("would share the directory"), "{e}");
    assert!(!runs[0].dir.exists());
    Ok(())
}

#[test]
fn a_failure_kills_the_children_still_running() -> anyhow::Result<()> {
    std::env::remove_var("RAYON_NUM_THREADS");
    let tmp = TempDir::new("grid-children-kill");
    let exe = child(&tmp.0);
    let runs = [run(&tmp.0, "slow", 0.5), run(&tmp.0, "bad", 0.5)];
    let pb = grid_progress("test", runs.len());
    assert!(run_children(&runs, 2, (&exe, "run-config", &[]), &pb, |_, _| {}).is_err());
    // The slow child would have finished 3 s after the failure; it was killed instead.
    std::thread::sleep(std::time::Duration::from_secs(5));
    assert!(!runs[0].dir.join("finished").exists());
    Ok(())
}

#[test]
fn a_failed_child_is_an_error_with_its_stderr() -> anyhow::Result<()> {
    std::env::remove_var("RAYON_NUM_THREADS");
    let tmp = TempDir::new("grid-children-bad");
    let exe = child(&tmp.0);
    let runs = [run(&tmp.0, "ok", 0.5), run(&tmp.0, "bad", 0.5)];
    let pb = grid_progress("test", runs.len());
    let e = run_children(&runs, 1, (&exe, "run-config", &[]), &pb, |_, _| {}).unwrap_err();
    let e = e.to_string();
    assert!(
        e.contains("run bad failed") && e.contains("the loss is NaN at step 3"),
        "{e}"
    );
    Ok(())
}
