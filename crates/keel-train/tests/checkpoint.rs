//! Checkpoints: bit-exact round trips, pruning, corruption, failed saves, temp files.
use std::collections::HashMap;
use std::path::Path;

use candle::{DType, Device, Tensor};
use keel_test_support::TempDir;
use keel_train::{load_checkpoint, load_latest_checkpoint, Checkpoint, CheckpointManager, RunLock};

fn small(step: usize) -> anyhow::Result<Checkpoint> {
    let mut c = Checkpoint::new(step);
    c.tensors.insert(
        "w".into(),
        Tensor::new(&[step as f32, 0.5, -1.0], &Device::Cpu)?,
    );
    c.meta = serde_json::json!({ "lr": 0.5, "note": "x" });
    Ok(c)
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// The raw bytes of a tensor, for bit-exact comparison (NaN payloads, -0.0 included).
fn bits(t: &Tensor) -> anyhow::Result<Vec<u8>> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::I64 => t
            .to_vec1::<i64>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::U32 => t
            .to_vec1::<u32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::U8 => t.to_vec1::<u8>()?,
        dt => anyhow::bail!("unexpected {dt:?}"),
    })
}

#[test]
fn round_trip_is_bit_exact() -> anyhow::Result<()> {
    let tmp = TempDir::new("roundtrip");
    let dev = &Device::Cpu;
    let specials = [
        f32::NAN,
        f32::from_bits(0x7fc0_1234), // a NaN with a payload
        -0.0,
        f32::INFINITY,
        f32::MIN_POSITIVE / 4.0, // subnormal
        1.0 / 3.0,
    ];
    let mut c = Checkpoint::new(123_456);
    c.tensors.insert("f32".into(), Tensor::new(&specials, dev)?);
    c.tensors.insert(
        "f32_transposed".into(),
        Tensor::arange(0f32, 12., dev)?.reshape((3, 4))?.t()?,
    );
    c.tensors.insert(
        "f16".into(),
        Tensor::new(&[1.0f32, -2.5, 65504.0, 1e-7], dev)?.to_dtype(DType::F16)?,
    );
    c.tensors.insert(
        "bf16".into(),
        Tensor::new(&[3.0f32, -1e30], dev)?.to_dtype(DType::BF16)?,
    );
    c.tensors.insert(
        "rng.state".into(),
        Tensor::new(&[i64::MIN, -1, 0, i64::MAX], dev)?,
    );
    c.tensors
        .insert("u32".into(), Tensor::new(&[u32::MAX, 7], dev)?);
    c.tensors
        .insert("u8_scalar".into(), Tensor::new(200u8, dev)?);
    c.tensors
        .insert("empty".into(), Tensor::zeros((0, 3), DType::F32, dev)?);
    c.meta = serde_json::json!({
        "lr": 0.1, "tiny": 1e-300, "third": 1.0 / 3.0, "seed": u64::MAX,
        "monitor": { "window": [1.5, 2.25] }, "text": "quotes \" and \n newlines",
    });
    let mut mgr = CheckpointManager::new(&tmp.0, 3)?;
    let path = mgr.save(&c, Some(0.75))?;
    assert_eq!(path, tmp.0.join("ckpt-00123456.safetensors"));
    let back = load_checkpoint(&path, dev)?;
    assert_eq!(back.step, 123_456);
    assert_eq!(back.meta, c.meta);
    assert_eq!(back.tensors.len(), c.tensors.len());
    for (name, t) in &c.tensors {
        let b = &back.tensors[name];
        assert_eq!(b.dtype(), t.dtype(), "{name}");
        assert_eq!(b.dims(), t.dims(), "{name}");
        assert_eq!(bits(b)?, bits(t)?, "{name}");
    }
    // The file is plain safetensors: candle reads it too.
    let plain = candle::safetensors::load(&path, dev)?;
    assert_eq!(plain.len(), c.tensors.len());
    Ok(())
}

#[test]
fn keeps_last_k_plus_best_and_a_new_manager_finds_them() -> anyhow::Result<()> {
    let tmp = TempDir::new("prune");
    let mut mgr = CheckpointManager::new(&tmp.0, 2)?;
    let metrics = [0.1, 0.9, 0.3, 0.4, 0.2, 0.5];
    for (i, m) in metrics.iter().enumerate() {
        mgr.save(&small(i + 1)?, Some(*m))?;
    }
    assert_eq!(
        names(&tmp.0),
        vec![
            "ckpt-00000002.safetensors",
            "ckpt-00000005.safetensors",
            "ckpt-00000006.safetensors"
        ]
    );
    assert_eq!(mgr.best(), Some(tmp.0.join("ckpt-00000002.safetensors")));
    assert_eq!(mgr.best_metric(), Some(0.9));
    assert_eq!(mgr.latest()?, Some(tmp.0.join("ckpt-00000006.safetensors")));

    // A resumed run: the best is found again from the headers and still protected.
    let mut again = CheckpointManager::new(&tmp.0, 2)?;
    assert_eq!(again.best(), mgr.best());
    assert_eq!(again.checkpoints(), mgr.checkpoints());
    again.save(&small(7)?, None)?;
    again.save(&small(8)?, Some(f64::NAN))?; // never the best
    assert_eq!(
        names(&tmp.0),
        vec![
            "ckpt-00000002.safetensors",
            "ckpt-00000007.safetensors",
            "ckpt-00000008.safetensors"
        ]
    );
    // A better metric moves the best; the old best is pruned once out of the last K.
    again.save(&small(9)?, Some(0.95))?;
    assert_eq!(again.best(), Some(tmp.0.join("ckpt-00000009.safetensors")));
    assert_eq!(
        names(&tmp.0),
        vec!["ckpt-00000008.safetensors", "ckpt-00000009.safetensors"]
    );
    Ok(())
}

/// A checkpoint of diverged weights: NaN in one tensor (an i64 step counter beside it is
/// never "non-finite").
fn diverged(step: usize) -> anyhow::Result<Checkpoint> {
    let mut c = small(step)?;
    c.tensors.insert(
        "w".into(),
        Tensor::new(&[f32::NAN, 0.5, -1.0], &Device::Cpu)?,
    );
    c.tensors
        .insert("count".into(), Tensor::new(&[step as i64], &Device::Cpu)?);
    Ok(c)
}

/// Keep-last pruning never deletes the last finite checkpoint: a run without a guard that
/// diverged keeps writing NaN checkpoints (no metric, so no best protects anything), and
/// the newest finite one stays, also for a new manager that takes the directory over.
#[test]
fn pruning_keeps_the_last_finite_checkpoint() -> anyhow::Result<()> {
    let tmp = TempDir::new("prune-finite");
    let mut mgr = CheckpointManager::new(&tmp.0, 2)?;
    for step in 1..=3 {
        mgr.save(&small(step)?, None)?;
    }
    for step in 4..=6 {
        mgr.save(&diverged(step)?, Some(f64::NAN))?;
    }
    let expected = vec![
        "ckpt-00000003.safetensors",
        "ckpt-00000005.safetensors",
        "ckpt-00000006.safetensors",
    ];
    assert_eq!(names(&tmp.0), expected);
    let back = load_checkpoint(tmp.0.join("ckpt-00000003.safetensors"), &Device::Cpu)?;
    assert_eq!(back.tensors["w"].to_vec1::<f32>()?, vec![3.0, 0.5, -1.0]);

    // A new manager does not know which files are finite; it reads them to find out.
    let mut again = CheckpointManager::new(&tmp.0, 2)?;
    again.save(&diverged(7)?, None)?;
    assert_eq!(
        names(&tmp.0),
        vec![
            "ckpt-00000003.safetensors",
            "ckpt-00000006.safetensors",
            "ckpt-00000007.safetensors"
        ]
    );
    // Once a finite checkpoint is newer, the old one is an ordinary one again.
    again.save(&small(8)?, None)?;
    again.save(&small(9)?, None)?;
    assert_eq!(
        names(&tmp.0),
        vec!["ckpt-00000008.safetensors", "ckpt-00000009.safetensors"]
    );
    Ok(())
}

#[test]
fn saving_a_step_again_replaces_it() -> anyhow::Result<()> {
    let tmp = TempDir::new("resave");
    let mut mgr = CheckpointManager::new(&tmp.0, 2)?;
    mgr.save(&small(1)?, Some(0.9))?;
    let mut c = small(1)?;
    c.meta = serde_json::json!("second");
    let p = mgr.save(&c, Some(0.1))?;
    assert_eq!(
        load_checkpoint(&p, &Device::Cpu)?.meta,
        serde_json::json!("second")
    );
    assert_eq!(mgr.best_metric(), Some(0.1));
    assert_eq!(mgr.checkpoints().len(), 1);
    Ok(())
}

#[test]
fn truncated_files_are_clear_errors_and_latest_skips_them() -> anyhow::Result<()> {
    let tmp = TempDir::new("truncated");
    let mut mgr = CheckpointManager::new(&tmp.0, 5)?;
    mgr.save(&small(1)?, None)?;
    let p2 = mgr.save(&small(2)?, None)?;
    let full = std::fs::read(&p2)?;
    for len in [full.len() - 1, full.len() - 12, 100, 9, 3, 0] {
        std::fs::write(&p2, &full[..len])?;
        let e = load_checkpoint(&p2, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("ckpt-00000002.safetensors"), "{len}: {e}");
        assert!(
            e.contains("truncated") || e.contains("header is invalid"),
            "{len}: {e}"
        );
        assert_eq!(mgr.latest()?, Some(tmp.0.join("ckpt-00000001.safetensors")));
    }
    Ok(())
}

#[test]
fn every_single_bit_flip_is_an_error_never_a_panic() -> anyhow::Result<()> {
    let tmp = TempDir::new("bitflip");
    let mut mgr = CheckpointManager::new(&tmp.0, 1)?;
    let path = mgr.save(&small(3)?, Some(0.5))?;
    let good = std::fs::read(&path)?;
    let header_len = u64::from_le_bytes(good[..8].try_into()?) as usize;
    let bad = tmp.0.join("flipped.safetensors");
    let mut checksum_errors = 0;
    for pos in 0..good.len() {
        let mut b = good.clone();
        b[pos] ^= 1 << (pos % 8);
        std::fs::write(&bad, &b)?;
        let e = match load_checkpoint(&bad, &Device::Cpu) {
            Ok(_) => panic!("a flipped bit at byte {pos} of {} loaded", good.len()),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("flipped.safetensors"), "{pos}: {e}");
        if e.contains("checksum mismatch") {
            checksum_errors += 1;
        }
        if pos >= 8 + header_len {
            assert!(e.contains("checksum mismatch"), "data byte {pos}: {e}");
        }
    }
    // The 12 data bytes, and the meta/metric/checksum text of the header.
    assert!(checksum_errors > 12, "{checksum_errors}");
    Ok(())
}

#[test]
fn non_keel_and_missing_files_are_clear_errors() -> anyhow::Result<()> {
    let tmp = TempDir::new("nonkeel");
    let plain = tmp.0.join("weights.safetensors");
    let mut t = HashMap::new();
    t.insert("w".to_string(), Tensor::ones(3, DType::F32, &Device::Cpu)?);
    candle::safetensors::save(&t, &plain)?;
    let e = load_checkpoint(&plain, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("weights.safetensors") && e.contains("not a keel checkpoint"),
        "{e}"
    );
    let e = load_checkpoint(tmp.0.join("nope.safetensors"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cannot read checkpoint") && e.contains("nope.safetensors"),
        "{e}"
    );
    Ok(())
}

#[test]
fn a_failed_save_leaves_the_previous_checkpoint_intact() -> anyhow::Result<()> {
    let tmp = TempDir::new("failedsave");
    let mut mgr = CheckpointManager::new(&tmp.0, 1)?;
    let p1 = mgr.save(&small(1)?, Some(0.3))?;
    let before = std::fs::read(&p1)?;
    // Make the rename fail at the very end: the target name is a non-empty directory.
    let blocker = tmp.0.join("ckpt-00000002.safetensors");
    std::fs::create_dir(&blocker)?;
    std::fs::write(blocker.join("keep"), b"x")?;
    let e = mgr.save(&small(2)?, Some(0.9)).unwrap_err().to_string();
    assert!(e.contains("ckpt-00000002.safetensors"), "{e}");
    // keep_last is 1, yet the previous checkpoint is untouched, no temp file is left, and the
    // manager's view did not change.
    assert_eq!(std::fs::read(&p1)?, before);
    assert_eq!(load_checkpoint(&p1, &Device::Cpu)?.step, 1);
    assert_eq!(
        names(&tmp.0),
        vec!["ckpt-00000001.safetensors", "ckpt-00000002.safetensors"]
    );
    assert_eq!(mgr.latest()?, Some(p1.clone()));
    assert_eq!(mgr.best(), Some(p1.clone()));

    // An unsupported dtype fails before anything is written.
    let mut c = small(3)?;
    c.tensors.insert(
        "f8".into(),
        Tensor::ones(2, DType::F32, &Device::Cpu)?.to_dtype(DType::F8E4M3)?,
    );
    let e = mgr.save(&c, None).unwrap_err().to_string();
    assert!(e.contains("`f8`") && e.contains("F8E4M3"), "{e}");
    assert_eq!(std::fs::read(&p1)?, before);
    Ok(())
}

#[test]
fn unusable_directories_are_clear_errors() -> anyhow::Result<()> {
    let tmp = TempDir::new("baddir");
    let file = tmp.0.join("a-file");
    std::fs::write(&file, b"x")?;
    let e = CheckpointManager::new(&file, 2).unwrap_err().to_string();
    assert!(e.contains("a-file") && e.contains("not a directory"), "{e}");
    let e = CheckpointManager::new(file.join("sub"), 2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot create checkpoint directory"), "{e}");
    let e = CheckpointManager::new(&tmp.0, 0).unwrap_err().to_string();
    assert!(e.contains("keep_last"), "{e}");
    // Created when missing.
    let nested = tmp.0.join("runs/exp1/ckpt");
    CheckpointManager::new(&nested, 2)?;
    assert!(nested.is_dir());
    Ok(())
}

#[test]
fn latest_ignores_temp_and_foreign_files() -> anyhow::Result<()> {
    let tmp = TempDir::new("latest");
    let mut mgr = CheckpointManager::new(&tmp.0, 5)?;
    assert_eq!(mgr.latest()?, None);
    let p4 = mgr.save(&small(4)?, None)?;
    let bytes = std::fs::read(&p4)?;
    // A complete but un-renamed temp file of a later step (killed between fsync and rename),
    // a later file with another suffix, a garbage file with a checkpoint name, and a valid
    // checkpoint renamed to another step.
    let stale_tmp = tmp.0.join(".ckpt-00000009.safetensors.tmp-4242");
    std::fs::write(&stale_tmp, &bytes)?;
    std::fs::write(tmp.0.join("ckpt-00000010.safetensors.partial"), &bytes)?;
    std::fs::write(tmp.0.join("ckpt-00000011.safetensors"), b"garbage")?;
    std::fs::write(tmp.0.join("ckpt-00000012.safetensors"), &bytes)?;
    assert_eq!(mgr.latest()?, Some(p4.clone()));
    // A new manager cleans the stale temp file up and leaves the rest alone.
    let again = CheckpointManager::new(&tmp.0, 5)?;
    assert!(!stale_tmp.exists());
    assert!(tmp.0.join("ckpt-00000011.safetensors").exists());
    assert_eq!(again.latest()?, Some(p4));
    Ok(())
}

#[test]
fn prefixed_helpers() -> anyhow::Result<()> {
    let mut c = Checkpoint::new(0);
    let t = Tensor::zeros(1, DType::F32, &Device::Cpu)?;
    c.extend_prefixed(
        "model.",
        [("a".to_string(), t.clone()), ("b".to_string(), t.clone())],
    );
    c.extend_prefixed("optim.", [("a".to_string(), t)]);
    let mut model: Vec<String> = c.prefixed("model.").into_keys().collect();
    model.sort();
    assert_eq!(model, vec!["a", "b"]);
    assert_eq!(c.prefixed("optim.").len(), 1);
    Ok(())
}

#[test]
fn a_monitor_in_the_meta_survives_save_and_load_exactly() -> anyhow::Result<()> {
    use keel_train::{MonitorConfig, StabilityMonitor, StepRecord};
    let tmp = TempDir::new("monitor-meta");
    let mut mon = StabilityMonitor::new(MonitorConfig::default());
    for step in 0..300 {
        let x = (step as f64 * 0.7311).sin();
        mon.record_step(&StepRecord {
            step,
            loss: 1.0 / (1.0 + step as f64) + 0.01 * x,
            grad_norm: Some(1.0 + x / 3.0),
            loss_scale: Some(65536.0 / (1 + step / 50) as f64),
            skipped: step % 97 == 0,
        });
    }
    let mut c = small(300)?;
    c.meta = serde_json::json!({ "monitor": mon });
    let mut mgr = CheckpointManager::new(&tmp.0, 1)?;
    let back = load_checkpoint(mgr.save(&c, None)?, &Device::Cpu)?;
    let restored: StabilityMonitor = serde_json::from_value(back.meta["monitor"].clone())?;
    assert_eq!(restored, mon);
    Ok(())
}

/// Flips one byte of the tensor data (past the header), so only the checksum can tell.
fn flip_data_byte(path: &Path) -> anyhow::Result<()> {
    let mut b = std::fs::read(path)?;
    let last = b.len() - 1;
    b[last] ^= 0x40;
    std::fs::write(path, b)?;
    Ok(())
}

#[test]
fn a_checksum_mismatch_in_the_newest_falls_back_to_the_previous_with_the_reason(
) -> anyhow::Result<()> {
    let tmp = TempDir::new("checksum-fallback");
    let mut mgr = CheckpointManager::new(&tmp.0, 5)?;
    let p1 = mgr.save(&small(10)?, None)?;
    let p2 = mgr.save(&small(20)?, None)?;
    let p3 = mgr.save(&small(30)?, None)?;
    flip_data_byte(&p3)?;
    std::fs::write(&p2, b"torn")?;
    let r = load_latest_checkpoint(&tmp.0, &Device::Cpu)?.expect("a checkpoint");
    assert_eq!((r.checkpoint.step, &r.path), (10, &p1));
    assert_eq!(r.skipped, vec![p3.clone(), p2]);
    assert!(
        r.skip_reasons[0].contains("checksum mismatch"),
        "{:?}",
        r.skip_reasons
    );
    assert!(
        r.skip_reasons[1].contains("truncated"),
        "{:?}",
        r.skip_reasons
    );
    // The manager's method is the same search.
    assert_eq!(mgr.load_latest(&Device::Cpu)?.unwrap().path, p1);
    // With no valid checkpoint left, the error names the newest and its fault.
    flip_data_byte(&p1)?;
    let e = mgr.load_latest(&Device::Cpu).unwrap_err().to_string();
    assert!(
        e.contains("ckpt-00000030") && e.contains("checksum mismatch"),
        "{e}"
    );
    Ok(())
}

#[test]
fn an_unreadable_newest_checkpoint_is_an_error_not_skipped() -> anyhow::Result<()> {
    let tmp = TempDir::new("unreadable");
    let mut mgr = CheckpointManager::new(&tmp.0, 5)?;
    mgr.save(&small(10)?, None)?;
    // A read that fails for a reason other than the content: here a directory under a
    // checkpoint's name (EISDIR; permission denied takes the same path, but tests may run
    // as root, which reads anything).
    let blocker = tmp.0.join("ckpt-00000020.safetensors");
    std::fs::create_dir(&blocker)?;
    let e = load_latest_checkpoint(&tmp.0, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cannot read checkpoint") && e.contains("ckpt-00000020"),
        "{e}"
    );
    assert!(e.contains("move the file away"), "{e}");
    std::fs::remove_dir(&blocker)?;
    assert_eq!(mgr.load_latest(&Device::Cpu)?.unwrap().checkpoint.step, 10);
    Ok(())
}

#[test]
fn stale_temp_files_of_keel_and_of_safetensors_are_removed_on_open() -> anyhow::Result<()> {
    let tmp = TempDir::new("stale-temps");
    let mut mgr = CheckpointManager::new(&tmp.0, 5)?;
    let p = mgr.save(&small(1)?, None)?;
    drop(mgr);
    // keel's write_atomic temp (`.{name}.tmp-{pid}`) and the `tempfile` crate's, which
    // safetensors::serialize_to_file and candle::safetensors::save write before renaming
    // (`.tmp` + 6 alphanumerics); and look-alikes that are not temp files.
    let stale = [
        ".ckpt-00000002.safetensors.tmp-31337",
        ".tmpAb12Zx",
        ".tmp0000aa",
    ];
    let kept = [".tmp-notes", ".tmpTooLong1", "my.tmp-1", ".x.tmp-12a"];
    for n in stale.iter().chain(&kept) {
        std::fs::write(tmp.0.join(n), b"partial")?;
    }
    // A look-up only reads: nothing is removed.
    load_latest_checkpoint(&tmp.0, &Device::Cpu)?;
    assert!(tmp.0.join(stale[1]).exists());
    let removed = keel_train::remove_stale_temps(&tmp.0)?;
    assert_eq!(removed.len(), 3, "{removed:?}");
    for n in stale {
        std::fs::write(tmp.0.join(n), b"partial")?;
    }
    CheckpointManager::new(&tmp.0, 5)?;
    let mut want: Vec<String> = kept.iter().map(|s| s.to_string()).collect();
    want.push("ckpt-00000001.safetensors".into());
    want.sort();
    assert_eq!(tmp.names(), want);
    assert!(p.exists());
    Ok(())
}

#[test]
fn a_run_lock_refuses_a_second_holder_and_takes_over_a_dead_ones() -> anyhow::Result<()> {
    let tmp = TempDir::new("lock");
    let lock = RunLock::acquire(&tmp.0)?;
    assert_eq!(lock.taken_over(), None);
    let file = tmp.0.join(keel_train::LOCK_FILE);
    assert_eq!(
        std::fs::read_to_string(&file)?.trim(),
        std::process::id().to_string()
    );
    let e = RunLock::acquire(&tmp.0).unwrap_err().to_string();
    assert!(
        e.contains(&format!("in use by process {}", std::process::id())) && e.contains("keel.lock"),
        "{e}"
    );
    drop(lock);
    assert!(!file.exists(), "the lock file outlived its guard");

    // A lock left by a process that has exited (and been reaped) is taken over.
    let mut child = std::process::Command::new("true").spawn()?;
    let dead = child.id();
    child.wait()?;
    std::fs::write(&file, format!("{dead}\n"))?;
    let lock = RunLock::acquire(&tmp.0)?;
    assert_eq!(lock.taken_over(), Some(dead));
    drop(lock);
    // So is one without a readable pid (torn by a crash while it was written).
    std::fs::write(&file, "")?;
    assert_eq!(RunLock::acquire(&tmp.0)?.taken_over(), Some(0));
    // A directory that does not exist is a clear error.
    let e = RunLock::acquire(tmp.0.join("missing"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot create lock"), "{e}");
    Ok(())
}
