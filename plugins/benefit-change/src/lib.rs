//! `benefit-change`: judges a policy against the version that is active in
//! the target environment, the way a program office reviews a change.
//!
//! Built with the SDK against `pde:plugin@0.2.0`, whose context carries the
//! active version (`ctx.active()`). Without one (a first deploy, no
//! environment, or the environment-neutral run pde records in the bundle)
//! there is no change to judge and it reports nothing, so its findings gate
//! a deploy without ever entering a bundle.
//!
//! # Checks
//! - **A benefit cut needs notice.** A numeric rule in one of `categories`
//!   (default `["benefits"]`) whose value fell by more than
//!   `max_cut_percent` (default 10) since the active version is an error
//!   (`benefit-change.short-notice`, at the rule's value) unless the policy's
//!   `effective` date is at least `min_notice_days` (default 90) after today.
//!   Recipients must be told before a benefit shrinks. An unreadable
//!   `effective` date with such a cut is `benefit-change.effective-unreadable`.
//! - **A removed rule must be explained.** A rule of the active version that
//!   the new one no longer has must be listed in the change notes, the array
//!   of strings at `notes_pointer` (default `/config/change_notes`): a note
//!   lists it when it contains the rule key (`benefit-change.removal-unlisted`).
//! - An info finding `benefit-change.compared` says which active version it
//!   compared with and what changed, so a release engineer sees that the
//!   comparison happened.
//!
//! # Today
//! From the wall clock (WASI, provided by the pde sandbox), or
//! `settings.today = "YYYY-MM-DD"` for deterministic tests and "as of"
//! reviews. A clock before 2020 is taken as stubbed: a plugin error.
//!
//! # Settings
//! ```toml
//! [settings]
//! max_cut_percent = 10
//! min_notice_days = 90
//! categories = ["benefits"]
//! notes_pointer = "/config/change_notes"
//! today = "2031-01-01"            # optional override of the clock
//! ```

use pde_plugin::serde_json::Value;
use pde_plugin::{
    ActivePolicy, Context, Diagnostic, Diagnostics, Level, Policy, RuleChange, Validator, log,
};
use serde::Deserialize;

/// The validator exported by this component.
pub struct BenefitChange;

impl Validator for BenefitChange {
    fn validate(policy: &Policy, ctx: &Context) -> Result<Vec<Diagnostic>, String> {
        check(policy, ctx)
    }
}

pde_plugin::export_validator!(BenefitChange);

/// The plugin's `[settings]` (see the crate docs).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// A cut larger than this percentage needs notice.
    pub max_cut_percent: f64,
    /// Days between today and `effective` that a large cut needs.
    pub min_notice_days: i64,
    /// Rule categories whose numeric values are benefits.
    pub categories: Vec<String>,
    /// JSON pointer to the change notes (an array of strings).
    pub notes_pointer: String,
    /// Overrides the wall clock (`YYYY-MM-DD`).
    pub today: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_cut_percent: 10.0,
            min_notice_days: 90,
            categories: vec!["benefits".to_string()],
            notes_pointer: "/config/change_notes".to_string(),
            today: None,
        }
    }
}

/// Runs the whole check (the plain function behind the component).
pub fn check(policy: &Policy, ctx: &Context) -> Result<Vec<Diagnostic>, String> {
    let settings: Settings = ctx
        .settings_as()
        .map_err(|e| format!("benefit-change: {e}"))?;
    if !(settings.max_cut_percent >= 0.0 && settings.min_notice_days >= 0) {
        return Err(format!(
            "benefit-change: max_cut_percent ({}) and min_notice_days ({}) must not be negative",
            settings.max_cut_percent, settings.min_notice_days
        ));
    }
    if !settings.notes_pointer.is_empty() && !settings.notes_pointer.starts_with('/') {
        return Err(format!(
            "benefit-change: notes_pointer {:?} is not a JSON pointer (it starts with `/`)",
            settings.notes_pointer
        ));
    }
    let Some(active) = ctx.active() else {
        log(
            Level::Debug,
            "benefit-change: no version is active here; nothing to compare with",
        );
        return Ok(Vec::new());
    };
    let today = match &settings.today {
        Some(t) => Date::parse(t).ok_or_else(|| {
            format!("benefit-change: settings.today `{t}` is not a YYYY-MM-DD date")
        })?,
        None => {
            let today = Date::today_utc()?;
            if today.year < 2020 {
                return Err(format!(
                    "benefit-change: the wall clock reads {today}, which cannot be right; \
                     set `today` in the plugin's [settings] or give the sandbox a real clock"
                ));
            }
            today
        }
    };
    Ok(judge(policy, active, &settings, today))
}

/// The check with an explicit `today` and active version.
pub fn judge(
    policy: &Policy,
    active: &ActivePolicy,
    settings: &Settings,
    today: Date,
) -> Vec<Diagnostic> {
    let mut out = Diagnostics::new();
    let changes = active.rule_changes(policy);
    let effective = policy.effective().and_then(Date::parse);
    let notes = change_notes(policy, &settings.notes_pointer);
    let (mut changed, mut added, mut removed) = (0, 0, 0);
    for change in &changes {
        match change {
            RuleChange::Added { .. } => added += 1,
            RuleChange::Changed { old, new } => {
                changed += 1;
                let benefit = new
                    .category
                    .is_some_and(|c| settings.categories.iter().any(|w| w == c));
                let (Some(was), Some(now)) = (old.number(), new.number()) else {
                    continue;
                };
                // (was - now) / |was| > max%, in a form exact for integers.
                let cut = (was - now) * 100.0 > settings.max_cut_percent * was.abs();
                if benefit && was != 0.0 && cut {
                    short_notice(
                        &mut out, change, active, settings, today, effective, was, now,
                    );
                }
            }
            RuleChange::Removed { old } => {
                removed += 1;
                let key = change.key();
                if !notes.iter().any(|n| n.contains(key)) {
                    out.error(
                        settings.notes_pointer.clone(),
                        "benefit-change.removal-unlisted",
                        format!(
                            "rule `{key}` (category {}) was removed since the active version {}; \
                             list it in the change notes at {} (an array of strings) with why",
                            old.category.unwrap_or("none"),
                            active.version(),
                            if settings.notes_pointer.is_empty() {
                                "the document root"
                            } else {
                                settings.notes_pointer.as_str()
                            }
                        ),
                    );
                }
            }
        }
    }
    out.info(
        "",
        "benefit-change.compared",
        format!(
            "compared with the active version {}{}: {changed} rule(s) changed, {added} added, {removed} removed",
            active.version(),
            if active.digest().is_empty() {
                String::new()
            } else {
                format!(" ({})", active.digest())
            }
        ),
    );
    out.into_vec()
}

#[allow(clippy::too_many_arguments)]
fn short_notice(
    out: &mut Diagnostics,
    change: &RuleChange<'_>,
    active: &ActivePolicy,
    settings: &Settings,
    today: Date,
    effective: Option<Date>,
    was: f64,
    now: f64,
) {
    let RuleChange::Changed { new, .. } = change else {
        return;
    };
    let percent = (was - now) / was.abs() * 100.0;
    let earliest = Date::from_days_since_epoch(today.days_since_epoch() + settings.min_notice_days);
    let what = format!(
        "benefit `{}` is cut by {percent:.1}% ({was} -> {now}) against the active version {}",
        change.key(),
        active.version()
    );
    match effective {
        None => {
            out.error(
                "/effective",
                "benefit-change.effective-unreadable",
                format!(
                    "{what}, and the policy's `effective` date is missing or not YYYY-MM-DD, so the notice cannot be checked"
                ),
            );
        }
        Some(date) if date < earliest => {
            out.error(
                new.field_pointer("value"),
                "benefit-change.short-notice",
                format!(
                    "{what}; a cut over {}% needs an effective date at least {} days ahead \
                     (on or after {earliest}), but the policy takes effect on {date}",
                    settings.max_cut_percent, settings.min_notice_days
                ),
            );
        }
        Some(_) => {}
    }
}

/// The strings at `pointer` (an array of strings, or one string).
fn change_notes<'a>(policy: &'a Policy, pointer: &str) -> Vec<&'a str> {
    match policy.get(pointer) {
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
        Some(Value::String(s)) => vec![s.as_str()],
        _ => Vec::new(),
    }
}

pub use pde_plugin::Date;

#[cfg(test)]
mod tests {
    use super::*;
    use pde_plugin::Severity;
    use pde_plugin::serde_json::json;

    fn doc(version: &str, effective: &str, rules: Value, notes: Value) -> Value {
        json!({
            "id": "42", "version": version, "title": "Heating assistance", "agency": "HMS",
            "effective": effective, "approvals": [], "rules": rules,
            "config": {"change_notes": notes}
        })
    }

    fn rule(key: &str, category: &str, value: Value) -> Value {
        json!({"key": key, "category": category, "value": value, "description": "d"})
    }

    fn v1() -> ActivePolicy {
        ActivePolicy::new(
            Policy::from_value(doc(
                "1.0.0",
                "2031-01-01",
                json!([
                    rule("heating.monthly-amount", "benefits", json!(200)),
                    rule("heating.min-age", "eligibility", json!(18)),
                    rule("heating.winter-bonus", "benefits", json!(50))
                ]),
                json!([]),
            )),
            "sha256:aaaa",
            "2031-01-02T10:00:00Z",
        )
    }

    fn today() -> Date {
        Date::parse("2031-03-01").unwrap()
    }

    fn codes(found: &[Diagnostic]) -> Vec<(&str, Severity, &str)> {
        found
            .iter()
            .map(|d| (d.code.as_str(), d.severity, d.path.as_str()))
            .collect()
    }

    fn v2(amount: Value, effective: &str, notes: Value) -> Policy {
        Policy::from_value(doc(
            "2.0.0",
            effective,
            json!([
                rule("heating.monthly-amount", "benefits", amount),
                rule("heating.min-age", "eligibility", json!(18)),
                rule("heating.winter-bonus", "benefits", json!(50))
            ]),
            notes,
        ))
    }

    #[test]
    fn a_cut_over_ten_percent_with_short_notice_is_an_error_at_the_value() {
        // 2031-03-01 + 90 days = 2031-05-30.
        let p = v2(json!(150), "2031-04-01", json!([]));
        let found = judge(&p, &v1(), &Settings::default(), today());
        assert_eq!(
            codes(&found),
            [
                (
                    "benefit-change.short-notice",
                    Severity::Error,
                    "/rules/0/value"
                ),
                ("benefit-change.compared", Severity::Info, "")
            ]
        );
        let m = &found[0].message;
        assert!(m.contains("cut by 25.0% (200 -> 150)"), "{m}");
        assert!(m.contains("active version 1.0.0"), "{m}");
        assert!(m.contains("on or after 2031-05-30"), "{m}");
        assert!(found[1].message.contains("1.0.0 (sha256:aaaa)"));
    }

    #[test]
    fn enough_notice_a_small_cut_a_raise_or_a_non_benefit_passes() {
        let s = Settings::default();
        // Exactly 90 days ahead is enough.
        let ok = judge(&v2(json!(150), "2031-05-30", json!([])), &v1(), &s, today());
        assert!(ok.iter().all(|d| d.severity != Severity::Error), "{ok:?}");
        // The day before is not.
        let late = judge(&v2(json!(150), "2031-05-29", json!([])), &v1(), &s, today());
        assert!(late[0].code == "benefit-change.short-notice");
        // Exactly 10% is not "more than 10%"; a raise is no cut.
        for amount in [json!(180), json!(250)] {
            let found = judge(&v2(amount, "2031-03-02", json!([])), &v1(), &s, today());
            assert_eq!(codes(&found).len(), 1, "{found:?}");
        }
        // An eligibility rule falling by half is not a benefit.
        let p = Policy::from_value(doc(
            "2.0.0",
            "2031-03-02",
            json!([
                rule("heating.monthly-amount", "benefits", json!(200)),
                rule("heating.min-age", "eligibility", json!(9)),
                rule("heating.winter-bonus", "benefits", json!(50))
            ]),
            json!([]),
        ));
        assert_eq!(codes(&judge(&p, &v1(), &s, today())).len(), 1);
    }

    #[test]
    fn settings_move_the_thresholds() {
        let s = Settings {
            max_cut_percent: 30.0,
            ..Settings::default()
        };
        let found = judge(&v2(json!(150), "2031-03-02", json!([])), &v1(), &s, today());
        assert!(found.iter().all(|d| d.severity != Severity::Error));
        let s = Settings {
            min_notice_days: 10,
            ..Settings::default()
        };
        let found = judge(&v2(json!(150), "2031-03-11", json!([])), &v1(), &s, today());
        assert!(found.iter().all(|d| d.severity != Severity::Error));
    }

    #[test]
    fn a_removed_rule_must_be_in_the_change_notes() {
        let removed = |notes: Value| {
            Policy::from_value(doc(
                "2.0.0",
                "2031-12-01",
                json!([
                    rule("heating.monthly-amount", "benefits", json!(200)),
                    rule("heating.min-age", "eligibility", json!(18))
                ]),
                notes,
            ))
        };
        let s = Settings::default();
        let found = judge(&removed(json!([])), &v1(), &s, today());
        assert_eq!(
            codes(&found)[0],
            (
                "benefit-change.removal-unlisted",
                Severity::Error,
                "/config/change_notes"
            )
        );
        assert!(found[0].message.contains("`heating.winter-bonus`"));
        assert!(
            found[1]
                .message
                .contains("0 rule(s) changed, 0 added, 1 removed")
        );
        let listed = removed(json!([
            "heating.winter-bonus: merged into the monthly amount"
        ]));
        assert_eq!(codes(&judge(&listed, &v1(), &s, today())).len(), 1);
        let one_string = removed(json!("dropped heating.winter-bonus"));
        assert_eq!(codes(&judge(&one_string, &v1(), &s, today())).len(), 1);
    }

    #[test]
    fn an_unreadable_effective_date_with_a_cut_is_an_error() {
        let p = v2(json!(100), "31/12/2031", json!([]));
        let found = judge(&p, &v1(), &Settings::default(), today());
        assert_eq!(found[0].code, "benefit-change.effective-unreadable");
        assert_eq!(found[0].path, "/effective");
    }

    #[test]
    fn without_an_active_version_there_is_nothing_to_judge() {
        let p = v2(json!(1), "2031-03-02", json!([]));
        let ctx = Context::new("prod", json!({"today": "2031-03-01"}));
        assert!(check(&p, &ctx).unwrap().is_empty());
        let ctx = ctx.with_active(v1());
        let found = check(&p, &ctx).unwrap();
        assert_eq!(found[0].code, "benefit-change.short-notice");
    }

    #[test]
    fn bad_settings_are_the_plugins_own_failure() {
        let p = v2(json!(1), "2031-03-02", json!([]));
        for settings in [
            json!({"max_cut": 10}),
            json!({"max_cut_percent": -1}),
            json!({"notes_pointer": "config/notes"}),
            json!({"today": "tomorrow"}),
        ] {
            let ctx = Context::new("prod", settings.clone()).with_active(v1());
            let err = check(&p, &ctx).unwrap_err();
            assert!(err.starts_with("benefit-change: "), "{settings}: {err}");
        }
    }
}
