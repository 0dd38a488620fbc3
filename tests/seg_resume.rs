//! `seg_train --resume` under faults and with other flags (issue 11, items 3, 5, 6): extending
//! a finished run, flags and an edited config.json that differ from the run's, a missing
//! config.json, a corrupt newest checkpoint, `--resume-from`, the run lock, stale temp files,
//! a fresh run into leftovers, and a SIGKILL that lands while a checkpoint is being written.
//! Same harness as tests/seg_train.rs: the example's modules are compiled in, and a real
//! process is this binary re-executed (`child_process`).
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[allow(dead_code)] // reason: the binary's `main` and items only the binary uses
#[path = "../examples/seg_train/main.rs"]
mod seg_train;

mod common;

use common::seg_cli::{
    child_env as child, child_main, log_records as records, step_losses, tiny, tmp, with,
};
use seg_train::{cli, output};

fn run_cli(args: &[String]) -> anyhow::Result<()> {
    cli::run(args.to_vec())
}

/// `seg_train --quiet --device cpu --resume DIR` and `extra`.
fn resume(dir: &Path, extra: &[&str]) -> Vec<String> {
    let base = format!("seg_train --quiet --device cpu --resume {}", dir.display());
    with(base.split_whitespace().map(String::from).collect(), extra)
}

fn err_of(args: &[String]) -> String {
    format!("{:#}", run_cli(args).unwrap_err())
}

/// Entry point of the re-executed test binary (a no-op in a normal test run).
#[test]
fn child_process() {
    child_main();
}

/// Asserts that `b`'s step losses equal `a`'s, bit for bit, over `a`'s steps.
fn assert_same_losses(a: &[(u64, f64)], b: &[(u64, f64)]) {
    assert_eq!(a.len(), b.len(), "{a:?}\nvs\n{b:?}");
    for ((sa, xa), (sb, xb)) in a.iter().zip(b) {
        assert_eq!(sa, sb);
        assert_eq!(xa.to_bits(), xb.to_bits(), "step {sa}: loss {xa} vs {xb}");
    }
}

fn ckpt(dir: &Path, step: usize) -> PathBuf {
    dir.join(format!("checkpoints/ckpt-{step:08}.safetensors"))
}

#[test]
fn a_finished_run_extends_with_steps_and_other_differing_flags_are_all_named() -> anyhow::Result<()>
{
    let d = tmp("extend");
    run_cli(&tiny(&d, 20))?;
    let before = step_losses(&d);
    // Nothing to do: a clear error with the fix, and the run's files stay as they were.
    let summary = std::fs::read(d.join("summary.json"))?;
    let e = err_of(&resume(&d, &[]));
    assert!(
        e.contains("already finished its 20 steps") && e.contains("--steps"),
        "{e}"
    );
    assert_eq!(std::fs::read(d.join("summary.json"))?, summary);
    // Every differing flag is named with the run's value; --steps is not among them.
    let e = err_of(&resume(
        &d,
        &[
            "--steps",
            "30",
            "--lr",
            "0.1",
            "--batch-size",
            "4",
            "--amp",
            "f16",
            "--out",
            "/elsewhere",
        ],
    ));
    for part in [
        "--lr 0.1 (the run has 0.05)",
        "--batch-size 4 (the run has 2)",
        "--amp f16 (the run has f32)",
        "--out /elsewhere",
    ] {
        assert!(e.contains(part), "{part}: {e}");
    }
    assert!(!e.contains("--steps 30"), "{e}");
    let e = err_of(&resume(&d, &["--steps", "15"]));
    assert!(
        e.contains("checkpoint is at step 20") && e.contains("larger --steps"),
        "{e}"
    );
    // The run's own flags repeated (equal values) are accepted, --steps 30 extends it.
    let mut again = tiny(&d, 30);
    again.push("--resume".into());
    again.push(d.display().to_string());
    run_cli(&again)?;
    let after = step_losses(&d);
    assert_eq!(after.len(), 30);
    assert_same_losses(&before, &after[..20]);
    assert!(ckpt(&d, 30).is_file());
    let cfg = cli::read_config(&d.join("config.json"))?;
    assert_eq!(cfg.steps, 30);
    // The schedule is recomputed for 30 steps: the LR of step 20 is the 30-step schedule's.
    let lr20 = records(&d, "step")[20]["lr"].as_f64().unwrap();
    let want = cfg.recipe().schedule()?.lr(20);
    assert_eq!(lr20.to_bits(), want.to_bits(), "{lr20} vs {want}");
    let _ = std::fs::remove_dir_all(d);
    Ok(())
}

#[test]
fn an_edited_config_json_is_refused_and_a_missing_one_is_recovered() -> anyhow::Result<()> {
    let d = tmp("config");
    run_cli(&tiny(&d, 10))?;
    let path = d.join("config.json");
    let original = std::fs::read_to_string(&path)?;
    let mut edited: serde_json::Value = serde_json::from_str(&original)?;
    edited["lr"] = serde_json::json!(0.2);
    edited["seed"] = serde_json::json!(7);
    std::fs::write(&path, serde_json::to_string_pretty(&edited)?)?;
    let e = err_of(&resume(&d, &["--steps", "20"]));
    assert!(
        e.contains("config.json differs from the config stored in")
            && e.contains("lr (config.json 0.2, checkpoint 0.05)")
            && e.contains("seed (config.json 7, checkpoint 0)"),
        "{e}"
    );
    // Without config.json, the checkpoint's config is used and written back.
    std::fs::remove_file(&path)?;
    let out = child(&resume(&d, &["--steps", "20"]), &[]).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("no config.json; recovered the run's config"),
        "{stderr}"
    );
    assert_eq!(step_losses(&d).len(), 20);
    let back = cli::read_config(&path)?;
    let first = serde_json::from_str::<cli::RunConfig>(&original)?;
    assert_eq!(back, cli::RunConfig { steps: 20, ..first });
    let _ = std::fs::remove_dir_all(d);
    Ok(())
}

#[test]
fn a_checksum_mismatch_falls_back_and_resume_from_picks_a_checkpoint() -> anyhow::Result<()> {
    let a = tmp("fallback");
    run_cli(&tiny(&a, 20))?;
    let reference = step_losses(&a);
    // A flipped byte in the newest checkpoint's data: resume from the previous one, warn.
    let mut bytes = std::fs::read(ckpt(&a, 20))?;
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(ckpt(&a, 20), &bytes)?;
    let out = child(&resume(&a, &[]), &[]).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: skipping") && stderr.contains("checksum mismatch"),
        "{stderr}"
    );
    assert_same_losses(&reference, &step_losses(&a));
    keel::train::load_checkpoint(ckpt(&a, 20), &candle::Device::Cpu)?; // rewritten, valid
                                                                       // --resume-from a named (older) checkpoint of a finished run, with or without --resume.
    let file = ckpt(&a, 10).display().to_string();
    run_cli(&resume(&a, &["--resume-from", &file]))?;
    assert_same_losses(&reference, &step_losses(&a));
    run_cli(&with(
        resume(&a, &[])[..4].to_vec(),
        &["--resume-from", &file],
    ))?;
    assert_same_losses(&reference, &step_losses(&a));
    let e = err_of(&with(
        resume(&a, &[])[..4].to_vec(),
        &["--resume-from", "/tmp/x.safetensors"],
    ));
    assert!(
        e.contains("not in a run's checkpoints/ folder") && e.contains("--resume DIR"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(a);
    Ok(())
}

#[test]
fn a_fresh_run_into_leftovers_without_config_json_is_refused() -> anyhow::Result<()> {
    let d = tmp("leftovers");
    run_cli(&tiny(&d, 10))?;
    std::fs::remove_file(d.join("config.json"))?;
    let log = std::fs::read(d.join("log.jsonl"))?;
    let e = err_of(&tiny(&d, 10));
    assert!(
        e.contains("no config.json") && e.contains("--resume"),
        "{e}"
    );
    assert_eq!(std::fs::read(d.join("log.jsonl"))?, log);
    // Only a log left: refused too.
    std::fs::remove_dir_all(d.join("checkpoints"))?;
    let e = err_of(&tiny(&d, 10));
    assert!(e.contains("no config.json"), "{e}");
    let _ = std::fs::remove_dir_all(d);
    Ok(())
}

#[test]
fn a_sigkill_during_a_checkpoint_write_resumes_exactly_and_the_lock_guards_the_run(
) -> anyhow::Result<()> {
    let steps = 30;
    let a = tmp("kill-save-ref");
    run_cli(&tiny(&a, steps))?;
    let reference = step_losses(&a);

    // The same run in a child whose checkpoint saves pause between temp file and rename.
    let b = tmp("kill-save");
    let pause = (output::SAVE_PAUSE_ENV, "1500");
    let mut proc = child(&tiny(&b, steps), &[pause]).spawn()?;
    let ckdir = b.join("checkpoints");
    let t0 = Instant::now();
    let temp = loop {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no second save seen"
        );
        assert!(proc.try_wait()?.is_none(), "child exited early");
        let hit = std::fs::read_dir(&ckdir).ok().and_then(|rd| {
            rd.filter_map(Result::ok).map(|e| e.path()).find(|p| {
                p.to_string_lossy()
                    .contains(".ckpt-00000020.safetensors.tmp-")
            })
        });
        if let Some(p) = hit {
            break p;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // While it runs, a second run on the directory is refused, naming the holder.
    let e = err_of(&resume(&b, &[]));
    assert!(
        e.contains(&format!("in use by process {}", proc.id())),
        "{e}"
    );
    proc.kill()?; // SIGKILL, mid-save
    assert!(!proc.wait()?.success());
    assert!(
        temp.exists() && !ckpt(&b, 20).exists(),
        "the kill missed the save"
    );
    assert!(b.join(keel::train::LOCK_FILE).exists());
    // A safetensors-library temp file left the same way is cleaned up too.
    let st_temp = ckdir.join(".tmpQ3xZ9a");
    std::fs::write(&st_temp, b"partial")?;

    let out = child(&resume(&b, &[]), &[]).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("stale lock of process"), "{stderr}");
    assert!(stderr.contains("removed the stale temp file"), "{stderr}");
    assert!(!temp.exists() && !st_temp.exists());
    assert!(
        !b.join(keel::train::LOCK_FILE).exists(),
        "lock left after the run"
    );
    assert_same_losses(&reference, &step_losses(&b));
    for d in [a, b] {
        let _ = std::fs::remove_dir_all(d);
    }
    Ok(())
}

/// A run keeps the weight-decay rule it started with: config.json records it (`rank` for a
/// fresh run), a run whose config says `names` (every run before the field existed reads
/// so) resumes with the name rule's groups, exactly, and the two rules train differently
/// (the twin's norms are named by position: the name rule decays their weights).
#[test]
fn a_runs_no_decay_rule_is_kept_on_resume() -> anyhow::Result<()> {
    let adamw = |d: &Path, steps: usize| {
        with(
            tiny(d, steps),
            &["--optimizer", "adamw", "--weight-decay", "0.5"],
        )
    };
    let fresh = tmp("nodecay-rank");
    run_cli(&adamw(&fresh, 12))?;
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fresh.join("config.json"))?)?;
    assert_eq!(cfg["no_decay"], "rank");
    cfg["no_decay"] = serde_json::json!("names");
    let run_config = |cfg: &serde_json::Value, out: &Path| -> anyhow::Result<()> {
        let file = out.with_extension("json");
        std::fs::write(&file, serde_json::to_string(cfg)?)?;
        let args = format!(
            "seg_train run-config --device cpu --config {} --out {}",
            file.display(),
            out.display()
        );
        let r = run_cli(
            &args
                .split_whitespace()
                .map(String::from)
                .collect::<Vec<_>>(),
        );
        let _ = std::fs::remove_file(file);
        r
    };
    let whole = tmp("nodecay-names");
    run_config(&cfg, &whole)?;
    let reference = step_losses(&whole);
    let file = ckpt(&whole, 10).display().to_string();
    run_cli(&resume(&whole, &["--resume-from", &file]))?;
    let read = cli::read_config(&whole.join("config.json"))?;
    assert_eq!(read.train.no_decay, keel::optim::NoDecay::Names);
    assert_same_losses(&reference, &step_losses(&whole));
    let (rank, names) = (step_losses(&fresh), step_losses(&whole));
    assert_eq!(rank[0], names[0], "step 0 runs before any update");
    assert_ne!(rank, names, "the rules gave the same training");
    for d in [fresh, whole] {
        let _ = std::fs::remove_dir_all(d);
    }
    Ok(())
}
