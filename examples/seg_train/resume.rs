//! What `--resume DIR` / `--resume-from FILE` continue from: the checkpoint (the newest that
//! verifies, or the named file), the run's config (its `config.json`, checked against the
//! config stored in the checkpoint, or recovered from the checkpoint when missing), and the
//! command-line flags checked against that config (only `--steps` may change).
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle::Device;
use clap::parser::ValueSource;
use clap::ArgMatches;
use keel::train::FieldChange;
use keel::train::{changed_fields, load_latest_checkpoint, Resume};

use super::cli::{read_config, RunConfig, TrainArgs};
use super::model::BackboneChoice;

/// Flags that drive a run without being part of its config, so `--resume` takes them.
const NOT_CONFIG: [&str; 8] = [
    "resume",
    "resume_from",
    "quiet",
    "device",
    "deterministic",
    "tf32",
    "step_delay_ms",
    "out",
];

/// The run directory to resume: `--resume DIR`, or the run that `--resume-from FILE`'s
/// `checkpoints/` folder belongs to; `None` for a fresh run.
pub fn resume_dir(t: &TrainArgs) -> anyhow::Result<Option<PathBuf>> {
    match (&t.resume, &t.resume_from) {
        (Some(dir), _) => Ok(Some(dir.clone())),
        (None, Some(file)) => {
            let run = file
                .parent()
                .filter(|p| p.file_name().is_some_and(|n| n == "checkpoints"))
                .and_then(Path::parent);
            match run {
                Some(run) => Ok(Some(run.to_path_buf())),
                None => bail!(
                    "--resume-from {}: the file is not in a run's checkpoints/ folder; name the \
                     run too: --resume DIR --resume-from {}",
                    file.display(),
                    file.display()
                ),
            }
        }
        (None, None) => Ok(None),
    }
}

/// The config a resumed run continues with and the checkpoint it starts from, every check
/// done before anything is built or written: `matches` tells which flags the user gave.
pub fn resume_plan(
    t: &TrainArgs,
    dir: &Path,
    matches: &ArgMatches,
    device: &Device,
) -> anyhow::Result<(RunConfig, Resume)> {
    let shown = dir.display();
    let found = find_checkpoint(t, dir, device)?;
    let stored: RunConfig = serde_json::from_value(found.checkpoint.meta["user"]["config"].clone())
        .with_context(|| {
            format!(
                "--resume {shown}: {} holds no seg_train config in its meta (not a seg_train \
                 checkpoint?)",
                found.path.display()
            )
        })?;
    let config_path = dir.join("config.json");
    let mut cfg = if config_path.exists() {
        let file = read_config(&config_path).with_context(|| format!("--resume {shown}"))?;
        check_config_file(&file, &stored, &found.path)
            .with_context(|| format!("--resume {shown}"))?;
        file
    } else {
        eprintln!(
            "warning: --resume {shown}: no config.json; recovered the run's config from {}",
            found.path.display()
        );
        stored
    };
    let differ = flags_that_differ(t, dir, matches, &cfg)?;
    if !differ.is_empty() {
        bail!(
            "--resume {shown}: {} differ{} from the run's config; a resumed run keeps its \
             settings (only --steps may change, to extend it): drop {}, or start a new run \
             with another --out",
            differ.join(", "),
            if differ.len() == 1 { "s" } else { "" },
            if differ.len() == 1 { "it" } else { "them" }
        )
    }
    let at = found.checkpoint.step;
    if matches.value_source("steps") == Some(ValueSource::CommandLine) && t.steps != cfg.steps {
        if t.steps <= at {
            bail!(
                "--resume {shown} --steps {}: the checkpoint is at step {at}; pass a larger \
                 --steps to continue",
                t.steps
            )
        }
        cfg.steps = t.steps;
    }
    if at >= cfg.steps {
        bail!(
            "--resume {shown}: the run already finished its {} steps ({} is at step {at}); \
             extend it with --steps N (N > {at})",
            cfg.steps,
            found.path.display()
        )
    }
    Ok((cfg, found))
}

/// The named checkpoint, or the newest that verifies (warning about the newer ones skipped).
fn find_checkpoint(t: &TrainArgs, dir: &Path, device: &Device) -> anyhow::Result<Resume> {
    let shown = dir.display();
    if let Some(file) = &t.resume_from {
        return Resume::from_file(file, device)
            .with_context(|| format!("--resume-from {}", file.display()));
    }
    let ckpts = dir.join("checkpoints");
    let found = load_latest_checkpoint(&ckpts, device)
        .with_context(|| format!("--resume {shown}"))?
        .with_context(|| format!("--resume {shown}: no checkpoint in {}", ckpts.display()))?;
    for (bad, why) in found.skipped.iter().zip(&found.skip_reasons) {
        eprintln!(
            "warning: skipping {} ({why}); resuming from {}",
            bad.display(),
            found.path.display()
        );
    }
    Ok(found)
}

/// `config.json` must be the config the checkpoint was trained with; only a larger `steps`
/// (an extension whose first checkpoint was not written yet) may differ.
fn check_config_file(file: &RunConfig, stored: &RunConfig, ckpt: &Path) -> anyhow::Result<()> {
    let differ: Vec<String> = changed_either(file, stored)?
        .into_iter()
        .filter(|c| !(c.key == "steps" && file.steps > stored.steps))
        .map(|c| {
            let (key, a, b) = (c.key, FieldChange::show(&c.a), FieldChange::show(&c.b));
            format!("{key} (config.json {a}, checkpoint {b})")
        })
        .collect();
    if !differ.is_empty() {
        bail!(
            "config.json differs from the config stored in {} in: {}; the checkpoint is what \
             the run trained with: restore config.json (or delete it, and it is recovered from \
             the checkpoint)",
            ckpt.display(),
            differ.join(", ")
        )
    }
    Ok(())
}

/// The flags the user gave whose value differs from `cfg` (`--steps` aside), as
/// `--flag value (the run has value)`.
fn flags_that_differ(
    t: &TrainArgs,
    dir: &Path,
    matches: &ArgMatches,
    cfg: &RunConfig,
) -> anyhow::Result<Vec<String>> {
    let given = RunConfig {
        init: t.init.clone(),
        ..t.common.config(t.norm, t.batch_size, t.steps, t.seed)
    }
    .with_backbone_defaults();
    let explicit = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
    let mut differ = Vec::new();
    if explicit("out") && t.out != dir {
        differ.push(format!(
            "--out {} (the run is in {})",
            t.out.display(),
            dir.display()
        ));
    }
    // Sorted by name; a config field that is no flag of this command is not checked.
    let ids: Vec<&str> = matches.ids().map(|id| id.as_str()).collect();
    for c in changed_either(&given, cfg)? {
        let id = c.key.as_str();
        if NOT_CONFIG.contains(&id) || id == "steps" || !ids.contains(&id) || !explicit(id) {
            continue;
        }
        let flag = c.key.replace('_', "-");
        differ.push(format!(
            "--{flag} {} (the run has {})",
            FieldChange::show(&c.a),
            FieldChange::show(&c.b)
        ));
    }
    Ok(differ)
}

/// The fields that differ between `a` and `b`, including those only `b` serializes (a
/// twin's config leaves the backbone flags out, a ResNet run's lists them), by key. A field
/// one side leaves out reads as its default (`backbone`: twin; the others: none).
fn changed_either(a: &RunConfig, b: &RunConfig) -> anyhow::Result<Vec<FieldChange>> {
    let absent = |key: &str, v: serde_json::Value| match (key, v) {
        ("backbone", serde_json::Value::Null) => {
            serde_json::to_value(BackboneChoice::default()).unwrap_or_default()
        }
        (_, v) => v,
    };
    let mut changes = changed_fields(a, b)?;
    for c in changed_fields(b, a)? {
        if !changes.iter().any(|x| x.key == c.key) {
            changes.push(FieldChange {
                a: c.b,
                b: c.a,
                key: c.key,
            });
        }
    }
    for c in &mut changes {
        c.a = absent(&c.key, std::mem::take(&mut c.a));
        c.b = absent(&c.key, std::mem::take(&mut c.b));
    }
    changes.retain(|c| c.a != c.b);
    changes.sort_by(|x, y| x.key.cmp(&y.key));
    Ok(changes)
}
