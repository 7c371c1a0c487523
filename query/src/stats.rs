//! Statistics for breakdowns: Wilson score intervals for shares, and whether a segment
//! answered differently from everyone else (chi-square test of independence for
//! single-answer polls, Bonferroni-corrected two-proportion z-tests for multi-choice).

use std::collections::BTreeMap;

use statrs::distribution::{ChiSquared, ContinuousCDF, Normal};

const Z95: f64 = 1.959_963_984_540_054;
/// Expected cell counts below this make the chi-square approximation unreliable.
const MIN_EXPECTED: f64 = 5.0;

/// 95% Wilson score interval of `count` successes in `n` trials.
pub fn wilson(count: u64, n: u64) -> Option<[f64; 2]> {
    if n == 0 {
        return None;
    }
    let n = n as f64;
    let p = count as f64 / n;
    let z2 = Z95 * Z95;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = Z95 * ((p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt()) / (1.0 + z2 / n);
    Some([(centre - half).max(0.0), (centre + half).min(1.0)])
}

#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    pub p_value: Option<f64>,
    /// True when an expected count is too small for the test to be trusted.
    pub small_sample: bool,
}

/// Chi-square test of independence between "in the segment" and the answer, on a 2×k table
/// of the segment's counts against the rest's.
pub fn chi_square(group: &BTreeMap<String, u64>, rest: &BTreeMap<String, u64>) -> Difference {
    let keys: Vec<&String> = group
        .keys()
        .chain(rest.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let row = |m: &BTreeMap<String, u64>| {
        keys.iter()
            .map(|k| m.get(*k).copied().unwrap_or(0) as f64)
            .collect::<Vec<f64>>()
    };
    let (a, b) = (row(group), row(rest));
    let (total_a, total_b): (f64, f64) = (a.iter().sum(), b.iter().sum());
    let total = total_a + total_b;
    let columns: Vec<usize> = (0..keys.len()).filter(|&i| a[i] + b[i] > 0.0).collect();
    if total_a == 0.0 || total_b == 0.0 || columns.len() < 2 {
        return Difference {
            p_value: None,
            small_sample: true,
        };
    }
    let mut statistic = 0.0;
    let mut small_sample = false;
    for &i in &columns {
        let column = a[i] + b[i];
        for (observed, row_total) in [(a[i], total_a), (b[i], total_b)] {
            let expected = row_total * column / total;
            small_sample |= expected < MIN_EXPECTED;
            statistic += (observed - expected).powi(2) / expected;
        }
    }
    let df = (columns.len() - 1) as f64;
    let p_value = ChiSquared::new(df)
        .map(|dist| 1.0 - dist.cdf(statistic))
        .ok();
    Difference {
        p_value,
        small_sample,
    }
}

/// For multi-choice polls: per option, the share of ballots choosing it in the segment vs the
/// rest (two-proportion z-test); the smallest p-value, Bonferroni-corrected for the options.
pub fn proportions(
    group: &BTreeMap<String, u64>,
    group_ballots: u64,
    rest: &BTreeMap<String, u64>,
    rest_ballots: u64,
) -> Difference {
    if group_ballots == 0 || rest_ballots == 0 {
        return Difference {
            p_value: None,
            small_sample: true,
        };
    }
    let normal = Normal::standard();
    let keys: std::collections::BTreeSet<&String> = group.keys().chain(rest.keys()).collect();
    let (n1, n2) = (group_ballots as f64, rest_ballots as f64);
    let mut smallest: Option<f64> = None;
    let mut small_sample = false;
    let mut tests = 0usize;
    for key in &keys {
        let x1 = group.get(*key).copied().unwrap_or(0) as f64;
        let x2 = rest.get(*key).copied().unwrap_or(0) as f64;
        let pooled = (x1 + x2) / (n1 + n2);
        small_sample |= n1 * pooled < MIN_EXPECTED || n1 * (1.0 - pooled) < MIN_EXPECTED;
        let se = (pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2)).sqrt();
        if se == 0.0 {
            continue;
        }
        tests += 1;
        let z = (x1 / n1 - x2 / n2) / se;
        let p = 2.0 * (1.0 - normal.cdf(z.abs()));
        smallest = Some(smallest.map_or(p, |s: f64| s.min(p)));
    }
    Difference {
        p_value: smallest.map(|p| (p * tests as f64).min(1.0)),
        small_sample,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    #[test]
    fn wilson_matches_known_values() {
        let [lo, hi] = wilson(90, 140).unwrap();
        assert!(
            (lo - 0.5603).abs() < 1e-3 && (hi - 0.7174).abs() < 1e-3,
            "{lo} {hi}"
        );
        assert_eq!(wilson(0, 0), None);
        let [lo, _] = wilson(0, 10).unwrap();
        assert_eq!(lo, 0.0);
    }

    #[test]
    fn chi_square_separates_equal_from_different() {
        let same = chi_square(
            &counts(&[("a", 50), ("b", 50)]),
            &counts(&[("a", 500), ("b", 500)]),
        );
        assert!(same.p_value.unwrap() > 0.9);
        assert!(!same.small_sample);
        // A 2x2 table with a known statistic: [[30,10],[10,30]] → chi2 = 20, p ≈ 7.7e-6.
        let different = chi_square(
            &counts(&[("a", 30), ("b", 10)]),
            &counts(&[("a", 10), ("b", 30)]),
        );
        assert!(
            (different.p_value.unwrap() - 7.74e-6).abs() < 1e-6,
            "{:?}",
            different
        );
        let tiny = chi_square(
            &counts(&[("a", 1), ("b", 1)]),
            &counts(&[("a", 100), ("b", 90)]),
        );
        assert!(tiny.small_sample);
    }

    #[test]
    fn proportions_flag_a_clear_difference() {
        let diff = proportions(
            &counts(&[("a", 80), ("b", 20)]),
            100,
            &counts(&[("a", 20), ("b", 80)]),
            100,
        );
        assert!(diff.p_value.unwrap() < 1e-6);
        let same = proportions(
            &counts(&[("a", 50), ("b", 50)]),
            100,
            &counts(&[("a", 50), ("b", 50)]),
            100,
        );
        assert!(same.p_value.unwrap() > 0.9);
    }
}
