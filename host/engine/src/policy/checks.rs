//! Built-in checks beyond the schema: rule keys, ownership across the store,
//! and versions (approvals have their own module, [`super::approvals`]).
//!
//! Each check returns diagnostics instead of failing fast, so one `pde
//! validate` run tells the author everything that is wrong. A check that
//! cannot read a *neighbouring* policy reports a warning rather than
//! crashing: one broken file in the store must not block every other deploy,
//! but the author should know that ownership was not fully checked.

use std::collections::{BTreeSet, HashMap};

use serde_json::Value;

use super::{Policy, PolicyStore};
use crate::diagnostic::Diagnostic;

/// Rule keys must be unique within a policy: one error per repeated key, at
/// `/rules/N/key` of the repeat.
pub fn check_rules_unique(policy: &Policy) -> Vec<Diagnostic> {
    let mut first_seen: HashMap<&str, usize> = HashMap::new();
    let mut out = Vec::new();
    for (i, rule) in policy.doc.rules.iter().enumerate() {
        if let Some(first) = first_seen.get(rule.key.as_str()) {
            out.push(Diagnostic::error(
                "schema",
                "rules.duplicate-key",
                &format!("/rules/{i}/key"),
                format!(
                    "rule key {:?} is already defined at /rules/{first}; each key may appear once",
                    rule.key
                ),
            ));
        } else {
            first_seen.insert(&rule.key, i);
        }
    }
    out
}

/// Every rule key is owned by one policy across the store. A key that another
/// policy file also defines is an error naming both policies. Store files
/// that cannot be read or parsed are reported as warnings.
pub fn check_conflicts(policy: &Policy, store: &PolicyStore) -> Vec<Diagnostic> {
    let ids = match store.ids() {
        Ok(ids) => ids,
        Err(e) => {
            return vec![Diagnostic::warning(
                "conflict",
                "conflict.store-unreadable",
                "",
                format!("rule ownership not checked: {e}"),
            )];
        }
    };
    // key -> the other policies that define it
    let mut owners: HashMap<String, Vec<String>> = HashMap::new();
    let mut out = Vec::new();
    for other in ids.iter().filter(|id| **id != policy.id) {
        match store.read_document(other) {
            Ok((_, doc)) => {
                for key in rule_keys(&doc) {
                    owners.entry(key).or_default().push(other.clone());
                }
            }
            Err(e) => out.push(Diagnostic::warning(
                "conflict",
                "conflict.unreadable-policy",
                "",
                format!("rule keys of policy {other:?} not checked for conflicts: {e}"),
            )),
        }
    }
    for (i, rule) in policy.doc.rules.iter().enumerate() {
        if let Some(others) = owners.get(&rule.key) {
            let others: BTreeSet<&String> = others.iter().collect();
            for other in others {
                out.push(Diagnostic::error(
                    "conflict",
                    "conflict.rule-owner",
                    &format!("/rules/{i}/key"),
                    format!(
                        "rule key {:?} is defined by both policy {:?} and policy {other:?}; a key is owned by one policy, so remove it from one of them",
                        rule.key, policy.id
                    ),
                ));
            }
        }
    }
    out
}

/// Rule keys of a raw, possibly schema-invalid document (best effort).
fn rule_keys(doc: &Value) -> BTreeSet<String> {
    doc.get("rules")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|r| r.get("key").and_then(Value::as_str))
        .map(str::to_string)
        .collect()
}

/// The version must be strictly greater than the one active in the
/// environment (`None`: nothing active yet, any version goes).
pub fn check_version(policy: &Policy, active: Option<&semver::Version>) -> Vec<Diagnostic> {
    match active {
        Some(active) if policy.version <= *active => vec![Diagnostic::error(
            "version",
            "version.not-greater",
            "/version",
            format!(
                "version {} of policy {:?} is not greater than the active version {active}; bump the version (use `pde rollback` to go back)",
                policy.version, policy.id
            ),
        )],
        _ => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::fs;

    fn doc(id: &str, version: &str, keys: &[&str], approvers: &[&str]) -> Value {
        json!({
            "id": id, "version": version, "title": "t", "agency": "a", "effective": "2026-01-01",
            "approvals": approvers.iter().map(|b| json!({"by": b, "role": "r", "at": "2026-01-01"})).collect::<Vec<_>>(),
            "rules": keys.iter().map(|k| json!({"key": k, "category": "c", "value": 1, "description": ""})).collect::<Vec<_>>(),
        })
    }

    fn write(dir: &std::path::Path, id: &str, v: &Value) {
        fs::write(dir.join(format!("{id}.json")), v.to_string()).unwrap();
    }

    #[test]
    fn duplicate_keys_point_at_the_repeat() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "1", &doc("1", "1.0.0", &["a", "b", "a"], &[]));
        let p = PolicyStore::open(d.path()).load("1").unwrap();
        let found = check_rules_unique(&p);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].path, "/rules/2/key");
        assert!(found[0].is_error());
    }

    #[test]
    fn a_key_owned_by_another_policy_names_both() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "42",
            &doc("42", "1.0.0", &["x.one", "x.two"], &[]),
        );
        write(d.path(), "7", &doc("7", "1.0.0", &["x.two"], &[]));
        write(d.path(), "8", &doc("8", "1.0.0", &["y"], &[]));
        fs::write(d.path().join("9.yaml"), "rules: [unclosed").unwrap();
        let store = PolicyStore::open(d.path());
        let p = store.load("42").unwrap();
        let found = check_conflicts(&p, &store);
        let errors: Vec<_> = found.iter().filter(|d| d.is_error()).collect();
        assert_eq!(errors.len(), 1, "{found:?}");
        assert_eq!(errors[0].path, "/rules/1/key");
        assert!(errors[0].message.contains("\"42\"") && errors[0].message.contains("\"7\""));
        let warnings: Vec<_> = found.iter().filter(|d| !d.is_error()).collect();
        assert_eq!(warnings.len(), 1, "{found:?}");
        assert!(warnings[0].message.contains("\"9\""));
    }

    #[test]
    fn version_must_increase() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "1", &doc("1", "1.3.0", &["a"], &[]));
        let p = PolicyStore::open(d.path()).load("1").unwrap();
        assert!(check_version(&p, None).is_empty());
        assert!(check_version(&p, Some(&semver::Version::new(1, 2, 9))).is_empty());
        let same = check_version(&p, Some(&semver::Version::new(1, 3, 0)));
        assert_eq!(same[0].code, "version.not-greater");
        assert_eq!(same[0].path, "/version");
        assert_eq!(
            check_version(&p, Some(&semver::Version::new(2, 0, 0))).len(),
            1
        );
    }
}
