//! How many loader threads a run uses: `--workers auto` (the default) or a number.
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::Source;

/// The number of [`crate::Loader`] threads: [`Workers::Auto`] or a fixed count (>= 1).
///
/// `Auto` resolves ([`Workers::resolve`]) by what loading a sample costs and where the
/// step runs, so that the loader never takes a core the step needs:
/// - a set held in memory ([`Source::in_memory`], e.g. the synthetic [`crate::Shapes`],
///   rendered once up front): **1** thread; a batch is a copy and a flip, far below a step;
/// - a set decoded from disk (VOC, COCO) with the step on the CPU: **a quarter of the cores**
///   (at least 1): the step's GEMMs and kernels use rayon's pool of one thread per core, and
///   decoding threads beyond that only preempt it;
/// - a set decoded from disk with the step on a GPU: **all cores but one, at most 8**: the
///   CPU has nothing else to do but feed the device (one core stays for the launch thread).
///
/// Serialized as `"auto"` or the number (run configs saved before `auto` existed hold a
/// number and read back as [`Workers::Threads`]).
///
/// ```
/// use keel_data::Workers;
/// let auto: Workers = "auto".parse()?;
/// assert_eq!(auto, Workers::Auto);
/// assert_eq!("3".parse::<Workers>()?, Workers::Threads(3));
/// assert!("0".parse::<Workers>().unwrap_err().contains("at least 1"));
/// let s = keel_data::Shapes::generate(2, 32, 0);
/// assert_eq!(auto.resolve(&s, true), 1); // in memory: one thread
/// assert_eq!(Workers::Threads(3).resolve(&s, true), 3);
/// # Ok::<(), String>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Workers {
    /// Chosen from the data and the device (see the type's docs).
    #[default]
    Auto,
    /// This many threads (at least 1).
    Threads(usize),
}

impl Workers {
    /// The thread count for loading `source` with the step on the CPU (`cpu_step`) or a GPU.
    pub fn resolve(self, source: &dyn Source, cpu_step: bool) -> usize {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        self.resolve_for(source.in_memory(), cpu_step, cores)
    }

    /// [`Workers::resolve`] for a set that is (`in_memory`) or is not held in memory, on a
    /// machine of `cores` cores.
    pub fn resolve_for(self, in_memory: bool, cpu_step: bool, cores: usize) -> usize {
        match self {
            Workers::Threads(n) => n.max(1),
            Workers::Auto if in_memory => 1,
            Workers::Auto if cpu_step => (cores / 4).max(1),
            Workers::Auto => cores.saturating_sub(1).clamp(1, 8),
        }
    }
}

impl fmt::Display for Workers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Workers::Auto => f.write_str("auto"),
            Workers::Threads(n) => write!(f, "{n}"),
        }
    }
}

/// Parses `auto` or a count >= 1; the error (a message for a command line) names the value
/// and the fix.
impl FromStr for Workers {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("auto") {
            return Ok(Workers::Auto);
        }
        match s.parse::<usize>() {
            Ok(n) if n >= 1 => Ok(Workers::Threads(n)),
            _ => Err(format!(
                "workers: `{s}` is not `auto` or a thread count of at least 1; pass e.g. \
                 --workers auto or --workers 2"
            )),
        }
    }
}

impl Serialize for Workers {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Workers::Auto => s.serialize_str("auto"),
            Workers::Threads(n) => s.serialize_u64(*n as u64),
        }
    }
}

impl<'de> Deserialize<'de> for Workers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Count(n) if n >= 1 => Ok(Workers::Threads(n as usize)),
            Raw::Count(n) => Err(serde::de::Error::custom(format!(
                "workers: {n} is not a thread count of at least 1"
            ))),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Workers;

    #[test]
    fn auto_follows_the_data_and_the_device() {
        let a = Workers::Auto;
        // In memory: one thread whatever the machine.
        assert_eq!(a.resolve_for(true, true, 64), 1);
        assert_eq!(a.resolve_for(true, false, 64), 1);
        // Decoded, CPU step: a quarter of the cores, at least one.
        assert_eq!(a.resolve_for(false, true, 2), 1);
        assert_eq!(a.resolve_for(false, true, 16), 4);
        // Decoded, GPU step: all cores but one, 1..=8.
        assert_eq!(a.resolve_for(false, false, 1), 1);
        assert_eq!(a.resolve_for(false, false, 4), 3);
        assert_eq!(a.resolve_for(false, false, 32), 8);
        assert_eq!(Workers::Threads(5).resolve_for(true, true, 2), 5);
    }

    #[test]
    fn serde_round_trips_and_reads_old_numbers() {
        for w in [Workers::Auto, Workers::Threads(1), Workers::Threads(6)] {
            let j = serde_json::to_string(&w).unwrap();
            assert_eq!(serde_json::from_str::<Workers>(&j).unwrap(), w, "{j}");
        }
        assert_eq!(serde_json::to_string(&Workers::Auto).unwrap(), "\"auto\"");
        assert_eq!(
            serde_json::from_str::<Workers>("2").unwrap(),
            Workers::Threads(2)
        );
        for bad in ["0", "\"none\"", "-1", "1.5"] {
            assert!(serde_json::from_str::<Workers>(bad).is_err(), "{bad}");
        }
    }
}
