//! JsonlLogger: truncate vs append, a torn last line, errors naming the file.
use keel_train::{JsonlLogger, StepRecord};

fn temp_file(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "keel-train-log-{name}-{}.jsonl",
        std::process::id()
    ))
}

fn rec(step: usize, loss: f64) -> StepRecord {
    StepRecord {
        step,
        loss,
        grad_norm: None,
        loss_scale: None,
        skipped: false,
    }
}

fn read(path: &std::path::Path) -> anyhow::Result<Vec<StepRecord>> {
    std::fs::read_to_string(path)?
        .lines()
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}

#[test]
fn create_truncates_append_keeps_and_nan_survives() -> anyhow::Result<()> {
    let path = temp_file("basic");
    std::fs::write(&path, "old content\n")?;
    let mut log = JsonlLogger::create(&path)?;
    log.log(&rec(0, 1.5))?;
    // Flushed per record: visible before the logger is dropped.
    assert_eq!(read(&path)?, vec![rec(0, 1.5)]);
    drop(log);
    let mut log = JsonlLogger::append(&path)?;
    log.log(&rec(1, f64::NAN))?;
    let back = read(&path)?;
    assert_eq!(back.len(), 2);
    assert!(back[1].loss.is_nan());
    assert_eq!(log.path(), path.as_path());
    std::fs::remove_file(&path)?;
    Ok(())
}

#[test]
fn append_cuts_a_torn_last_line() -> anyhow::Result<()> {
    let path = temp_file("torn");
    std::fs::write(
        &path,
        "{\"step\":0,\"loss\":1.0,\"grad_norm\":null,\"loss_scale\":null,\"skipped\":false}\n{\"step\":1,\"lo",
    )?;
    let mut log = JsonlLogger::append(&path)?;
    log.log(&rec(1, 0.5))?;
    assert_eq!(read(&path)?, vec![rec(0, 1.0), rec(1, 0.5)]);
    // A file with no complete line at all is emptied.
    std::fs::write(&path, "{\"step\":0")?;
    JsonlLogger::append(&path)?;
    assert_eq!(std::fs::read(&path)?, b"");
    std::fs::remove_file(&path)?;
    Ok(())
}

#[test]
fn errors_name_the_file() {
    let bad = std::env::temp_dir().join("keel-train-no-such-dir/sub/log.jsonl");
    let e = JsonlLogger::create(&bad).unwrap_err().to_string();
    assert!(e.contains("keel-train-no-such-dir/sub/log.jsonl"), "{e}");
    let e = JsonlLogger::append(&bad).unwrap_err().to_string();
    assert!(e.contains("cannot open log file"), "{e}");
}

/// The eval line keeps NaN metrics and null per-class IoU; the field order is the log's.
#[test]
fn eval_line_format() {
    let classes = ["bg".to_string(), "disc".to_string()];
    let line = keel_train::EvalLog {
        step: 9,
        miou: f64::NAN,
        pixel_acc: 0.5,
        iou: &[Some(0.25), None],
        classes: &classes,
        ema: false,
    };
    assert_eq!(
        serde_json::to_string(&line).unwrap(),
        r#"{"kind":"eval","step":9,"miou":"NaN","pixel_acc":0.5,"iou":[0.25,null],"classes":["bg","disc"],"ema":false}"#
    );
}
