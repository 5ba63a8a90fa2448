//! The policy store: a directory of `<id>.json` / `<id>.yaml` files.
//!
//! Policy files are hostile input (anyone who can open a pull request can
//! write one), so reading is bounded before parsing starts: files over
//! [`MAX_POLICY_BYTES`] are refused without being read in full, YAML is
//! parsed with a tight `serde-saphyr` budget (nodes, depth, aliases, one
//! document) against billion-laughs style expansion, and duplicate YAML keys
//! are errors rather than last-one-wins. Both formats end up as the same
//! `serde_json::Value`, which is what the schema, the plugins and the bundle
//! see.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{Policy, PolicyDoc, PolicyError, check_canonical_numbers, check_schema};
use crate::diagnostic::Diagnostic;

/// The largest policy file pde reads: 4 MiB.
pub const MAX_POLICY_BYTES: u64 = 4 * 1024 * 1024;

const EXTENSIONS: [&str; 3] = ["json", "yaml", "yml"];

/// A directory of policy files.
#[derive(Debug, Clone)]
pub struct PolicyStore {
    dir: PathBuf,
}

impl PolicyStore {
    /// A store over `dir`. Nothing is read until a policy is asked for.
    pub fn open(dir: &Path) -> PolicyStore {
        PolicyStore {
            dir: dir.to_path_buf(),
        }
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file holding policy `id`: exactly one of `<id>.json`, `<id>.yaml`, `<id>.yml`.
    pub fn path_of(&self, id: &str) -> Result<PathBuf, PolicyError> {
        if !valid_id(id) {
            return Err(PolicyError::BadId { id: id.to_string() });
        }
        let found: Vec<PathBuf> = EXTENSIONS
            .iter()
            .map(|ext| self.dir.join(format!("{id}.{ext}")))
            .filter(|p| p.is_file())
            .collect();
        match found.len() {
            0 => Err(PolicyError::NotFound {
                id: id.to_string(),
                dir: self.dir.clone(),
            }),
            1 => Ok(found.into_iter().next().expect("one path")),
            _ => Err(PolicyError::Ambiguous {
                id: id.to_string(),
                paths: found,
            }),
        }
    }

    /// Reads and parses policy `id` without schema checks: the raw document.
    pub fn read_document(&self, id: &str) -> Result<(PathBuf, Value), PolicyError> {
        let path = self.path_of(id)?;
        let text = read_bounded(&path)?;
        let is_json = path.extension().is_some_and(|e| e == "json");
        let value = if is_json {
            parse_json(&path, &text)?
        } else {
            parse_yaml(&path, &text)?
        };
        Ok((path, value))
    }

    /// Loads policy `id`: parse, schema check, id check, typed view.
    pub fn load(&self, id: &str) -> Result<Policy, PolicyError> {
        let (path, document) = self.read_document(id)?;
        let mut diagnostics = check_schema(&document);
        diagnostics.extend(check_canonical_numbers(&document));
        if !diagnostics.is_empty() {
            return Err(PolicyError::Invalid {
                id: id.to_string(),
                diagnostics,
            });
        }
        let doc: PolicyDoc =
            serde_json::from_value(document.clone()).map_err(|e| PolicyError::Invalid {
                id: id.to_string(),
                diagnostics: vec![Diagnostic::error(
                    "schema",
                    "schema.shape",
                    "",
                    e.to_string(),
                )],
            })?;
        if doc.id != id {
            return Err(PolicyError::IdMismatch {
                path,
                expected: id.to_string(),
                found: doc.id,
            });
        }
        let version = semver::Version::parse(&doc.version).map_err(|e| PolicyError::Invalid {
            id: id.to_string(),
            diagnostics: vec![Diagnostic::error(
                "schema",
                "schema.semver",
                "/version",
                format!("{:?} is not a semantic version: {e}", doc.version),
            )],
        })?;
        let approvals_dir = super::approvals::dir_of(&path);
        let signed_approvals =
            super::approvals::read_dir(&approvals_dir).map_err(|source| PolicyError::Read {
                path: approvals_dir,
                source,
            })?;
        Ok(Policy {
            id: doc.id.clone(),
            version,
            document,
            path,
            doc,
            signed_approvals,
        })
    }

    /// Every policy id in the store, sorted. Each id appears once even if
    /// several files claim it ([`PolicyStore::path_of`] reports that).
    pub fn ids(&self) -> Result<Vec<String>, PolicyError> {
        let entries = fs::read_dir(&self.dir).map_err(|source| PolicyError::Read {
            path: self.dir.clone(),
            source,
        })?;
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| PolicyError::Read {
                path: self.dir.clone(),
                source,
            })?;
            let path = entry.path();
            let (Some(stem), Some(ext)) = (
                path.file_stem().and_then(|s| s.to_str()),
                path.extension().and_then(|s| s.to_str()),
            ) else {
                continue;
            };
            if EXTENSIONS.contains(&ext) && valid_id(stem) && path.is_file() {
                ids.push(stem.to_string());
            }
        }
        ids.sort();
        ids.dedup();
        Ok(ids)
    }
}

/// Ids name files, tags and locks: letters, digits, `.`, `_`, `-`, not
/// starting with `.` or `-`.
pub(crate) fn valid_id(id: &str) -> bool {
    let mut chars = id.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && id.len() <= 128
}

fn read_bounded(path: &Path) -> Result<String, PolicyError> {
    let read_err = |source| PolicyError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = fs::File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let too_large = |size| PolicyError::TooLarge {
        path: path.to_path_buf(),
        size,
        limit: MAX_POLICY_BYTES,
    };
    if size > MAX_POLICY_BYTES {
        return Err(too_large(size));
    }
    // The file may grow between stat and read; never read past the limit.
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(MAX_POLICY_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_POLICY_BYTES {
        return Err(too_large(bytes.len() as u64));
    }
    String::from_utf8(bytes).map_err(|e| PolicyError::Parse {
        path: path.to_path_buf(),
        message: format!(
            "not UTF-8 (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ),
    })
}

/// Parses JSON, refusing duplicate object keys.
///
/// `serde_json` keeps the last of two equal keys, so `"version": "9.9.9",
/// "version": "1.0.0"` would be approved by one reader as 9.9.9 and deployed
/// by another as 1.0.0. YAML already refuses duplicates; JSON must too.
fn parse_json(path: &Path, text: &str) -> Result<Value, PolicyError> {
    use serde::de::DeserializeSeed;
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = StrictValue {
        pointer: String::new(),
    }
    .deserialize(&mut de)
    .and_then(|v| de.end().map(|()| v));
    parsed.map_err(|e| PolicyError::Parse {
        path: path.to_path_buf(),
        message: format!(
            "invalid JSON at line {}, column {}: {}",
            e.line(),
            e.column(),
            // serde_json appends the position to custom messages; it is already in front.
            e.to_string()
                .rsplit_once(" at line ")
                .map_or_else(|| e.to_string(), |(m, _)| m.to_string())
        ),
    })
}

/// A [`Value`] seed that knows its JSON pointer, to name a duplicate key.
struct StrictValue {
    pointer: String,
}

impl StrictValue {
    fn child(&self, token: &str) -> StrictValue {
        let escaped = token.replace('~', "~0").replace('/', "~1");
        StrictValue {
            pointer: format!("{}/{escaped}", self.pointer),
        }
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for StrictValue {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for StrictValue {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(v) = seq.next_element_seed(self.child(&items.len().to_string()))? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let child = self.child(&key);
            if object.contains_key(&key) {
                return Err(serde::de::Error::custom(format!(
                    "duplicate key {key:?} at {}",
                    child.pointer
                )));
            }
            let value = map.next_value_seed(child)?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

fn yaml_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_documents = 1;
    budget.max_depth = 64;
    budget.max_nodes = 200_000;
    budget.max_events = 500_000;
    budget.max_aliases = 1_000;
    budget.max_anchors = 1_000;
    budget.max_total_scalar_bytes = MAX_POLICY_BYTES as usize;
    budget.max_recorded_anchor_events = 100_000;
    budget.max_recorded_anchor_bytes = MAX_POLICY_BYTES as usize;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options.alias_limits.max_total_replayed_events = 100_000;
    options.with_snippet = false;
    // YAML 1.1 booleans (`no`, `on`, ...) would silently turn a country code
    // or a rule value into `false`.
    options.strict_booleans = true;
    options
}

fn parse_yaml(path: &Path, text: &str) -> Result<Value, PolicyError> {
    // serde-saphyr refuses `.nan` and `.inf` by default (RFC 8785 has no
    // form for them), naming line and column; tests/all/jcs.rs holds it to that.
    serde_saphyr::from_str_with_options::<Value>(text, yaml_options()).map_err(|e| {
        let message = match e.location() {
            Some(loc) => format!(
                "invalid YAML at line {}, column {}: {e}",
                loc.line(),
                loc.column()
            ),
            None => format!("invalid YAML: {e}"),
        };
        PolicyError::Parse {
            path: path.to_path_buf(),
            message,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pde_core::{ExitCode, HasExitCode};

    const JSON_42: &str = r#"{"id": "42", "version": "1.3.0", "title": "Eligibility", "agency": "HMS",
        "effective": "2026-01-01",
        "approvals": [{"by": "ana", "role": "director", "at": "2025-12-01"}],
        "rules": [{"key": "eligibility.max-age", "category": "eligibility", "value": 65, "description": "Upper age"}]}"#;

    const YAML_7: &str = "id: \"7\"\nversion: 2.0.0\ntitle: Benefits\nagency: HMS\neffective: \"2026-03-01\"\nrules:\n  - key: benefits.cap\n    category: benefits\n    value: {amount: 1200}\n    description: Monthly cap\nconfig:\n  region: north\n";

    fn store(files: &[(&str, &str)]) -> (tempfile::TempDir, PolicyStore) {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            fs::write(dir.path().join(name), text).unwrap();
        }
        let store = PolicyStore::open(dir.path());
        (dir, store)
    }

    #[test]
    fn loads_json_and_yaml_into_the_same_shape() {
        let (_d, s) = store(&[("42.json", JSON_42), ("7.yaml", YAML_7)]);
        let p = s.load("42").unwrap();
        assert_eq!(p.id, "42");
        assert_eq!(p.version, semver::Version::new(1, 3, 0));
        assert_eq!(p.doc.rules[0].key, "eligibility.max-age");
        assert_eq!(p.doc.approvals[0].by, "ana");
        let y = s.load("7").unwrap();
        assert_eq!(y.version, semver::Version::new(2, 0, 0));
        assert_eq!(y.document["rules"][0]["value"]["amount"], 1200);
        assert_eq!(y.doc.config["region"], "north");
        assert!(y.doc.approvals.is_empty());
        assert_eq!(s.ids().unwrap(), vec!["42".to_string(), "7".to_string()]);
    }

    #[test]
    fn missing_ambiguous_and_bad_ids_are_usage_errors() {
        let (_d, s) = store(&[("42.json", JSON_42), ("42.yml", YAML_7), ("notes.txt", "x")]);
        let e = s.load("42").unwrap_err();
        assert!(matches!(e, PolicyError::Ambiguous { ref paths, .. } if paths.len() == 2));
        assert_eq!(e.exit_code(), ExitCode::Usage);
        let e = s.load("9").unwrap_err();
        assert!(matches!(e, PolicyError::NotFound { .. }));
        assert!(e.to_string().contains("9.json"));
        assert_eq!(e.exit_code(), ExitCode::Usage);
        for bad in ["../42", "a/b", ".hidden", ""] {
            assert!(
                matches!(s.path_of(bad), Err(PolicyError::BadId { .. })),
                "{bad}"
            );
        }
        assert_eq!(s.ids().unwrap(), vec!["42".to_string()]);
    }

    #[test]
    fn malformed_json_names_line_and_column() {
        let (_d, s) = store(&[("42.json", "{\"id\": \"42\",\n  \"version\": }")]);
        let e = s.load("42").unwrap_err();
        assert_eq!(e.exit_code(), ExitCode::ValidationFailed);
        let PolicyError::Parse { message, .. } = e else {
            panic!("expected a parse error, got {e:?}")
        };
        assert!(message.contains("line 2"), "{message}");
    }

    #[test]
    fn malformed_yaml_names_the_line() {
        let (_d, s) = store(&[(
            "7.yaml",
            "id: \"7\"\nrules:\n  - key: [unclosed\nversion: 1.0.0\n",
        )]);
        let e = s.load("7").unwrap_err();
        assert_eq!(e.exit_code(), ExitCode::ValidationFailed);
        let PolicyError::Parse { message, .. } = e else {
            panic!("expected a parse error, got {e:?}")
        };
        assert!(message.contains("line"), "{message}");
    }

    #[test]
    fn yaml_duplicate_keys_and_multiple_documents_are_refused() {
        let (_d, s) = store(&[
            ("1.yaml", "id: \"1\"\nid: \"2\"\n"),
            ("2.yaml", "id: \"2\"\n---\nid: \"3\"\n"),
        ]);
        assert!(matches!(s.load("1"), Err(PolicyError::Parse { .. })));
        assert!(matches!(s.load("2"), Err(PolicyError::Parse { .. })));
    }

    #[test]
    fn json_duplicate_keys_are_refused_with_their_pointer() {
        let (_d, s) = store(&[
            (
                "1.json",
                r#"{"id": "1", "version": "9.9.9", "version": "1.0.0"}"#,
            ),
            (
                "2.json",
                r#"{"id": "2", "rules": [{"key": "a"}, {"key": "b", "value": {"x/y": 1, "x/y": 2}}]}"#,
            ),
        ]);
        let e = s.load("1").unwrap_err();
        assert_eq!(e.exit_code(), ExitCode::ValidationFailed);
        let PolicyError::Parse { message, .. } = e else {
            panic!("expected a parse error, got {e:?}")
        };
        assert!(
            message.contains("duplicate key \"version\" at /version"),
            "{message}"
        );
        assert!(message.contains("line 1"), "{message}");
        let e = s.read_document("2").unwrap_err().to_string();
        assert!(e.contains("at /rules/1/value/x~1y"), "{e}");
        // Without duplicates the strict parser reads what serde_json reads.
        let (_d, s) = store(&[("42.json", JSON_42)]);
        let (_, v) = s.read_document("42").unwrap();
        assert_eq!(v, serde_json::from_str::<Value>(JSON_42).unwrap());
    }

    #[test]
    fn alias_bombs_hit_the_budget() {
        let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..9 {
            let prev = (b'a' + i - 1) as char;
            let cur = (b'a' + i) as char;
            bomb.push_str(&format!(
                "{cur}: &{cur} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
            ));
        }
        let (_d, s) = store(&[("1.yaml", &bomb)]);
        assert!(matches!(s.load("1"), Err(PolicyError::Parse { .. })));
    }

    #[test]
    fn yaml_scalars_stay_literal() {
        let (_d, s) = store(&[("1.yaml", "country: NO\neffective: 2026-01-01\non: yes\n")]);
        let (_, v) = s.read_document("1").unwrap();
        assert_eq!(v["country"], "NO");
        assert_eq!(v["effective"], "2026-01-01");
        assert_eq!(v["on"], "yes");
    }

    #[test]
    fn yaml_tags_read_no_files() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret.txt");
        fs::write(&secret, "TOP-SECRET").unwrap();
        let yaml = format!("leak: !include {}\n", secret.display());
        fs::write(dir.path().join("1.yaml"), yaml).unwrap();
        match PolicyStore::open(dir.path()).read_document("1") {
            Ok((_, v)) => assert!(!v.to_string().contains("TOP-SECRET"), "{v}"),
            Err(e) => assert!(matches!(e, PolicyError::Parse { .. }), "{e}"),
        }
    }

    #[test]
    fn oversized_files_are_refused_before_parsing() {
        let big = format!("{{\"pad\": \"{}\"}}", "x".repeat(MAX_POLICY_BYTES as usize));
        let (_d, s) = store(&[("42.json", &big)]);
        let e = s.load("42").unwrap_err();
        assert!(matches!(
            e,
            PolicyError::TooLarge {
                limit: MAX_POLICY_BYTES,
                ..
            }
        ));
        assert_eq!(e.exit_code(), ExitCode::ValidationFailed);
    }

    #[test]
    fn schema_violations_and_id_mismatch_are_validation_failures() {
        let bad = JSON_42.replace("\"1.3.0\"", "\"one\"");
        let (_d, s) = store(&[("42.json", &bad), ("43.json", JSON_42)]);
        let e = s.load("42").unwrap_err();
        let PolicyError::Invalid {
            ref diagnostics, ..
        } = e
        else {
            panic!("expected Invalid, got {e:?}")
        };
        assert_eq!(diagnostics[0].path, "/version");
        assert_eq!(e.exit_code(), ExitCode::ValidationFailed);
        let e = s.load("43").unwrap_err();
        assert!(matches!(e, PolicyError::IdMismatch { ref found, .. } if found == "42"));
        assert_eq!(e.exit_code(), ExitCode::ValidationFailed);
    }
}
