//! `eligibility-bounds`: benefit eligibility rules stay within sane ranges.
//!
//! A typo in an eligibility threshold (an age of 650, an income cap of
//! -1, a co-pay of 250 %) silently changes who gets benefits, so this
//! validator checks every eligibility rule whose key names an age, an income
//! or a percentage against bounds. Agencies differ (a state's income caps are
//! not a county's), so the bounds come from the plugin's `[settings]`, with
//! per-agency overrides.
//!
//! # Which rules are checked
//! Rules whose `category` is in `settings.categories` (default
//! `["eligibility"]`). The rule key is split on anything that is not a
//! letter or digit, and the lower-cased words decide the kind:
//! - age: `age`, `ages`, `age_years`-style keys (word `age` or `ages`);
//! - income: `income`, `earnings`, `wages`, `salary`;
//! - percentage: `percent`, `percentage`, `pct`.
//!
//! A rule matching none is left alone. The value may be a number or a range
//! object `{"min": n, "max": n}`; each number is checked, and `min > max` is
//! an error.
//!
//! # Settings
//! ```toml
//! [settings]
//! categories = ["eligibility"]          # optional
//! age     = { min = 0, max = 120 }      # defaults shown
//! income  = { min = 0, max = 1000000 }
//! percent = { min = 0, max = 100 }
//! [settings.agencies."County of Springfield"]
//! income = { max = 250000 }             # overrides only the fields given
//! ```
//! Unknown keys are rejected so a typo is an error, not a silently ignored
//! bound.
//!
//! # Diagnostics
//! `eligibility.age-range`, `eligibility.income-range`,
//! `eligibility.percent-range` (errors, at `/rules/N/value` or
//! `/rules/N/value/min|max`), `eligibility.not-a-number` (error),
//! `eligibility.inverted-range` (error), `eligibility.percent-as-fraction`
//! (warning: `0 < value < 1` looks like a fraction of one, not a percentage).

use std::collections::BTreeMap;

use pde_plugin::serde_json::Value;
use pde_plugin::{Context, Diagnostic, Diagnostics, Level, Policy, Rule, Validator, log};
use serde::Deserialize;

/// The validator exported by this component.
pub struct EligibilityBounds;

impl Validator for EligibilityBounds {
    fn validate(policy: &Policy, ctx: &Context) -> Result<Vec<Diagnostic>, String> {
        check(policy, ctx)
    }
}

pde_plugin::export_validator!(EligibilityBounds);

/// The kinds of quantity this plugin knows bounds for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An age in years.
    Age,
    /// An income amount (currency units per the agency's convention).
    Income,
    /// A percentage, 0 to 100.
    Percent,
}

impl Kind {
    fn code(self) -> &'static str {
        match self {
            Kind::Age => "eligibility.age-range",
            Kind::Income => "eligibility.income-range",
            Kind::Percent => "eligibility.percent-range",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Kind::Age => "age",
            Kind::Income => "income threshold",
            Kind::Percent => "percentage",
        }
    }
}

/// Decides from a rule key which kind of quantity it holds, if any.
pub fn classify(key: &str) -> Option<Kind> {
    // Allocation-free: this runs once per rule on every call.
    let has = |set: &[&str]| {
        key.split(|c: char| !c.is_ascii_alphanumeric())
            .any(|w| set.iter().any(|s| w.eq_ignore_ascii_case(s)))
    };
    if has(&["percent", "percentage", "pct"]) {
        Some(Kind::Percent)
    } else if has(&["income", "earnings", "wages", "salary"]) {
        Some(Kind::Income)
    } else if has(&["age", "ages"]) {
        Some(Kind::Age)
    } else {
        None
    }
}

/// An inclusive range; either end may be left open in settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bound {
    /// Smallest allowed value.
    pub min: Option<f64>,
    /// Largest allowed value.
    pub max: Option<f64>,
}

impl Bound {
    fn over(self, base: Bound) -> Bound {
        Bound {
            min: self.min.or(base.min),
            max: self.max.or(base.max),
        }
    }

    fn contains(self, v: f64) -> bool {
        self.min.is_none_or(|m| v >= m) && self.max.is_none_or(|m| v <= m)
    }

    fn describe(self) -> String {
        match (self.min, self.max) {
            (Some(a), Some(b)) => format!("{a} to {b}"),
            (Some(a), None) => format!("at least {a}"),
            (None, Some(b)) => format!("at most {b}"),
            (None, None) => "anything".to_string(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Overrides {
    age: Option<Bound>,
    income: Option<Bound>,
    percent: Option<Bound>,
}

/// The plugin's `[settings]`, as documented in the crate docs.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    categories: Option<Vec<String>>,
    #[serde(flatten)]
    global: Overrides,
    #[serde(default)]
    agencies: BTreeMap<String, Overrides>,
}

/// The bounds in force for one policy, after defaults, settings and the
/// policy's agency override are layered.
#[derive(Debug, Clone, PartialEq)]
pub struct Bounds {
    /// Rule categories that are checked.
    pub categories: Vec<String>,
    /// Bound for ages.
    pub age: Bound,
    /// Bound for income thresholds.
    pub income: Bound,
    /// Bound for percentages.
    pub percent: Bound,
}

impl Bounds {
    /// Built-in defaults: ages 0..=120, income 0..=1,000,000, percent 0..=100.
    pub fn defaults() -> Self {
        Bounds {
            categories: vec!["eligibility".to_string()],
            age: Bound {
                min: Some(0.0),
                max: Some(120.0),
            },
            income: Bound {
                min: Some(0.0),
                max: Some(1_000_000.0),
            },
            percent: Bound {
                min: Some(0.0),
                max: Some(100.0),
            },
        }
    }

    /// Layers `settings` (and its override for `agency`) over the defaults.
    /// Fails on unknown keys or a bound whose min exceeds its max.
    pub fn from_settings(settings: &Value, agency: Option<&str>) -> Result<Self, String> {
        let s: Settings = if settings.is_null() {
            Settings::default()
        } else {
            Settings::deserialize(settings)
                .map_err(|e| format!("eligibility-bounds: invalid [settings]: {e}"))?
        };
        let mut b = Bounds::defaults();
        if let Some(c) = s.categories {
            b.categories = c;
        }
        let layers = std::iter::once(&s.global).chain(agency.and_then(|a| s.agencies.get(a)));
        for o in layers {
            b.age = o.age.map_or(b.age, |x| x.over(b.age));
            b.income = o.income.map_or(b.income, |x| x.over(b.income));
            b.percent = o.percent.map_or(b.percent, |x| x.over(b.percent));
        }
        for (name, bound) in [("age", b.age), ("income", b.income), ("percent", b.percent)] {
            if let (Some(lo), Some(hi)) = (bound.min, bound.max)
                && lo > hi
            {
                return Err(format!(
                    "eligibility-bounds: [settings] bound `{name}` has min {lo} > max {hi}; swap them"
                ));
            }
        }
        Ok(b)
    }

    fn bound(&self, kind: Kind) -> Bound {
        match kind {
            Kind::Age => self.age,
            Kind::Income => self.income,
            Kind::Percent => self.percent,
        }
    }
}

/// Runs the whole check: the plain function behind the component, also
/// used by the native benchmark.
pub fn check(policy: &Policy, ctx: &Context) -> Result<Vec<Diagnostic>, String> {
    let bounds = Bounds::from_settings(ctx.settings(), policy.agency())?;
    let mut out = Diagnostics::new();
    let mut checked = 0usize;
    for rule in policy.rules() {
        let in_scope = rule
            .category
            .is_some_and(|c| bounds.categories.iter().any(|k| k == c));
        let kind = rule.key.and_then(classify);
        if let (true, Some(kind)) = (in_scope, kind) {
            checked += 1;
            check_rule(&rule, kind, bounds.bound(kind), &mut out);
        }
    }
    log(
        Level::Debug,
        &format!(
            "eligibility-bounds: checked {checked} rule(s), {} finding(s)",
            out.len()
        ),
    );
    Ok(out.into_vec())
}

fn check_rule(rule: &Rule<'_>, kind: Kind, bound: Bound, out: &mut Diagnostics) {
    let key = rule.key.unwrap_or_default();
    // Pointers are built only when a finding needs one: most rules pass.
    let value_ptr = || rule.field_pointer("value");
    match rule.value {
        Some(Value::Number(n)) => {
            let v = n.as_f64().unwrap_or(f64::NAN);
            check_number(key, kind, bound, v, value_ptr, out);
        }
        Some(Value::Object(range)) if range.contains_key("min") || range.contains_key("max") => {
            let mut ends = [None, None];
            for (i, end) in ["min", "max"].into_iter().enumerate() {
                let Some(v) = range.get(end) else { continue };
                let ptr = || format!("{}/{end}", value_ptr());
                match v.as_f64() {
                    Some(v) => {
                        ends[i] = Some(v);
                        check_number(key, kind, bound, v, ptr, out);
                    }
                    None => {
                        out.error(
                            ptr(),
                            "eligibility.not-a-number",
                            format!("rule `{key}`: range {end} must be a number, found {v}"),
                        );
                    }
                }
            }
            if let [Some(lo), Some(hi)] = ends
                && lo > hi
            {
                out.error(
                    value_ptr(),
                    "eligibility.inverted-range",
                    format!("rule `{key}`: range min {lo} is greater than max {hi}"),
                );
            }
        }
        other => {
            let found = other.map_or_else(|| "nothing".to_string(), Value::to_string);
            out.error(
                value_ptr(),
                "eligibility.not-a-number",
                format!(
                    "rule `{key}` is an {} and must be a number or {{\"min\", \"max\"}}, found {found}",
                    kind.noun()
                ),
            );
        }
    }
}

fn check_number(
    key: &str,
    kind: Kind,
    bound: Bound,
    v: f64,
    ptr: impl Fn() -> String,
    out: &mut Diagnostics,
) {
    if !bound.contains(v) {
        out.error(
            ptr(),
            kind.code(),
            format!(
                "rule `{key}`: {} {v} is outside the allowed range ({}); fix the value or adjust this agency's bounds in the plugin settings",
                kind.noun(),
                bound.describe()
            ),
        );
    } else if kind == Kind::Percent && v > 0.0 && v < 1.0 {
        out.warning(
            ptr(),
            "eligibility.percent-as-fraction",
            format!(
                "rule `{key}`: percentage {v} looks like a fraction; percentages are written 0 to 100 (did you mean {}?)",
                v * 100.0
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pde_plugin::Severity;
    use pde_plugin::serde_json::json;

    fn policy(agency: &str, rules: Value) -> Policy {
        Policy::from_value(json!({
            "id": "42", "version": "1.0.0", "title": "t", "agency": agency,
            "effective": "2030-01-01", "approvals": [], "rules": rules, "config": {}
        }))
    }

    fn codes(d: &[Diagnostic]) -> Vec<(&str, &str)> {
        d.iter()
            .map(|d| (d.path.as_str(), d.code.as_str()))
            .collect()
    }

    #[test]
    fn classify_by_key_words() {
        assert_eq!(classify("snap.max_age"), Some(Kind::Age));
        assert_eq!(classify("Household-Income-Cap"), Some(Kind::Income));
        assert_eq!(classify("copay_pct"), Some(Kind::Percent));
        assert_eq!(classify("page_limit"), None, "`page` is not `age`");
        assert_eq!(classify("storage"), None);
    }

    #[test]
    fn sane_policy_passes() {
        let p = policy(
            "HHS",
            json!([
                {"key": "snap.min_age", "category": "eligibility", "value": 18, "description": ""},
                {"key": "snap.max_income", "category": "eligibility", "value": 32000, "description": ""},
                {"key": "snap.copay_percent", "category": "eligibility", "value": 20, "description": ""},
                {"key": "snap.age_band", "category": "eligibility", "value": {"min": 18, "max": 64}, "description": ""}
            ]),
        );
        assert_eq!(check(&p, &Context::default()).unwrap(), vec![]);
    }

    #[test]
    fn out_of_range_values_point_at_the_value() {
        let p = policy(
            "HHS",
            json!([
                {"key": "form.title", "category": "forms", "value": "x", "description": ""},
                {"key": "snap.max_age", "category": "eligibility", "value": 650, "description": ""},
                {"key": "snap.max_income", "category": "eligibility", "value": -1, "description": ""},
                {"key": "snap.copay_pct", "category": "eligibility", "value": 250, "description": ""},
                {"key": "snap.max_age_other", "category": "payments", "value": 999, "description": "not eligibility: ignored"}
            ]),
        );
        let d = check(&p, &Context::default()).unwrap();
        assert_eq!(
            codes(&d),
            vec![
                ("/rules/1/value", "eligibility.age-range"),
                ("/rules/2/value", "eligibility.income-range"),
                ("/rules/3/value", "eligibility.percent-range"),
            ]
        );
        assert!(d.iter().all(|d| d.severity == Severity::Error));
        assert!(d[0].message.contains("650") && d[0].message.contains("0 to 120"));
    }

    #[test]
    fn ranges_non_numbers_and_fractions() {
        let p = policy(
            "HHS",
            json!([
                {"key": "age_band", "category": "eligibility", "value": {"min": 70, "max": 20}, "description": ""},
                {"key": "age_cap", "category": "eligibility", "value": {"min": 0, "max": 200}, "description": ""},
                {"key": "income_cap", "category": "eligibility", "value": "lots", "description": ""},
                {"key": "copay_pct", "category": "eligibility", "value": 0.2, "description": ""}
            ]),
        );
        let d = check(&p, &Context::default()).unwrap();
        assert_eq!(
            codes(&d),
            vec![
                ("/rules/0/value", "eligibility.inverted-range"),
                ("/rules/1/value/max", "eligibility.age-range"),
                ("/rules/2/value", "eligibility.not-a-number"),
                ("/rules/3/value", "eligibility.percent-as-fraction"),
            ]
        );
        assert_eq!(d[3].severity, Severity::Warning);
    }

    #[test]
    fn per_agency_bounds_override_globals() {
        let settings = json!({
            "income": {"max": 100000},
            "agencies": {"County": {"income": {"max": 50000}}}
        });
        let rules = json!([{"key": "max_income", "category": "eligibility", "value": 60000, "description": ""}]);
        let ctx = Context::new("production", settings);
        assert!(
            check(&policy("State", rules.clone()), &ctx)
                .unwrap()
                .is_empty()
        );
        let d = check(&policy("County", rules), &ctx).unwrap();
        assert_eq!(
            codes(&d),
            vec![("/rules/0/value", "eligibility.income-range")]
        );
        assert!(d[0].message.contains("0 to 50000"), "{}", d[0].message);
    }

    #[test]
    fn custom_categories_and_bad_settings() {
        let ctx = Context::new("", json!({"categories": ["benefits"], "age": {"max": 99}}));
        let p = policy(
            "X",
            json!([{"key": "age", "category": "benefits", "value": 100, "description": ""}]),
        );
        assert_eq!(check(&p, &ctx).unwrap().len(), 1);
        let typo = Context::new("", json!({"agee": {"max": 1}}));
        assert!(check(&p, &typo).unwrap_err().contains("agee"));
        let inverted = Context::new("", json!({"age": {"min": 10, "max": 1}}));
        assert!(check(&p, &inverted).unwrap_err().contains("min 10 > max 1"));
    }

    #[test]
    fn logs_a_summary() {
        pde_plugin::take_native_logs();
        check(&policy("X", json!([])), &Context::default()).unwrap();
        let logs = pde_plugin::take_native_logs();
        assert_eq!(logs.len(), 1);
        assert!(logs[0].1.contains("checked 0 rule(s)"));
    }
}
