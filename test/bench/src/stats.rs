//! Summaries of repeated measurements: median and spread, percentiles.

use serde::Serialize;

/// The median and the spread of a set of samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    /// The middle sample (the mean of the two middle ones for an even count).
    pub median: f64,
    /// The smallest sample.
    pub min: f64,
    /// The largest sample.
    pub max: f64,
    /// How many samples there were.
    pub n: usize,
}

/// The finite samples, sorted. A metric a run could not measure is left out, not counted as 0.
fn sorted(samples: &[f64]) -> Vec<f64> {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    v
}

/// Median, min and max of the finite samples; `None` when there are none.
pub fn spread(samples: &[f64]) -> Option<Spread> {
    let v = sorted(samples);
    let (&min, &max) = (v.first()?, v.last()?);
    let mid = v.len() / 2;
    let median = if v.len() % 2 == 1 { v[mid] } else { (v[mid - 1] + v[mid]) / 2.0 };
    Some(Spread { median, min, max, n: v.len() })
}

/// Nearest-rank percentile (`q` in 0..=1) of the finite samples; `None` when there are none.
/// With 100 samples p99 is the 99th smallest, not an interpolation past the data.
pub fn percentile(samples: &[f64], q: f64) -> Option<f64> {
    let v = sorted(samples);
    if v.is_empty() {
        return None;
    }
    let q = q.clamp(0.0, 1.0);
    let rank = (q * v.len() as f64).ceil().max(1.0) as usize;
    v.get(rank - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        let s = spread(&[5.0, 1.0, 3.0]).expect("three samples");
        assert_eq!(s, Spread { median: 3.0, min: 1.0, max: 5.0, n: 3 });
        let s = spread(&[4.0, 1.0, 3.0, 10.0]).expect("four samples");
        assert_eq!(s, Spread { median: 3.5, min: 1.0, max: 10.0, n: 4 });
        let s = spread(&[7.0]).expect("one sample");
        assert_eq!((s.median, s.min, s.max), (7.0, 7.0, 7.0));
    }

    #[test]
    fn missing_and_non_finite_samples_are_left_out() {
        assert_eq!(spread(&[]), None);
        assert_eq!(spread(&[f64::NAN]), None);
        let s = spread(&[f64::NAN, 2.0, f64::INFINITY, 4.0]).expect("two finite samples");
        assert_eq!(s, Spread { median: 3.0, min: 2.0, max: 4.0, n: 2 });
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&v, 1.0), Some(100.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 0.99), Some(3.0));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
