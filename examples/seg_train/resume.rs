//! What `--resume DIR` / `--resume-from FILE` continue from: keel::train::cli's
//! [`plan_resume`] (the checkpoint, the run's config checked against it, the flags checked
//! against the config; only `--steps` may change) with seg_train's flags.
use std::path::Path;

use candle::Device;
use clap::ArgMatches;
use keel::train::cli::{plan_resume, ResumeRequest};
use keel::train::Resume;

use super::cli::{RunConfig, TrainArgs};

/// seg_train's flags that drive a run without being part of its config, so `--resume`
/// takes them (keel::train::cli's own, `--device` and the like, are never compared).
const NOT_CONFIG: [&str; 2] = ["quiet", "step_delay_ms"];

/// The config a resumed run continues with and the checkpoint it starts from, every check
/// done before anything is built or written: `matches` tells which flags the user gave.
pub fn resume_plan(
    t: &TrainArgs,
    dir: &Path,
    matches: &ArgMatches,
    device: &Device,
) -> anyhow::Result<(RunConfig, Resume)> {
    let given = RunConfig {
        init: t.init.clone(),
        ..t.common.config(t.norm, t.batch_size, t.steps, t.seed)
    }
    .with_backbone_defaults();
    let req = ResumeRequest {
        tool: "seg_train",
        dir,
        args: &t.resume,
        given,
        out: &t.out,
        matches,
        not_config: &NOT_CONFIG,
    };
    let plan = plan_resume(req, device, |w| eprintln!("warning: {w}"))?;
    Ok((plan.config, plan.found))
}
