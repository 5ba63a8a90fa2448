//! The plugin runtime end to end: real components built from `plugins/`
//! (through `pde-plugin-artifacts`), real files in temporary plugin
//! directories, the real wasmtime host. Nothing is mocked.
//!
//! Every misbehaving fixture mode must end with its exact named error well
//! within 2 s, and the same `PluginHost` must then serve a well-behaved call.
// Test code: a failed unwrap is a failed test, with its location.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pde::ExitCode;
use pde::config::Limits;
use pde::diagnostic::Severity;
use pde::error::HasExitCode;
use pde::keys::TrustedKeys;
use pde::plugin::{
    CallContext, Plugin, PluginError, PluginHost, PluginKind, PolicyInput, ServiceInfo,
    SignatureStatus, sha256_hex,
};
use serde_json::{Value, json};

/// Path of a built component.
fn artifact(name: &str) -> PathBuf {
    PathBuf::from(
        pde_plugin_artifacts::wasm(name).unwrap_or_else(|| panic!("no artifact named {name}")),
    )
}

/// Copies `artifact` to `<dir>/<stem>.wasm` and writes `<dir>/<stem>.toml`.
fn install(dir: &Path, stem: &str, artifact_name: &str, kind: &str, extra: &str) -> PathBuf {
    let bytes = std::fs::read(artifact(artifact_name)).unwrap();
    install_bytes(dir, stem, &bytes, kind, extra)
}

fn install_bytes(dir: &Path, stem: &str, bytes: &[u8], kind: &str, extra: &str) -> PathBuf {
    let wasm = dir.join(format!("{stem}.wasm"));
    std::fs::write(&wasm, bytes).unwrap();
    let manifest = format!(
        "name = \"{stem}\"\nkind = \"{kind}\"\nversion = \"0.1.0\"\nsha256 = \"{}\"\ndescription = \"test copy\"\n{extra}",
        sha256_hex(bytes)
    );
    std::fs::write(dir.join(format!("{stem}.toml")), manifest).unwrap();
    wasm
}

fn host() -> PluginHost {
    PluginHost::new(Limits::default(), None).unwrap()
}

fn load_one(host: &PluginHost, dir: &Path) -> Plugin {
    let mut plugins = host.load_dir(dir, &TrustedKeys::new()).unwrap();
    assert_eq!(plugins.len(), 1);
    plugins.remove(0)
}

fn load_err(dir: &Path) -> PluginError {
    host()
        .load_dir(dir, &TrustedKeys::new())
        .expect_err("loading must fail")
}

fn policy(rules: Value) -> PolicyInput {
    policy_with(json!({ "rules": rules }))
}

/// A DESIGN §8 policy document, with `overrides` merged over the defaults.
fn policy_with(overrides: Value) -> PolicyInput {
    let mut doc = json!({
        "id": "42",
        "version": "1.3.0",
        "title": "Housing benefit eligibility 2031",
        "agency": "Department of Human Services",
        "effective": "2099-01-01",
        "approvals": [
            {"by": "a.smith", "role": "policy-owner", "at": "2030-11-01T10:00:00Z"},
            {"by": "b.jones", "role": "legal", "at": "2030-11-02T10:00:00Z"}
        ],
        "rules": [],
        "config": {}
    });
    for (k, v) in overrides.as_object().unwrap() {
        doc[k] = v.clone();
    }
    PolicyInput {
        id: doc["id"].as_str().unwrap().to_string(),
        version: doc["version"].as_str().unwrap().to_string(),
        document: doc,
    }
}

/// Fails the test, listing them, if any finding is an error.
fn assert_no_errors(found: &[pde::diagnostic::Diagnostic]) {
    assert!(found.iter().all(|d| !d.is_error()), "{found:?}");
}

fn ctx(env: &str) -> CallContext {
    CallContext::env(env)
}

fn service(name: &str, tags: &[&str]) -> ServiceInfo {
    ServiceInfo {
        name: name.to_string(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        labels: Default::default(),
    }
}

// ---------------------------------------------------------------- examples

#[test]
fn eligibility_bounds_flags_out_of_range_rules_and_passes_sane_ones() {
    let dir = tempfile::tempdir().unwrap();
    install(
        dir.path(),
        "eligibility-bounds",
        "eligibility-bounds",
        "validator",
        "[settings]\nage = { min = 16, max = 120 }\n",
    );
    let host = host();
    let plugin = load_one(&host, dir.path());
    assert_eq!(plugin.kind, PluginKind::Validator);
    assert_eq!(plugin.wit_version, semver::Version::new(0, 2, 0));
    assert_eq!(plugin.signature, SignatureStatus::Unsigned);

    let bad = policy(json!([
        {"key": "min_age", "category": "eligibility", "value": 150, "description": "typo"},
        {"key": "income_cap", "category": "eligibility", "value": 42000, "description": "ok"},
        {"key": "copay_percent", "category": "eligibility", "value": 0.5, "description": "fraction"},
        {"key": "applicant_age", "category": "eligibility", "value": 12, "description": "below agency min"}
    ]));
    let report = host.validate(&plugin, &bad, &ctx("staging")).unwrap();
    let found: Vec<(Severity, &str, &str)> = report
        .value
        .iter()
        .map(|d| (d.severity, d.code.as_str(), d.path.as_str()))
        .collect();
    assert_eq!(
        found,
        vec![
            (Severity::Error, "eligibility.age-range", "/rules/0/value"),
            (
                Severity::Warning,
                "eligibility.percent-as-fraction",
                "/rules/2/value"
            ),
            (Severity::Error, "eligibility.age-range", "/rules/3/value"),
        ]
    );
    assert!(
        report
            .value
            .iter()
            .all(|d| d.source == "eligibility-bounds")
    );
    assert!(report.fuel_used > 0);
    assert!(report.peak_memory_bytes > 0);

    let good = policy(json!([
        {"key": "min_age", "category": "eligibility", "value": 18, "description": "adult"},
        {"key": "income_cap", "category": "eligibility", "value": {"min": 0, "max": 52000}, "description": "cap"}
    ]));
    let report = host.validate(&plugin, &good, &ctx("")).unwrap();
    assert_eq!(report.value, vec![], "{:?}", report.value);
    // host.log lines arrive in the report
    assert!(
        report.log.iter().any(|l| l.contains("checked 2 rule(s)")),
        "{:?}",
        report.log
    );
}

/// Installs plugin `name` with the manifest template shipped beside its
/// crate, `sha256` filled in: what an agency's operator does.
fn install_shipped(dir: &Path, name: &str) -> PathBuf {
    let bytes = std::fs::read(artifact(name)).unwrap();
    let template_path = pde_plugin_artifacts::manifest_template(name)
        .unwrap_or_else(|| panic!("{name} ships no manifest template"));
    let template = std::fs::read_to_string(template_path).unwrap();
    assert!(template.contains("sha256 = \"\""), "{template}");
    let manifest = template.replace(
        "sha256 = \"\"",
        &format!("sha256 = \"{}\"", sha256_hex(&bytes)),
    );
    let wasm = dir.join(format!("{name}.wasm"));
    std::fs::write(&wasm, &bytes).unwrap();
    std::fs::write(dir.join(format!("{name}.toml")), manifest).unwrap();
    wasm
}

#[test]
fn every_shipped_plugin_loads_from_one_directory_with_its_template() {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "eligibility-bounds",
        "pii-guard",
        "effective-date",
        "category-router",
        "benefit-change",
        "label-router",
    ] {
        install_shipped(dir.path(), name);
    }
    let plugins = host().load_dir(dir.path(), &TrustedKeys::new()).unwrap();
    let got: Vec<(&str, PluginKind)> = plugins.iter().map(|p| (p.name.as_str(), p.kind)).collect();
    assert_eq!(
        got,
        vec![
            ("benefit-change", PluginKind::Validator),
            ("category-router", PluginKind::Router),
            ("effective-date", PluginKind::Validator),
            ("eligibility-bounds", PluginKind::Validator),
            ("label-router", PluginKind::Router),
            ("pii-guard", PluginKind::Validator),
        ]
    );
    // Built with the SDK, so against its contract: the newest.
    assert!(
        plugins
            .iter()
            .all(|p| p.wit_version == semver::Version::new(0, 2, 0) && p.sees_active_policy())
    );
}

#[test]
fn pii_guard_refuses_ssn_and_birth_dates_on_the_portal() {
    let dir = tempfile::tempdir().unwrap();
    install_shipped(dir.path(), "pii-guard");
    let host = host();
    let plugin = load_one(&host, dir.path());
    let exposed = policy_with(json!({
        "rules": [
            {"key": "intake.form", "category": "forms", "value": {"fields": ["name", "email"]},
             "description": "Ask for the date of birth on the public form"}
        ],
        "config": {"portal_fields": ["name", "ssn", "email"]}
    }));
    let report = host
        .validate(&plugin, &exposed, &ctx("production"))
        .unwrap();
    let errors: Vec<(&str, &str)> = report
        .value
        .iter()
        .filter(|d| d.is_error())
        .map(|d| (d.code.as_str(), d.path.as_str()))
        .collect();
    assert!(
        errors.contains(&("pii.ssn-exposed", "/config/portal_fields/1")),
        "{errors:?}"
    );
    assert!(
        errors.contains(&("pii.dob-exposed", "/rules/0/description")),
        "{errors:?}"
    );
    assert!(report.value.iter().all(|d| d.source == "pii-guard"));

    let clean = policy_with(json!({
        "rules": [{"key": "min_age", "category": "eligibility", "value": 18, "description": "adult"}],
        "config": {"portal_fields": ["name", "email"]}
    }));
    let report = host.validate(&plugin, &clean, &ctx("production")).unwrap();
    assert_no_errors(&report.value);
}

#[test]
fn effective_date_rejects_past_dates_and_leaves_approvals_to_pde() {
    let dir = tempfile::tempdir().unwrap();
    install_shipped(dir.path(), "effective-date");
    let host = host();
    let mut plugin = load_one(&host, dir.path());

    // The real WASI wall clock: 2000-01-01 is in the past whenever this runs.
    let past = policy_with(json!({"effective": "2000-01-01", "approvals": []}));
    let report = host.validate(&plugin, &past, &ctx("")).unwrap();
    let codes: Vec<(&str, &str)> = report
        .value
        .iter()
        .filter(|d| d.is_error())
        .map(|d| (d.code.as_str(), d.path.as_str()))
        .collect();
    assert!(
        codes.contains(&("effective.in-past", "/effective")),
        "{codes:?}"
    );
    // No typed-in approvals is not the plugin's to judge: pde counts
    // approvals, signed ones included (issue 26).
    assert!(
        !codes.iter().any(|(c, _)| c.starts_with("approvals.")),
        "{codes:?}"
    );

    let malformed = policy_with(json!({"effective": "2031-02-30"}));
    let report = host.validate(&plugin, &malformed, &ctx("")).unwrap();
    assert!(
        report.value.iter().any(|d| d.code == "effective.malformed"),
        "{:?}",
        report.value
    );

    // With a pinned "today" the verdict is deterministic.
    plugin.settings["today"] = json!("2030-06-01");
    let fine = policy_with(json!({"effective": "2030-07-01"}));
    let report = host.validate(&plugin, &fine, &ctx("")).unwrap();
    assert_no_errors(&report.value);
}

#[test]
fn category_router_routes_by_category_and_tags_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    install_shipped(dir.path(), "category-router");
    let host = host();
    let plugin = load_one(&host, dir.path());
    assert_eq!(plugin.kind, PluginKind::Router);
    let services = vec![
        service("HMS-API", &["api", "eligibility"]),
        service("Scheduler", &["scheduling"]),
        service("Portal", &["portal", "public"]),
        service("Mailer", &["mail"]),
    ];
    let p = policy(json!([
        {"key": "min_age", "category": "eligibility", "value": 18, "description": "adult"},
        {"key": "intake.form", "category": "forms", "value": {}, "description": "form"}
    ]));
    let report = host
        .route(&plugin, &p, &ctx("production"), &services)
        .unwrap();
    let mut routed: Vec<&str> = report.value.iter().map(|r| r.service.as_str()).collect();
    routed.sort();
    assert_eq!(routed, vec!["HMS-API", "Portal", "Scheduler"]);
    for r in &report.value {
        assert!(!r.reason.is_empty(), "{r:?}");
    }
    let portal = report.value.iter().find(|r| r.service == "Portal").unwrap();
    assert!(portal.reason.contains("forms"), "{}", portal.reason);

    let payments = policy(json!([
        {"key": "payment_day", "category": "payments", "value": 15, "description": "monthly"}
    ]));
    let report = host
        .route(&plugin, &payments, &ctx("production"), &services)
        .unwrap();
    let routed: Vec<&str> = report.value.iter().map(|r| r.service.as_str()).collect();
    assert_eq!(routed, vec!["Scheduler"]);

    // A router called as a validator is refused by name, not run.
    let err = host.validate(&plugin, &payments, &ctx("")).unwrap_err();
    assert!(
        matches!(
            err,
            PluginError::WrongWorld {
                expected: PluginKind::Validator,
                ..
            }
        ),
        "{err}"
    );
}

// ---------------------------------------------------------------- loading errors

#[test]
fn digest_mismatch_is_an_integrity_error() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = install(dir.path(), "eb", "eligibility-bounds", "validator", "");
    let mut bytes = std::fs::read(&wasm).unwrap();
    bytes.extend_from_slice(b"\0");
    std::fs::write(&wasm, bytes).unwrap();
    let err = load_err(dir.path());
    assert!(
        matches!(&err, PluginError::DigestMismatch { plugin, .. } if plugin == "eb"),
        "{err}"
    );
    assert_eq!(err.exit_code(), ExitCode::Integrity);
}

#[test]
fn missing_manifest_orphan_manifest_duplicate_and_unknown_kind_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "eb", "eligibility-bounds", "validator", "");
    std::fs::remove_file(dir.path().join("eb.toml")).unwrap();
    let err = load_err(dir.path());
    assert!(matches!(err, PluginError::MissingManifest { .. }), "{err}");
    assert!(err.to_string().contains("eb.toml"), "{err}");
    assert_eq!(err.exit_code(), ExitCode::Usage);

    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "eb", "eligibility-bounds", "validator", "");
    std::fs::remove_file(dir.path().join("eb.wasm")).unwrap();
    let err = load_err(dir.path());
    assert!(matches!(err, PluginError::OrphanManifest { .. }), "{err}");
    assert_eq!(err.exit_code(), ExitCode::Usage);

    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "a", "eligibility-bounds", "validator", "");
    install(dir.path(), "b", "eligibility-bounds", "validator", "");
    let text = std::fs::read_to_string(dir.path().join("b.toml")).unwrap();
    std::fs::write(
        dir.path().join("b.toml"),
        text.replace("name = \"b\"", "name = \"a\""),
    )
    .unwrap();
    let err = load_err(dir.path());
    assert!(
        matches!(&err, PluginError::DuplicateName { name, .. } if name == "a"),
        "{err}"
    );
    assert_eq!(err.exit_code(), ExitCode::Usage);

    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "eb", "eligibility-bounds", "checker", "");
    let err = load_err(dir.path());
    assert!(
        matches!(&err, PluginError::UnknownKind { kind, .. } if kind == "checker"),
        "{err}"
    );
    assert_eq!(err.exit_code(), ExitCode::Usage);
}

#[test]
fn a_manifest_may_tighten_limits_but_not_loosen_them() {
    let dir = tempfile::tempdir().unwrap();
    install(
        dir.path(),
        "eb",
        "eligibility-bounds",
        "validator",
        "[limits]\nfuel = 50_000_000\ntimeout_ms = 500\n",
    );
    let plugin = load_one(&host(), dir.path());
    assert_eq!(
        plugin.limits,
        Limits {
            fuel: 50_000_000,
            memory_mib: 64,
            timeout_ms: 500
        }
    );

    let dir = tempfile::tempdir().unwrap();
    install(
        dir.path(),
        "eb",
        "eligibility-bounds",
        "validator",
        "[limits]\nmemory_mib = 1024\n",
    );
    let err = load_err(dir.path());
    assert!(
        matches!(
            err,
            PluginError::LimitLoosened {
                field: "memory_mib",
                asked: 1024,
                allowed: 64,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.exit_code(), ExitCode::Usage);
}

#[test]
fn a_core_module_is_a_bad_component_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    install_bytes(dir.path(), "core", b"\0asm\x01\0\0\0", "validator", "");
    let err = load_err(dir.path());
    assert!(
        matches!(&err, PluginError::BadComponent { plugin, .. } if plugin == "core"),
        "{err}"
    );
    assert!(err.to_string().contains("core WebAssembly module"), "{err}");
    assert_eq!(err.exit_code(), ExitCode::PluginFault);
}

#[test]
fn a_router_declared_as_validator_is_the_wrong_world() {
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "cr", "category-router", "validator", "");
    let err = load_err(dir.path());
    match &err {
        PluginError::WrongWorld {
            plugin,
            expected,
            found,
            hint,
        } => {
            assert_eq!(plugin, "cr");
            assert_eq!(*expected, PluginKind::Validator);
            assert!(
                found.contains("router") && found.contains("route"),
                "{found}"
            );
            assert!(hint.contains("kind = \"router\""), "{hint}");
        }
        other => panic!("expected WrongWorld, got {other}"),
    }
    assert_eq!(err.exit_code(), ExitCode::PluginFault);
}

#[test]
fn load_file_without_manifest_infers_the_kind() {
    let host = host();
    let p = host
        .load_file(&artifact("category-router"), &TrustedKeys::new())
        .unwrap();
    assert_eq!(p.kind, PluginKind::Router);
    let p = host
        .load_file(&artifact("eligibility-bounds"), &TrustedKeys::new())
        .unwrap();
    assert_eq!(p.kind, PluginKind::Validator);
    assert_eq!(p.settings, json!({}));
}

// ---------------------------------------------------------------- signatures

fn signer(name: &str) -> pde::plugin::signature::Signer {
    pde::plugin::signature::Signer {
        name: name.to_string(),
        note: Some("reviewed in SEC-42".to_string()),
    }
}

#[test]
fn signatures_are_valid_invalid_or_absent() {
    let keys = tempfile::tempdir().unwrap();
    let good = pde::keys::generate(keys.path(), "good").unwrap();
    let other = pde::keys::generate(keys.path(), "other").unwrap();
    let trusted = TrustedKeys::from_files(&[&good.public_path]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wasm = install(dir.path(), "eb", "eligibility-bounds", "validator", "");
    let host = host();

    let unsigned = host.load_dir(dir.path(), &trusted).unwrap().remove(0);
    assert_eq!(unsigned.signature, SignatureStatus::Unsigned);
    let err = unsigned.require_signature().unwrap_err();
    assert_eq!(err.exit_code(), ExitCode::Integrity);

    let key = pde::keys::load_signing_key(&good.secret_path).unwrap();
    let (sig_path, file) = host.sign_file(&wasm, &key, &signer("Sec Team")).unwrap();
    assert_eq!(sig_path, dir.path().join("eb.wasm.sig"));
    let signed = host.load_dir(dir.path(), &trusted).unwrap().remove(0);
    // Who, when and why are recorded, and covered by the signature.
    assert_eq!(
        signed.signature,
        SignatureStatus::Valid {
            keyid: good.key_id.clone(),
            signer: "Sec Team".into(),
            signed_at: file.signed_at.clone(),
            note: Some("reviewed in SEC-42".into()),
            // Named by its file, as the trusted set was given it.
            key_name: Some(good.public_path.display().to_string()),
        }
    );
    assert!(file.signed_at.ends_with('Z'), "{}", file.signed_at);
    signed.require_signature().unwrap();

    // Someone rewrites the signer in the file: the signature no longer matches.
    let text = std::fs::read_to_string(&sig_path).unwrap();
    std::fs::write(&sig_path, text.replace("Sec Team", "Mallory")).unwrap();
    let forged = host.load_dir(dir.path(), &trusted).unwrap().remove(0);
    assert!(
        matches!(&forged.signature, SignatureStatus::Invalid { reason } if reason.contains("does not match")),
        "{:?}",
        forged.signature
    );
    assert_eq!(
        forged.require_signature().unwrap_err().exit_code(),
        ExitCode::Integrity
    );

    // Signed by a key nobody trusts.
    let other_key = pde::keys::load_signing_key(&other.secret_path).unwrap();
    host.sign_file(&wasm, &other_key, &signer("x")).unwrap();
    let untrusted = host.load_dir(dir.path(), &trusted).unwrap().remove(0);
    assert!(
        matches!(&untrusted.signature, SignatureStatus::Invalid { reason } if reason.contains("untrusted")),
        "{:?}",
        untrusted.signature
    );
}

#[test]
fn editing_a_signed_manifest_invalidates_the_signature() {
    let keys = tempfile::tempdir().unwrap();
    let good = pde::keys::generate(keys.path(), "good").unwrap();
    let trusted = TrustedKeys::from_files(&[&good.public_path]).unwrap();
    let key = pde::keys::load_signing_key(&good.secret_path).unwrap();
    let host = host();
    let original = "[limits]\ntimeout_ms = 500\n[settings]\nage = { min = 16, max = 120 }\n";
    // Each edit a reviewer never approved, and the field it changes.
    let edits = [
        ("max = 120", "max = 999999999", "settings"),
        ("timeout_ms = 500", "timeout_ms = 2000", "limits"),
        ("version = \"0.1.0\"", "version = \"0.1.1\"", "version"),
    ];
    for (from, to, field) in edits {
        let dir = tempfile::tempdir().unwrap();
        let wasm = install(
            dir.path(),
            "eb",
            "eligibility-bounds",
            "validator",
            original,
        );
        host.sign_file(&wasm, &key, &signer("Sec Team")).unwrap();
        let signed = host.load_dir(dir.path(), &trusted).unwrap().remove(0);
        signed.require_signature().unwrap();

        let toml = dir.path().join("eb.toml");
        let text = std::fs::read_to_string(&toml).unwrap();
        assert!(text.contains(from), "{text}");
        std::fs::write(&toml, text.replace(from, to)).unwrap();
        let edited = host.load_dir(dir.path(), &trusted).unwrap().remove(0);
        match &edited.signature {
            SignatureStatus::Invalid { reason } => {
                assert!(reason.contains("manifest changed"), "{reason}");
                assert!(reason.contains(field), "{reason}");
            }
            other => panic!("{field} edited after signing, still {other:?}"),
        }
        assert_eq!(
            edited.require_signature().unwrap_err().exit_code(),
            ExitCode::Integrity
        );
    }
}

#[test]
fn a_legacy_signature_must_be_re_signed() {
    // The old format: {keyid, alg, sig} over "sha256:<hex of the wasm>" only.
    let keys = tempfile::tempdir().unwrap();
    let good = pde::keys::generate(keys.path(), "good").unwrap();
    let trusted = TrustedKeys::from_files(&[&good.public_path]).unwrap();
    let key = pde::keys::load_signing_key(&good.secret_path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wasm = install(dir.path(), "eb", "eligibility-bounds", "validator", "");
    let digest = sha256_hex(&std::fs::read(&wasm).unwrap());
    let old = pde::keys::sign(&key, format!("sha256:{digest}").as_bytes());
    std::fs::write(
        dir.path().join("eb.wasm.sig"),
        serde_json::to_string(&old).unwrap(),
    )
    .unwrap();
    let plugin = host().load_dir(dir.path(), &trusted).unwrap().remove(0);
    assert!(
        matches!(&plugin.signature, SignatureStatus::Invalid { reason } if reason.contains("legacy signature, re-sign required")),
        "{:?}",
        plugin.signature
    );
    assert_eq!(
        plugin.require_signature().unwrap_err().exit_code(),
        ExitCode::Integrity
    );
}

#[test]
fn a_revoked_key_no_longer_counts() {
    let keys = tempfile::tempdir().unwrap();
    let good = pde::keys::generate(keys.path(), "good").unwrap();
    let mut trusted = TrustedKeys::from_files(&[&good.public_path]).unwrap();
    let key = pde::keys::load_signing_key(&good.secret_path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wasm = install(dir.path(), "eb", "eligibility-bounds", "validator", "");
    let host = host();
    host.sign_file(&wasm, &key, &signer("Sec Team")).unwrap();
    trusted.revoke(&[good.key_id.as_str()]);
    let plugin = host.load_dir(dir.path(), &trusted).unwrap().remove(0);
    assert!(
        matches!(&plugin.signature, SignatureStatus::Invalid { reason } if reason.contains("revoked")),
        "{:?}",
        plugin.signature
    );
}

#[test]
fn signing_refuses_what_inspect_refuses() {
    let keys = tempfile::tempdir().unwrap();
    let good = pde::keys::generate(keys.path(), "good").unwrap();
    let key = pde::keys::load_signing_key(&good.secret_path).unwrap();
    let host = host();
    for (bytes, why) in [
        (b"random bytes, not wasm".to_vec(), "not WebAssembly"),
        (b"\0asm\x01\0\0\0".to_vec(), "core WebAssembly module"),
        (b"\0asm\x0d\0\x01\0\xff\xff".to_vec(), "does not compile"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let wasm = install_bytes(dir.path(), "junk", &bytes, "validator", "");
        let err = host.sign_file(&wasm, &key, &signer("x")).unwrap_err();
        assert!(
            matches!(err, PluginError::BadComponent { .. }) && err.to_string().contains(why),
            "{err}"
        );
        assert!(!dir.path().join("junk.wasm.sig").exists());
    }
}

// ---------------------------------------------------------------- cache

/// `eligibility-bounds` installed as `eb` in a plugin directory, and the
/// cache directory of a state directory beside it (kept alive by the guard).
fn cached_eligibility_bounds() -> (tempfile::TempDir, tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let cache_dir = state.path().join("cache").join("plugins");
    install(dir.path(), "eb", "eligibility-bounds", "validator", "");
    (dir, state, cache_dir)
}

/// Rewrites `path` in place with `bytes`, then puts its modification time
/// back: only the change time (which nobody can set back) moves.
fn rewrite_keeping_mtime(path: &Path, bytes: &[u8]) {
    let modified = std::fs::metadata(path).unwrap().modified().unwrap();
    std::fs::write(path, bytes).unwrap();
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(modified)
        .unwrap();
    assert_eq!(
        std::fs::metadata(path).unwrap().modified().unwrap(),
        modified
    );
}

#[test]
fn second_host_uses_the_cache_and_a_corrupt_entry_is_rebuilt() {
    let (dir, _state, cache_dir) = cached_eligibility_bounds();
    let new_host = || PluginHost::new(Limits::default(), Some(cache_dir.clone())).unwrap();
    let sane = policy(json!([{"key": "min_age", "category": "eligibility", "value": 18}]));

    let first = new_host();
    let p = load_one(&first, dir.path());
    assert!(!p.loaded_from_cache);
    let entry = first.cache_entry(&p.sha256).unwrap();
    assert!(entry.is_file(), "{} not written", entry.display());

    let second = new_host();
    let p = load_one(&second, dir.path());
    assert!(p.loaded_from_cache);
    assert_eq!(second.validate(&p, &sane, &ctx("")).unwrap().value, vec![]);

    // Flip bytes in the middle of the compiled code: must be detected, not run.
    let mut bytes = std::fs::read(&entry).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 16] {
        *b ^= 0xff;
    }
    std::fs::write(&entry, &bytes).unwrap();
    let third = new_host();
    let p = load_one(&third, dir.path());
    assert!(!p.loaded_from_cache, "a corrupt entry was trusted");
    assert_eq!(third.validate(&p, &sane, &ctx("")).unwrap().value, vec![]);
    assert_ne!(std::fs::read(&entry).unwrap(), bytes, "entry not rebuilt");

    // Truncated entry: same.
    std::fs::write(&entry, b"PDECACHE1\n").unwrap();
    let p = load_one(&new_host(), dir.path());
    assert!(!p.loaded_from_cache);
    let p = load_one(&new_host(), dir.path());
    assert!(p.loaded_from_cache, "rebuilt entry is served again");
}

#[test]
fn a_cached_entry_is_trusted_by_stamp_only_until_it_is_rewritten() {
    let (dir, _state, cache_dir) = cached_eligibility_bounds();
    let new_host = || PluginHost::new(Limits::default(), Some(cache_dir.clone())).unwrap();
    let p = load_one(&new_host(), dir.path());
    assert!(!p.loaded_from_cache);
    let entry = new_host().cache_entry(&p.sha256).unwrap();
    let record = pde::plugin::cache::record_path(&entry);
    let stamp = || {
        let text = std::fs::read_to_string(&record).unwrap();
        text.lines().nth(2).unwrap_or("").to_string()
    };
    assert_eq!(stamp(), "", "a fresh entry is not trusted by stamp (racy)");

    // Once older than the racy window, the first use hashes it and records
    // its stamp; later uses map it without hashing.
    std::thread::sleep(pde::plugin::cache::RACY_WINDOW + Duration::from_millis(200));
    assert!(load_one(&new_host(), dir.path()).loaded_from_cache);
    let recorded = stamp();
    assert!(!recorded.is_empty(), "stamp recorded after a digest check");
    assert!(load_one(&new_host(), dir.path()).loaded_from_cache);
    assert_eq!(stamp(), recorded);

    // Rewrite it in place, same size, and put its modification time back:
    // the change time still moves, so the entry is hashed, and refused.
    let mut bytes = std::fs::read(&entry).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 16] {
        *b ^= 0xff;
    }
    rewrite_keeping_mtime(&entry, &bytes);
    let host = new_host();
    let p = load_one(&host, dir.path());
    assert!(
        !p.loaded_from_cache,
        "a rewritten entry was trusted by its stamp"
    );
    assert_ne!(std::fs::read(&entry).unwrap(), bytes, "entry not rebuilt");
    let sane = policy(json!([{"key": "min_age", "category": "eligibility", "value": 18}]));
    assert_eq!(host.validate(&p, &sane, &ctx("")).unwrap().value, vec![]);

    // An entry without its record (an older pde's, or a half-written one)
    // is a miss, never trusted.
    std::fs::remove_file(&record).unwrap();
    assert!(!load_one(&new_host(), dir.path()).loaded_from_cache);
    assert!(record.is_file(), "record rewritten with the entry");
}

/// The digest index spares hashing a plugin file on every load, but only
/// while the file's stamp is the one recorded when it was last hashed: a
/// file rewritten in place, same size, modification time put back, is
/// hashed again and refused against its manifest's pin, even though its
/// compiled form is still in the cache.
#[test]
fn a_plugin_file_rewritten_behind_the_digest_index_is_hashed_again_and_refused() {
    let (dir, _state, cache_dir) = cached_eligibility_bounds();
    let new_host = || PluginHost::new(Limits::default(), Some(cache_dir.clone())).unwrap();
    let load = || new_host().load_dir(dir.path(), &TrustedKeys::new());
    assert!(!load().unwrap()[0].loaded_from_cache);
    let index = cache_dir.join("digests");
    let stamps = || {
        std::fs::read_dir(&index)
            .map(|entries| {
                entries
                    .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
                    .map(|text| text.lines().nth(2).unwrap_or("").to_string())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    assert!(
        stamps().iter().all(String::is_empty),
        "a file just written is not vouched for by its stamp (racy)"
    );

    std::thread::sleep(pde::plugin::cache::RACY_WINDOW + Duration::from_millis(200));
    assert!(load().unwrap()[0].loaded_from_cache);
    let [recorded] = &stamps()[..] else {
        panic!("one record expected: {:?}", stamps())
    };
    assert!(!recorded.is_empty(), "stamp recorded after hashing");
    assert!(load().unwrap()[0].loaded_from_cache);

    let wasm = dir.path().join("eb.wasm");
    let mut bytes = std::fs::read(&wasm).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    rewrite_keeping_mtime(&wasm, &bytes);
    let err = load().expect_err("a rewritten plugin file must be refused");
    assert!(
        matches!(&err, PluginError::DigestMismatch { plugin, .. } if plugin == "eb"),
        "{err}"
    );
}

/// Issue 21 item 2: the digest index vouches for a plugin file only through
/// a record this machine's pde wrote. Replace the plugin file by another
/// component and forge its index record, pinned digest and the new file's
/// stamp: the record is not trusted, the file is hashed and refused against
/// its manifest's pin (before, the forged record was believed and the
/// signed plugin's name stood for a file that was not it).
#[test]
fn a_forged_digest_index_record_does_not_vouch_for_a_replaced_plugin_file() {
    let (dir, _state, cache_dir) = cached_eligibility_bounds();
    let new_host = || PluginHost::new(Limits::default(), Some(cache_dir.clone())).unwrap();
    let load = || new_host().load_dir(dir.path(), &TrustedKeys::new());
    assert!(!load().unwrap()[0].loaded_from_cache);
    std::thread::sleep(pde::plugin::cache::RACY_WINDOW + Duration::from_millis(200));
    assert!(load().unwrap()[0].loaded_from_cache);
    let records: Vec<PathBuf> = std::fs::read_dir(cache_dir.join("digests"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let [record] = &records[..] else {
        panic!("one record expected: {records:?}")
    };
    let text = std::fs::read_to_string(record).unwrap();
    assert!(!text.lines().nth(2).unwrap().is_empty(), "stamp recorded");

    let wasm = dir.path().join("eb.wasm");
    std::fs::write(&wasm, std::fs::read(artifact("pii-guard")).unwrap()).unwrap();
    // The stamp pde records, for the file now in place.
    #[cfg(unix)]
    let stamp = {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&wasm).unwrap();
        format!(
            "{} {}.{:09} {}.{:09} {} {}",
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
            m.ino(),
            m.dev()
        )
    };
    #[cfg(not(unix))]
    let stamp = String::new();
    let mut lines: Vec<&str> = text.lines().collect();
    lines[2] = &stamp;
    let forged = lines.join("\n") + "\n";
    std::fs::write(record, &forged).unwrap();

    let err = load().expect_err("a forged digest record vouched for a replaced plugin file");
    assert!(
        matches!(&err, PluginError::DigestMismatch { plugin, .. } if plugin == "eb"),
        "{err}"
    );
    assert_ne!(
        std::fs::read_to_string(record).ok().as_deref(),
        Some(forged.as_str()),
        "the forged record is discarded"
    );
}

// ---------------------------------------------------------------- misbehaving fixture

/// The `misbehave` fixture loaded once; modes are chosen per call through
/// its settings, as a manifest's `[settings] mode = "…"` would.
struct Fixture {
    host: PluginHost,
    plugin: Plugin,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    install(
        dir.path(),
        "misbehave",
        "misbehave",
        "validator",
        "[settings]\nmode = \"ok\"\n",
    );
    let host = host();
    let plugin = load_one(&host, dir.path());
    Fixture {
        host,
        plugin,
        _dir: dir,
    }
}

impl Fixture {
    fn mode(&self, mode: &str) -> Plugin {
        let mut p = self.plugin.clone();
        p.settings = json!({ "mode": mode });
        p
    }

    /// Runs `plugin`, asserts it ended within its wall-time limit plus a
    /// margin, then proves the same host still serves a well-behaved call.
    ///
    /// The margin is wide on purpose: what this checks is that a hostile
    /// plugin is stopped at all (without the watchdog, the loops and sleeps
    /// of `misbehave` never end), not how fast a benign one runs. A flat 2 s
    /// failed for the 40,002-line chatty mode on a CI-sized machine under a
    /// load average of 20.
    fn run(
        &self,
        plugin: &Plugin,
    ) -> Result<pde::plugin::CallReport<Vec<pde::diagnostic::Diagnostic>>, PluginError> {
        let start = Instant::now();
        let out = self.host.validate(plugin, &policy(json!([])), &ctx("test"));
        let took = start.elapsed();
        let bound = Duration::from_millis(plugin.limits.timeout_ms) + Duration::from_secs(8);
        assert!(
            took < bound,
            "{:?} took {took:?}, over {bound:?}",
            plugin.settings
        );
        let ok = self
            .host
            .validate(&self.mode("ok"), &policy(json!([])), &ctx("test"))
            .expect("a well-behaved call right after must succeed");
        assert_no_errors(&ok.value);
        out
    }
}

/// Runs the misbehave fixture in `mode` with fuel no call can burn and a
/// 300 ms limit, so only the clock can stop it; asserts that it was
/// stopped as a timeout, and returns how long that took.
fn stopped_by_the_clock(f: &Fixture, mode: &str) -> Duration {
    let mut p = f.mode(mode);
    p.limits.fuel = u64::MAX / 4;
    p.limits.timeout_ms = 300;
    let start = Instant::now();
    let err = f.run(&p).unwrap_err();
    let took = start.elapsed();
    assert!(
        matches!(&err, PluginError::Timeout { plugin, timeout_ms: 300 } if plugin == "misbehave"),
        "{err}"
    );
    assert_eq!(err.exit_code(), ExitCode::PluginFault);
    took
}

#[test]
fn infinite_loop_times_out() {
    stopped_by_the_clock(&fixture(), "loop");
}

#[test]
fn a_plugin_looping_over_an_expensive_host_call_is_stopped_at_its_timeout() {
    // Host calls cost no fuel: a guest asking `wasi:random` for 1 MiB at a
    // time burns a few fuel units per millisecond of host work, so its next
    // fuel yield would be tens of seconds away. The deadline is also checked
    // as each host call returns.
    let f = fixture();
    let took = stopped_by_the_clock(&f, "random");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "stopped after {took:?}"
    );
    // More than the host hands out in one call is the guest's fault.
    let mut greedy = f.mode("random");
    greedy.settings = json!({"mode": "random", "bytes": 2 << 20});
    let err = f.run(&greedy).unwrap_err();
    assert!(!matches!(err, PluginError::Timeout { .. }), "{err}");
}

/// `uses_environment = false` is enforced by the host, not trusted: the
/// plugin is handed the neutral context whatever the caller asks for.
#[test]
fn a_plugin_declared_environment_neutral_is_never_given_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    install(
        dir.path(),
        "echo",
        "misbehave",
        "validator",
        "uses_environment = false\n[settings]\nmode = \"context\"\n",
    );
    let host = host();
    let neutral = load_one(&host, dir.path());
    assert!(!neutral.uses_environment);
    let said = |p: &Plugin| {
        let out = host
            .validate(p, &policy(json!([])), &ctx("production"))
            .unwrap();
        out.value[0].message.clone()
    };
    assert!(
        said(&neutral).starts_with(r#"environment="""#),
        "{}",
        said(&neutral)
    );
    let mut using = neutral.clone();
    using.uses_environment = true;
    assert!(
        said(&using).starts_with(r#"environment="production""#),
        "{}",
        said(&using)
    );
}

#[test]
fn infinite_loop_runs_out_of_fuel() {
    let f = fixture();
    let mut p = f.mode("loop");
    p.limits.fuel = 20_000_000;
    let err = f.run(&p).unwrap_err();
    assert!(
        matches!(&err, PluginError::OutOfFuel { plugin, fuel: 20_000_000 } if plugin == "misbehave"),
        "{err}"
    );
}

#[test]
fn unbounded_memory_growth_hits_the_memory_limit() {
    let f = fixture();
    let err = f.run(&f.mode("memory")).unwrap_err();
    assert!(
        matches!(&err, PluginError::MemoryLimit { plugin, limit_mib: 64 } if plugin == "misbehave"),
        "{err}"
    );
    assert_eq!(err.exit_code(), ExitCode::PluginFault);
}

/// The SDK's heap (talc over a static arena, then memory grown in 1 MiB
/// steps) reuses what a plugin frees: 660 MB allocated in blocks of up to
/// 4 MiB, 6 MB of them alive at the end, fit in 32 MiB with every block's
/// contents intact. A call that allocates little grows no memory at all:
/// every call is a fresh instance, so a first `memory.grow` per call would
/// be a host call on every call.
#[test]
fn the_sdk_heap_reuses_freed_memory_and_small_calls_do_not_grow_memory() {
    let f = fixture();
    let mut p = f.mode("churn");
    p.limits.memory_mib = 32;
    let report = f.run(&p).expect("churn fits in 32 MiB");
    let [d] = &report.value[..] else {
        panic!("{:?}", report.value)
    };
    assert_eq!(d.code, "misbehave.churn");
    assert!(
        d.message
            .starts_with("allocated 661824948 bytes in 2000 blocks"),
        "{}",
        d.message
    );
    let peak = report.peak_memory_bytes;
    assert!(peak > 8 << 20 && peak <= 32 << 20, "peak {peak}");

    // A call that keeps up to 128 KiB stays in the SDK's static arena: its
    // peak is the module's initial memory, nothing grown. Keeping 1 MiB
    // does grow memory, so the peak does measure growth.
    let keeping = |keep_bytes: u64| {
        let mut p = f.mode("churn");
        p.settings = json!({"mode": "churn", "rounds": 0, "keep_bytes": keep_bytes});
        f.run(&p).unwrap().peak_memory_bytes
    };
    let wasm = std::fs::read(pde_plugin_artifacts::wasm("misbehave").unwrap()).unwrap();
    let initial = crate::support::initial_memory_bytes(&wasm);
    assert!(initial > 0);
    assert_eq!(keeping(1), initial);
    assert_eq!(keeping(128 << 10), initial);
    assert!(keeping(1 << 20) > initial);
}

#[test]
fn deep_recursion_traps() {
    let f = fixture();
    let err = f.run(&f.mode("recursion")).unwrap_err();
    match &err {
        PluginError::Trap { plugin, message } => {
            assert_eq!(plugin, "misbehave");
            // Depending on frame sizes (and so on the guest's opt-level), a
            // Rust guest either exhausts wasmtime's call stack or runs its
            // shadow stack off the bottom of linear memory; both are traps.
            assert!(
                message.contains("call stack exhausted")
                    || message.contains("out of bounds memory access"),
                "{message}"
            );
            assert!(!message.contains("wasm backtrace"), "{message}");
        }
        other => panic!("expected Trap, got {other}"),
    }
    assert_eq!(err.exit_code(), ExitCode::PluginFault);
}

#[test]
fn a_panic_traps_with_the_guests_message() {
    let f = fixture();
    let err = f.run(&f.mode("panic")).unwrap_err();
    match &err {
        PluginError::Trap { plugin, message } => {
            assert_eq!(plugin, "misbehave");
            assert!(message.contains("misbehave: deliberate panic"), "{message}");
        }
        other => panic!("expected Trap, got {other}"),
    }
}

#[test]
fn a_million_diagnostics_hit_the_memory_limit_inside_the_guest() {
    // 1,000,000 records cost ~40 MB as Rust values plus ~28 MB as the
    // canonical-ABI list: over 64 MiB before the host ever sees the list.
    let f = fixture();
    let err = f.run(&f.mode("flood")).unwrap_err();
    assert!(
        matches!(&err, PluginError::MemoryLimit { plugin, limit_mib: 64 } if plugin == "misbehave"),
        "{err}"
    );
}

#[test]
fn more_diagnostics_than_the_host_accepts_are_result_too_large() {
    let f = fixture();
    let mut p = f.mode("flood");
    p.settings = json!({"mode": "flood", "count": pde::plugin::MAX_RESULT_ITEMS + 1});
    let err = f.run(&p).unwrap_err();
    match &err {
        PluginError::ResultTooLarge { plugin, what } => {
            assert_eq!(plugin, "misbehave");
            assert!(what.contains("1001 diagnostics"), "{what}");
        }
        other => panic!("expected ResultTooLarge, got {other}"),
    }
    assert_eq!(err.exit_code(), ExitCode::PluginFault);
    // Exactly at the bound is fine.
    p.settings = json!({"mode": "flood", "count": pde::plugin::MAX_RESULT_ITEMS});
    assert_eq!(
        f.run(&p).unwrap().value.len(),
        pde::plugin::MAX_RESULT_ITEMS
    );
}

/// Runs a probe mode; the fixture reports `info` when the sandbox denied it.
fn probe(f: &Fixture, mode: &str) -> String {
    let report = f.run(&f.mode(mode)).unwrap();
    assert_eq!(report.value.len(), 1, "{:?}", report.value);
    let d = &report.value[0];
    assert_eq!(d.code, format!("misbehave.{mode}"));
    assert_eq!(d.severity, Severity::Info, "sandbox escape: {}", d.message);
    d.message.clone()
}

#[test]
fn reading_a_file_is_denied() {
    let f = fixture();
    let message = probe(&f, "read-file");
    assert!(message.starts_with("read /etc/passwd denied"), "{message}");
}

#[test]
fn opening_a_socket_is_denied() {
    let f = fixture();
    let message = probe(&f, "socket");
    assert!(
        message.starts_with("connect 127.0.0.1:9 failed"),
        "{message}"
    );
}

#[test]
fn environment_variables_are_not_visible() {
    // The test process certainly has PATH; the guest must see nothing.
    assert!(std::env::var_os("PATH").is_some());
    let f = fixture();
    let message = probe(&f, "env");
    assert!(
        message.starts_with("0 environment variable(s)"),
        "{message}"
    );
}

#[test]
fn an_unknown_mode_is_the_plugins_own_failure() {
    let f = fixture();
    let err = f.run(&f.mode("nap")).unwrap_err();
    assert!(
        matches!(&err, PluginError::PluginFailed { plugin, message } if plugin == "misbehave" && message.contains("unknown mode")),
        "{err}"
    );
    assert_eq!(err.exit_code(), ExitCode::PluginFault);
}

#[test]
fn stdout_and_stderr_are_captured_into_the_log() {
    let f = fixture();
    let report = f.run(&f.mode("ok")).unwrap();
    assert!(
        report
            .log
            .contains(&"stdout: misbehave: mode ok (stdout)".to_string()),
        "{:?}",
        report.log
    );
    assert!(
        report
            .log
            .contains(&"stderr: misbehave: mode ok (stderr)".to_string()),
        "{:?}",
        report.log
    );
}

// ---------------------------------------------------------------- containment (issue 9)

#[test]
fn a_sleeping_plugin_is_stopped_at_its_timeout() {
    // `std::thread::sleep` blocks on a monotonic-clock pollable in the host:
    // no guest code runs and no fuel is spent, so only the host-side timer
    // can end the call (guest code would also yield on fuel).
    let f = fixture();
    let mut p = f.mode("sleep");
    p.settings = json!({"mode": "sleep", "seconds": 60});
    p.limits.timeout_ms = 500;
    let start = Instant::now();
    let err = f.run(&p).unwrap_err();
    let took = start.elapsed();
    assert!(
        matches!(&err, PluginError::Timeout { plugin, timeout_ms: 500 } if plugin == "misbehave"),
        "{err}"
    );
    assert_eq!(err.exit_code(), ExitCode::PluginFault);
    assert!(
        took >= Duration::from_millis(250) && took <= Duration::from_millis(750),
        "stopped after {took:?}, not at 500 ms ± 250 ms"
    );
    // A short nap within the limit still works: the clock is not broken.
    p.settings = json!({"mode": "sleep", "seconds": 0});
    let report = f.run(&p).unwrap();
    assert_eq!(report.value[0].code, "misbehave.sleep");
}

/// What the fixture's `ansi` mode puts in every string it returns.
const ANSI: &str =
    "\x1b[2K\rverdict: pass\x1b]0;owned\x07\x1b]52;c;ZXZpbA==\x07\u{9b}1A\nforged line\x7f";

#[test]
fn terminal_controls_are_kept_exact_in_reports_and_escaped_for_people() {
    let f = fixture();
    let report = f.run(&f.mode("ansi")).unwrap();
    let d = &report.value[0];
    // The report (and so JSON output) carries the plugin's exact text ...
    assert_eq!(d.message, format!("message {ANSI}"));
    assert_eq!(d.code, format!("misbehave.ansi{ANSI}"));
    assert!(
        report.log.contains(&format!("warn: log {ANSI}")),
        "{:?}",
        report.log
    );
    // ... and what a person sees has no control character left.
    let shown = d.to_string();
    assert!(!shown.chars().any(pde::term::is_unsafe), "{shown:?}");
    assert!(shown.contains("\\u{1b}[2K\\rverdict: pass"), "{shown}");
    assert!(shown.contains("\\nforged line"), "{shown}");
    for line in &report.log {
        assert!(!pde::term::escape(line).chars().any(pde::term::is_unsafe));
    }
}

#[test]
fn a_chatty_plugins_log_is_bounded_and_says_how_much_was_dropped() {
    let f = fixture();
    let mut p = f.mode("chatty");
    // What is checked is the log bound, not speed: 40,002 lines through a
    // debug build on a loaded 2-core machine overran the default 2 s.
    p.limits.timeout_ms = 20_000;
    let report = f.run(&p).unwrap();
    let (note, kept) = report.log.split_last().unwrap();
    let kept_bytes: usize = kept.iter().map(String::len).sum();
    assert!(
        kept_bytes <= pde::plugin::sandbox::MAX_LOG_BYTES,
        "{kept_bytes} bytes of log kept"
    );
    assert!(note.contains("more log lines dropped"), "{note}");
    let dropped: usize = note
        .trim_start_matches('(')
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // 20,000 host.log lines, 20,000 stdout lines and the two mode lines.
    assert_eq!(kept.len() + dropped, 40_002, "{note}");
}

#[test]
fn a_flood_of_bytes_is_refused_while_being_copied_out_of_the_guest() {
    // 20 messages of 1 MiB: fits the guest's 64 MiB, but far past pde's
    // 1 MiB result bound. It must be refused by the copy budget, before the
    // host allocates 20 MiB, not by the bound check after.
    let f = fixture();
    let mut p = f.mode("flood");
    p.settings = json!({"mode": "flood", "count": 20, "message_bytes": 1 << 20});
    let err = f.run(&p).unwrap_err();
    match &err {
        PluginError::ResultTooLarge { plugin, what } => {
            assert_eq!(plugin, "misbehave");
            assert!(what.contains("while copying"), "{what}");
        }
        other => panic!("expected ResultTooLarge, got {other}"),
    }
    assert_eq!(err.exit_code(), ExitCode::PluginFault);
    // A result right at pde's own bound still gets through.
    p.settings =
        json!({"mode": "flood", "count": 1, "message_bytes": pde::plugin::MAX_RESULT_BYTES});
    let report = f.run(&p).unwrap();
    assert_eq!(report.value[0].message.len(), pde::plugin::MAX_RESULT_BYTES);
}

#[test]
fn denied_capabilities_are_reported_at_run_time() {
    let f = fixture();
    // A plugin that asks for nothing is reported as asking for nothing.
    let report = f.run(&f.mode("ok")).unwrap();
    assert_eq!(report.denied, Vec::<String>::new());
    for (mode, expected) in [
        (
            "read-file",
            "tried wasi:filesystem: open a file or directory",
        ),
        ("socket", "tried wasi:sockets: create a TCP socket: denied"),
        (
            "env",
            "tried wasi:cli/environment: read environment variables",
        ),
    ] {
        let report = f.run(&f.mode(mode)).unwrap();
        // Still denied: the probe reports `info` only when it was refused.
        assert_eq!(report.value[0].severity, Severity::Info, "{mode}");
        assert!(
            report.denied.iter().any(|d| d.starts_with(expected)),
            "{mode}: {:?}",
            report.denied
        );
    }
}

#[test]
fn a_component_exporting_more_than_its_world_is_refused_and_flagged() {
    // `extra-exports` exports `validate`, componentize-py's `exports`
    // runtime instance (tolerated) and `backdoor` (not part of any world).
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "plus", "extra-exports", "validator", "");
    let err = load_err(dir.path());
    match &err {
        PluginError::WrongWorld { plugin, found, .. } => {
            assert_eq!(plugin, "plus");
            assert!(found.contains("`backdoor`"), "{found}");
            assert!(!found.contains("`exports`"), "{found}");
        }
        other => panic!("expected WrongWorld, got {other}"),
    }
    assert_eq!(err.exit_code(), ExitCode::PluginFault);

    let host = host();
    let bytes = std::fs::read(artifact("extra-exports")).unwrap();
    let report = pde::plugin::inspect::inspect(host.engine(), "plus", &bytes).unwrap();
    assert_eq!(report.kind, Some(PluginKind::Validator));
    assert_eq!(report.tolerated_exports, vec!["exports".to_string()]);
    assert_eq!(report.unexpected_exports, vec!["backdoor".to_string()]);
    // The SDK's components export their world and nothing else.
    let bytes = std::fs::read(artifact("eligibility-bounds")).unwrap();
    let report = pde::plugin::inspect::inspect(host.engine(), "eb", &bytes).unwrap();
    assert!(report.tolerated_exports.is_empty() && report.unexpected_exports.is_empty());
}

// ------------------------------------------------------- WIT versions

/// Policy 42 as it is active (`version`, a monthly benefit of `amount`).
fn heating(version: &str, amount: u32, effective: &str) -> Value {
    json!({
        "id": "42", "version": version, "title": "Heating assistance", "agency": "HMS",
        "effective": effective,
        "approvals": [{"by": "a.smith", "role": "policy-owner", "at": "2030-11-01"}],
        "rules": [
            {"key": "heating.monthly-amount", "category": "benefits", "value": amount,
             "description": "Monthly heating benefit in USD"}
        ],
        "config": {}
    })
}

fn as_input(doc: Value) -> PolicyInput {
    PolicyInput {
        id: doc["id"].as_str().unwrap().to_string(),
        version: doc["version"].as_str().unwrap().to_string(),
        document: doc,
    }
}

/// The context of a deploy to `prod` where `active` is active.
fn with_active(active: Value) -> CallContext {
    CallContext {
        environment: "prod".into(),
        active: Some(pde::plugin::ActivePolicy {
            version: active["version"].as_str().unwrap().to_string(),
            digest: "sha256:0123456789abcdef".into(),
            deployed_at: "2031-01-02T10:00:00Z".into(),
            document: active,
        }),
    }
}

#[test]
fn a_0_1_0_and_a_0_2_0_validator_run_side_by_side_and_only_0_2_0_sees_the_active_policy() {
    let dir = tempfile::tempdir().unwrap();
    install(
        dir.path(),
        "legacy-validator",
        "legacy-validator",
        "validator",
        "",
    );
    install(
        dir.path(),
        "benefit-change",
        "benefit-change",
        "validator",
        "[settings]\ntoday = \"2031-03-01\"\n",
    );
    let host = host();
    let plugins = host.load_dir(dir.path(), &TrustedKeys::new()).unwrap();
    let versions: Vec<(&str, String, bool)> = plugins
        .iter()
        .map(|p| {
            (
                p.name.as_str(),
                p.wit_version.to_string(),
                p.sees_active_policy(),
            )
        })
        .collect();
    assert_eq!(
        versions,
        [
            ("benefit-change", "0.2.0".to_string(), true),
            ("legacy-validator", "0.1.0".to_string(), false),
        ]
    );
    let (change, legacy) = (&plugins[0], &plugins[1]);

    // v2 cuts the benefit by 25% and takes effect in a month.
    let v2 = as_input(heating("2.0.0", 150, "2031-04-01"));
    let deploy = with_active(heating("1.0.0", 200, "2031-01-01"));
    let report = host.validate(change, &v2, &deploy).unwrap();
    let found: Vec<(&str, Severity, &str)> = report
        .value
        .iter()
        .map(|d| (d.code.as_str(), d.severity, d.source.as_str()))
        .collect();
    assert_eq!(
        found,
        [
            (
                "benefit-change.short-notice",
                Severity::Error,
                "benefit-change"
            ),
            ("benefit-change.compared", Severity::Info, "benefit-change"),
        ]
    );
    assert!(
        report.value[0]
            .message
            .contains("cut by 25.0% (200 -> 150) against the active version 1.0.0"),
        "{}",
        report.value[0].message
    );
    assert!(report.value[1].message.contains("sha256:0123456789abcdef"));

    // The 0.1.0 plugin runs in the same host with the same context; it is
    // told the environment, never the active version, and works as before.
    let report = host.validate(legacy, &v2, &deploy).unwrap();
    assert_eq!(report.value.len(), 1);
    let d = &report.value[0];
    assert_eq!(
        (d.code.as_str(), d.severity, d.source.as_str()),
        ("legacy.seen", Severity::Warning, "legacy-validator")
    );
    assert_eq!(
        d.message,
        "pde:plugin@0.1.0 validator saw policy 42 version 2.0.0 (environment `prod`)"
    );
    assert!(report.fuel_used > 0);
    assert_eq!(
        report.log,
        ["info: legacy-validator (pde:plugin@0.1.0): checked policy 42"]
    );

    // With nothing active there is no change to judge.
    let first = host.validate(change, &v2, &ctx("prod")).unwrap();
    assert!(first.value.is_empty(), "{:?}", first.value);
}

#[test]
fn the_hosts_checks_apply_below_the_0_1_0_shim() {
    // Result bounds: 1 + 1000 findings from a 0.1.0 validator.
    let dir = tempfile::tempdir().unwrap();
    install(
        dir.path(),
        "legacy-validator",
        "legacy-validator",
        "validator",
        "[settings]\nextra = 1000\n",
    );
    let host = host();
    let plugin = load_one(&host, dir.path());
    let err = host
        .validate(&plugin, &policy(json!([])), &ctx("prod"))
        .unwrap_err();
    assert!(
        matches!(&err, PluginError::ResultTooLarge { plugin, what }
            if plugin == "legacy-validator" && what.contains("1001 diagnostics")),
        "{err}"
    );
    // Fuel: the manifest's (tighter) limit stops it, by name.
    let mut starved = plugin.clone();
    starved.settings = json!({});
    starved.limits.fuel = 1_000; // a whole call takes about 6,000
    let err = host
        .validate(&starved, &policy(json!([])), &ctx("prod"))
        .unwrap_err();
    assert!(
        matches!(err, PluginError::OutOfFuel { fuel: 1_000, .. }),
        "{err}"
    );

    // A 0.1.0 router naming a service it was not offered.
    let dir = tempfile::tempdir().unwrap();
    install(
        dir.path(),
        "legacy-router",
        "legacy-router",
        "router",
        "[settings]\nalso = \"NOT-OFFERED\"\n",
    );
    let router = load_one(&host, dir.path());
    assert_eq!(router.wit_version, semver::Version::new(0, 1, 0));
    let services = [service("HMS-API", &["api"]), service("Portal", &["portal"])];
    let err = host
        .route(&router, &policy(json!([])), &ctx("prod"), &services)
        .unwrap_err();
    assert!(
        matches!(&err, PluginError::UnknownService { service, .. } if service == "NOT-OFFERED"),
        "{err}"
    );
    let mut honest = router.clone();
    honest.settings = json!({});
    let report = host
        .route(&honest, &policy(json!([])), &ctx("prod"), &services)
        .unwrap();
    assert_eq!(report.value.len(), 1);
    assert_eq!(report.value[0].service, "HMS-API");
    assert_eq!(
        report.value[0].reason,
        "pde:plugin@0.1.0 router: tagged `api`"
    );
}

/// `bytes` with every `pde:plugin` name of version `from` renamed to `to`
/// (same length, so the component stays well-formed).
fn retarget(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let mut out = bytes.to_vec();
    let mut renamed = 0;
    for name in ["pde:plugin/host@", "pde:plugin/types@", "pde:plugin@"] {
        let (old, new) = (format!("{name}{from}"), format!("{name}{to}"));
        let mut at = 0;
        while let Some(pos) = out[at..]
            .windows(old.len())
            .position(|w| w == old.as_bytes())
        {
            let start = at + pos;
            out[start..start + old.len()].copy_from_slice(new.as_bytes());
            at = start + old.len();
            renamed += 1;
        }
    }
    assert!(renamed > 0, "no pde:plugin@{from} name in the component");
    out
}

#[test]
fn a_plugin_of_an_unknown_wit_version_is_refused_by_name() {
    // The 0.1.0 fixture, its interface names rewritten to 0.4.0: a real
    // component of a contract this pde does not know.
    let bytes = std::fs::read(artifact("legacy-validator")).unwrap();
    let future = retarget(&bytes, "0.1.0", "0.4.0");
    let host = host();
    let report = pde::plugin::inspect::inspect(host.engine(), "future", &future).unwrap();
    assert_eq!(report.wit_versions, ["0.4.0"]);
    assert_eq!(report.wit_bound_by, None);
    assert_eq!(report.wit_supported, ["0.1.0", "0.2.0", "0.3.0"]);
    assert!(!report.sees_active_policy);

    let dir = tempfile::tempdir().unwrap();
    install_bytes(dir.path(), "future", &future, "validator", "");
    let err = load_err(dir.path());
    match &err {
        PluginError::UnsupportedWitVersion {
            plugin,
            found,
            supported,
        } => {
            assert_eq!(plugin, "future");
            assert_eq!(found, "0.4.0");
            assert_eq!(supported, "0.1.0, 0.2.0, 0.3.0");
        }
        other => panic!("expected UnsupportedWitVersion, got {other}"),
    }
    assert!(err.to_string().contains("pde:plugin@0.4.0"), "{err}");
    assert_eq!(err.exit_code(), ExitCode::PluginFault);

    // The unmodified bytes load, so it is the version that is refused, not
    // the rewrite.
    install_bytes(dir.path(), "future", &bytes, "validator", "");
    assert_eq!(
        load_one(&host, dir.path()).wit_version,
        semver::Version::new(0, 1, 0)
    );
    // Claiming a supported version is not enough: a 0.1.0 component named
    // 0.2.0 lacks `context.active` and fails the 0.2.0 type check.
    let pretender = retarget(&bytes, "0.1.0", "0.2.0");
    install_bytes(dir.path(), "future", &pretender, "validator", "");
    match load_err(dir.path()) {
        PluginError::BadComponent { plugin, message } => {
            assert_eq!(plugin, "future");
            assert!(
                message.contains("does not link as a WIT 0.2.0 validator"),
                "{message}"
            );
        }
        other => panic!("expected BadComponent, got {other}"),
    }
}

#[test]
fn inspect_names_the_wit_version_and_the_module_that_binds_it() {
    let host = host();
    for (name, version, sees) in [
        ("legacy-validator", "0.1.0", false),
        ("legacy-router", "0.1.0", false),
        ("benefit-change", "0.2.0", true),
        ("label-router", "0.2.0", true),
    ] {
        let bytes = std::fs::read(artifact(name)).unwrap();
        let r = pde::plugin::inspect::inspect(host.engine(), name, &bytes).unwrap();
        assert_eq!(r.wit_versions, [version], "{name}");
        assert_eq!(r.wit_bound_by.as_deref(), Some(version), "{name}");
        assert_eq!(r.sees_active_policy, sees, "{name}");
    }
}

#[test]
fn label_router_routes_to_the_services_whose_labels_match_its_settings() {
    let dir = tempfile::tempdir().unwrap();
    install_shipped(dir.path(), "label-router");
    let host = host();
    let plugin = load_one(&host, dir.path());
    assert_eq!(plugin.kind, PluginKind::Router);
    let labelled = |name: &str, labels: &[(&str, &str)]| ServiceInfo {
        name: name.to_string(),
        tags: Vec::new(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    let services = [
        labelled("HMS-API", &[("tier", "benefits"), ("region", "east")]),
        labelled("HMS-PORTAL", &[("tier", "public")]),
        labelled("HMS-WEST", &[("tier", "benefits"), ("region", "west")]),
    ];
    // The shipped template: `[settings.match] tier = "benefits"`.
    let report = host
        .route(&plugin, &policy(json!([])), &ctx("prod"), &services)
        .unwrap();
    let got: Vec<(&str, &str)> = report
        .value
        .iter()
        .map(|r| (r.service.as_str(), r.reason.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("HMS-API", "labels tier=benefits match the selector"),
            ("HMS-WEST", "labels tier=benefits match the selector"),
        ]
    );
    assert!(
        report.log[0].contains("2 of 3 service(s) match"),
        "{:?}",
        report.log
    );
    // Every label must match.
    let mut narrow = plugin.clone();
    narrow.settings = json!({"match": {"tier": "benefits", "region": ["west"]}});
    let report = host
        .route(&narrow, &policy(json!([])), &ctx("prod"), &services)
        .unwrap();
    assert_eq!(report.value.len(), 1);
    assert_eq!(
        report.value[0].reason,
        "labels region=west, tier=benefits match the selector"
    );
    // An empty selector is the plugin's own failure, not "route everywhere".
    let mut empty = plugin.clone();
    empty.settings = json!({"match": {}});
    let err = host
        .route(&empty, &policy(json!([])), &ctx("prod"), &services)
        .unwrap_err();
    assert!(
        matches!(&err, PluginError::PluginFailed { message, .. } if message.contains("is empty")),
        "{err}"
    );
}
