//! How a cuDNN convolution algorithm is chosen, kept apart from the cuDNN calls so that the
//! policy is plain Rust and tested on every machine (the CUDA code in `crate::cuda::conv`
//! feeds it cuDNN's ranked list and runs the launches).
//!
//! - **Ranked list**: cuDNN's heuristics (`cudnnGetConvolution*Algorithm_v7`) rank every
//!   algorithm for a geometry; entries whose status is not success are dropped by the
//!   caller. A few fixed algorithms with small workspaces follow the list as a last resort.
//! - **Eligible**: an entry is used only if its workspace fits the cap, it is deterministic
//!   when [`crate::set_conv_deterministic`] is on, and its math type is FMA when an f32
//!   convolution must not use TF32 (the entry's own math type is set on the descriptor
//!   before it runs, as cuDNN requires).
//! - **Fallback**: the eligible entries are tried in rank order; one that fails at launch
//!   (cuDNN error, workspace allocation failure) is skipped for the next, and the first that
//!   runs is what the caller caches. A cached algorithm that fails later is evicted and the
//!   list is walked again without it.

use candle::{bail, Result};

/// cuDNN's math types (`cudnnMathType_t`), as keel needs to tell them apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Math {
    /// `CUDNN_DEFAULT_MATH`: tensor cores permitted (TF32 for f32 on Ampere and later).
    Default,
    /// `CUDNN_TENSOR_OP_MATH`.
    TensorOp,
    /// `CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION`.
    TensorOpConversion,
    /// `CUDNN_FMA_MATH`: FMA instructions only (true f32).
    Fma,
}

/// One algorithm of one direction, as cuDNN ranked it (or a fixed fallback); `A` is the
/// algorithm enum (cuDNN's per direction; plain numbers in the tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Candidate<A> {
    /// The algorithm.
    pub(crate) algo: A,
    /// Workspace bytes it needs.
    pub(crate) workspace: usize,
    /// Whether it gives bitwise identical results from run to run (no atomics).
    pub(crate) deterministic: bool,
    /// The math type to set on the convolution descriptor for it.
    pub(crate) math: Math,
}

/// What a usable algorithm must satisfy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Needs {
    /// The most workspace bytes one call may take.
    pub(crate) workspace_cap: usize,
    /// Deterministic algorithms only ([`crate::set_conv_deterministic`]).
    pub(crate) deterministic: bool,
    /// FMA math only: an f32 convolution with TF32 off ([`crate::set_conv_tf32`]).
    pub(crate) fma_only: bool,
}

impl Needs {
    /// Why `c` is not usable, or `None` when it is.
    fn rejects<A>(&self, c: &Candidate<A>) -> Option<&'static str> {
        if c.workspace > self.workspace_cap {
            Some("workspace over the cap")
        } else if self.deterministic && !c.deterministic {
            Some("not deterministic")
        } else if self.fma_only && c.math != Math::Fma {
            Some("tensor-core math while f32 must stay FMA (TF32 off)")
        } else {
            None
        }
    }
}

/// The usable entries of `ranked`, in rank order, without duplicates and without `failed`.
pub(crate) fn eligible<A: Copy + PartialEq>(
    ranked: &[Candidate<A>],
    needs: &Needs,
    failed: &[Candidate<A>],
) -> Vec<Candidate<A>> {
    let mut out: Vec<Candidate<A>> = Vec::new();
    for c in ranked {
        let seen = out
            .iter()
            .chain(failed)
            .any(|o| o.algo == c.algo && o.math == c.math);
        if !seen && needs.rejects(c).is_none() {
            out.push(*c);
        }
    }
    out
}

/// The algorithms that failed at launch, in order, with their errors.
pub(crate) type Failures<A> = Vec<(Candidate<A>, String)>;

/// Runs `launch` on a cached algorithm or on cuDNN's ranked list, falling back on failure.
///
/// `cached` is tried first when it is still eligible; if it fails it is dropped and
/// `ranked()` is consulted. Returns the algorithm that ran (the caller caches it; it
/// differs from `cached` when that one was evicted) and the failures on the way, in order.
/// Fails, naming `what`, every failure and every rejection, when nothing runs.
pub(crate) fn run<A, F>(
    what: &str,
    cached: Option<Candidate<A>>,
    ranked: impl FnOnce() -> Result<Vec<Candidate<A>>>,
    needs: &Needs,
    mut launch: F,
) -> Result<(Candidate<A>, Failures<A>)>
where
    A: Copy + PartialEq + std::fmt::Debug,
    F: FnMut(&Candidate<A>) -> Result<()>,
{
    let mut failures: Failures<A> = Vec::new();
    if let Some(c) = cached.filter(|c| needs.rejects(c).is_none()) {
        match launch(&c) {
            Ok(()) => return Ok((c, failures)),
            Err(e) => failures.push((c, e.to_string())),
        }
    }
    let ranked = ranked()?;
    let failed: Vec<Candidate<A>> = failures.iter().map(|(c, _)| *c).collect();
    for c in eligible(&ranked, needs, &failed) {
        match launch(&c) {
            Ok(()) => return Ok((c, failures)),
            Err(e) => failures.push((c, e.to_string())),
        }
    }
    let rejected: Vec<String> = ranked
        .iter()
        .filter_map(|c| {
            needs
                .rejects(c)
                .map(|why| format!("algo {:?} ({why})", c.algo))
        })
        .collect();
    let failed: Vec<String> = failures
        .iter()
        .map(|(c, e)| format!("algo {:?} failed: {e}", c.algo))
        .collect();
    bail!(
        "{what}: no cuDNN algorithm ran (of {} ranked; rejected: [{}]; failed: [{}]); \
         if `set_conv_deterministic(true)` is on, turn it off, or lower the batch size if \
         the failures are out-of-memory",
        ranked.len(),
        rejected.join(", "),
        failed.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    const NEEDS: Needs = Needs {
        workspace_cap: 1000,
        deterministic: false,
        fma_only: false,
    };

    fn c(algo: u32, workspace: usize, deterministic: bool, math: Math) -> Candidate<u32> {
        Candidate {
            algo,
            workspace,
            deterministic,
            math,
        }
    }

    fn ranked() -> Vec<Candidate<u32>> {
        vec![
            c(7, 5000, true, Math::TensorOp), // best, but over the workspace cap
            c(1, 100, false, Math::TensorOp), // atomics
            c(1, 100, false, Math::TensorOp), // duplicate entry
            c(0, 10, true, Math::Fma),
            c(2, 0, true, Math::TensorOp),
        ]
    }

    #[test]
    fn eligible_keeps_rank_order_and_applies_every_need() {
        let algos = |v: Vec<Candidate<u32>>| v.iter().map(|c| c.algo).collect::<Vec<_>>();
        assert_eq!(algos(eligible(&ranked(), &NEEDS, &[])), [1, 0, 2]);
        let det = Needs {
            deterministic: true,
            ..NEEDS
        };
        assert_eq!(algos(eligible(&ranked(), &det, &[])), [0, 2]);
        let fma = Needs {
            fma_only: true,
            ..NEEDS
        };
        assert_eq!(algos(eligible(&ranked(), &fma, &[])), [0]);
        let big = Needs {
            workspace_cap: 10_000,
            ..NEEDS
        };
        assert_eq!(algos(eligible(&ranked(), &big, &[])), [7, 1, 0, 2]);
        let failed = [c(1, 100, false, Math::TensorOp)];
        assert_eq!(algos(eligible(&ranked(), &NEEDS, &failed)), [0, 2]);
    }

    /// A fake cuDNN: `broken` algorithms fail at launch; records what was launched.
    fn fake<'a>(
        broken: &'static [u32],
        log: &'a RefCell<Vec<u32>>,
    ) -> impl FnMut(&Candidate<u32>) -> Result<()> + 'a {
        move |c: &Candidate<u32>| {
            log.borrow_mut().push(c.algo);
            if broken.contains(&c.algo) {
                bail!("CUDNN_STATUS_EXECUTION_FAILED")
            }
            Ok(())
        }
    }

    #[test]
    fn a_failing_algorithm_falls_back_to_the_next_in_rank_order() -> Result<()> {
        let log = RefCell::new(Vec::new());
        let (ran, failures) = run(
            "conv2d forward",
            None,
            || Ok(ranked()),
            &NEEDS,
            fake(&[1], &log),
        )?;
        assert_eq!(ran.algo, 0);
        assert_eq!(*log.borrow(), [1, 0]);
        assert_eq!(failures.len(), 1);
        assert!(failures[0].1.contains("EXECUTION_FAILED"));
        Ok(())
    }

    #[test]
    fn a_cached_algorithm_that_fails_is_evicted_without_asking_twice() -> Result<()> {
        let log = RefCell::new(Vec::new());
        let cached = Some(c(2, 0, true, Math::TensorOp));
        // The cached one works: the ranked list is never queried.
        let (ran, _) = run(
            "x",
            cached,
            || bail!("not queried"),
            &NEEDS,
            fake(&[], &log),
        )?;
        assert_eq!(ran.algo, 2);
        // It fails: evicted, the list is walked without it.
        log.borrow_mut().clear();
        let (ran, failures) = run("x", cached, || Ok(ranked()), &NEEDS, fake(&[2, 1], &log))?;
        assert_eq!(ran.algo, 0);
        assert_eq!(*log.borrow(), [2, 1, 0]);
        assert_eq!(
            failures.iter().map(|(c, _)| c.algo).collect::<Vec<_>>(),
            [2, 1]
        );
        Ok(())
    }

    #[test]
    fn a_cached_algorithm_no_longer_eligible_is_not_launched() -> Result<()> {
        // Cached before deterministic mode was turned on (the cache key includes the mode,
        // but the policy must not trust that alone).
        let log = RefCell::new(Vec::new());
        let det = Needs {
            deterministic: true,
            ..NEEDS
        };
        let cached = Some(c(1, 100, false, Math::TensorOp));
        let (ran, _) = run("x", cached, || Ok(ranked()), &det, fake(&[], &log))?;
        assert_eq!(ran.algo, 0);
        assert_eq!(*log.borrow(), [0]);
        Ok(())
    }

    #[test]
    fn nothing_runs_is_an_error_naming_rejections_and_failures() {
        let log = RefCell::new(Vec::new());
        let det = Needs {
            deterministic: true,
            ..NEEDS
        };
        let err = run(
            "conv2d backward-filter",
            None,
            || Ok(ranked()),
            &det,
            fake(&[0, 2], &log),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("conv2d backward-filter"), "{err}");
        assert!(err.contains("algo 7 (workspace over the cap)"), "{err}");
        assert!(err.contains("algo 1 (not deterministic)"), "{err}");
        assert!(
            err.contains("algo 0 failed: CUDNN_STATUS_EXECUTION_FAILED"),
            "{err}"
        );
        assert!(err.contains("set_conv_deterministic"), "{err}");
    }
}
