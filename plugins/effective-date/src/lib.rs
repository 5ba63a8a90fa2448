//! `effective-date`: the policy takes effect on a real, future date, and the
//! approvals typed into it are well formed.
//!
//! A policy whose `effective` date is malformed or already past would be
//! applied retroactively by the receiving services: a release blocker.
//!
//! This plugin does **not** count approvals. pde does: it counts the signed
//! approvals (`pde approve`, `policies/<id>.approvals/`) and, where an
//! environment allows them, the typed-in ones, against the environment's
//! `min_approvals` and `required_roles`. A plugin sees only the document, so
//! a count made here would see none of the signed approvals and fail a
//! policy pde has accepted (issue 26).
//!
//! # Checks
//! - `effective` present (`effective.missing`), strictly `YYYY-MM-DD` and a
//!   real calendar date (`effective.malformed`), not before today
//!   (`effective.in-past`; today itself is fine), and not absurdly far ahead
//!   (warning `effective.far-future`, default more than 1826 days ≈ 5 years,
//!   which catches typos like `2205-01-01`).
//! - each typed-in `approvals` entry has non-empty `by`, `role` and `at`
//!   (`approvals.incomplete`, at `/approvals/N/<field>`); `at` starts with a
//!   valid `YYYY-MM-DD` (`approvals.bad-date`) and is not after today
//!   (warning `approvals.future`); one person approving twice is a warning
//!   (`approvals.duplicate`). A policy with no typed-in entries passes.
//!
//! # Today
//! The component reads the wall clock (WASI `wall-clock`, which the pde
//! sandbox provides). `settings.today = "YYYY-MM-DD"` overrides it, for
//! deterministic tests and for validating a policy "as of" a planned
//! release day. A clock reading before 2020 is taken as a stubbed clock and
//! is a plugin error (set `today` instead), never a silent pass.
//!
//! # Settings
//! ```toml
//! [settings]
//! today = "2030-01-01"            # optional override of the clock
//! max_future_days = 1826
//! ```
//! `min_approvals` and `required_roles` (settings of version 0.1) are
//! refused with a message pointing at pde.toml's `[environments.X]`, where
//! they are counted, rather than silently ignored.

use std::collections::BTreeSet;

use pde_plugin::{Context, Diagnostic, Diagnostics, Policy, Validator};
use serde::Deserialize;

/// The validator exported by this component.
pub struct EffectiveDate;

impl Validator for EffectiveDate {
    fn validate(policy: &Policy, ctx: &Context) -> Result<Vec<Diagnostic>, String> {
        check(policy, ctx)
    }
}

pde_plugin::export_validator!(EffectiveDate);

pub use pde_plugin::Date;

/// The plugin's `[settings]` (see the crate docs).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Overrides the wall clock (`YYYY-MM-DD`).
    pub today: Option<String>,
    /// Retired (0.1): pde counts approvals. Present only to be refused by
    /// name, with where the setting belongs now.
    pub min_approvals: Option<serde::de::IgnoredAny>,
    /// Retired (0.1), as `min_approvals`.
    pub required_roles: Option<serde::de::IgnoredAny>,
    /// Effective dates further ahead than this many days get a warning.
    pub max_future_days: i64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            today: None,
            min_approvals: None,
            required_roles: None,
            max_future_days: 1826,
        }
    }
}

/// Runs the whole check (the plain function behind the component).
pub fn check(policy: &Policy, ctx: &Context) -> Result<Vec<Diagnostic>, String> {
    let settings: Settings = ctx
        .settings_as()
        .map_err(|e| format!("effective-date: {e}"))?;
    for (name, set) in [
        ("min_approvals", settings.min_approvals.is_some()),
        ("required_roles", settings.required_roles.is_some()),
    ] {
        if set {
            return Err(format!(
                "effective-date: settings.{name} is no longer read: pde counts approvals, \
                 signed ones included; set `{name}` under [environments.<env>] in pde.toml \
                 and remove it from this plugin's [settings]"
            ));
        }
    }
    let today = match &settings.today {
        Some(t) => Date::parse(t).ok_or_else(|| {
            format!("effective-date: settings.today `{t}` is not a YYYY-MM-DD date")
        })?,
        None => plausible_clock(Date::today_utc()?)?,
    };
    Ok(check_as_of(policy, &settings, today))
}

/// Refuses a clock reading before 2020: a host that stubs the wall clock
/// (e.g. at the epoch) would otherwise make every date look far ahead and no
/// date look past, silently passing stale policies.
pub fn plausible_clock(today: Date) -> Result<Date, String> {
    if today.year < 2020 {
        return Err(format!(
            "effective-date: the wall clock reads {today}, which cannot be right; \
             set `today` in the plugin's [settings] or give the sandbox a real clock"
        ));
    }
    Ok(today)
}

/// The check with an explicit `today`.
pub fn check_as_of(policy: &Policy, settings: &Settings, today: Date) -> Vec<Diagnostic> {
    let mut out = Diagnostics::new();
    check_effective(policy, settings, today, &mut out);
    check_approvals(policy, today, &mut out);
    out.into_vec()
}

fn check_effective(policy: &Policy, settings: &Settings, today: Date, out: &mut Diagnostics) {
    let Some(raw) = policy.document().get("effective") else {
        out.error(
            "/effective",
            "effective.missing",
            "the policy has no `effective` date; add \"effective\": \"YYYY-MM-DD\"",
        );
        return;
    };
    let Some(date) = raw.as_str().and_then(Date::parse) else {
        out.error(
            "/effective",
            "effective.malformed",
            format!("effective date {raw} is not a real YYYY-MM-DD date"),
        );
        return;
    };
    let ahead = date.days_since_epoch() - today.days_since_epoch();
    if ahead < 0 {
        out.error(
            "/effective",
            "effective.in-past",
            format!(
                "effective date {date} is {} day(s) before today ({today}); a past date would apply the policy retroactively",
                -ahead
            ),
        );
    } else if ahead > settings.max_future_days {
        out.warning(
            "/effective",
            "effective.far-future",
            format!(
                "effective date {date} is {ahead} days ahead (more than {}); is the year a typo?",
                settings.max_future_days
            ),
        );
    }
}

/// Well-formedness of the typed-in entries only; how many approvals a policy
/// has, and of which roles, is pde's to count (see the crate docs).
fn check_approvals(policy: &Policy, today: Date, out: &mut Diagnostics) {
    let approvals = policy.approvals();
    let mut seen = BTreeSet::new();
    for a in &approvals {
        for (field, value) in [("by", a.by), ("role", a.role), ("at", a.at)] {
            if value.is_none_or(|v| v.trim().is_empty()) {
                out.error(
                    a.field_pointer(field),
                    "approvals.incomplete",
                    format!("approval #{} has no `{field}`", a.index + 1),
                );
            }
        }
        if let Some(at) = a.at.filter(|s| !s.trim().is_empty()) {
            match at.get(..10).and_then(Date::parse) {
                None => {
                    out.error(
                        a.field_pointer("at"),
                        "approvals.bad-date",
                        format!(
                            "approval #{} date `{at}` does not start with a YYYY-MM-DD date",
                            a.index + 1
                        ),
                    );
                }
                Some(d) if d > today => {
                    out.warning(
                        a.field_pointer("at"),
                        "approvals.future",
                        format!(
                            "approval #{} is dated {d}, after today ({today})",
                            a.index + 1
                        ),
                    );
                }
                Some(_) => {}
            }
        }
        if let Some(by) = a.by.filter(|s| !s.trim().is_empty())
            && !seen.insert(by.trim().to_lowercase())
        {
            out.warning(
                a.field_pointer("by"),
                "approvals.duplicate",
                format!("`{by}` approved more than once; count distinct people"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pde_plugin::Severity;
    use pde_plugin::serde_json::{Value, json};

    fn policy(effective: Value, approvals: Value) -> Policy {
        Policy::from_value(json!({
            "id": "1", "version": "1.0.0", "title": "t", "agency": "A",
            "effective": effective, "approvals": approvals, "rules": [], "config": {}
        }))
    }

    fn ok_approvals() -> Value {
        json!([{"by": "ana", "role": "policy-owner", "at": "2029-12-01T10:00:00Z"}])
    }

    fn found(d: &[Diagnostic]) -> Vec<(&str, &str)> {
        d.iter()
            .map(|d| (d.path.as_str(), d.code.as_str()))
            .collect()
    }

    fn ctx(today: &str) -> Context {
        Context::new("", json!({"today": today}))
    }

    #[test]
    fn future_and_today_pass_past_fails() {
        let today = "2030-01-01";
        assert!(
            check(&policy(json!("2030-01-01"), ok_approvals()), &ctx(today))
                .unwrap()
                .is_empty()
        );
        assert!(
            check(&policy(json!("2030-06-01"), ok_approvals()), &ctx(today))
                .unwrap()
                .is_empty()
        );
        let d = check(&policy(json!("2029-12-31"), ok_approvals()), &ctx(today)).unwrap();
        assert_eq!(found(&d), vec![("/effective", "effective.in-past")]);
        assert!(
            d[0].message.contains("1 day(s) before today (2030-01-01)"),
            "{}",
            d[0].message
        );
    }

    #[test]
    fn malformed_missing_and_far_future() {
        let d = check(
            &policy(json!("01/02/2030"), ok_approvals()),
            &ctx("2030-01-01"),
        )
        .unwrap();
        assert_eq!(found(&d), vec![("/effective", "effective.malformed")]);
        let d = check(&policy(json!(20300101), ok_approvals()), &ctx("2030-01-01")).unwrap();
        assert_eq!(found(&d), vec![("/effective", "effective.malformed")]);
        let mut p = policy(json!("x"), ok_approvals()).document().clone();
        p.as_object_mut().unwrap().remove("effective");
        let d = check(&Policy::from_value(p), &ctx("2030-01-01")).unwrap();
        assert_eq!(found(&d), vec![("/effective", "effective.missing")]);
        let d = check(
            &policy(json!("2205-01-01"), ok_approvals()),
            &ctx("2030-01-01"),
        )
        .unwrap();
        assert_eq!(found(&d), vec![("/effective", "effective.far-future")]);
        assert_eq!(d[0].severity, Severity::Warning);
    }

    #[test]
    fn approvals_complete_and_distinct() {
        let approvals = json!([
            {"by": "ana", "role": "policy-owner", "at": "2029-12-01"},
            {"by": "", "role": "legal", "at": "yesterday"},
            {"by": "ANA", "role": "cfo", "at": "2031-01-01"},
            "not an object"
        ]);
        let d = check(&policy(json!("2030-02-01"), approvals), &ctx("2030-01-01")).unwrap();
        assert_eq!(
            found(&d),
            vec![
                ("/approvals/1/by", "approvals.incomplete"),
                ("/approvals/1/at", "approvals.bad-date"),
                ("/approvals/2/at", "approvals.future"),
                ("/approvals/2/by", "approvals.duplicate"),
                ("/approvals/3/by", "approvals.incomplete"),
                ("/approvals/3/role", "approvals.incomplete"),
                ("/approvals/3/at", "approvals.incomplete"),
            ]
        );
    }

    #[test]
    fn approvals_are_not_counted_here() {
        // No typed-in entries (the approvals are signed, beside the policy):
        // nothing to say. pde counts them, signed ones included.
        let d = check(&policy(json!("2030-01-02"), json!([])), &ctx("2030-01-01")).unwrap();
        assert_eq!(found(&d), vec![]);
        let p = policy(json!("2030-01-02"), ok_approvals())
            .document()
            .clone();
        let mut p = p;
        p.as_object_mut().unwrap().remove("approvals");
        let d = check(&Policy::from_value(p), &ctx("2030-01-01")).unwrap();
        assert_eq!(found(&d), vec![]);
    }

    #[test]
    fn retired_count_settings_are_refused_by_name() {
        let p = policy(json!("2030-01-02"), ok_approvals());
        for (name, value) in [
            ("min_approvals", json!(1)),
            ("required_roles", json!(["legal"])),
        ] {
            let err = check(
                &p,
                &Context::new("", json!({"today": "2030-01-01", (name): value})),
            )
            .unwrap_err();
            assert!(
                err.contains(name) && err.contains("[environments.<env>]"),
                "{err}"
            );
        }
    }

    #[test]
    fn bad_settings_are_a_plugin_error() {
        let p = policy(json!("2030-01-02"), ok_approvals());
        assert!(
            check(&p, &Context::new("", json!({"today": "soon"})))
                .unwrap_err()
                .contains("soon")
        );
        assert!(
            check(&p, &Context::new("", json!({"min_aprovals": 1})))
                .unwrap_err()
                .contains("min_aprovals")
        );
    }

    #[test]
    fn a_stubbed_clock_is_refused() {
        let epoch = Date::from_days_since_epoch(0);
        assert!(plausible_clock(epoch).unwrap_err().contains("1970-01-01"));
        let now = Date::parse("2026-11-29").unwrap();
        assert_eq!(plausible_clock(now), Ok(now));
    }

    #[test]
    fn wall_clock_is_used_without_override() {
        let today = Date::today_utc().unwrap();
        assert!(today.year >= 2024, "{today}");
        let tomorrow = Date::from_days_since_epoch(today.days_since_epoch() + 1);
        let approvals = json!([{"by": "ana", "role": "owner", "at": today.to_string()}]);
        let p = policy(json!(tomorrow.to_string()), approvals);
        assert_eq!(check(&p, &Context::default()).unwrap(), vec![]);
        let yesterday = Date::from_days_since_epoch(today.days_since_epoch() - 1);
        let p = policy(json!(yesterday.to_string()), ok_approvals());
        let d = check(&p, &Context::default()).unwrap();
        assert_eq!(d[0].code, "effective.in-past");
    }
}
