//! The policy as a plugin sees it.
//!
//! WIT has no recursive types, so the host hands the document over as a JSON
//! string. The SDK parses it once and offers both the raw [`Value`] (for
//! anything agency-specific) and borrowed, typed views of the DESIGN §8
//! fields. The views are lenient: a missing or mistyped field reads as
//! `None` instead of failing, because the host has already schema-checked
//! the document and a plugin should report findings, not crash.

use serde_json::Value;

use crate::diagnostic::json_pointer;

/// A policy document as approved by the agency.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    id: String,
    version: String,
    document: Value,
}

/// One entry of the policy's `rules` array (`{key, category, value, description}`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rule<'a> {
    /// Position in the `rules` array; use [`Rule::pointer`] for diagnostics.
    pub index: usize,
    /// The rule key, unique within the policy, e.g. `"snap.max_income"`.
    pub key: Option<&'a str>,
    /// The rule category, e.g. `"eligibility"`, `"forms"`, `"payments"`.
    pub category: Option<&'a str>,
    /// The rule's value (any JSON); `None` when the field is absent.
    pub value: Option<&'a Value>,
    /// Free-text description.
    pub description: Option<&'a str>,
    /// The whole rule object, for fields beyond the standard four.
    pub raw: &'a Value,
}

/// One entry of the policy's `approvals` array (`{by, role, at}`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Approval<'a> {
    /// Position in the `approvals` array.
    pub index: usize,
    /// Who approved.
    pub by: Option<&'a str>,
    /// In which role, e.g. `"policy-owner"`.
    pub role: Option<&'a str>,
    /// When (a date or RFC 3339 timestamp, as written).
    pub at: Option<&'a str>,
    /// The whole approval object.
    pub raw: &'a Value,
}

impl Policy {
    /// Parses the document the host passed over the WIT boundary.
    ///
    /// Fails when `document` is not JSON or not a JSON object.
    pub fn from_json(
        id: impl Into<String>,
        version: impl Into<String>,
        document: &str,
    ) -> Result<Self, String> {
        let document: Value = serde_json::from_str(document)
            .map_err(|e| format!("the policy document from the host is not valid JSON: {e}"))?;
        if !document.is_object() {
            return Err("the policy document from the host is not a JSON object".to_string());
        }
        Ok(Policy {
            id: id.into(),
            version: version.into(),
            document,
        })
    }

    /// Wraps an already-parsed document; `id` and `version` are read from
    /// it (empty when absent). Handy in unit tests with `serde_json::json!`.
    pub fn from_value(document: Value) -> Self {
        let field = |name: &str| {
            document
                .get(name)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        Policy {
            id: field("id"),
            version: field("version"),
            document,
        }
    }

    /// The policy id, e.g. `"42"`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The policy's semver version, e.g. `"1.3.0"`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The whole document.
    pub fn document(&self) -> &Value {
        &self.document
    }

    /// Looks up a value by JSON pointer, e.g. `policy.get("/config/portal_fields")`.
    pub fn get(&self, pointer: &str) -> Option<&Value> {
        self.document.pointer(pointer)
    }

    fn str_field(&self, name: &str) -> Option<&str> {
        self.document.get(name).and_then(Value::as_str)
    }

    /// `title`, when present and a string.
    pub fn title(&self) -> Option<&str> {
        self.str_field("title")
    }

    /// `agency`, when present and a string.
    pub fn agency(&self) -> Option<&str> {
        self.str_field("agency")
    }

    /// `effective` (`YYYY-MM-DD`), as written, when present and a string.
    pub fn effective(&self) -> Option<&str> {
        self.str_field("effective")
    }

    /// `config`, when present (any JSON, normally an object).
    pub fn config(&self) -> Option<&Value> {
        self.document.get("config")
    }

    /// The `rules` array, in order. Non-object entries are still listed
    /// (with every field `None`) so indices match the document.
    pub fn rules(&self) -> Vec<Rule<'_>> {
        self.array("rules")
            .iter()
            .enumerate()
            .map(|(index, raw)| Rule {
                index,
                key: raw.get("key").and_then(Value::as_str),
                category: raw.get("category").and_then(Value::as_str),
                value: raw.get("value"),
                description: raw.get("description").and_then(Value::as_str),
                raw,
            })
            .collect()
    }

    /// The rule with key `key`, if any (keys are unique within a policy).
    pub fn rule(&self, key: &str) -> Option<Rule<'_>> {
        self.rules().into_iter().find(|r| r.key == Some(key))
    }

    /// The `approvals` array, in order (same leniency as [`Policy::rules`]).
    pub fn approvals(&self) -> Vec<Approval<'_>> {
        self.array("approvals")
            .iter()
            .enumerate()
            .map(|(index, raw)| Approval {
                index,
                by: raw.get("by").and_then(Value::as_str),
                role: raw.get("role").and_then(Value::as_str),
                at: raw.get("at").and_then(Value::as_str),
                raw,
            })
            .collect()
    }

    fn array(&self, name: &str) -> &[Value] {
        self.document
            .get(name)
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
}

impl Rule<'_> {
    /// JSON pointer to this rule, e.g. `/rules/3`.
    pub fn pointer(&self) -> String {
        json_pointer(["rules".to_string(), self.index.to_string()])
    }

    /// JSON pointer to one field of this rule, e.g. `/rules/3/value`.
    pub fn field_pointer(&self, field: &str) -> String {
        json_pointer(["rules", &self.index.to_string(), field])
    }

    /// The value as a number, when it is one.
    pub fn number(&self) -> Option<f64> {
        self.value.and_then(Value::as_f64)
    }
}

impl Approval<'_> {
    /// JSON pointer to this approval, e.g. `/approvals/0`.
    pub fn pointer(&self) -> String {
        json_pointer(["approvals".to_string(), self.index.to_string()])
    }

    /// JSON pointer to one field of this approval, e.g. `/approvals/0/by`.
    pub fn field_pointer(&self, field: &str) -> String {
        json_pointer(["approvals", &self.index.to_string(), field])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Policy {
        Policy::from_value(json!({
            "id": "42", "version": "1.3.0", "title": "SNAP thresholds",
            "agency": "HHS", "effective": "2030-01-01",
            "approvals": [{"by": "ana", "role": "policy-owner", "at": "2029-12-01"}, "junk"],
            "rules": [
                {"key": "snap.max_age", "category": "eligibility", "value": 65, "description": "d"},
                {"key": "x"}
            ],
            "config": {"portal_fields": ["name"]}
        }))
    }

    #[test]
    fn typed_accessors_read_design_fields() {
        let p = sample();
        assert_eq!((p.id(), p.version()), ("42", "1.3.0"));
        assert_eq!(p.title(), Some("SNAP thresholds"));
        assert_eq!(p.agency(), Some("HHS"));
        assert_eq!(p.effective(), Some("2030-01-01"));
        assert_eq!(p.get("/config/portal_fields/0"), Some(&json!("name")));
        let rules = p.rules();
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].key, Some("snap.max_age"));
        assert_eq!(rules[0].category, Some("eligibility"));
        assert_eq!(rules[0].number(), Some(65.0));
        assert_eq!(rules[0].field_pointer("value"), "/rules/0/value");
        assert_eq!(rules[1].value, None);
        assert_eq!(p.rule("x").map(|r| r.index), Some(1));
        assert!(p.rule("nope").is_none());
        let approvals = p.approvals();
        assert_eq!(approvals.len(), 2, "non-object entries keep their index");
        assert_eq!(approvals[0].role, Some("policy-owner"));
        assert_eq!(approvals[1].by, None);
        assert_eq!(approvals[1].pointer(), "/approvals/1");
    }

    #[test]
    fn from_json_rejects_non_objects_and_garbage() {
        assert!(Policy::from_json("1", "1.0.0", "[1]").is_err());
        let err = Policy::from_json("1", "1.0.0", "{nope").unwrap_err();
        assert!(err.contains("not valid JSON"), "{err}");
        let p = Policy::from_json("7", "2.0.0", r#"{"id":"ignored"}"#).unwrap();
        assert_eq!(p.id(), "7", "the WIT id wins over the document's");
        assert!(p.rules().is_empty());
    }
}
