//! Small robust statistics for the monitor: medians, a bounded-memory quantile sketch with
//! relative accuracy (the DDSketch idea, Masson et al. 2019), and a JSON encoding of `f64`
//! that keeps NaN and infinities.
use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The median of `values` (the mean of the two middle values for an even count); `None` when
/// empty. NaNs sort last (`total_cmp`); callers pass finite values.
pub(crate) fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.into_iter().collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    })
}

/// Median and median absolute deviation (unscaled).
pub(crate) fn median_mad(values: &[f64]) -> Option<(f64, f64)> {
    let med = median(values.iter().copied())?;
    let mad = median(values.iter().map(|x| (x - med).abs()))?;
    Some((med, mad))
}

/// Relative accuracy of [`QuantileSketch`]: bucket bounds grow by this factor.
const GAMMA: f64 = 1.02;

/// Quantiles of non-negative values within about 1% relative error, in memory that grows
/// with the log of the value range, not with the number of values (so a monitor that saw a
/// million steps still serializes to a few kilobytes).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct QuantileSketch {
    /// Bucket index -> count; bucket `i` holds values in `(GAMMA^(i-1), GAMMA^i]`.
    buckets: BTreeMap<i32, u64>,
    zeros: u64,
    count: u64,
    #[serde(with = "lossless_f64")]
    max: f64,
}

impl QuantileSketch {
    /// Adds a finite, non-negative value (others are ignored).
    pub(crate) fn add(&mut self, x: f64) {
        if !x.is_finite() || x < 0.0 {
            return;
        }
        if x == 0.0 {
            self.zeros += 1;
        } else {
            let i = (x.ln() / GAMMA.ln()).ceil().clamp(-30_000.0, 30_000.0) as i32;
            *self.buckets.entry(i).or_insert(0) += 1;
        }
        self.count += 1;
        self.max = self.max.max(x);
    }

    /// The `q`-quantile (0..=1), `None` when empty. The largest value is exact.
    pub(crate) fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * (self.count - 1) as f64).round() as u64;
        if rank + 1 == self.count {
            return Some(self.max);
        }
        if rank < self.zeros {
            return Some(0.0);
        }
        let mut seen = self.zeros;
        for (&i, &c) in &self.buckets {
            seen += c;
            if rank < seen {
                // The bucket's midpoint in relative terms.
                let v = 2.0 * GAMMA.powi(i) / (GAMMA + 1.0);
                return Some(v.min(self.max));
            }
        }
        Some(self.max)
    }

    /// The largest value added.
    pub(crate) fn max(&self) -> Option<f64> {
        (self.count > 0).then_some(self.max)
    }
}

/// A JSON-friendly `f64` encoding for serde's `with` attribute: finite values as numbers,
/// NaN and infinities as the strings `"NaN"`, `"inf"`, `"-inf"` (serde_json would write
/// `null` and fail to read it back as an `f64`). Reads numbers, those strings and `null`
/// (as NaN). Use it on every float a run records (losses, grad norms, metrics), so a run
/// that ever saw a NaN still reads back.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// #[derive(Serialize, Deserialize)]
/// struct Record {
///     #[serde(with = "keel_train::lossless_f64")]
///     loss: f64,
///     #[serde(with = "keel_train::lossless_f64::option")]
///     grad_norm: Option<f64>,
///     #[serde(with = "keel_train::lossless_f64::seq")]
///     history: Vec<f64>,
/// }
/// let r = Record { loss: f64::NAN, grad_norm: Some(f64::INFINITY), history: vec![1.5, f64::NEG_INFINITY] };
/// let json = serde_json::to_string(&r).unwrap();
/// assert_eq!(json, r#"{"loss":"NaN","grad_norm":"inf","history":[1.5,"-inf"]}"#);
/// let back: Record = serde_json::from_str(&json).unwrap();
/// assert!(back.loss.is_nan() && back.grad_norm == Some(f64::INFINITY));
/// assert_eq!(back.history[1], f64::NEG_INFINITY);
/// ```
pub mod lossless_f64 {
    use super::*;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Num(f64),
        Str(String),
        Null(()),
    }

    fn to_repr<S: Serializer>(x: f64, s: S) -> Result<S::Ok, S::Error> {
        if x.is_finite() {
            s.serialize_f64(x)
        } else if x.is_nan() {
            s.serialize_str("NaN")
        } else if x > 0.0 {
            s.serialize_str("inf")
        } else {
            s.serialize_str("-inf")
        }
    }

    fn from_repr<E: serde::de::Error>(r: Repr) -> Result<f64, E> {
        match r {
            Repr::Num(x) => Ok(x),
            Repr::Null(()) => Ok(f64::NAN),
            Repr::Str(s) => match s.as_str() {
                "NaN" | "nan" => Ok(f64::NAN),
                "inf" | "+inf" | "Infinity" => Ok(f64::INFINITY),
                "-inf" | "-Infinity" => Ok(f64::NEG_INFINITY),
                other => Err(E::custom(format!(
                    "expected a number, \"NaN\", \"inf\" or \"-inf\", got \"{other}\""
                ))),
            },
        }
    }

    /// An `f64` that (de)serializes in this encoding, for containers of `f64`.
    struct Lossless(f64);

    impl Serialize for Lossless {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            to_repr(self.0, s)
        }
    }

    impl<'de> Deserialize<'de> for Lossless {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            from_repr(Repr::deserialize(d)?).map(Lossless)
        }
    }

    /// `#[serde(with = "lossless_f64")]` for `f64`.
    pub fn serialize<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
        to_repr(*x, s)
    }

    /// `#[serde(with = "lossless_f64")]` for `f64`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        from_repr(Repr::deserialize(d)?)
    }

    /// `#[serde(with = "lossless_f64::option")]` for `Option<f64>` (`null` is `None`).
    pub mod option {
        use super::*;

        /// Serializes `None` as `null`, a value as in [`super::serialize`].
        pub fn serialize<S: Serializer>(x: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
            x.map(Lossless).serialize(s)
        }

        /// Reads `null` as `None`, a value as in [`super::deserialize`].
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
            Ok(Option::<Lossless>::deserialize(d)?.map(|x| x.0))
        }
    }

    /// `#[serde(with = "lossless_f64::seq")]` for `Vec<f64>` and `VecDeque<f64>`.
    pub mod seq {
        use super::*;

        /// Serializes every element as in [`super::serialize`].
        pub fn serialize<'a, C, S>(xs: &'a C, s: S) -> Result<S::Ok, S::Error>
        where
            &'a C: IntoIterator<Item = &'a f64>,
            S: Serializer,
        {
            s.collect_seq(xs.into_iter().map(|&x| Lossless(x)))
        }

        /// Reads every element as in [`super::deserialize`].
        pub fn deserialize<'de, C, D>(d: D) -> Result<C, D::Error>
        where
            C: FromIterator<f64>,
            D: Deserializer<'de>,
        {
            Ok(Vec::<Lossless>::deserialize(d)?
                .into_iter()
                .map(|x| x.0)
                .collect())
        }
    }

    /// `#[serde(with = "lossless_f64::pairs")]` for `Vec<(usize, f64)>` (a curve of
    /// `(step, value)` points), as `[[step, value], ...]`.
    ///
    /// ```
    /// #[derive(serde::Serialize, serde::Deserialize)]
    /// struct Curve(#[serde(with = "keel_train::lossless_f64::pairs")] Vec<(usize, f64)>);
    /// let json = serde_json::to_string(&Curve(vec![(1, 0.5), (2, f64::NAN)])).unwrap();
    /// assert_eq!(json, r#"[[1,0.5],[2,"NaN"]]"#);
    /// let back: Curve = serde_json::from_str(&json).unwrap();
    /// assert!(back.0[1].1.is_nan() && back.0[0] == (1, 0.5));
    /// ```
    pub mod pairs {
        use super::*;

        /// Serializes each pair as `[step, value]`, the value as in [`super::serialize`].
        pub fn serialize<S: Serializer>(pairs: &[(usize, f64)], s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(pairs.iter().map(|&(i, x)| (i, Lossless(x))))
        }

        /// Reads `[step, value]` pairs, the value as in [`super::deserialize`].
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(usize, f64)>, D::Error> {
            Ok(Vec::<(usize, Lossless)>::deserialize(d)?
                .into_iter()
                .map(|(i, x)| (i, x.0))
                .collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median([3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median([4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(std::iter::empty()), None);
        assert_eq!(median_mad(&[1.0, 2.0, 3.0, 4.0, 100.0]), Some((3.0, 1.0)));
    }

    #[test]
    fn sketch_quantiles_within_two_percent() {
        let mut s = QuantileSketch::default();
        let values: Vec<f64> = (1..=1000).map(|i| i as f64 * 0.01).collect();
        for &v in &values {
            s.add(v);
        }
        s.add(f64::NAN); // ignored
        for (q, exact) in [(0.5, 5.0), (0.99, 9.9), (0.1, 1.0)] {
            let got = s.quantile(q).unwrap();
            assert!(
                (got - exact).abs() <= 0.02 * exact,
                "q{q}: {got} vs {exact}"
            );
        }
        assert_eq!(s.quantile(1.0), Some(10.0));
        assert_eq!(s.max(), Some(10.0));
        assert_eq!(QuantileSketch::default().quantile(0.5), None);
    }
}
