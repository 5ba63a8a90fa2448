//! Property-based fuzzing of everything that parses hostile input, on the
//! stable toolchain (proptest; there is no nightly for cargo-fuzz here).
//!
//! Each property runs `PDE_FUZZ_CASES` cases (default: a short budget that
//! `scripts/test.sh` runs on every CI run). For a longer run:
//!
//! ```sh
//! PDE_FUZZ_CASES=20000 cargo test -p pde-cli --test all --release fuzz::
//! ```
//!
//! A failing case is shrunk and saved by proptest in
//! `tests/all/fuzz.proptest-regressions`; commit that file, so the case is
//! replayed first on every later run (the checked-in corpus), and add a named
//! regression test beside the fix.
// Test code: a failed unwrap is a failed test, with its location.

use crate::support;

use std::sync::OnceLock;

use pde::approval::SignedApproval;
use pde::bundle::{Bundle, Manifest, Payload};
use pde::keys::TrustedKeys;
use pde_core::canonical::jcs;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use serde_json::{Value, json};

/// Cases per property: `PDE_FUZZ_CASES`, else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("PDE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn config(default: u32) -> ProptestConfig {
    ProptestConfig {
        cases: cases(default),
        // Shrinking a slow case (a compile, an HTTP round trip) must not
        // turn a short budget into a long one.
        max_shrink_iters: 256,
        // The checked-in corpus: shrunk failures are saved here and replayed
        // first on every run. (proptest's default looks for a lib.rs beside
        // the test, which a tests/ file does not have.)
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/all/fuzz.proptest-regressions"
        )))),
        ..ProptestConfig::default()
    }
}

/// Any JSON value that RFC 8785 can represent: integers within ±(2^53−1),
/// finite doubles, any Unicode text (lone surrogates cannot be in a Rust
/// string, so none are generated), nested arrays and objects.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (-(1i64 << 53) + 1..(1i64 << 53)).prop_map(|i| json!(i)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".*".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(".{0,12}", inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Up to `n` random byte edits (overwrite, insert or delete) of `bytes`.
fn mutated(bytes: Vec<u8>, n: usize) -> impl Strategy<Value = Vec<u8>> {
    let len = bytes.len().max(1);
    prop::collection::vec((0..3u8, 0..len, any::<u8>()), 1..=n).prop_map(move |edits| {
        let mut out = bytes.clone();
        for (kind, at, byte) in edits {
            let at = at.min(out.len().saturating_sub(1));
            match kind {
                0 if !out.is_empty() => out[at] = byte,
                1 => out.insert(at, byte),
                _ if !out.is_empty() => {
                    out.remove(at);
                }
                _ => out.push(byte),
            }
        }
        out
    })
}

fn release_key() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[5; 32])
}

fn valid_bundle() -> &'static Bundle {
    static B: OnceLock<Bundle> = OnceLock::new();
    B.get_or_init(|| {
        let policy = support::policy_42("1.0.0");
        Bundle::seal(
            Payload {
                manifest: Manifest {
                    policy_id: "42".into(),
                    version: "1.0.0".into(),
                    source_commit: "0".repeat(40),
                    validators: vec![],
                },
                policy,
            },
            &[&release_key()],
        )
        .unwrap()
    })
}

proptest! {
    #![proptest_config(config(256))]

    /// Canonical JSON: its output parses, and canonicalising that again
    /// gives the same bytes (idempotence); the value survives the trip.
    #[test]
    fn canonical_json_round_trips_and_is_idempotent(v in json_value()) {
        // What JCS cannot write so that it reads back is refused, by pointer.
        let Ok(bytes) = jcs(&v) else {
            prop_assert!(!pde_core::canonical::unrepresentable_numbers(&v).is_empty());
            return Ok(());
        };
        let back: Value = serde_json::from_slice(&bytes).unwrap();
        prop_assert_eq!(jcs(&back).unwrap(), bytes.clone());
        // Equal as numbers: -0.0 and 1.0 come back as 0 and 1.
        let again = jcs(&serde_json::from_slice::<Value>(&jcs(&back).unwrap()).unwrap()).unwrap();
        prop_assert_eq!(again, bytes);
    }

    /// Policy files, JSON and YAML, of any content: loading gives a policy
    /// or an error, never a panic, and a loaded policy passed its schema.
    #[test]
    fn policy_files_of_any_content_load_or_fail_cleanly(
        text in prop_oneof![
            ".{0,400}",
            json_value().prop_map(|v| v.to_string()),
            mutated(support::policy_42("1.0.0").to_string().into_bytes(), 6)
                .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        ],
        yaml in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let file = if yaml { "42.yaml" } else { "42.json" };
        std::fs::write(dir.path().join(file), &text).unwrap();
        let store = pde::policy::PolicyStore::open(dir.path());
        if let Ok(p) = store.load("42") {
            prop_assert!(pde::policy::check_schema(&p.document).is_empty());
            prop_assert_eq!(p.id, "42");
        }
    }

    /// Bundle parse and verify over edits of a real bundle: an edited
    /// bundle that still parses and verifies must carry the same payload
    /// (only insignificant bytes changed), never a different one.
    #[test]
    fn an_edited_bundle_never_verifies_with_other_content(
        bytes in mutated(valid_bundle().to_canonical_bytes(), 4),
    ) {
        let mut trusted = TrustedKeys::new();
        trusted.add(release_key().verifying_key());
        if let Ok(parsed) = Bundle::from_slice(&bytes)
            && parsed.verify_signature(&trusted).is_ok()
        {
            prop_assert_eq!(&parsed.payload, &valid_bundle().payload);
            prop_assert_eq!(&parsed.digest, &valid_bundle().digest);
        }
    }

    /// Bundles and approvals from arbitrary JSON: an error, never a panic.
    #[test]
    fn arbitrary_json_is_never_a_bundle_or_approval_by_accident(v in json_value()) {
        prop_assert!(Bundle::from_value(v.clone()).is_err());
        prop_assert!(serde_json::from_value::<SignedApproval>(v).is_err());
    }
}

proptest! {
    #![proptest_config(config(48))]

    /// The audit log under random edits: verification either fails, or the
    /// records it vouches for are exactly those that were written.
    #[test]
    fn audit_verify_catches_every_edit_that_changes_a_record(
        seed in prop::collection::vec(json_value(), 1..5),
        edits in prop::collection::vec((0..3u8, any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let log = pde::audit::AuditLog::open_with_actor(dir.path(), "fuzz").unwrap();
        for data in &seed {
            log.append(pde::audit::Event::Validated, "42", "prod", json!({"v": data})).unwrap();
        }
        let before = log.records().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut bytes = std::fs::read(&path).unwrap();
        for (kind, at, byte) in edits {
            let i = at.index(bytes.len().max(1)).min(bytes.len().saturating_sub(1));
            match kind {
                0 if !bytes.is_empty() => bytes[i] = byte,
                1 => bytes.insert(i, byte),
                _ if !bytes.is_empty() => { bytes.remove(i); }
                _ => bytes.push(byte),
            }
        }
        std::fs::write(&path, &bytes).unwrap();
        let reopened = pde::audit::AuditLog::open_read_only(dir.path()).unwrap();
        if reopened.verify().is_ok() {
            let after = reopened.records().unwrap();
            prop_assert_eq!(
                serde_json::to_value(&after).unwrap(),
                serde_json::to_value(&before).unwrap()
            );
        }
    }
}

fn agent_url() -> &'static str {
    static URL: OnceLock<(tempfile::TempDir, String)> = OnceLock::new();
    &URL.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let public = dir.path().join("release.pub");
        std::fs::write(
            &public,
            hex::encode(release_key().verifying_key().to_bytes()),
        )
        .unwrap();
        let url = support::start_agent(&dir.path().join("data"), &public);
        (dir, url)
    })
    .1
}

fn post(body: Vec<u8>, key: &str) -> (u16, Value) {
    // Started outside block_on: starting it blocks on the same runtime.
    let url = agent_url();
    support::runtime().block_on(async {
        let r = reqwest::Client::new()
            .post(format!("{url}/deploy"))
            .header("Idempotency-Key", key)
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    })
}

proptest! {
    #![proptest_config(config(128))]

    /// The agent's deploy body, over HTTP to a real agent: arbitrary bytes
    /// and edits of a real request get a 4xx (or, if an edit was
    /// insignificant, activate exactly the real bundle), never a 5xx, and
    /// never another active digest.
    #[test]
    fn the_agent_answers_any_deploy_body_without_activating_anything_else(
        body in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..512),
            json_value().prop_map(|v| v.to_string().into_bytes()),
            mutated(
                serde_json::to_vec(&json!({"bundle": valid_bundle(), "env": "prod"})).unwrap(),
                4,
            ),
        ],
        key in "[a-z0-9:]{1,40}",
    ) {
        let (status, answer) = post(body, &key);
        prop_assert!(status < 500, "status {} for a fuzzed body: {}", status, answer);
        let active = support::active_policies(agent_url());
        for (policy, digest) in &active {
            prop_assert_eq!(policy.as_str(), "42");
            prop_assert_eq!(digest, &valid_bundle().digest);
        }
        if status == 200 {
            prop_assert_eq!(answer["digest"].as_str(), Some(valid_bundle().digest.as_str()));
        }
    }
}

fn example_component() -> &'static [u8] {
    static C: OnceLock<Vec<u8>> = OnceLock::new();
    C.get_or_init(|| std::fs::read(pde_plugin_artifacts::EFFECTIVE_DATE).unwrap())
}

fn plugin_host() -> &'static pde::plugin::PluginHost {
    static H: OnceLock<pde::plugin::PluginHost> = OnceLock::new();
    H.get_or_init(|| pde::plugin::PluginHost::new(Default::default(), None).unwrap())
}

proptest! {
    // Each case compiles a component (tens of milliseconds): a small budget.
    #![proptest_config(config(24))]

    /// Component loading from arbitrary bytes and from edits of a real
    /// component: an inspection or a typed error, never a panic.
    #[test]
    fn component_loading_survives_arbitrary_bytes(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..256),
            // A valid component header followed by noise.
            prop::collection::vec(any::<u8>(), 0..256).prop_map(|tail| {
                let mut b = b"\0asm\x0d\0\x01\0".to_vec();
                b.extend(tail);
                b
            }),
            mutated(example_component().to_vec(), 3),
        ],
    ) {
        let engine = plugin_host().engine();
        match pde::plugin::inspect::inspect(engine, "fuzz", &bytes) {
            Ok(found) => prop_assert_eq!(found.size, bytes.len() as u64),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}
