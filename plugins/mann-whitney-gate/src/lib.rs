//! `mann-whitney-gate`: a pde gate plugin (`pde:plugin@0.3.0`, world
//! `gate`) that judges a rollout wave by a two-sided Mann-Whitney U test of
//! the wave's samples against the baseline's, as Kayenta's canary judge
//! does.
//!
//! Settings (the manifest's `[settings]`):
//! - `alpha` (default 0.05): the significance level; a difference counts
//!   when the two-sided p-value is below it;
//! - `min_samples` (default 10): fewer values than this on either side is
//!   `inconclusive` (the normal approximation needs about 10 per side);
//! - `direction` (default `"higher"`): which difference fails the wave.
//!   `"higher"`: the metric is worse when higher (an error ratio, a
//!   latency), so a wave significantly *lower* than the baseline passes;
//!   `"lower"`: the reverse (a success ratio); `"either"`: any significant
//!   difference fails.
//!
//! No baseline (the last wave, when every routed service is in it) is
//! `inconclusive`: there is nothing to compare with. The statistics it
//! returns: `u`, `z`, `p-value`, `effect` (`U / (n1 n2)`, the probability
//! that a wave value is higher than a baseline value), `n-wave`,
//! `n-baseline`, `median-wave`, `median-baseline`.
//!
//! The test itself is `stats.rs`, shared verbatim with the native side of
//! the `gate_plugin` benchmark.
//!
//! On wasm the crate is `no_std` (see `bare.rs`): without `std` the
//! component imports nothing but `pde:plugin/types`, where a `std` build
//! asks for thirteen WASI interfaces it never calls, each of which every
//! fresh instance must be linked against.

#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

#[cfg(target_arch = "wasm32")]
mod bare;
pub mod stats;

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use alloc::{format, vec};

use serde::Deserialize;

/// The plugin's settings, strictly read.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Significance level of the two-sided test.
    pub alpha: f64,
    /// Fewer values than this on either side: inconclusive.
    pub min_samples: usize,
    /// Which difference fails the wave.
    pub direction: Direction,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            alpha: 0.05,
            min_samples: 10,
            direction: Direction::Higher,
        }
    }
}

/// Which significant difference fails the wave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// The wave's values are higher (worse for an error ratio).
    Higher,
    /// The wave's values are lower (worse for a success ratio).
    Lower,
    /// Any difference.
    Either,
}

impl Settings {
    /// Reads `[settings]` as JSON text; an unusable value is an error.
    pub fn parse(json: &str) -> Result<Settings, String> {
        let s: Settings = serde_json::from_str(if json.trim().is_empty() { "{}" } else { json })
            .map_err(|e| format!("mann-whitney-gate: bad [settings]: {e}"))?;
        if !(s.alpha > 0.0 && s.alpha < 1.0) {
            return Err(format!(
                "mann-whitney-gate: alpha = {} must be between 0 and 1",
                s.alpha
            ));
        }
        Ok(s)
    }
}

/// The verdict, as the plugin decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Alike, or different in the harmless direction.
    Pass,
    /// Significantly different in the harmful direction.
    Fail,
    /// Too few samples, or no baseline.
    Inconclusive,
}

/// The judgement on one wave: verdict, reason, statistics.
pub fn judge(
    settings: &Settings,
    wave: &[f64],
    baseline: Option<&[f64]>,
) -> (Verdict, String, Vec<(String, f64)>) {
    let Some(baseline) = baseline else {
        return (
            Verdict::Inconclusive,
            "no baseline: every routed service is in this or an earlier wave".into(),
            Vec::new(),
        );
    };
    // Each side is sorted once, for the ranks and for its median.
    let (wave, baseline) = (stats::Sorted::new(wave), stats::Sorted::new(baseline));
    let (n1, n2) = (wave.len(), baseline.len());
    let mut stats = vec![
        ("n-wave".to_string(), n1 as f64),
        ("n-baseline".to_string(), n2 as f64),
    ];
    if n1 < settings.min_samples || n2 < settings.min_samples {
        return (
            Verdict::Inconclusive,
            format!(
                "too few samples: {n1} from the wave and {n2} from the baseline, at least {} \
                 each are needed",
                settings.min_samples.max(1)
            ),
            stats,
        );
    }
    let Some(r) = stats::mann_whitney_sorted(&wave, &baseline) else {
        return (Verdict::Inconclusive, "no numeric samples".into(), stats);
    };
    let (mw, mb) = (wave.median(), baseline.median());
    stats.extend([
        ("u".to_string(), r.u),
        ("z".to_string(), r.z),
        ("p-value".to_string(), r.p),
        ("effect".to_string(), r.effect),
        ("median-wave".to_string(), mw),
        ("median-baseline".to_string(), mb),
    ]);
    let significant = r.p < settings.alpha;
    let side = if r.z > 0.0 { "higher" } else { "lower" };
    let harmful = match settings.direction {
        Direction::Higher => r.z > 0.0,
        Direction::Lower => r.z < 0.0,
        Direction::Either => true,
    };
    let summary = format!(
        "Mann-Whitney U = {}, p = {:.3e} (alpha {}); wave median {mw} against baseline median {mb}",
        r.u, r.p, settings.alpha
    );
    if significant && harmful {
        (
            Verdict::Fail,
            format!("the wave is significantly {side} than the baseline: {summary}"),
            stats,
        )
    } else if significant {
        (
            Verdict::Pass,
            format!(
                "the wave is significantly {side} than the baseline, which is not worse: {summary}"
            ),
            stats,
        )
    } else {
        (
            Verdict::Pass,
            format!("no significant difference from the baseline: {summary}"),
            stats,
        )
    }
}

/// The component's export, on wasm only: natively the crate is the logic
/// above, unit tested with `cargo test`.
#[cfg(target_arch = "wasm32")]
mod component {
    // Generated code: the canonical ABI flattens records into many parameters.
    #![allow(clippy::too_many_arguments, missing_docs, unsafe_code)]

    wit_bindgen::generate!({
        path: "../../wit/v0.3.0",
        world: "pde:plugin/gate@0.3.0",
        generate_all,
    });

    use alloc::string::String;
    use alloc::vec::Vec;
    use pde::plugin::types::{Samples, Verdict as WitVerdict};

    struct MannWhitneyGate;

    fn values(s: &Samples) -> Vec<f64> {
        let mut all = Vec::with_capacity(s.series.iter().map(|x| x.values.len()).sum());
        for x in &s.series {
            all.extend_from_slice(&x.values);
        }
        all
    }

    impl Guest for MannWhitneyGate {
        fn gate(_policy: Policy, context: Context, input: GateInput) -> Result<Judgement, String> {
            let settings = super::Settings::parse(&context.settings)?;
            let wave = values(&input.wave_samples);
            let baseline = input.baseline_samples.as_ref().map(values);
            let (verdict, reason, statistics) = super::judge(&settings, &wave, baseline.as_deref());
            Ok(Judgement {
                verdict: match verdict {
                    super::Verdict::Pass => WitVerdict::Pass,
                    super::Verdict::Fail => WitVerdict::Fail,
                    super::Verdict::Inconclusive => WitVerdict::Inconclusive,
                },
                reason,
                statistics,
            })
        }
    }

    export!(MannWhitneyGate);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(base: f64, n: usize) -> Vec<f64> {
        // Deterministic jitter around `base`.
        (0..n)
            .map(|i| base + ((i * 7919) % 13) as f64 * 0.001)
            .collect()
    }

    #[test]
    fn a_higher_wave_fails_and_a_like_one_passes() {
        let s = Settings::default();
        let (v, why, stats) = judge(&s, &series(0.05, 30), Some(&series(0.01, 30)));
        assert_eq!(v, Verdict::Fail, "{why}");
        assert!(why.contains("significantly higher"), "{why}");
        assert!(stats.iter().any(|(k, p)| k == "p-value" && *p < 0.05));
        let (v, why, _) = judge(&s, &series(0.01, 30), Some(&series(0.01, 30)));
        assert_eq!(v, Verdict::Pass, "{why}");
    }

    #[test]
    fn direction_decides_which_difference_fails() {
        let low = series(0.01, 30);
        let high = series(0.05, 30);
        let mut s = Settings::default();
        assert_eq!(judge(&s, &low, Some(&high)).0, Verdict::Pass);
        s.direction = Direction::Lower;
        assert_eq!(judge(&s, &low, Some(&high)).0, Verdict::Fail);
        assert_eq!(judge(&s, &high, Some(&low)).0, Verdict::Pass);
        s.direction = Direction::Either;
        assert_eq!(judge(&s, &high, Some(&low)).0, Verdict::Fail);
    }

    #[test]
    fn too_few_samples_or_no_baseline_is_inconclusive() {
        let s = Settings::default();
        assert_eq!(
            judge(&s, &series(0.05, 9), Some(&series(0.01, 30))).0,
            Verdict::Inconclusive
        );
        assert_eq!(judge(&s, &series(0.05, 30), None).0, Verdict::Inconclusive);
        let few = Settings {
            min_samples: 3,
            ..Settings::default()
        };
        assert_ne!(
            judge(&few, &series(0.05, 9), Some(&series(0.01, 30))).0,
            Verdict::Inconclusive
        );
    }

    #[test]
    fn settings_are_read_strictly() {
        assert_eq!(Settings::parse("{}").unwrap(), Settings::default());
        let s = Settings::parse(r#"{"alpha": 0.01, "direction": "either"}"#).unwrap();
        assert_eq!((s.alpha, s.direction), (0.01, Direction::Either));
        assert!(Settings::parse(r#"{"alpha": 2}"#).is_err());
        assert!(Settings::parse(r#"{"alfa": 0.1}"#).is_err());
        assert!(Settings::parse(r#"{"direction": "up"}"#).is_err());
    }
}
