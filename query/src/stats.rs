//! Statistics for breakdowns: Wilson score intervals for shares, and whether a segment
//! answered differently from everyone else (chi-square test of independence for
//! single-answer polls, Bonferroni-corrected two-proportion z-tests for multi-choice).

use statrs::distribution::{ChiSquared, ContinuousCDF, Normal};

const Z95: f64 = 1.959_963_984_540_054;
/// Expected cell counts below this make the chi-square approximation unreliable.
const MIN_EXPECTED: f64 = 5.0;
/// Groups with fewer votes than this are marked `small_sample` and their test is not
/// reported: a share of a handful of votes says little, and a test of it less.
pub const MIN_GROUP_VOTES: u64 = 10;

/// Benjamini–Hochberg adjusted p-values (the false discovery rate when every given p-value
/// is one test of a family), in the order given; `None` stays `None` and does not count as
/// a test. Equal to scipy's `false_discovery_control(ps, method="bh")`.
pub fn benjamini_hochberg(p_values: &[Option<f64>]) -> Vec<Option<f64>> {
    let mut tested: Vec<(usize, f64)> = p_values
        .iter()
        .enumerate()
        .filter_map(|(i, p)| p.map(|p| (i, p)))
        .collect();
    tested.sort_by(|a, b| a.1.total_cmp(&b.1));
    let m = tested.len() as f64;
    let mut adjusted = vec![None; p_values.len()];
    // From the largest p down: each adjusted value is the smallest `p * m / rank` at or
    // above its rank, so the adjusted values keep the order of the raw ones.
    let mut running = 1.0_f64;
    for (rank, (index, p)) in tested.iter().enumerate().rev() {
        running = running.min(p * m / (rank + 1) as f64).min(1.0);
        adjusted[*index] = Some(running);
    }
    adjusted
}

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
/// of the segment's counts against the rest's (both per answer, in the same order).
pub fn chi_square(group: &[u64], rest: &[u64]) -> Difference {
    let (total_a, total_b) = (sum(group), sum(rest));
    let total = total_a + total_b;
    let columns: Vec<(f64, f64)> = group
        .iter()
        .zip(rest)
        .map(|(a, b)| (*a as f64, *b as f64))
        .filter(|(a, b)| a + b > 0.0)
        .collect();
    if total_a == 0.0 || total_b == 0.0 || columns.len() < 2 {
        return Difference {
            p_value: None,
            small_sample: true,
        };
    }
    let mut statistic = 0.0;
    let mut small_sample = false;
    for &(a, b) in &columns {
        let column = a + b;
        for (observed, row_total) in [(a, total_a), (b, total_b)] {
            let expected = row_total * column / total;
            small_sample |= expected < MIN_EXPECTED;
            statistic += (observed - expected).powi(2) / expected;
        }
    }
    let df = (columns.len() - 1) as f64;
    let p_value = ChiSquared::new(df)
        // The survival function, not `1 - cdf`: that rounds every p below about 1e-16 to 0.
        .map(|dist| dist.sf(statistic))
        .ok();
    Difference {
        p_value,
        small_sample,
    }
}

fn sum(counts: &[u64]) -> f64 {
    counts.iter().map(|c| *c as f64).sum()
}

/// For multi-choice polls: per option, the share of ballots choosing it in the segment vs the
/// rest (two-proportion z-test); the smallest p-value, Bonferroni-corrected for the options.
/// `group` and `rest` are votes per option, in the same order.
pub fn proportions(
    group: &[u64],
    group_ballots: u64,
    rest: &[u64],
    rest_ballots: u64,
) -> Difference {
    if group_ballots == 0 || rest_ballots == 0 {
        return Difference {
            p_value: None,
            small_sample: true,
        };
    }
    let normal = Normal::standard();
    let (n1, n2) = (group_ballots as f64, rest_ballots as f64);
    let mut smallest: Option<f64> = None;
    let mut small_sample = false;
    let mut tests = 0usize;
    for (x1, x2) in group.iter().zip(rest) {
        let (x1, x2) = (*x1 as f64, *x2 as f64);
        let pooled = (x1 + x2) / (n1 + n2);
        small_sample |= n1 * pooled < MIN_EXPECTED || n1 * (1.0 - pooled) < MIN_EXPECTED;
        let se = (pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2)).sqrt();
        if se == 0.0 {
            continue;
        }
        tests += 1;
        let z = (x1 / n1 - x2 / n2) / se;
        let p = 2.0 * normal.sf(z.abs());
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

    /// Votes per option, in the order named (every call names the same options alike).
    fn counts(pairs: &[(&str, u64)]) -> Vec<u64> {
        pairs.iter().map(|(_, v)| *v).collect()
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

    /// Relative error of `got` against scipy's `want`.
    fn close(got: Option<f64>, want: f64) -> bool {
        got.is_some_and(|got| ((got - want) / want).abs() < 1e-6)
    }

    /// p-values in the far tail, where `1 - cdf` is 0, against scipy 1.17
    /// (`scipy.stats.chi2.sf`, `2 * scipy.stats.norm.sf`).
    /// Reference values from scipy 1.17: `scipy.stats.false_discovery_control(ps)`.
    #[test]
    fn benjamini_hochberg_matches_scipy() {
        let close = |got: &[Option<f64>], want: &[Option<f64>]| {
            got.len() == want.len()
                && got.iter().zip(want).all(|(g, w)| match (g, w) {
                    (Some(g), Some(w)) => (g - w).abs() < 1e-12,
                    (None, None) => true,
                    _ => false,
                })
        };
        let ps = [Some(0.01), Some(0.04), Some(0.03), Some(0.005), Some(0.2)];
        let got = benjamini_hochberg(&ps);
        assert!(
            close(
                &got,
                &[Some(0.025), Some(0.05), Some(0.05), Some(0.025), Some(0.2)]
            ),
            "{got:?}"
        );
        // Groups without a test are not part of the family.
        let got = benjamini_hochberg(&[Some(0.01), None, Some(0.04), None]);
        assert!(
            close(&got, &[Some(0.02), None, Some(0.04), None]),
            "{got:?}"
        );
        // false_discovery_control([0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205])
        let ps = [0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205].map(Some);
        let want = [
            0.008,
            0.032,
            0.0672,
            0.0672,
            0.0672,
            0.08,
            0.08457142857142856,
            0.205,
        ]
        .map(Some);
        let got = benjamini_hochberg(&ps);
        assert!(close(&got, &want), "{got:?}");
        assert!(benjamini_hochberg(&[]).is_empty());
        assert_eq!(benjamini_hochberg(&[Some(0.7)]), [Some(0.7)]);
    }

    #[test]
    fn tail_p_values_match_scipy() {
        // [[300, 10], [10, 300]]: chi2 = 542.58…, df 1; `1 - chi2.cdf` gives 0.0.
        let chi = chi_square(
            &counts(&[("a", 300), ("b", 10)]),
            &counts(&[("a", 10), ("b", 300)]),
        );
        assert!(close(chi.p_value, 5.176319245325501e-120), "{chi:?}");
        let moderate = chi_square(
            &counts(&[("a", 30), ("b", 10)]),
            &counts(&[("a", 10), ("b", 30)]),
        );
        assert!(
            close(moderate.p_value, 7.744216431044088e-06),
            "{moderate:?}"
        );
        // 95/100 against 5/100: z = 12.73, two options (Bonferroni × 2).
        let z = proportions(
            &counts(&[("a", 95), ("b", 5)]),
            100,
            &counts(&[("a", 5), ("b", 95)]),
            100,
        );
        assert!(close(z.p_value, 8.274063493027622e-37), "{z:?}");
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
