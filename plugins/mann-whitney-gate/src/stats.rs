//! The Mann-Whitney U test, two-sided, by the normal approximation with a
//! tie correction and a continuity correction.
//!
//! Plain Rust with no dependencies, so that the very same file is compiled
//! into the plugin (wasm) and into the native benchmark
//! (`host/engine/benches/gate_plugin.rs` includes it with `#[path]`).
//!
//! For samples `x` (the wave, size `n1`) and `y` (the baseline, `n2`):
//! - every value is ranked in the pooled sample, ties getting the mean of
//!   the ranks they span; `R1` is the wave's rank sum;
//! - `U1 = R1 - n1 (n1 + 1) / 2`: the number of pairs (wave, baseline) in
//!   which the wave's value is higher, ties counting one half;
//! - under "the two come from the same distribution", `U1` has mean
//!   `n1 n2 / 2` and variance `n1 n2 / 12 × ((n + 1) - Σ(t³ - t) / (n (n - 1)))`
//!   where `n = n1 + n2` and `t` runs over the sizes of the groups of ties;
//! - `z = (U1 - n1 n2 / 2 ∓ 0.5) / σ` (the ½ is the continuity correction,
//!   taken towards zero), and the two-sided p-value is `2 (1 - Φ(|z|))`.
//!
//! This is what SciPy's `mannwhitneyu(x, y, method="asymptotic")` computes;
//! the approximation is good from about 10 values per side, which is why
//! the gate wants a minimum sample count. NaN values are dropped (they
//! cannot be ranked); infinities rank as the largest or smallest values.

/// What the test found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MannWhitney {
    /// Values of the first sample (the wave) used, NaNs dropped.
    pub n1: usize,
    /// Values of the second sample (the baseline) used.
    pub n2: usize,
    /// `U1`, the first sample's U statistic.
    pub u: f64,
    /// The standardised statistic (0 when every value is the same).
    pub z: f64,
    /// The two-sided p-value (1 when every value is the same).
    pub p: f64,
    /// `U1 / (n1 n2)`: the probability that a value of the first sample is
    /// higher than one of the second (ties count one half). 0.5: alike.
    pub effect: f64,
}

/// Runs the test on `x` against `y`; `None` when either has no
/// (non-NaN) value.
pub fn mann_whitney(x: &[f64], y: &[f64]) -> Option<MannWhitney> {
    let mut pooled: Vec<(f64, bool)> = x
        .iter()
        .filter(|v| !v.is_nan())
        .map(|&v| (v, true))
        .chain(y.iter().filter(|v| !v.is_nan()).map(|&v| (v, false)))
        .collect();
    let n1 = pooled.iter().filter(|(_, first)| *first).count();
    let n2 = pooled.len() - n1;
    if n1 == 0 || n2 == 0 {
        return None;
    }
    pooled.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
    let n = pooled.len();
    let mut rank_sum = 0.0;
    let mut ties = 0.0;
    let mut i = 0;
    while i < n {
        let mut j = i + 1;
        while j < n && pooled[j].0 == pooled[i].0 {
            j += 1;
        }
        // Ranks i+1 ..= j, shared.
        let rank = (i + 1 + j) as f64 / 2.0;
        let in_first = pooled[i..j].iter().filter(|(_, first)| *first).count();
        rank_sum += rank * in_first as f64;
        let t = (j - i) as f64;
        ties += t * t * t - t;
        i = j;
    }
    let (a, b, nf) = (n1 as f64, n2 as f64, n as f64);
    let u = rank_sum - a * (a + 1.0) / 2.0;
    let mean = a * b / 2.0;
    let variance = a * b / 12.0 * ((nf + 1.0) - ties / (nf * (nf - 1.0)));
    let (z, p) = if variance <= 0.0 {
        (0.0, 1.0)
    } else {
        let d = u - mean;
        let corrected = d.signum() * (d.abs() - 0.5).max(0.0);
        let z = corrected / variance.sqrt();
        (z, (2.0 * normal_upper_tail(z.abs())).min(1.0))
    };
    Some(MannWhitney {
        n1,
        n2,
        u,
        z,
        p,
        effect: u / (a * b),
    })
}

/// `1 - Φ(z)`, the standard normal's upper tail.
pub fn normal_upper_tail(z: f64) -> f64 {
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// The complementary error function, by the Chebyshev fit of Numerical
/// Recipes (`erfcc`, fractional error below 1.2e-7 everywhere): plenty
/// for a p-value compared with a significance of 0.05 or 0.01.
pub fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

/// The median of the non-NaN values (`NaN` when there are none).
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn the_scipy_documentation_example() {
        // SciPy's `mannwhitneyu` documentation (after Conover): ages of
        // male and female workers; U1 = 17, and with
        // method="asymptotic" p = 0.11134688653314041.
        let males = [19.0, 22.0, 16.0, 29.0, 24.0];
        let females = [20.0, 11.0, 17.0, 12.0];
        let r = mann_whitney(&males, &females).unwrap();
        assert_eq!((r.n1, r.n2), (5, 4));
        assert_eq!(r.u, 17.0);
        assert!(close(r.p, 0.111_346_886_533_140_41, 1e-6), "{r:?}");
        // U1 + U2 = n1 n2, and the test is symmetric.
        let s = mann_whitney(&females, &males).unwrap();
        assert_eq!(s.u, 3.0);
        assert!(close(s.p, r.p, 1e-12));
        assert!(close(s.z, -r.z, 1e-12));
    }

    #[test]
    fn ties_share_ranks_and_shrink_the_variance() {
        // x = [1, 2, 2, 3], y = [2, 3, 4, 5]: pooled ranks 1, 3, 3, 5.5 for
        // x (the 2s take ranks 2-4, the 3s 5-6), so R1 = 12.5, U1 = 2.5.
        // Ties: a group of 3 and one of 2, Σ(t³ - t) = 24 + 6 = 30;
        // σ² = 16/12 × (9 - 30/56) = 11.2857…; z = (2.5 - 8 + 0.5)/σ.
        let r = mann_whitney(&[1.0, 2.0, 2.0, 3.0], &[2.0, 3.0, 4.0, 5.0]).unwrap();
        assert_eq!(r.u, 2.5);
        let sigma = (16.0_f64 / 12.0 * (9.0 - 30.0 / 56.0)).sqrt();
        assert!(close(r.z, -5.0 / sigma, 1e-12), "{r:?}");
        // Φ(-1.48836) = 0.068335 (normal table), p two-sided 0.13667.
        assert!(close(r.p, 0.136_67, 2e-4), "{r:?}");
    }

    #[test]
    fn identical_samples_are_alike_and_shifted_ones_are_not() {
        let a: Vec<f64> = (0..50).map(|i| f64::from(i % 7)).collect();
        let r = mann_whitney(&a, &a).unwrap();
        assert!(
            close(r.p, 1.0, 1e-9) && close(r.effect, 0.5, 1e-12),
            "{r:?}"
        );
        let all_same = mann_whitney(&[1.0; 5], &[1.0; 5]).unwrap();
        assert_eq!((all_same.z, all_same.p), (0.0, 1.0));
        let higher: Vec<f64> = a.iter().map(|v| v + 3.0).collect();
        let r = mann_whitney(&higher, &a).unwrap();
        assert!(r.p < 1e-6 && r.z > 0.0 && r.effect > 0.5, "{r:?}");
    }

    #[test]
    fn nans_are_dropped_and_empty_samples_give_nothing() {
        assert!(mann_whitney(&[], &[1.0]).is_none());
        assert!(mann_whitney(&[f64::NAN], &[1.0]).is_none());
        let r = mann_whitney(&[1.0, f64::NAN, 2.0], &[3.0]).unwrap();
        assert_eq!((r.n1, r.n2), (2, 1));
    }

    #[test]
    fn the_normal_tail_matches_the_tables() {
        assert!(close(normal_upper_tail(0.0), 0.5, 1e-7));
        assert!(close(normal_upper_tail(1.959_964), 0.025, 1e-7));
        assert!(close(normal_upper_tail(-1.0), 0.841_344_746, 1e-7));
        assert!(close(normal_upper_tail(3.0), 0.001_349_898, 1e-8));
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
