//! The bundled JSON Schema of a policy document, and schema diagnostics.
//!
//! The schema ships inside the binary (`include_str!`) so that what "valid"
//! means is fixed by the pde version, not by whatever file happens to sit in a
//! policy repository. It is compiled once per process. Each schema error
//! becomes a [`Diagnostic`] with source `schema`, code `schema.<keyword>` and
//! the JSON pointer of the offending value, so editors and the CLI can point
//! at the exact field.

use std::sync::LazyLock;

use serde_json::Value;

use crate::diagnostic::Diagnostic;

/// The policy JSON Schema (draft 2020-12), as shipped.
pub const POLICY_SCHEMA: &str = include_str!("policy.schema.json");

/// At most this many schema diagnostics are reported for one document; a
/// hostile file could otherwise produce one per array element.
pub const MAX_SCHEMA_DIAGNOSTICS: usize = 100;

static VALIDATOR: LazyLock<jsonschema::Validator> = LazyLock::new(|| {
    let schema: Value = serde_json::from_str(POLICY_SCHEMA).expect("bundled schema is JSON");
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("bundled schema compiles")
});

/// Checks `doc` against the bundled schema; one error diagnostic per violation.
pub fn check_schema(doc: &Value) -> Vec<Diagnostic> {
    let mut out: Vec<Diagnostic> = VALIDATOR
        .iter_errors(doc)
        .take(MAX_SCHEMA_DIAGNOSTICS)
        .map(|e| {
            let code = format!("schema.{}", e.kind().keyword());
            let path = e.instance_path().to_string();
            Diagnostic::error("schema", &code, &path, e.to_string())
        })
        .collect();
    if out.len() == MAX_SCHEMA_DIAGNOSTICS {
        out.push(Diagnostic::error(
            "schema",
            "schema.too-many-errors",
            "",
            format!("more than {MAX_SCHEMA_DIAGNOSTICS} schema errors; fix these first"),
        ));
    }
    out
}

/// One error per number that RFC 8785 canonical JSON would round (an
/// integer beyond ±(2^53−1)), with its JSON pointer.
///
/// A bundle's digest is computed over that form; a number it cannot hold
/// would give a digest that other JCS implementations disagree with, or a
/// silently different value, so it is refused here, where the author can fix
/// it (usually by writing it as a string).
pub fn check_canonical_numbers(doc: &Value) -> Vec<Diagnostic> {
    pde_core::canonical::unrepresentable_numbers(doc)
        .into_iter()
        .take(MAX_SCHEMA_DIAGNOSTICS)
        .map(|e| {
            let pointer = match &e {
                pde_core::canonical::CanonicalError::Number { pointer, .. } => pointer.clone(),
                pde_core::canonical::CanonicalError::Serialize(_) => String::new(),
            };
            Diagnostic::error("schema", "schema.canonical-number", &pointer, e.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn valid() -> Value {
        json!({
            "id": "42", "version": "1.3.0", "title": "Eligibility", "agency": "HMS",
            "effective": "2026-01-01",
            "approvals": [{"by": "ana", "role": "director", "at": "2025-12-01"}],
            "rules": [{"key": "eligibility.max-age", "category": "eligibility", "value": 65, "description": "d"}],
            "config": {"mode": "strict"}
        })
    }

    fn codes_at(doc: &Value) -> Vec<(String, String)> {
        check_schema(doc)
            .into_iter()
            .map(|d| (d.code, d.path))
            .collect()
    }

    #[test]
    fn a_valid_document_has_no_findings() {
        assert_eq!(check_schema(&valid()), vec![]);
    }

    #[test]
    fn rule_keys_may_use_underscores_and_descriptions_are_optional() {
        let mut doc = valid();
        doc["rules"] = json!([{"key": "snap.max_income", "category": "eligibility", "value": 1}]);
        assert_eq!(check_schema(&doc), vec![]);
        doc["rules"][0]["key"] = json!("Snap.Max");
        assert_eq!(
            codes_at(&doc),
            vec![("schema.pattern".to_string(), "/rules/0/key".to_string())]
        );
    }

    #[test]
    fn violations_carry_keyword_codes_and_pointers() {
        let mut doc = valid();
        doc["version"] = json!("1.3");
        doc["rules"][0]["key"] = json!("Bad Key");
        doc["effective"] = json!("2026-02-30");
        doc.as_object_mut().unwrap().remove("title");
        doc["titel"] = json!("typo");
        let found = codes_at(&doc);
        for expected in [
            ("schema.pattern", "/version"),
            ("schema.pattern", "/rules/0/key"),
            ("schema.format", "/effective"),
            ("schema.required", ""),
            ("schema.additionalProperties", ""),
        ] {
            assert!(
                found.contains(&(expected.0.to_string(), expected.1.to_string())),
                "missing {expected:?} in {found:?}"
            );
        }
        assert!(
            check_schema(&doc)
                .iter()
                .all(|d| d.is_error() && d.source == "schema")
        );
    }

    #[test]
    fn empty_rules_and_wrong_types_are_reported() {
        let mut doc = valid();
        doc["rules"] = json!([]);
        doc["approvals"] = json!([{"by": "ana"}]);
        doc["config"] = json!([1]);
        let found = codes_at(&doc);
        assert!(
            found.contains(&("schema.minItems".into(), "/rules".into())),
            "{found:?}"
        );
        assert!(
            found.contains(&("schema.required".into(), "/approvals/0".into())),
            "{found:?}"
        );
        assert!(
            found.contains(&("schema.type".into(), "/config".into())),
            "{found:?}"
        );
    }

    #[test]
    fn a_flood_of_errors_is_capped() {
        let mut doc = valid();
        doc["rules"] = Value::Array((0..500).map(|_| json!({"key": 1})).collect());
        let found = check_schema(&doc);
        assert_eq!(found.len(), MAX_SCHEMA_DIAGNOSTICS + 1);
        assert_eq!(found.last().unwrap().code, "schema.too-many-errors");
    }
}
