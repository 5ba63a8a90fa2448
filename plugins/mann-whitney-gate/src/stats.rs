//! The Mann-Whitney U test, two-sided, by the normal approximation with a
//! tie correction and a continuity correction.
//!
//! Plain Rust, so that the very same code runs in the plugin (wasm) and in
//! the native side of the benchmark (`host/engine/benches/gate_plugin.rs`
//! links this crate). Its one dependency is `libm`, for `sqrt` and `exp`,
//! which `core` lacks and the plugin's `no_std` build needs.
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

use alloc::vec::Vec;

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

/// The non-NaN values of one sample, sorted once: the test ranks them by
/// merging the two sides, and each side's median is read from them. (The
/// first version sorted a pooled copy for the ranks and each side again for
/// its median: three sorts where two do; a call now takes about half the
/// time, natively and in the sandbox.)
///
/// They are kept as integer keys in the values' order, so the sort compares
/// plain `u64`s rather than calling `f64::total_cmp`. `-0.0` is stored as
/// `0.0`, so the two tie, as `==` says they do. The keys end with [`END`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sorted(Vec<u64>);

impl Sorted {
    /// Sorts the non-NaN values of `values`.
    pub fn new(values: &[f64]) -> Sorted {
        let mut keys: Vec<u64> = values
            .iter()
            .filter(|v| !v.is_nan())
            .map(|&v| key(v))
            .collect();
        keys.sort_unstable();
        keys.push(END);
        Sorted(keys)
    }

    /// How many values there are (NaNs dropped).
    pub fn len(&self) -> usize {
        self.0.len() - 1
    }

    /// True when there is no value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The median (`NaN` when there is no value).
    pub fn median(&self) -> f64 {
        let k = &self.0[..self.len()];
        let m = k.len() / 2;
        match k.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => unkey(k[m]),
            _ => (unkey(k[m - 1]) + unkey(k[m])) / 2.0,
        }
    }
}

/// After every key (the largest, +inf's, is `0xfff0_…`): it ends each side,
/// so the merge in [`mann_whitney_sorted`] needs no end-of-side checks.
const END: u64 = u64::MAX;

/// A key whose unsigned order is the order of non-NaN `f64`s.
fn key(v: f64) -> u64 {
    let bits = (v + 0.0).to_bits(); // -0.0 + 0.0 is 0.0
    if bits >> 63 == 1 {
        !bits
    } else {
        bits | 1 << 63
    }
}

/// The value of a [`key`].
fn unkey(k: u64) -> f64 {
    f64::from_bits(if k >> 63 == 1 { k & !(1 << 63) } else { !k })
}

/// Runs the test on `x` against `y`; `None` when either has no
/// (non-NaN) value.
pub fn mann_whitney(x: &[f64], y: &[f64]) -> Option<MannWhitney> {
    mann_whitney_sorted(&Sorted::new(x), &Sorted::new(y))
}

/// [`mann_whitney`] on values already sorted.
pub fn mann_whitney_sorted(x: &Sorted, y: &Sorted) -> Option<MannWhitney> {
    let (a, b) = (&x.0, &y.0);
    let (n1, n2) = (x.len(), y.len());
    if n1 == 0 || n2 == 0 {
        return None;
    }
    let n = n1 + n2;
    // Walk the two sorted sides as one pooled sample, a group of equal
    // values at a time. Integer sums in the loop: it is most of a call's
    // time after the sorts, and in wasm each int-to-float conversion and
    // branch costs more than natively.
    let (mut i, mut j, mut below) = (0, 0, 0);
    // Twice the wave's rank sum, so that shared ranks stay whole numbers.
    let mut rank_sum2: u64 = 0;
    let mut ties = 0.0;
    while below < n {
        let v = a[i].min(b[j]);
        let (i0, j0) = (i, j);
        while a[i] == v {
            i += 1;
        }
        while b[j] == v {
            j += 1;
        }
        let (in_first, t) = (i - i0, i - i0 + j - j0);
        // Ranks below+1 ..= below+t, shared: (2 below + t + 1) / 2 each.
        rank_sum2 += (2 * below + t + 1) as u64 * in_first as u64;
        if t > 1 {
            let t = t as f64;
            ties += t * t * t - t;
        }
        below += t;
    }
    let rank_sum = rank_sum2 as f64 / 2.0;
    let (a, b, nf) = (n1 as f64, n2 as f64, n as f64);
    let u = rank_sum - a * (a + 1.0) / 2.0;
    let mean = a * b / 2.0;
    let variance = a * b / 12.0 * ((nf + 1.0) - ties / (nf * (nf - 1.0)));
    let (z, p) = if variance <= 0.0 {
        (0.0, 1.0)
    } else {
        let d = u - mean;
        let corrected = d.signum() * (d.abs() - 0.5).max(0.0);
        let z = corrected / libm::sqrt(variance);
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
    0.5 * erfc(z / core::f64::consts::SQRT_2)
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
    let r = t * libm::exp(poly);
    if x >= 0.0 { r } else { 2.0 - r }
}

/// The median of the non-NaN values (`NaN` when there are none).
pub fn median(values: &[f64]) -> f64 {
    Sorted::new(values).median()
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

    /// U counted pair by pair, the definition the ranks shortcut.
    fn u_by_pairs(x: &[f64], y: &[f64]) -> f64 {
        let mut u = 0.0;
        for a in x.iter().filter(|v| !v.is_nan()) {
            for b in y.iter().filter(|v| !v.is_nan()) {
                if a > b {
                    u += 1.0;
                } else if a == b {
                    u += 0.5;
                }
            }
        }
        u
    }

    #[test]
    fn the_rank_sum_agrees_with_counting_pairs_on_larger_samples() {
        // Deterministic pseudo-random values with many ties (a coarse grid),
        // both signs, zeros of both signs, infinities and NaNs.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..20 {
            let mut draw = |n: usize| -> Vec<f64> {
                (0..n)
                    .map(|_| match next() % 50 {
                        0 => f64::NAN,
                        1 => f64::INFINITY,
                        2 => f64::NEG_INFINITY,
                        3 => -0.0,
                        4 => 0.0,
                        r => (r as f64 - 25.0) / 4.0,
                    })
                    .collect()
            };
            let (x, y) = (draw(100 + round * 7), draw(150 - round * 3));
            let r = mann_whitney(&x, &y).unwrap();
            assert_eq!(r.u, u_by_pairs(&x, &y), "round {round}");
            let s = mann_whitney(&y, &x).unwrap();
            assert_eq!(r.u + s.u, (r.n1 * r.n2) as f64, "round {round}");
            assert!(close(r.p, s.p, 1e-12) && close(r.z, -s.z, 1e-12));
        }
    }

    #[test]
    fn keys_keep_the_order_and_the_value_of_every_number() {
        let values = [
            f64::NEG_INFINITY,
            -f64::MAX,
            -1.5,
            -f64::MIN_POSITIVE,
            -1e-310, // subnormal
            0.0,
            1e-310,
            f64::MIN_POSITIVE,
            2.25,
            f64::MAX,
            f64::INFINITY,
        ];
        for pair in values.windows(2) {
            assert!(key(pair[0]) < key(pair[1]), "{pair:?}");
        }
        for v in values {
            assert_eq!(unkey(key(v)).to_bits(), v.to_bits(), "{v}");
        }
        assert_eq!(unkey(key(-0.0)).to_bits(), 0.0_f64.to_bits());
        assert!(key(f64::INFINITY) < END);
        assert_eq!(median(&[-3.0, -1.0]), -2.0);
        assert_eq!(median(&[-7.5, 4.0, -1.25]), -1.25);
    }

    #[test]
    fn z_and_p_follow_the_tie_corrected_formula_on_larger_samples() {
        // The variance's tie term counted independently: group the pooled
        // values by value (with -0.0 as 0.0) and sum t³ - t.
        let x: Vec<f64> = (0..300).map(|i| f64::from((i * 7) % 23) - 11.0).collect();
        let y: Vec<f64> = (0..200).map(|i| f64::from((i * 5) % 19) - 8.0).collect();
        let mut counts = std::collections::BTreeMap::<u64, f64>::new();
        for v in x.iter().chain(&y) {
            *counts.entry((v + 0.0).to_bits()).or_default() += 1.0;
        }
        let ties: f64 = counts.values().map(|t| t * t * t - t).sum();
        let (a, b) = (x.len() as f64, y.len() as f64);
        let n = a + b;
        let sigma = (a * b / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)))).sqrt();
        let u = u_by_pairs(&x, &y);
        let d = u - a * b / 2.0;
        let z = d.signum() * (d.abs() - 0.5) / sigma;
        let r = mann_whitney(&x, &y).unwrap();
        assert_eq!(r.u, u);
        assert!(close(r.z, z, 1e-12), "{} against {z}", r.z);
        assert!(close(r.p, 2.0 * normal_upper_tail(z.abs()), 1e-12), "{r:?}");
    }

    #[test]
    fn zeros_of_both_signs_tie_and_infinities_rank_at_the_ends() {
        let r = mann_whitney(&[-0.0], &[0.0]).unwrap();
        assert_eq!(r.u, 0.5);
        let r = mann_whitney(&[f64::INFINITY, f64::NEG_INFINITY], &[1.0, 2.0]).unwrap();
        assert_eq!(r.u, 2.0);
        assert_eq!(
            median(&[f64::NEG_INFINITY, -1.5, f64::NAN]),
            f64::NEG_INFINITY
        );
        assert_eq!(median(&[-2.0, -0.0, 3.0]), 0.0);
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
