//! Quantiles and series over what was observed: plain functions over plain numbers.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Quantiles {
    pub n: usize,
    #[serde(deserialize_with = "nan_if_null")]
    pub p50: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub p90: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub p99: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub max: f64,
}

/// A figure that JSON wrote as `null` because it was NaN (no values) reads back as NaN.
pub fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Nearest-rank quantile of sorted values.
fn rank(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

pub fn quantiles(values: &[f64]) -> Quantiles {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    Quantiles { n: v.len(), p50: rank(&v, 0.5), p90: rank(&v, 0.9), p99: rank(&v, 0.99), max: v.last().copied().unwrap_or(f64::NAN) }
}

/// Points (value, fraction ≤ value) of the empirical CDF, thinned to at most `max_points`.
pub fn cdf(values: &[f64], max_points: usize) -> Vec<(f64, f64)> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let step = (n / max_points.max(1)).max(1);
    let mut out: Vec<(f64, f64)> = v.iter().enumerate().filter(|(i, _)| i % step == 0 || *i == n - 1).map(|(i, x)| (*x, (i + 1) as f64 / n as f64)).collect();
    out.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
    out
}

/// Events per second in buckets of `width` seconds from 0 to `end`: (bucket start, rate).
pub fn rate_series(times: &[f64], width: f64, end: f64) -> Vec<(f64, f64)> {
    let buckets = ((end / width).ceil() as usize).max(1);
    let mut counts = vec![0usize; buckets];
    for t in times {
        if *t >= 0.0 {
            let i = ((t / width) as usize).min(buckets - 1);
            counts[i] += 1;
        }
    }
    counts.iter().enumerate().map(|(i, c)| (i as f64 * width, *c as f64 / width)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_quantiles_survive_json() {
        let back: Quantiles = serde_json::from_str(&serde_json::to_string(&quantiles(&[])).unwrap()).unwrap();
        assert!(back.p50.is_nan() && back.max.is_nan() && back.n == 0);
    }

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let q = quantiles(&v);
        assert_eq!((q.p50, q.p99, q.max, q.n), (50.0, 99.0, 100.0, 100));
        assert!(quantiles(&[]).p50.is_nan());
    }

    #[test]
    fn cdf_ends_at_one_and_rates_count_everything() {
        let v: Vec<f64> = (0..1000).map(|i| i as f64 / 10.0).collect();
        let c = cdf(&v, 100);
        assert!(c.len() <= 101 && c.last().unwrap().1 == 1.0);
        let r = rate_series(&[0.5, 1.5, 1.6, 9.9], 1.0, 10.0);
        assert_eq!(r.len(), 10);
        assert_eq!(r[1].1, 2.0);
        assert_eq!(r.iter().map(|(_, x)| x).sum::<f64>(), 4.0);
    }
}
