//! `effective-date`: the policy takes effect on a real, future date and was
//! approved by people who can be named.
//!
//! A policy whose `effective` date is malformed or already past would be
//! applied retroactively by the receiving services; one without complete
//! approvals has no accountable owner. Both are release blockers.
//!
//! # Checks
//! - `effective` present (`effective.missing`), strictly `YYYY-MM-DD` and a
//!   real calendar date (`effective.malformed`), not before today
//!   (`effective.in-past`; today itself is fine), and not absurdly far ahead
//!   (warning `effective.far-future`, default more than 1826 days ≈ 5 years,
//!   which catches typos like `2205-01-01`).
//! - at least `min_approvals` approvals (`approvals.missing`, default 1);
//!   each has non-empty `by`, `role` and `at` (`approvals.incomplete`, at
//!   `/approvals/N/<field>`); `at` starts with a valid `YYYY-MM-DD`
//!   (`approvals.bad-date`) and is not after today (warning
//!   `approvals.future`); one person approving twice is a warning
//!   (`approvals.duplicate`); every role in `required_roles` is present
//!   (`approvals.role-missing`).
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
//! min_approvals = 1
//! required_roles = ["policy-owner"]
//! max_future_days = 1826
//! ```

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
    /// Fewest approvals accepted.
    pub min_approvals: usize,
    /// Roles that must each appear among the approvals.
    pub required_roles: Vec<String>,
    /// Effective dates further ahead than this many days get a warning.
    pub max_future_days: i64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            today: None,
            min_approvals: 1,
            required_roles: Vec::new(),
            max_future_days: 1826,
        }
    }
}

/// Runs the whole check (the plain function behind the component).
pub fn check(policy: &Policy, ctx: &Context) -> Result<Vec<Diagnostic>, String> {
    let settings: Settings = ctx
        .settings_as()
        .map_err(|e| format!("effective-date: {e}"))?;
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
    check_approvals(policy, settings, today, &mut out);
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

fn check_approvals(policy: &Policy, settings: &Settings, today: Date, out: &mut Diagnostics) {
    let approvals = policy.approvals();
    if approvals.len() < settings.min_approvals {
        out.error(
            "/approvals",
            "approvals.missing",
            format!(
                "the policy has {} approval(s); at least {} required",
                approvals.len(),
                settings.min_approvals
            ),
        );
    }
    let mut seen = BTreeSet::new();
    let mut roles = BTreeSet::new();
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
        if let Some(role) = a.role {
            roles.insert(role);
        }
    }
    for role in &settings.required_roles {
        if !roles.contains(role.as_str()) {
            out.error(
                "/approvals",
                "approvals.role-missing",
                format!("no approval by the required role `{role}`"),
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
    fn min_approvals_and_required_roles() {
        let c = Context::new(
            "",
            json!({"today": "2030-01-01", "min_approvals": 2, "required_roles": ["policy-owner", "legal"]}),
        );
        let d = check(&policy(json!("2030-01-02"), ok_approvals()), &c).unwrap();
        assert_eq!(
            found(&d),
            vec![
                ("/approvals", "approvals.missing"),
                ("/approvals", "approvals.role-missing"),
            ]
        );
        assert!(d[1].message.contains("`legal`"));
        let d = check(&policy(json!("2030-01-02"), json!([])), &ctx("2030-01-01")).unwrap();
        assert_eq!(found(&d), vec![("/approvals", "approvals.missing")]);
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
