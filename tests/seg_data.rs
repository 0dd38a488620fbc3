//! seg_train's data checks from the command line (issue 11 item 4): a `--data-dir` with bad
//! files fails before the first step, names every bad file at once and writes nothing to
//! `--out`; a run that stopped before its first checkpoint leaves a directory a plain
//! re-run accepts. (How the example is built and run: see tests/seg_train.rs.)
use std::path::Path;
use std::time::{Duration, Instant};

mod common;
#[path = "../crates/keel-data/tests/common/mod.rs"]
mod voc;

#[allow(dead_code)] // reason: the binary's `main` and items only the binary uses
#[path = "../examples/seg_train/main.rs"]
mod seg_train;

use common::seg_cli::{child, child_main, tiny, tmp};
use seg_train::cli;

/// Entry point of the re-executed test binary (a no-op in a normal test run).
#[test]
fn child_process() {
    child_main();
}

fn on_voc(out: &Path, root: &Path, steps: usize) -> Vec<String> {
    let mut args = tiny(out, steps);
    let dir = root.to_str().unwrap().to_string();
    args.extend(["--data-dir".into(), dir, "--num-classes".into(), "3".into()]);
    args
}

#[test]
fn bad_data_fails_before_the_first_step_naming_every_file() -> anyhow::Result<()> {
    let root = tmp("bad-voc");
    voc::write_voc(&root, 4, 2)?;
    voc::truncate_image(&root, 1)?;
    voc::poke_mask(&root, 2, 5)?;
    voc::mask_16bit(&root, 3)?;
    voc::resize_mask(&root, 5)?; // val
    let out = tmp("bad-voc-out");
    let res = child(&on_voc(&out, &root, 2)).output()?;
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("4 of 6 samples are bad"), "{stderr}");
    for f in ["img1.jpg", "img2.png", "img3.png", "img5.png"] {
        assert!(stderr.contains(f), "{f} is not named: {stderr}");
    }
    assert!(stderr.contains("--data-dir"), "{stderr}");
    assert!(!out.exists(), "a failed validation wrote {}", out.display());
    // An existing, empty --out stays empty.
    std::fs::create_dir_all(&out)?;
    assert!(cli::run(on_voc(&out, &root, 2)).is_err());
    assert_eq!(std::fs::read_dir(&out)?.count(), 0);
    for d in [root, out] {
        std::fs::remove_dir_all(d)?;
    }
    Ok(())
}

#[test]
fn a_run_that_stopped_before_its_first_checkpoint_can_be_rerun() -> anyhow::Result<()> {
    let out = tmp("no-ckpt");
    let steps = 20; // first checkpoint at step 10
                    // A run killed (SIGKILL) after its first logged step, before its first checkpoint.
    let mut slow = tiny(&out, steps);
    slow.extend(["--step-delay-ms".to_string(), "300".to_string()]);
    let mut proc = child(&slow).spawn()?;
    let t0 = Instant::now();
    while logged_steps(&out) == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "child logged no step"
        );
        assert!(proc.try_wait()?.is_none(), "child exited early");
        std::thread::sleep(Duration::from_millis(5));
    }
    proc.kill()?;
    proc.wait()?;
    assert_eq!(std::fs::read_dir(out.join("checkpoints"))?.count(), 0);
    // The plain re-run starts over in it: a fresh log, checkpoints.
    cli::run(tiny(&out, steps))?;
    assert_eq!(logged_steps(&out), steps);
    assert!(std::fs::read_dir(out.join("checkpoints"))?.count() > 0);
    // With a checkpoint it is a run worth keeping: refused, as before.
    let err = cli::run(tiny(&out, steps)).unwrap_err();
    assert!(
        format!("{err:#}").contains("already holds a run"),
        "{err:#}"
    );
    // Without checkpoints but with a file seg_train did not write: refused, file kept.
    std::fs::remove_dir_all(out.join("checkpoints"))?;
    for f in ["health.json", "summary.json"] {
        std::fs::remove_file(out.join(f))?;
    }
    std::fs::write(out.join("notes.txt"), b"mine")?;
    let err = cli::run(tiny(&out, steps)).unwrap_err();
    assert!(
        format!("{err:#}").contains("already holds a run"),
        "{err:#}"
    );
    assert_eq!(std::fs::read(out.join("notes.txt"))?, b"mine");
    std::fs::remove_dir_all(out)?;
    Ok(())
}

/// The step records in `out/log.jsonl` (0 when there is no log yet).
fn logged_steps(out: &Path) -> usize {
    std::fs::read_to_string(out.join("log.jsonl"))
        .map(|l| {
            l.lines()
                .filter(|l| l.contains("\"kind\":\"step\""))
                .count()
        })
        .unwrap_or(0)
}
