//! `pii-guard`: keeps SSNs, dates of birth and bank details away from
//! public-facing services.
//!
//! A validator never sees the environment's services (only routers do), so
//! it judges exposure from the policy itself, with a scheme that is simple
//! enough for a release engineer to predict:
//!
//! # What counts as public-facing
//! - **Config exposure lists**: `config.expose_fields`, `config.portal_fields`
//!   and `config.public_fields` (names configurable). An array lists fields
//!   shown to public/portal services; an object maps a service tag to such
//!   an array, and only the public tags' arrays count
//!   (`{"portal": [...], "api": [...]}` checks `portal` only).
//! - **Config sections named after a public tag**: everything under
//!   `config.public` or `config.portal`.
//! - **Public-facing rules**: a rule whose `category` is in
//!   `public_categories` (default `["forms"]`, which `category-router` sends
//!   to the portal), whose key contains a public tag as a word
//!   (`portal.fields`), or whose value object says so (`"audience": "public"`,
//!   `"tags": ["portal"]`, `"public": true`). Its key, description and every
//!   string or object key inside its value are checked.
//!
//! Public tags default to `["public", "portal"]`.
//!
//! # What counts as sensitive
//! Text is split into lower-case words (also at camelCase boundaries) and
//! matched against: SSN (`ssn`, `social security`), date of birth (`dob`,
//! `date of birth`, `birth date`, `birthdate`, `birthday`), bank details
//! (`bank`, `iban`, `routing number`, `account number`, `sort code`).
//! A mention that is also `masked`, `redacted`, `hashed`, `tokenized`,
//! `truncated` or `last4` is downgraded to a warning (`pii.masked-exposure`).
//! Rule keys or field names listed in `allow` are skipped entirely.
//!
//! # Settings
//! ```toml
//! [settings]
//! public_tags = ["public", "portal"]
//! public_categories = ["forms"]
//! exposure_keys = ["expose_fields", "portal_fields", "public_fields"]
//! allow = ["applicant.dob_year"]
//! ```
//!
//! # Diagnostics
//! Errors `pii.ssn-exposed`, `pii.dob-exposed`, `pii.bank-exposed`;
//! warning `pii.masked-exposure`. Each points at the exact string, key or
//! array element (e.g. `/config/portal_fields/2`, `/rules/4/description`).

use pde_plugin::serde_json::Value;
use pde_plugin::{Context, Diagnostic, Diagnostics, Policy, Rule, Validator, json_pointer};
use serde::Deserialize;

/// The validator exported by this component.
pub struct PiiGuard;

impl Validator for PiiGuard {
    fn validate(policy: &Policy, ctx: &Context) -> Result<Vec<Diagnostic>, String> {
        check(policy, ctx)
    }
}

pde_plugin::export_validator!(PiiGuard);

/// A class of personally identifying data this plugin guards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Pii {
    /// Social Security number.
    Ssn,
    /// Date of birth.
    Dob,
    /// Bank account or routing details.
    Bank,
}

impl Pii {
    fn code(self) -> &'static str {
        match self {
            Pii::Ssn => "pii.ssn-exposed",
            Pii::Dob => "pii.dob-exposed",
            Pii::Bank => "pii.bank-exposed",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Pii::Ssn => "a Social Security number",
            Pii::Dob => "a date of birth",
            Pii::Bank => "bank details",
        }
    }
}

/// The plugin's `[settings]` (see the crate docs).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Service tags that mean "public-facing".
    pub public_tags: Vec<String>,
    /// Rule categories whose rules reach public-facing services.
    pub public_categories: Vec<String>,
    /// Config keys that list exposed fields.
    pub exposure_keys: Vec<String>,
    /// Rule keys and field names that are exempt.
    pub allow: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        let v = |xs: &[&str]| xs.iter().map(|s| s.to_string()).collect();
        Settings {
            public_tags: v(&["public", "portal"]),
            public_categories: v(&["forms"]),
            exposure_keys: v(&["expose_fields", "portal_fields", "public_fields"]),
            allow: Vec::new(),
        }
    }
}

/// Splits text into lower-case words at non-alphanumerics and camelCase humps.
pub fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut prev_lower = false;
    for c in text.chars() {
        if !c.is_alphanumeric() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            prev_lower = false;
            continue;
        }
        if c.is_uppercase() && prev_lower && !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
        prev_lower = c.is_lowercase() || c.is_ascii_digit();
        cur.extend(c.to_lowercase());
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn has_phrase(words: &[String], phrase: &[&str]) -> bool {
    words
        .windows(phrase.len())
        .any(|w| w.iter().zip(phrase).all(|(a, b)| a == b))
}

/// Which kinds of PII `text` mentions (sorted, no duplicates).
pub fn detect(text: &str) -> Vec<Pii> {
    let w = words(text);
    let any = |phrases: &[&[&str]]| phrases.iter().any(|p| has_phrase(&w, p));
    let mut found = Vec::new();
    if any(&[
        &["ssn"],
        &["ssns"],
        &["social", "security"],
        &["socialsecurity"],
        &["socialsecuritynumber"],
    ]) {
        found.push(Pii::Ssn);
    }
    if any(&[
        &["dob"],
        &["date", "of", "birth"],
        &["birth", "date"],
        &["birthdate"],
        &["birthday"],
        &["dateofbirth"],
    ]) {
        found.push(Pii::Dob);
    }
    if any(&[
        &["bank"],
        &["banking"],
        &["iban"],
        &["routing", "number"],
        &["routingnumber"],
        &["account", "number"],
        &["accountnumber"],
        &["bankaccount"],
        &["sort", "code"],
    ]) {
        found.push(Pii::Bank);
    }
    found
}

/// True when `text` says the value is masked (e.g. `ssn_last4`, `masked dob`).
pub fn is_masked(text: &str) -> bool {
    let w = words(text);
    [
        "masked",
        "redacted",
        "hashed",
        "tokenized",
        "truncated",
        "last4",
    ]
    .iter()
    .any(|m| w.iter().any(|x| x == m))
        || has_phrase(&w, &["last", "4"])
}

struct Scan<'a> {
    settings: &'a Settings,
    out: Diagnostics,
}

impl Scan<'_> {
    fn allowed(&self, text: &str) -> bool {
        self.settings.allow.iter().any(|a| a == text)
    }

    /// Reports every PII kind `text` mentions, at `ptr`, found in `what`.
    fn text(&mut self, text: &str, ptr: &str, what: &str) {
        if self.allowed(text) {
            return;
        }
        let masked = is_masked(text);
        for kind in detect(text) {
            if masked {
                self.out.warning(
                    ptr,
                    "pii.masked-exposure",
                    format!(
                        "{what} `{text}` exposes {} to public-facing services, marked as masked; confirm the masking happens before it leaves the agency",
                        kind.noun()
                    ),
                );
            } else {
                self.out.error(
                    ptr,
                    kind.code(),
                    format!(
                        "{what} `{text}` would expose {} to public-facing services ({}); remove it, expose a masked form, or add it to the plugin's `allow` setting after a privacy review",
                        kind.noun(),
                        self.settings.public_tags.join("/")
                    ),
                );
            }
        }
    }

    /// Checks every string and object key inside `value`.
    fn value(&mut self, value: &Value, ptr: &str, what: &str, depth: usize) {
        if depth > 64 {
            return;
        }
        match value {
            Value::String(s) => self.text(s, ptr, what),
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.value(item, &format!("{ptr}/{i}"), what, depth + 1);
                }
            }
            Value::Object(map) => {
                for (k, v) in map {
                    let child = format!("{ptr}/{}", pde_plugin::pointer_escape(k));
                    self.text(k, &child, "field");
                    self.value(v, &child, what, depth + 1);
                }
            }
            _ => {}
        }
    }

    fn is_public_tag(&self, tag: &str) -> bool {
        self.settings.public_tags.iter().any(|t| t == tag)
    }

    fn rule_is_public(&self, rule: &Rule<'_>) -> bool {
        if rule
            .category
            .is_some_and(|c| self.settings.public_categories.iter().any(|p| p == c))
        {
            return true;
        }
        if rule
            .key
            .is_some_and(|k| words(k).iter().any(|w| self.is_public_tag(w)))
        {
            return true;
        }
        let Some(Value::Object(v)) = rule.value else {
            return false;
        };
        let tag_in = |x: &Value| match x {
            Value::String(s) => self.is_public_tag(s),
            Value::Array(a) => a
                .iter()
                .filter_map(Value::as_str)
                .any(|s| self.is_public_tag(s)),
            _ => false,
        };
        v.get("public") == Some(&Value::Bool(true))
            || ["audience", "audiences", "tags", "services"]
                .iter()
                .filter_map(|k| v.get(*k))
                .any(tag_in)
    }

    fn rule(&mut self, rule: &Rule<'_>) {
        if rule.key.is_some_and(|k| self.allowed(k)) || !self.rule_is_public(rule) {
            return;
        }
        if let Some(key) = rule.key {
            self.text(key, &rule.field_pointer("key"), "rule key");
        }
        if let Some(d) = rule.description {
            self.text(d, &rule.field_pointer("description"), "rule description");
        }
        if let Some(v) = rule.value {
            self.value(v, &rule.field_pointer("value"), "rule value", 0);
        }
    }

    fn config(&mut self, config: &Value) {
        let Some(map) = config.as_object() else {
            return;
        };
        for (key, v) in map {
            let ptr = json_pointer(["config", key.as_str()]);
            if self.is_public_tag(key) {
                self.value(v, &ptr, "public config value", 0);
                continue;
            }
            if !self.settings.exposure_keys.iter().any(|k| k == key) {
                continue;
            }
            match v {
                Value::Object(by_tag) => {
                    for (tag, fields) in by_tag {
                        if self.is_public_tag(tag) {
                            let p = format!("{ptr}/{}", pde_plugin::pointer_escape(tag));
                            self.value(fields, &p, "exposed field", 0);
                        }
                    }
                }
                other => self.value(other, &ptr, "exposed field", 0),
            }
        }
    }
}

/// Runs the whole check (the plain function behind the component).
pub fn check(policy: &Policy, ctx: &Context) -> Result<Vec<Diagnostic>, String> {
    let settings: Settings = if ctx.settings().as_object().is_some_and(|m| m.is_empty()) {
        Settings::default()
    } else {
        ctx.settings_as().map_err(|e| format!("pii-guard: {e}"))?
    };
    let mut scan = Scan {
        settings: &settings,
        out: Diagnostics::new(),
    };
    for rule in policy.rules() {
        scan.rule(&rule);
    }
    if let Some(config) = policy.config() {
        scan.config(config);
    }
    Ok(scan.out.into_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pde_plugin::Severity;
    use pde_plugin::serde_json::json;

    fn policy(rules: Value, config: Value) -> Policy {
        Policy::from_value(json!({
            "id": "7", "version": "1.0.0", "title": "t", "agency": "A",
            "effective": "2030-01-01", "approvals": [], "rules": rules, "config": config
        }))
    }

    /// Sorted, so the result does not depend on serde_json's map order.
    fn found(d: &[Diagnostic]) -> Vec<(&str, &str)> {
        let mut v: Vec<_> = d
            .iter()
            .map(|d| (d.path.as_str(), d.code.as_str()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn word_splitting_and_detection() {
        assert_eq!(
            words("applicantDateOfBirth"),
            ["applicant", "date", "of", "birth"]
        );
        assert_eq!(
            words("bank_account.routing-number"),
            ["bank", "account", "routing", "number"]
        );
        assert_eq!(detect("applicant.ssn"), [Pii::Ssn]);
        assert_eq!(detect("Social Security Number"), [Pii::Ssn]);
        assert_eq!(detect("dob"), [Pii::Dob]);
        assert_eq!(detect("birthDate and IBAN"), [Pii::Dob, Pii::Bank]);
        assert!(
            detect("lessons").is_empty(),
            "`ssn` inside a word does not count"
        );
        assert!(detect("riverbank_name").is_empty());
        assert!(detect("household_size").is_empty());
        assert!(is_masked("ssn_last4") && is_masked("masked SSN") && !is_masked("ssn"));
    }

    #[test]
    fn config_exposure_lists_point_at_elements() {
        let p = policy(
            json!([]),
            json!({
                "portal_fields": ["name", "ssn", "bank_account"],
                "expose_fields": {"portal": ["dateOfBirth"], "api": ["ssn"]},
                "internal": {"ssn": true}
            }),
        );
        let d = check(&p, &Context::default()).unwrap();
        assert_eq!(
            found(&d),
            vec![
                ("/config/expose_fields/portal/0", "pii.dob-exposed"),
                ("/config/portal_fields/1", "pii.ssn-exposed"),
                ("/config/portal_fields/2", "pii.bank-exposed"),
            ]
        );
        assert!(d.iter().all(|d| d.severity == Severity::Error));
    }

    #[test]
    fn config_section_named_after_public_tag_is_scanned() {
        let p = policy(
            json!([]),
            json!({"public": {"show": {"routing_number": "x"}}}),
        );
        let d = check(&p, &Context::default()).unwrap();
        assert_eq!(
            found(&d),
            vec![("/config/public/show/routing_number", "pii.bank-exposed")]
        );
    }

    #[test]
    fn public_rules_are_checked_internal_ones_are_not() {
        let p = policy(
            json!([
                {"key": "intake.ssn_required", "category": "eligibility", "value": true, "description": "needs SSN"},
                {"key": "form.applicant_fields", "category": "forms", "value": ["name", "dob"], "description": "fields on the form"},
                {"key": "notice.text", "category": "payments", "value": {"audience": "public", "body": "x"}, "description": "We show your bank account number"},
                {"key": "portal.summary", "category": "payments", "value": "shows ssn_last4", "description": ""}
            ]),
            json!({}),
        );
        let d = check(&p, &Context::default()).unwrap();
        assert_eq!(
            found(&d),
            vec![
                ("/rules/1/value/1", "pii.dob-exposed"),
                ("/rules/2/description", "pii.bank-exposed"),
                ("/rules/3/value", "pii.masked-exposure"),
            ]
        );
        assert_eq!(d[2].severity, Severity::Warning);
        assert!(d[0].message.contains("`dob`"), "{}", d[0].message);
    }

    #[test]
    fn settings_allow_and_retag() {
        let p = policy(
            json!([{"key": "form.dob", "category": "forms", "value": 1, "description": ""}]),
            json!({"kiosk": ["ssn"], "portal_fields": ["dob"]}),
        );
        let ctx = Context::new(
            "",
            json!({"public_tags": ["kiosk"], "allow": ["form.dob"], "exposure_keys": []}),
        );
        let d = check(&p, &ctx).unwrap();
        assert_eq!(found(&d), vec![("/config/kiosk/0", "pii.ssn-exposed")]);
        let typo = Context::new("", json!({"public_tag": ["kiosk"]}));
        assert!(check(&p, &typo).unwrap_err().contains("public_tag"));
    }

    #[test]
    fn clean_policy_passes() {
        let p = policy(
            json!([{"key": "form.fields", "category": "forms", "value": ["name", "address"], "description": "contact"}]),
            json!({"portal_fields": ["name"]}),
        );
        assert!(check(&p, &Context::default()).unwrap().is_empty());
    }
}
