//! Summaries of runs for comparison tables and curves: mean and sample standard deviation,
//! a nearest-rank percentile of the finite values, a trailing moving average of a loss
//! curve, and the mean over seeds of aligned curves.

/// Mean and sample standard deviation (`n - 1` in the denominator; 0 for one value). NaN
/// for an empty slice; a NaN value makes both NaN.
///
/// ```
/// let (m, s) = keel_train::series::mean_std(&[1.0, 2.0, 3.0]);
/// assert_eq!((m, s), (2.0, 1.0));
/// ```
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (m, var.sqrt())
}

/// The `p`-th percentile (0..=100) of the finite values of `v`, nearest rank (the value at
/// `round(p / 100 * (n - 1))` in sorted order); NaN when none is finite.
///
/// ```
/// let v = vec![5.0, f64::NAN, 1.0, 3.0, f64::INFINITY];
/// assert_eq!(keel_train::series::percentile(v, 50.0), 3.0);
/// ```
pub fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i]
}

/// The trailing moving average over `k` points (fewer at the start) of the finite values of
/// a `(step, value)` curve, as `(step, average)` points. Non-finite values are dropped
/// first, so one NaN step does not blank a window.
///
/// ```
/// let ma = keel_train::series::moving_average(&[(0, 1.0), (1, 3.0), (2, f64::NAN), (3, 5.0)], 2);
/// assert_eq!(ma, vec![(0.0, 1.0), (1.0, 2.0), (3.0, 4.0)]);
/// ```
pub fn moving_average(v: &[(usize, f64)], k: usize) -> Vec<(f64, f64)> {
    let k = k.max(1);
    let finite: Vec<(usize, f64)> = v.iter().copied().filter(|(_, l)| l.is_finite()).collect();
    (0..finite.len())
        .map(|i| {
            let w = &finite[i.saturating_sub(k - 1)..=i];
            (
                finite[i].0 as f64,
                w.iter().map(|x| x.1).sum::<f64>() / w.len() as f64,
            )
        })
        .collect()
}

/// The pointwise mean of curves aligned by index (seeds of one config), as long as the
/// shortest; the x values are the first curve's. Empty for no curves.
///
/// ```
/// let m = keel_train::series::mean_series(vec![vec![(0.0, 1.0), (1.0, 2.0)], vec![(0.0, 3.0)]]);
/// assert_eq!(m, vec![(0.0, 2.0)]);
/// ```
pub fn mean_series(series: Vec<Vec<(f64, f64)>>) -> Vec<(f64, f64)> {
    let n = series.iter().map(Vec::len).min().unwrap_or(0);
    (0..n)
        .map(|i| {
            (
                series[0][i].0,
                series.iter().map(|s| s[i].1).sum::<f64>() / series.len() as f64,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_std_edge_cases() {
        assert_eq!(mean_std(&[4.0]), (4.0, 0.0));
        let (m, s) = mean_std(&[]);
        assert!(m.is_nan() && s == 0.0);
        let (m, s) = mean_std(&[1.0, f64::NAN]);
        assert!(m.is_nan() && s.is_nan());
        let (m, s) = mean_std(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
        assert_eq!(m, 5.0);
        assert!((s - (32.0f64 / 7.0).sqrt()).abs() < 1e-15, "{s}");
    }

    #[test]
    fn percentile_nearest_rank_of_finite_values() {
        let v: Vec<f64> = (1..=101).map(f64::from).collect();
        assert_eq!(percentile(v.clone(), 99.0), 100.0);
        assert_eq!(percentile(v.clone(), 0.0), 1.0);
        assert_eq!(percentile(v, 100.0), 101.0);
        assert!(percentile(vec![f64::NAN, f64::NEG_INFINITY], 50.0).is_nan());
        assert!(percentile(Vec::new(), 50.0).is_nan());
    }

    #[test]
    fn moving_average_and_mean_series() {
        let curve: Vec<(usize, f64)> = (0..5).map(|i| (i * 10, i as f64)).collect();
        let ma = moving_average(&curve, 3);
        assert_eq!(
            ma,
            vec![
                (0.0, 0.0),
                (10.0, 0.5),
                (20.0, 1.0),
                (30.0, 2.0),
                (40.0, 3.0)
            ]
        );
        assert_eq!(moving_average(&curve, 0), moving_average(&curve, 1));
        assert!(moving_average(&[(0, f64::NAN)], 3).is_empty());
        let m = mean_series(vec![
            ma.clone(),
            ma.iter().map(|&(x, y)| (x, y + 2.0)).collect(),
        ]);
        assert_eq!(m[4], (40.0, 4.0));
        assert!(mean_series(Vec::new()).is_empty());
    }
}
