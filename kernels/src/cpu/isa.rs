//! Which instruction set keel's CPU kernels run: detection at run time, the `KEEL_CPU_ISA`
//! environment variable (read once), and the process-wide override [`set_cpu_isa`].
//!
//! The kernels of [`super::Kernel`] are compiled once per [`CpuIsa`] (see
//! [`super::dispatch`]). Each op call asks [`Isa::current`] which one to run:
//! 1. the level passed to [`set_cpu_isa`], if any;
//! 2. else `KEEL_CPU_ISA` (`base`, `avx2` or `avx512`, any case; empty counts as unset), read
//!    the first time any op asks; a value that is not one of those, or a level this CPU lacks,
//!    makes every op that reads it fail with a message naming the variable, the value and
//!    what the CPU has (never a silent fallback);
//! 3. else the best level the CPU supports ([`CpuIsa::best`]).
//!
//! All levels compute the same arithmetic in the same order (no fused multiply-adds are
//! introduced, reductions keep their lanes), so they give bit-identical results; the levels
//! differ only in speed.

use candle::{bail, Result};
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// The environment variable that caps the instruction set of keel's CPU kernels.
pub const CPU_ISA_ENV: &str = "KEEL_CPU_ISA";

/// An instruction-set level that keel's CPU kernels (GroupNorm(+SiLU) forward and backward)
/// are compiled for. Convolutions are not affected: `gemm` picks its own kernels.
///
/// # Example
/// ```
/// use keel_kernels::CpuIsa;
/// let isa: CpuIsa = "avx2".parse()?;
/// assert_eq!(isa.to_string(), "avx2");
/// assert!(CpuIsa::Base.is_supported());
/// assert!(CpuIsa::best().is_supported() && CpuIsa::best() >= CpuIsa::Base);
/// # Ok::<(), candle::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CpuIsa {
    /// The compilation target's baseline (SSE2 on x86_64): runs on every CPU.
    Base,
    /// x86_64 with AVX2 and FMA: 8 `f32` lanes.
    Avx2,
    /// x86_64 with AVX-512 F, BW and VL (plus AVX2 and FMA): 16 `f32` lanes.
    Avx512,
}

impl CpuIsa {
    /// Every level, lowest first.
    pub const ALL: [CpuIsa; 3] = [CpuIsa::Base, CpuIsa::Avx2, CpuIsa::Avx512];

    /// The name `KEEL_CPU_ISA` and [`FromStr`] accept: `base`, `avx2` or `avx512`.
    pub fn name(self) -> &'static str {
        match self {
            CpuIsa::Base => "base",
            CpuIsa::Avx2 => "avx2",
            CpuIsa::Avx512 => "avx512",
        }
    }

    /// The CPU features this level needs (as `is_x86_feature_detected!` names them), all of
    /// which its `#[target_feature]` instantiation enables.
    pub fn features(self) -> &'static [&'static str] {
        match self {
            CpuIsa::Base => &[],
            CpuIsa::Avx2 => &["avx2", "fma"],
            CpuIsa::Avx512 => &["avx512f", "avx512bw", "avx512vl", "avx2", "fma"],
        }
    }

    /// Whether the running CPU supports this level (always true for [`CpuIsa::Base`],
    /// false for the x86 levels on other architectures).
    pub fn is_supported(self) -> bool {
        self.supported_by(&has_feature)
    }

    /// Whether a CPU with the features `has` supports this level.
    fn supported_by(self, has: Has<'_>) -> bool {
        self.features().iter().all(|f| has(f))
    }

    /// The best level the running CPU supports.
    pub fn best() -> CpuIsa {
        *Self::supported().last().unwrap_or(&CpuIsa::Base)
    }

    /// The levels the running CPU supports, lowest first (always starts with
    /// [`CpuIsa::Base`]).
    pub fn supported() -> Vec<CpuIsa> {
        Self::ALL.into_iter().filter(|i| i.is_supported()).collect()
    }
}

impl fmt::Display for CpuIsa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CpuIsa {
    type Err = candle::Error;

    /// `base`, `avx2` or `avx512`, in any case.
    fn from_str(s: &str) -> Result<Self> {
        match CpuIsa::ALL
            .into_iter()
            .find(|i| i.name().eq_ignore_ascii_case(s.trim()))
        {
            Some(i) => Ok(i),
            None => bail!("unknown CPU ISA {s:?}; expected base, avx2 or avx512"),
        }
    }
}

/// Which CPU features a CPU has, by the names of [`CpuIsa::features`].
type Has<'a> = &'a dyn Fn(&str) -> bool;

/// Whether the running CPU has the x86 feature `name` (one of [`CpuIsa::features`]).
fn has_feature(name: &str) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        match name {
            "avx2" => std::is_x86_feature_detected!("avx2"),
            "fma" => std::is_x86_feature_detected!("fma"),
            "avx512f" => std::is_x86_feature_detected!("avx512f"),
            "avx512bw" => std::is_x86_feature_detected!("avx512bw"),
            "avx512vl" => std::is_x86_feature_detected!("avx512vl"),
            _ => false,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = name;
        false
    }
}

/// `KEEL_CPU_ISA` as read: unset (or empty), a known level (with the value as the user wrote
/// it, for errors), or a value that is not one.
#[derive(Clone, Debug, PartialEq, Eq)]
enum EnvSetting {
    Unset,
    Level(CpuIsa, String),
    Unknown(String),
}

impl EnvSetting {
    fn parse(value: Option<&std::ffi::OsStr>) -> Self {
        let Some(v) = value else {
            return EnvSetting::Unset;
        };
        match v.to_str() {
            Some(s) if s.trim().is_empty() => EnvSetting::Unset,
            Some(s) => match s.parse() {
                Ok(i) => EnvSetting::Level(i, s.to_string()),
                Err(_) => EnvSetting::Unknown(s.to_string()),
            },
            None => EnvSetting::Unknown(v.to_string_lossy().into_owned()),
        }
    }

    /// The variable, read the first time any op asks and kept for the process.
    fn get() -> &'static EnvSetting {
        static ENV: OnceLock<EnvSetting> = OnceLock::new();
        ENV.get_or_init(|| EnvSetting::parse(std::env::var_os(CPU_ISA_ENV).as_deref()))
    }
}

/// What a CPU with the features `has` supports, for error messages:
/// `"this CPU supports base, avx2 (it lacks avx512f, avx512bw)"`, listing what it lacks of
/// `wanted`'s features.
fn describe_cpu(has: Has<'_>, wanted: CpuIsa) -> String {
    let levels: Vec<&str> = CpuIsa::ALL
        .into_iter()
        .filter(|&i| i.supported_by(has))
        .map(CpuIsa::name)
        .collect();
    let lacks: Vec<&str> = wanted
        .features()
        .iter()
        .copied()
        .filter(|f| !has(f))
        .collect();
    if lacks.is_empty() {
        format!("this CPU supports {}", levels.join(", "))
    } else {
        format!(
            "this CPU supports {} (it lacks {})",
            levels.join(", "),
            lacks.join(", ")
        )
    }
}

/// The level an op runs: the override, else the environment, else the best supported
/// (see the module docs). `has` says which features the CPU has (a parameter so tests can
/// pretend to be another CPU).
fn choose(op: &str, over: Option<CpuIsa>, env: &EnvSetting, has: Has<'_>) -> Result<CpuIsa> {
    if let Some(i) = over {
        return Ok(i);
    }
    match env {
        EnvSetting::Unset => Ok(*CpuIsa::ALL
            .iter()
            .rev()
            .find(|i| i.supported_by(has))
            .unwrap_or(&CpuIsa::Base)),
        EnvSetting::Level(i, _) if i.supported_by(has) => Ok(*i),
        EnvSetting::Level(i, raw) => bail!(
            "{op}: {CPU_ISA_ENV}={raw:?} asks for CPU kernels using {}, but {}; set {CPU_ISA_ENV} to one of those levels or unset it",
            i.features().join(", "),
            describe_cpu(has, *i)
        ),
        EnvSetting::Unknown(v) => bail!(
            "{op}: {CPU_ISA_ENV}={v:?} is not an instruction set keel knows; use base, avx2 or avx512 ({}), or unset it",
            describe_cpu(has, CpuIsa::Base)
        ),
    }
}

/// 0 = no override, else `1 + index in CpuIsa::ALL`.
static OVERRIDE: AtomicU8 = AtomicU8::new(0);

fn override_level() -> Option<CpuIsa> {
    match OVERRIDE.load(Ordering::Relaxed) {
        0 => None,
        i => CpuIsa::ALL.get(i as usize - 1).copied(),
    }
}

/// Makes keel's CPU kernels run `isa` in this whole process from the next op call on
/// (`Some`), overriding `KEEL_CPU_ISA` and detection, or goes back to them (`None`).
/// For benchmarks that compare levels in one run, and for programs that cap the level
/// themselves. Errors, changing nothing, when the CPU lacks `isa`.
///
/// # Example
/// ```
/// use keel_kernels::{cpu_isa, set_cpu_isa, CpuIsa};
/// set_cpu_isa(Some(CpuIsa::Base))?;
/// assert_eq!(cpu_isa()?, CpuIsa::Base);
/// set_cpu_isa(None)?; // back to KEEL_CPU_ISA or the best level
/// # Ok::<(), candle::Error>(())
/// ```
pub fn set_cpu_isa(isa: Option<CpuIsa>) -> Result<()> {
    let code = match isa {
        None => 0,
        Some(i) if i.is_supported() => 1 + i as u8,
        Some(i) => bail!(
            "set_cpu_isa: {i} needs {}, but {}; pick one of those levels",
            i.features().join(", "),
            describe_cpu(&has_feature, i)
        ),
    };
    OVERRIDE.store(code, Ordering::Relaxed);
    Ok(())
}

/// The instruction set keel's CPU kernels run now: [`set_cpu_isa`]'s level, else
/// `KEEL_CPU_ISA`'s, else [`CpuIsa::best`]. Errors exactly when the ops would: when
/// `KEEL_CPU_ISA` is not a known level or names one this CPU lacks (and no override is set).
pub fn cpu_isa() -> Result<CpuIsa> {
    Isa::current("cpu_isa").map(Isa::level)
}

/// A level the running CPU supports: the proof [`super::dispatch`] relies on to call a
/// `#[target_feature]` instantiation. Only this module constructs it, after checking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Isa(CpuIsa);

impl Isa {
    /// The level an op named `op` runs now (see [`cpu_isa`]); the error names `op`.
    pub(crate) fn current(op: &str) -> Result<Isa> {
        let level = choose(op, override_level(), EnvSetting::get(), &has_feature)?;
        match Isa::checked(level) {
            Some(isa) => Ok(isa),
            // Unreachable: `choose` returns only supported levels and the override is
            // checked when set; kept as an error rather than a panic.
            None => bail!("{op}: CPU ISA {level} chosen but not supported by this CPU"),
        }
    }

    /// The baseline level, which every CPU supports.
    #[cfg(test)]
    pub(crate) fn base() -> Isa {
        Isa(CpuIsa::Base)
    }

    /// `level` if the running CPU supports it.
    pub(crate) fn checked(level: CpuIsa) -> Option<Isa> {
        level.is_supported().then_some(Isa(level))
    }

    /// Every level the running CPU supports, lowest first.
    #[cfg(test)]
    pub(crate) fn supported() -> Vec<Isa> {
        CpuIsa::supported().into_iter().map(Isa).collect()
    }

    /// The level.
    pub(crate) fn level(self) -> CpuIsa {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn names_parse_and_print() {
        for i in CpuIsa::ALL {
            assert_eq!(i.name().parse::<CpuIsa>().ok(), Some(i));
            assert_eq!(i.name().to_uppercase().parse::<CpuIsa>().ok(), Some(i));
            assert_eq!(i.to_string(), i.name());
        }
        let err = "sse4".parse::<CpuIsa>().unwrap_err().to_string();
        assert!(
            err.contains("\"sse4\"") && err.contains("base, avx2 or avx512"),
            "{err}"
        );
        assert_eq!(EnvSetting::parse(None), EnvSetting::Unset);
        assert_eq!(EnvSetting::parse(Some(OsStr::new(" "))), EnvSetting::Unset);
        assert_eq!(
            EnvSetting::parse(Some(OsStr::new("AVX2"))),
            EnvSetting::Level(CpuIsa::Avx2, "AVX2".into())
        );
        assert_eq!(
            EnvSetting::parse(Some(OsStr::new("avx-512"))),
            EnvSetting::Unknown("avx-512".into())
        );
    }

    #[test]
    fn choose_follows_override_then_env_then_best() {
        let all = |_: &str| true;
        let avx2_box = |f: &str| f == "avx2" || f == "fma";
        let base_box = |_: &str| false;
        let level = |i: CpuIsa| EnvSetting::Level(i, i.to_string());
        let ok = |over, env: &EnvSetting, has: Has<'_>| choose("op", over, env, has).ok();
        assert_eq!(ok(None, &EnvSetting::Unset, &all), Some(CpuIsa::Avx512));
        assert_eq!(ok(None, &EnvSetting::Unset, &avx2_box), Some(CpuIsa::Avx2));
        assert_eq!(ok(None, &EnvSetting::Unset, &base_box), Some(CpuIsa::Base));
        assert_eq!(ok(None, &level(CpuIsa::Avx2), &all), Some(CpuIsa::Avx2));
        assert_eq!(ok(None, &level(CpuIsa::Base), &all), Some(CpuIsa::Base));
        assert_eq!(
            ok(Some(CpuIsa::Base), &level(CpuIsa::Avx2), &all),
            Some(CpuIsa::Base)
        );
        // The override wins over a bad variable.
        let bad = EnvSetting::Unknown("sse9".into());
        assert_eq!(ok(Some(CpuIsa::Avx2), &bad, &all), Some(CpuIsa::Avx2));
    }

    #[test]
    fn bad_environment_is_an_error_naming_variable_value_and_cpu() {
        let avx2_box = |f: &str| f == "avx2" || f == "fma";
        let e = choose(
            "group_norm",
            None,
            &EnvSetting::Level(CpuIsa::Avx512, "AVX512".into()),
            &avx2_box,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("group_norm: KEEL_CPU_ISA=\"AVX512\" asks")
                && e.contains("avx512f, avx512bw, avx512vl, avx2, fma")
                && e.contains(
                    "this CPU supports base, avx2 (it lacks avx512f, avx512bw, avx512vl)"
                )
                && e.contains("unset it"),
            "{e}"
        );
        let bad = EnvSetting::Unknown("sse9".into());
        let e = choose("group_norm_silu", None, &bad, &avx2_box)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("group_norm_silu: KEEL_CPU_ISA=\"sse9\"")
                && e.contains("base, avx2 or avx512")
                && e.contains("this CPU supports base, avx2"),
            "{e}"
        );
    }

    /// Detection agrees with the CPU's own feature flags, so an AVX-512 machine tests (and
    /// benchmarks) the AVX-512 path and every machine the levels below it.
    #[test]
    fn supported_levels_match_the_cpu() {
        let s = CpuIsa::supported();
        println!("CPU ISA levels supported here: {s:?}");
        assert_eq!(s.first(), Some(&CpuIsa::Base));
        #[cfg(target_arch = "x86_64")]
        {
            use std::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma");
            let avx512 = avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vl");
            assert_eq!(s.contains(&CpuIsa::Avx2), avx2);
            assert_eq!(s.contains(&CpuIsa::Avx512), avx512);
        }
        #[cfg(not(target_arch = "x86_64"))]
        assert_eq!(s, vec![CpuIsa::Base]);
        assert_eq!(Isa::supported().len(), s.len());
        assert_eq!(CpuIsa::best(), *s.last().unwrap_or(&CpuIsa::Base));
    }
}
