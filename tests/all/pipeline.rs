//! The deploy pipeline end to end, over real parts: temp Git repositories,
//! the example plugins compiled from source, in-process `pde agent`s and §8
//! receivers with injected faults, all on 127.0.0.1.
// Test code: a failed unwrap is a failed test, with its location.

use crate::support;

use pde::ExitCode;
use pde::error::HasExitCode;
use pde::pipeline::DeployOutcome;
use pde::push::TargetState;
use support::receiver::{Fault, Receiver};
use support::{Svc, Workspace, policy_42};

fn svc(name: &'static str, url: &str, tags: &'static [&'static str]) -> Svc {
    Svc {
        name,
        url: url.to_string(),
        tags,
    }
}

/// A workspace whose `prod` environment has the three given receivers.
fn with_receivers(rs: &[&Receiver], extra: &str) -> Workspace {
    let names = ["HMS-API", "HMS-PORTAL", "HMS-SCHEDULER"];
    let tags: [&'static [&'static str]; 3] = [
        &["api", "eligibility"],
        &["portal", "public", "forms"],
        &["scheduling", "payments"],
    ];
    let services: Vec<Svc> = rs
        .iter()
        .enumerate()
        .map(|(i, r)| svc(names[i], &r.url, tags[i]))
        .collect();
    let ws = Workspace::new(&Workspace::env_toml("prod", extra, &services));
    ws.commit("policies");
    ws
}

/// The audit log's event names, in order.
fn audit_events(engine: &pde::Engine) -> Vec<String> {
    engine
        .audit()
        .records()
        .unwrap()
        .iter()
        .map(|r| {
            serde_json::to_value(r.event)
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

fn exit_of<T: std::fmt::Debug>(r: Result<T, pde::Error>) -> (ExitCode, pde::Error) {
    let e = r.expect_err("expected the deploy to fail");
    (e.exit_code(), e)
}

#[test]
fn happy_path_to_three_agents_with_plugins_tags_and_audits() {
    let ws = Workspace::new("");
    let urls: Vec<String> = ["api", "portal", "sched"]
        .iter()
        .map(|n| ws.agent(n))
        .collect();
    let env = Workspace::env_toml(
        "production",
        "require_signed_plugins = true\nmin_approvals = 2",
        &[
            svc("HMS-API", &urls[0], &["api", "eligibility"]),
            svc("HMS-PORTAL", &urls[1], &["portal", "public", "forms"]),
            svc("HMS-SCHEDULER", &urls[2], &["scheduling", "payments"]),
        ],
    );
    let toml = std::fs::read_to_string(ws.root().join("pde.toml")).unwrap() + &env;
    std::fs::write(ws.root().join("pde.toml"), toml).unwrap();
    ws.install_examples();
    ws.commit("policies and plugins");

    let engine = ws.engine();
    let report = engine.deploy_policy("42", "production").expect("deploys");
    assert_eq!(report.outcome, DeployOutcome::Deployed);
    assert_eq!(report.routes.len(), 3, "routes: {:?}", report.routes);
    assert!(
        report
            .routes
            .iter()
            .all(|r| r.reasons.iter().any(|x| x.starts_with("category-router: ")))
    );
    assert_eq!(report.validation.plugins.len(), 3, "three validators ran");
    for url in &urls {
        assert_eq!(
            support::active_digest(url).as_deref(),
            Some(report.digest.as_str())
        );
    }
    let push = report.push.as_ref().unwrap();
    assert!(
        push.targets
            .iter()
            .all(|t| t.state == TargetState::Delivered)
    );
    assert_eq!(ws.tags(), vec!["policy/42/v1.0.0/production".to_string()]);
    let tag_msg = support::git(
        ws.root(),
        &["tag", "-l", "-n99", "policy/42/v1.0.0/production"],
    );
    assert!(tag_msg.contains(&report.digest), "{tag_msg}");

    // The bundle on disk is the one every agent runs.
    let bytes = std::fs::read(report.bundle_path.as_ref().unwrap()).unwrap();
    let bundle = pde::bundle::Bundle::from_slice(&bytes).unwrap();
    assert_eq!(bundle.digest, report.digest);
    assert_eq!(bundle.payload.manifest.validators.len(), 3);

    let events = audit_events(&engine);
    assert_eq!(
        events,
        [
            "deploy_start",
            "validated",
            "packaged",
            "env_check_ok",
            "routed",
            "pushed",
            "tagged",
            "deployed"
        ]
    );
    engine.audit().verify().unwrap();
    let active = engine.state().active("42", "production").unwrap().unwrap();
    assert_eq!(active.digest, report.digest);

    // Deploying the same commit again is an idempotent success.
    let again = ws
        .engine()
        .deploy_policy("42", "production")
        .expect("re-deploy");
    assert_eq!(again.digest, report.digest);
    assert!(again.already_active);
    assert!(!again.tag.unwrap().created);
    assert_eq!(ws.tags().len(), 1);
}

#[test]
fn a_target_that_always_fails_rolls_the_others_back_and_nothing_is_tagged() {
    let rs = [
        Receiver::start(Fault::None),
        Receiver::start(Fault::None),
        Receiver::start(Fault::None),
    ];
    let ws = with_receivers(&rs.iter().collect::<Vec<_>>(), "");
    let first = ws.engine().deploy_policy("42", "prod").expect("v1 deploys");

    ws.write_policy("42.json", &policy_42("1.1.0").to_string());
    ws.commit("v1.1.0");
    rs[1].set_fault(Fault::Always500);
    let (code, err) = exit_of(ws.engine().deploy_policy("42", "prod"));
    assert_eq!(code, ExitCode::DeployFailed);
    let pde::Error::DeployFailed {
        report, outcome, ..
    } = err
    else {
        panic!("not a deploy failure: {err}")
    };
    assert_eq!(outcome.to_string(), "rolled-back");
    assert_eq!(report.outcome, DeployOutcome::RolledBack);
    for r in &rs {
        assert_eq!(r.active_digest().as_deref(), Some(first.digest.as_str()));
    }
    // v1, then 1 try + 2 retries of v1.1 on the failing target.
    assert_eq!(rs[1].deploys(), 1 + 3);
    assert_eq!(ws.tags(), vec!["policy/42/v1.0.0/prod".to_string()]);
    let state = ws.engine().state().active("42", "prod").unwrap().unwrap();
    assert_eq!(
        state.digest, first.digest,
        "state keeps the version that runs"
    );
}

#[test]
fn a_target_failing_once_is_retried_and_the_deploy_succeeds() {
    let rs = [
        Receiver::start(Fault::Once500),
        Receiver::start(Fault::None),
    ];
    let ws = with_receivers(&rs.iter().collect::<Vec<_>>(), "");
    let report = ws
        .engine()
        .deploy_policy("42", "prod")
        .expect("deploys after a retry");
    assert_eq!(report.outcome, DeployOutcome::Deployed);
    assert_eq!(rs[0].deploys(), 2);
    let t = &report.push.unwrap().targets[0];
    assert_eq!(t.attempts, 2);
    let key = format!("{}:prod", report.digest);
    assert!(
        rs[0]
            .seen
            .lock()
            .unwrap()
            .idempotency_keys
            .iter()
            .all(|k| *k == key)
    );
}

#[test]
fn a_hanging_target_times_out_and_the_other_is_compensated() {
    let rs = [Receiver::start(Fault::None), Receiver::start(Fault::Hang)];
    let ws = with_receivers(&rs.iter().collect::<Vec<_>>(), "");
    let (code, err) = exit_of(ws.engine().deploy_policy("42", "prod"));
    assert_eq!(code, ExitCode::DeployFailed, "{err}");
    assert_eq!(
        rs[0].active_digest(),
        None,
        "first-ever deploy compensated to nothing"
    );
    assert!(ws.tags().is_empty());
}

#[test]
fn an_active_endpoint_that_disagrees_fails_verification() {
    let rs = [Receiver::start(Fault::LyingActive)];
    let ws = with_receivers(&rs.iter().collect::<Vec<_>>(), "");
    let (code, err) = exit_of(ws.engine().deploy_policy("42", "prod"));
    assert_eq!(code, ExitCode::DeployFailed);
    let pde::Error::DeployFailed { report, .. } = err else {
        panic!("{err}")
    };
    let t = &report.push.as_ref().unwrap().targets[0];
    assert!(t.detail.contains("verif"), "{}", t.detail);
}

#[test]
fn an_unhealthy_environment_gets_nothing_pushed() {
    let rs = [
        Receiver::start(Fault::None),
        Receiver::start(Fault::Unhealthy),
    ];
    let ws = with_receivers(&rs.iter().collect::<Vec<_>>(), "");
    let engine = ws.engine();
    let (code, err) = exit_of(engine.deploy_policy("42", "prod"));
    assert_eq!(code, ExitCode::EnvUnhealthy);
    assert!(err.to_string().contains("HMS-PORTAL"), "{err}");
    assert_eq!(
        rs[0].deploys() + rs[1].deploys(),
        0,
        "no POST /deploy arrived anywhere"
    );
    let events = audit_events(&engine);
    assert!(
        events.contains(&"env_check_failed".to_string()),
        "{events:?}"
    );
    assert_eq!(events.last().unwrap(), "deploy_failed");
}

#[test]
fn malformed_policies_fail_validation() {
    let r = Receiver::start(Fault::None);
    let ws = with_receivers(&[&r], "");
    ws.write_policy("42.json", "{\"id\": \"42\", \"version\": ");
    ws.commit("broken json");
    let (code, _) = exit_of(ws.engine().deploy_policy("42", "prod"));
    assert_eq!(code, ExitCode::ValidationFailed);
    let events = audit_events(&ws.engine());
    assert_eq!(
        events,
        ["deploy_start", "validation_failed", "deploy_failed"]
    );

    std::fs::remove_file(ws.root().join("policies/42.json")).unwrap();
    ws.write_policy("42.yaml", "id: \"42\"\nversion: [unclosed\n");
    ws.commit("broken yaml");
    let (code, _) = exit_of(ws.engine().deploy_policy("42", "prod"));
    assert_eq!(code, ExitCode::ValidationFailed);
    assert_eq!(r.deploys(), 0);
}

#[test]
fn schema_violations_carry_json_pointers() {
    let r = Receiver::start(Fault::None);
    let ws = with_receivers(&[&r], "");
    let mut doc = policy_42("1.0.0");
    doc["version"] = "one".into();
    doc["rules"][1]["key"] = "Not A Key".into();
    ws.write_policy("42.json", &doc.to_string());
    ws.commit("bad schema");
    let (code, err) = exit_of(ws.engine().validate_policy("42", None));
    assert_eq!(code, ExitCode::ValidationFailed);
    let pde::Error::ValidationFailed { report, .. } = err else {
        panic!("{err}")
    };
    let paths: Vec<&str> = report.diagnostics.iter().map(|d| d.path.as_str()).collect();
    assert!(paths.contains(&"/version"), "{paths:?}");
    assert!(paths.contains(&"/rules/1/key"), "{paths:?}");
}

#[test]
fn a_version_must_be_greater_than_the_active_one() {
    let r = Receiver::start(Fault::None);
    let ws = with_receivers(&[&r], "");
    ws.write_policy("42.json", &policy_42("2.0.0").to_string());
    ws.commit("v2");
    ws.engine().deploy_policy("42", "prod").unwrap();
    ws.write_policy("42.json", &policy_42("1.9.0").to_string());
    ws.commit("older");
    let (code, err) = exit_of(ws.engine().deploy_policy("42", "prod"));
    assert_eq!(code, ExitCode::ValidationFailed, "{err}");
    // Same version, other bytes: refused too.
    let mut doc = policy_42("2.0.0");
    doc["title"] = "changed".into();
    ws.write_policy("42.json", &doc.to_string());
    ws.commit("same version, new content");
    let (code, err) = exit_of(ws.engine().deploy_policy("42", "prod"));
    assert_eq!(code, ExitCode::ValidationFailed, "{err}");
    assert!(err.to_string().contains("bump the version"), "{err}");
}

#[test]
fn a_rule_owned_by_two_policies_is_a_conflict_naming_both() {
    let r = Receiver::start(Fault::None);
    let ws = with_receivers(&[&r], "");
    let mut other = policy_42("1.0.0");
    other["id"] = "77".into();
    other["rules"] = serde_json::json!([{"key": "heating.min-age", "category": "eligibility", "value": 21, "description": "dup"}]);
    ws.write_policy("77.json", &other.to_string());
    ws.commit("conflict");
    let (code, err) = exit_of(ws.engine().deploy_policy("42", "prod"));
    assert_eq!(code, ExitCode::ValidationFailed);
    let pde::Error::ValidationFailed { report, .. } = err else {
        panic!("{err}")
    };
    let d = report
        .diagnostics
        .iter()
        .find(|d| d.message.contains("heating.min-age"))
        .expect("a conflict diagnostic");
    assert!(
        d.message.contains("42") && d.message.contains("77"),
        "{}",
        d.message
    );
    assert_eq!(r.deploys(), 0);
}

#[test]
fn missing_approvals_block_the_environment_that_wants_them() {
    let r = Receiver::start(Fault::None);
    let ws = with_receivers(&[&r], "min_approvals = 3");
    let (code, _) = exit_of(ws.engine().deploy_policy("42", "prod"));
    assert_eq!(code, ExitCode::ValidationFailed);
    assert_eq!(r.deploys(), 0);
}

#[test]
fn an_unsigned_plugin_is_refused_in_an_environment_that_requires_signatures() {
    let r = Receiver::start(Fault::None);
    let ws = with_receivers(&[&r], "require_signed_plugins = true");
    ws.install_examples();
    let (name, wasm) = &support::example_plugins()[0];
    ws.install_plugin(name, "validator", wasm, "", false);
    std::fs::remove_file(ws.root().join(format!("plugins/{name}.wasm.sig"))).unwrap();
    ws.commit("unsigned plugin");
    let (code, err) = exit_of(ws.engine().deploy_policy("42", "prod"));
    assert_eq!(code, ExitCode::Integrity, "{err}");
    assert!(err.to_string().contains(name), "{err}");
    assert_eq!(r.deploys(), 0);
}

#[test]
fn production_only_takes_what_staging_runs() {
    let (s, p) = (Receiver::start(Fault::None), Receiver::start(Fault::None));
    let envs = Workspace::env_toml("staging", "", &[svc("API", &s.url, &["api"])])
        + &Workspace::env_toml(
            "production",
            "promote_from = \"staging\"",
            &[svc("API", &p.url, &["api"])],
        );
    let ws = Workspace::new(&envs);
    ws.commit("policies");
    let (code, err) = exit_of(ws.engine().deploy_policy("42", "production"));
    assert_eq!(code, ExitCode::ValidationFailed, "{err}");
    assert!(err.to_string().contains("staging"), "{err}");
    let staged = ws.engine().deploy_policy("42", "staging").unwrap();
    let promoted = ws.engine().deploy_policy("42", "production").unwrap();
    assert_eq!(staged.digest, promoted.digest, "the same bytes, promoted");
    assert_eq!(p.deploys(), 1);
}

#[test]
fn bundles_are_byte_identical_across_builds_and_clones() {
    let r = Receiver::start(Fault::None);
    let ws = with_receivers(&[&r], "");
    ws.install_examples();
    ws.commit("plugins");
    let a = ws.engine().package("42", None).unwrap();
    let first = std::fs::read(&a.path).unwrap();
    std::fs::remove_dir_all(ws.root().join(".pde")).unwrap();
    let b = ws.engine().package("42", None).unwrap();
    assert_eq!(first, std::fs::read(&b.path).unwrap());

    let clone = tempfile::tempdir().unwrap();
    support::git(
        clone.path(),
        &["clone", "-q", ws.root().to_str().unwrap(), "c"],
    );
    let croot = clone.path().join("c");
    std::fs::create_dir_all(croot.join("keys")).unwrap();
    for f in [
        "release.ed25519",
        "release.ed25519.pub",
        "security.ed25519.pub",
    ] {
        std::fs::copy(ws.root().join("keys").join(f), croot.join("keys").join(f)).unwrap();
    }
    let c = pde::Engine::open(&croot)
        .unwrap()
        .package("42", None)
        .unwrap();
    assert_eq!(
        first,
        std::fs::read(&c.path).unwrap(),
        "a fresh clone builds the same bytes"
    );
}

#[test]
fn a_release_tag_is_never_moved() {
    let r = Receiver::start(Fault::None);
    let ws = with_receivers(&[&r], "");
    let first = ws.engine().deploy_policy("42", "prod").unwrap();
    // Someone rebuilt state from scratch and changed the content at the same version.
    std::fs::remove_dir_all(ws.root().join(".pde")).unwrap();
    let mut doc = policy_42("1.0.0");
    doc["title"] = "different".into();
    ws.write_policy("42.json", &doc.to_string());
    ws.commit("same version, other content");
    let deploys_before = r.deploys();
    let (code, err) = exit_of(ws.engine().deploy_policy("42", "prod"));
    assert_eq!(code, ExitCode::Integrity, "{err}");
    assert_eq!(r.deploys(), deploys_before, "refused before any push");
    let msg = support::git(ws.root(), &["tag", "-l", "-n99", "policy/42/v1.0.0/prod"]);
    assert!(msg.contains(&first.digest));
}

#[test]
fn a_second_deploy_of_the_same_policy_and_env_is_locked_out() {
    let r = Receiver::start(Fault::None);
    let ws = with_receivers(&[&r], "");
    let engine = ws.engine();
    let _held = engine.state().lock("42", "prod").unwrap();
    let (code, _) = exit_of(ws.engine().deploy_policy("42", "prod"));
    assert_eq!(code, ExitCode::Locked);
    assert_eq!(r.deploys(), 0);
}

#[test]
fn rollback_returns_every_holder_to_the_previous_version() {
    let ws = Workspace::new("");
    let urls: Vec<String> = ["a", "b"].iter().map(|n| ws.agent(n)).collect();
    let env = Workspace::env_toml(
        "prod",
        "",
        &[
            svc("A", &urls[0], &["api"]),
            svc("B", &urls[1], &["portal"]),
        ],
    );
    let toml = std::fs::read_to_string(ws.root().join("pde.toml")).unwrap() + &env;
    std::fs::write(ws.root().join("pde.toml"), toml).unwrap();
    ws.commit("v1");
    let v1 = ws.engine().deploy_policy("42", "prod").unwrap();
    ws.write_policy("42.json", &policy_42("1.1.0").to_string());
    ws.commit("v1.1");
    let v2 = ws.engine().deploy_policy("42", "prod").unwrap();
    assert_ne!(v1.digest, v2.digest);
    let report = ws.engine().rollback("42", "prod", None).unwrap();
    assert_eq!(report.to_digest, v1.digest);
    for url in &urls {
        assert_eq!(
            support::active_digest(url).as_deref(),
            Some(v1.digest.as_str())
        );
    }
    let active = ws.engine().state().active("42", "prod").unwrap().unwrap();
    assert_eq!(active.version, "1.0.0");

    // Deploying 1.1.0 again after the rollback activates it again everywhere.
    let again = ws.engine().deploy_policy("42", "prod").unwrap();
    assert_eq!(again.digest, v2.digest);
    for url in &urls {
        assert_eq!(
            support::active_digest(url).as_deref(),
            Some(v2.digest.as_str())
        );
    }
    ws.engine().audit().verify().unwrap();
}

#[test]
fn a_failed_first_deploy_leaves_real_agents_with_nothing_active() {
    let ws = Workspace::new("");
    let good = ws.agent("good");
    let bad = Receiver::start(Fault::Reject400);
    let env = Workspace::env_toml(
        "prod",
        "",
        &[svc("A", &good, &["api"]), svc("B", &bad.url, &["portal"])],
    );
    let toml = std::fs::read_to_string(ws.root().join("pde.toml")).unwrap() + &env;
    std::fs::write(ws.root().join("pde.toml"), toml).unwrap();
    ws.commit("init");
    let (code, err) = exit_of(ws.engine().deploy_policy("42", "prod"));
    assert_eq!(code, ExitCode::DeployFailed);
    let pde::Error::DeployFailed { report, .. } = err else {
        panic!("{err}")
    };
    assert_eq!(
        report.outcome,
        DeployOutcome::RolledBack,
        "{:?}",
        report.push
    );
    assert_eq!(bad.deploys(), 1, "a 400 is permanent: no retry");
    assert_eq!(support::active_digest(&good), None);
    assert!(ws.engine().state().active("42", "prod").unwrap().is_none());
}

/// Policy `id` at `version`: policy 42's shape with rule keys of its own
/// (a rule key belongs to one policy across the store).
fn policy_n(id: &str, version: &str) -> String {
    let mut p = policy_42(version);
    p["id"] = id.into();
    for rule in p["rules"].as_array_mut().unwrap() {
        let key = rule["key"]
            .as_str()
            .unwrap()
            .replace("heating.", &format!("p{id}."));
        rule["key"] = key.into();
    }
    p.to_string()
}

/// A workspace with policies 42, 43 and 44 and a `prod` environment of
/// the given service URLs (named A, B, C…), committed.
fn many_policies(urls: &[String]) -> Workspace {
    let ws = Workspace::new("");
    let names = ["A", "B", "C", "D"];
    let services: Vec<support::Svc> = urls
        .iter()
        .enumerate()
        .map(|(i, u)| svc(names[i], u, &["api"]))
        .collect();
    let env = Workspace::env_toml("prod", "", &services);
    let toml = std::fs::read_to_string(ws.root().join("pde.toml")).unwrap() + &env;
    std::fs::write(ws.root().join("pde.toml"), toml).unwrap();
    ws.write_policy("43.json", &policy_n("43", "1.0.0"));
    ws.write_policy("44.json", &policy_n("44", "1.0.0"));
    ws.commit("policies 42, 43, 44");
    ws
}

/// Real agents of a workspace-to-be: they trust a key made up front, which
/// is then copied into the workspace as its release key.
fn agents_for(n: usize) -> (tempfile::TempDir, Vec<String>) {
    let keys = tempfile::tempdir().unwrap();
    pde::keys::generate(keys.path(), "release.ed25519").unwrap();
    let public = keys.path().join("release.ed25519.pub");
    let urls = (0..n)
        .map(|i| support::start_agent(&keys.path().join(format!("agent-{i}")), &public))
        .collect();
    (keys, urls)
}

fn use_release_key(ws: &Workspace, keys: &tempfile::TempDir) {
    for f in ["release.ed25519", "release.ed25519.pub"] {
        std::fs::copy(keys.path().join(f), ws.root().join("keys").join(f)).unwrap();
    }
}

#[test]
fn three_policies_on_the_same_agents_are_all_active_and_roll_back_alone() {
    let (keys, urls) = agents_for(3);
    let ws = many_policies(&urls);
    use_release_key(&ws, &keys);
    let mut digests = std::collections::BTreeMap::new();
    for id in ["42", "43", "44"] {
        let r = ws.engine().deploy_policy(id, "prod").unwrap();
        assert_eq!(r.outcome, DeployOutcome::Deployed);
        digests.insert(id.to_string(), r.digest);
    }
    for url in &urls {
        assert_eq!(support::active_policies(url), digests, "agent {url}");
    }
    // pde's own record: every policy, on every service, with its digest.
    let status = ws.engine().state().status(Some("prod")).unwrap();
    assert_eq!(status.len(), 3);
    for e in &status {
        assert_eq!(e.services.len(), 3, "{e:?}");
        assert!(
            e.services
                .iter()
                .all(|h| h.digest.as_deref() == Some(e.digest.as_str())),
            "{e:?}"
        );
    }

    // A new 43, then a rollback of 43 alone.
    ws.write_policy("43.json", &policy_n("43", "1.1.0"));
    ws.commit("43 v1.1");
    let v11 = ws.engine().deploy_policy("43", "prod").unwrap();
    for url in &urls {
        assert_eq!(
            support::active_digest_of(url, "43").as_deref(),
            Some(v11.digest.as_str())
        );
    }
    let back = ws.engine().rollback("43", "prod", None).unwrap();
    assert_eq!(back.to_digest, digests["43"]);
    for url in &urls {
        assert_eq!(support::active_policies(url), digests, "agent {url}");
    }
    ws.engine().audit().verify().unwrap();
}

#[test]
fn a_failed_push_of_44_is_compensated_without_touching_42_or_43() {
    let (keys, mut urls) = agents_for(2);
    let flaky = Receiver::start(Fault::None);
    urls.push(flaky.url.clone());
    let ws = many_policies(&urls);
    use_release_key(&ws, &keys);
    let mut digests = std::collections::BTreeMap::new();
    for id in ["42", "43"] {
        digests.insert(id, ws.engine().deploy_policy(id, "prod").unwrap().digest);
    }
    flaky.set_fault(Fault::Always500);
    let (code, err) = exit_of(ws.engine().deploy_policy("44", "prod"));
    assert_eq!(code, ExitCode::DeployFailed, "{err}");
    let pde::Error::DeployFailed { report, .. } = err else {
        panic!("{err}")
    };
    assert_eq!(
        report.outcome,
        DeployOutcome::RolledBack,
        "{:?}",
        report.push
    );
    for url in &urls[..2] {
        assert_eq!(
            support::active_digest_of(url, "44"),
            None,
            "44 undone on {url}"
        );
        assert_eq!(
            support::active_digest_of(url, "42").as_deref(),
            Some(digests["42"].as_str())
        );
        assert_eq!(
            support::active_digest_of(url, "43").as_deref(),
            Some(digests["43"].as_str())
        );
    }
    assert_eq!(
        flaky.active_digest_of("42").as_deref(),
        Some(digests["42"].as_str())
    );
    assert_eq!(
        flaky.active_digest_of("43").as_deref(),
        Some(digests["43"].as_str())
    );
    assert!(ws.engine().state().active("44", "prod").unwrap().is_none());
}

#[test]
fn concurrent_deploys_of_42_and_43_to_the_same_agents_both_land() {
    let (keys, urls) = agents_for(3);
    let ws = many_policies(&urls);
    use_release_key(&ws, &keys);
    let root = ws.root().to_path_buf();
    let deploys: Vec<_> = ["42", "43"]
        .into_iter()
        .map(|id| {
            let root = root.clone();
            std::thread::spawn(move || {
                let engine = pde::blocking::Engine::open(&root).unwrap();
                engine.deploy_policy(id, "prod").unwrap().digest
            })
        })
        .collect();
    let digests: Vec<String> = deploys.into_iter().map(|t| t.join().unwrap()).collect();
    for url in &urls {
        let active = support::active_policies(url);
        assert_eq!(active.get("42"), Some(&digests[0]), "agent {url}");
        assert_eq!(active.get("43"), Some(&digests[1]), "agent {url}");
    }
}

#[test]
fn a_v1_receiver_is_refused_and_nothing_is_pushed() {
    let (keys, mut urls) = agents_for(1);
    let old = Receiver::start(Fault::V1);
    old.preload(
        "sha256:1111111111111111111111111111111111111111111111111111111111111111",
        "0.9.0",
    );
    urls.push(old.url.clone());
    let ws = many_policies(&urls);
    use_release_key(&ws, &keys);
    let (code, err) = exit_of(ws.engine().deploy_policy("43", "prod"));
    assert_eq!(code, ExitCode::DeployFailed);
    let pde::Error::DeployFailed { report, .. } = err else {
        panic!("{err}")
    };
    let push = report.push.expect("the push reports per target");
    let b = push.targets.iter().find(|t| t.service == "B").unwrap();
    assert!(b.detail.contains("protocol v1"), "{}", b.detail);
    assert_eq!(old.deploys(), 0, "nothing is sent to a v1 receiver");
    assert_eq!(
        support::active_digest_of(&urls[0], "43"),
        None,
        "nor to anyone else"
    );
}

#[test]
fn rollback_honours_the_workspace_push_settings() {
    // The workspace says `[push] retries = 2`; the built-in default is 3.
    let r = Receiver::start(Fault::None);
    let ws = with_receivers(&[&r], "");
    ws.engine().deploy_policy("42", "prod").unwrap();
    ws.write_policy("42.json", &policy_42("1.1.0").to_string());
    ws.commit("v1.1");
    ws.engine().deploy_policy("42", "prod").unwrap();
    let before = r.seen.lock().unwrap().rollbacks;
    r.set_fault(Fault::RollbackFails);
    let (code, _) = exit_of(ws.engine().rollback("42", "prod", None));
    assert_eq!(code, ExitCode::DeployFailed);
    let attempts = r.seen.lock().unwrap().rollbacks - before;
    assert_eq!(attempts, 3, "one attempt and the workspace's 2 retries");
}

#[test]
fn the_engine_runs_inside_async_code() {
    let (keys, urls) = agents_for(2);
    let ws = many_policies(&urls);
    use_release_key(&ws, &keys);
    // The caller's own runtime, as a service has one.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(deploy_from_async_code(&ws, &urls));
}

async fn deploy_from_async_code(ws: &Workspace, urls: &[String]) {
    // The async engine on the caller's runtime: no nested runtime, no panic.
    let engine = pde::Engine::open(ws.root()).unwrap();
    let (a, b) = tokio::join!(engine.deploy_policy("42", "prod"), engine.env_check("prod"));
    let report = a.unwrap();
    assert!(b.unwrap().healthy());
    assert_eq!(report.outcome, DeployOutcome::Deployed);
    let plan = engine.plan("43", "prod").await.unwrap();
    assert_eq!(plan.targets.len(), 2);
    // Spawned onto the runtime, as a service would: the future is Send.
    let root = ws.root().to_path_buf();
    let spawned = tokio::spawn(async move {
        let engine = pde::Engine::open(&root).unwrap();
        engine.deploy_policy("43", "prod").await.map(|r| r.digest)
    });
    let digest = spawned.await.unwrap().unwrap();
    for url in urls {
        let got = tokio::task::spawn_blocking({
            let url = url.clone();
            move || support::active_digest_of(&url, "43")
        })
        .await
        .unwrap();
        assert_eq!(got.as_deref(), Some(digest.as_str()));
    }
}

// --------------------------------------------- WIT 0.1.0 and 0.2.0 together

/// Policy 42 as the heating program publishes it: a monthly benefit of
/// `amount`, and the change notes of this version.
fn heating(version: &str, amount: u32, effective: &str, notes: &[&str]) -> String {
    serde_json::json!({
        "id": "42",
        "version": version,
        "title": "Winter heating assistance",
        "agency": "HMS",
        "effective": effective,
        "approvals": [
            {"by": "director@hms.example.gov", "role": "program-director", "at": "2030-11-20T15:04:00Z"}
        ],
        "rules": [
            {"key": "heating.monthly-amount", "category": "benefits", "value": amount,
             "description": "Monthly heating benefit in USD"},
            {"key": "heating.min-age", "category": "eligibility", "value": 18,
             "description": "Applicant must be at least 18"}
        ],
        "config": {"change_notes": notes}
    })
    .to_string()
}

/// A workspace whose `prod` has three real agents with labels, and four
/// signed plugins: a validator and a router built against pde:plugin@0.1.0
/// (the `legacy-*` fixtures) and against 0.2.0 (`benefit-change`,
/// `label-router`, through the SDK). Policy 42 v1.0.0 is committed.
fn mixed_versions() -> (Workspace, Vec<String>) {
    let ws = Workspace::new("");
    let services = [
        ("HMS-API", "api", "benefits"),
        ("HMS-PORTAL", "portal", "public"),
        ("HMS-PAYMENTS", "payments", "benefits"),
    ];
    let mut env = String::from("[environments.prod]\n");
    let mut urls = Vec::new();
    for (name, tag, tier) in services {
        let url = ws.agent(&name.to_lowercase());
        env.push_str(&format!(
            "[[environments.prod.services]]\nname = \"{name}\"\nurl = \"{url}\"\n\
             tags = [\"{tag}\"]\nlabels = {{ tier = \"{tier}\" }}\n"
        ));
        urls.push(url);
    }
    let toml = std::fs::read_to_string(ws.root().join("pde.toml")).unwrap() + &env;
    std::fs::write(ws.root().join("pde.toml"), toml).unwrap();
    let artifact = |name| std::path::PathBuf::from(pde_plugin_artifacts::wasm(name).unwrap());
    for (name, kind, settings) in [
        ("legacy-validator", "validator", ""),
        (
            "benefit-change",
            "validator",
            "[settings]\ntoday = \"2031-03-01\"\n",
        ),
        ("legacy-router", "router", "[settings]\ntag = \"api\"\n"),
        (
            "label-router",
            "router",
            "[settings.match]\ntier = \"benefits\"\n",
        ),
    ] {
        ws.install_plugin(name, kind, &artifact(name), settings, true);
    }
    ws.write_policy("42.json", &heating("1.0.0", 200, "2031-01-01", &[]));
    ws.commit("policy 42 v1 and plugins of both WIT versions");
    (ws, urls)
}

/// `validate 42 --env prod` fails (exit 3) with an `active.unavailable`
/// error; returns that finding.
fn active_unavailable(ws: &Workspace) -> pde::diagnostic::Diagnostic {
    let (code, err) = exit_of(ws.engine().validate_policy("42", Some("prod")));
    assert_eq!(code, ExitCode::ValidationFailed, "{err}");
    let pde::Error::ValidationFailed { report, .. } = err else {
        panic!("{err}")
    };
    let d = report
        .diagnostics
        .iter()
        .find(|d| d.code == "active.unavailable")
        .unwrap_or_else(|| panic!("{:?}", findings(&report)));
    assert!(d.is_error(), "{d:?}");
    d.clone()
}

/// The findings of `report` as (source, code, severity).
fn findings(report: &pde::validate::ValidationReport) -> Vec<(String, String, String)> {
    report
        .diagnostics
        .iter()
        .map(|d| {
            (
                d.source.clone(),
                d.code.clone(),
                format!("{:?}", d.severity).to_lowercase(),
            )
        })
        .collect()
}

fn has(report: &pde::validate::ValidationReport, source: &str, code: &str, severity: &str) -> bool {
    findings(report)
        .iter()
        .any(|(s, c, v)| s == source && c == code && v == severity)
}

#[test]
fn a_0_1_0_and_a_0_2_0_plugin_run_in_one_deploy_and_the_0_2_0_validator_judges_the_change() {
    let (ws, urls) = mixed_versions();

    // v1: a first deploy. Both validators and both routers run; nothing is
    // active yet, so benefit-change has no change to judge.
    let v1 = ws.engine().deploy_policy("42", "prod").expect("v1 deploys");
    assert_eq!(v1.outcome, DeployOutcome::Deployed);
    let runs: Vec<(&str, u32)> = v1
        .validation
        .plugins
        .iter()
        .map(|p| (p.name.as_str(), p.warnings))
        .collect();
    assert_eq!(runs, [("benefit-change", 0), ("legacy-validator", 1)]);
    assert!(
        v1.validation.plugins.iter().all(|p| p.fuel_used > 0),
        "{:?}",
        v1.validation.plugins
    );
    assert!(v1.validation.active.is_none());
    let seen: Vec<&str> = v1
        .validation
        .diagnostics
        .iter()
        .filter(|d| d.code == "legacy.seen")
        .map(|d| d.message.as_str())
        .collect();
    assert_eq!(
        seen,
        [
            "pde:plugin@0.1.0 validator saw policy 42 version 1.0.0 (environment none)",
            "pde:plugin@0.1.0 validator saw policy 42 version 1.0.0 (environment `prod`)",
        ],
        "the 0.1.0 validator ran twice: env-neutral (recorded) and for prod"
    );
    let routes: Vec<(&str, Vec<&str>)> = v1
        .routes
        .iter()
        .map(|r| {
            (
                r.service.as_str(),
                r.reasons.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    assert_eq!(
        routes,
        [
            (
                "HMS-API",
                vec![
                    "label-router: labels tier=benefits match the selector",
                    "legacy-router: pde:plugin@0.1.0 router: tagged `api`",
                ]
            ),
            (
                "HMS-PAYMENTS",
                vec!["label-router: labels tier=benefits match the selector"]
            ),
        ]
    );
    assert_eq!(
        support::active_digest(&urls[0]).as_deref(),
        Some(v1.digest.as_str())
    );
    assert_eq!(support::active_digest(&urls[1]), None, "not routed");
    // The bundle records both validators; the state keeps the bundle.
    let bundle =
        pde::bundle::Bundle::from_slice(&std::fs::read(v1.bundle_path.as_ref().unwrap()).unwrap())
            .unwrap();
    let recorded: Vec<&str> = bundle
        .payload
        .manifest
        .validators
        .iter()
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(recorded, ["benefit-change", "legacy-validator"]);
    let kept = ws.engine().state().bundle(&v1.digest).unwrap().unwrap();
    assert_eq!(kept, bundle.to_canonical_bytes());

    // v2 cuts the benefit by 25% and takes effect a month from "today"
    // (2031-03-01): benefit-change, told v1 is active, blocks it. The 0.1.0
    // validator ran in the same deploy and reported as before.
    ws.write_policy("42.json", &heating("2.0.0", 150, "2031-04-01", &[]));
    ws.commit("v2: cut the monthly amount");
    let (code, err) = exit_of(ws.engine().deploy_policy("42", "prod"));
    assert_eq!(code, ExitCode::ValidationFailed, "{err}");
    let pde::Error::ValidationFailed { report, errors, .. } = err else {
        panic!("not a validation failure: {err}")
    };
    assert_eq!(errors, 1, "{:?}", findings(&report));
    assert!(has(
        &report,
        "benefit-change",
        "benefit-change.short-notice",
        "error"
    ));
    let blocked = report
        .diagnostics
        .iter()
        .find(|d| d.code == "benefit-change.short-notice")
        .unwrap();
    assert_eq!(blocked.path, "/rules/0/value");
    assert!(
        blocked
            .message
            .contains("cut by 25.0% (200 -> 150) against the active version 1.0.0"),
        "{}",
        blocked.message
    );
    assert!(
        report
            .diagnostics
            .iter()
            .any(|d| d.code == "benefit-change.compared" && d.message.contains(&v1.digest))
    );
    assert!(has(&report, "legacy-validator", "legacy.seen", "warning"));
    let legacy = report
        .plugins
        .iter()
        .find(|p| p.name == "legacy-validator")
        .expect("the 0.1.0 validator ran in this deploy");
    assert!(legacy.fuel_used > 0);
    // What a bundle would record is the env-neutral run's: no error there,
    // since that run is never told the active version.
    let change = report
        .plugins
        .iter()
        .find(|p| p.name == "benefit-change")
        .unwrap();
    assert_eq!((change.errors, change.warnings), (0, 0));
    let active = report.active.as_ref().expect("judged against v1");
    assert_eq!(
        (active.version.as_str(), active.digest.as_str()),
        ("1.0.0", v1.digest.as_str())
    );
    // Nothing moved.
    for url in [&urls[0], &urls[2]] {
        assert_eq!(
            support::active_digest(url).as_deref(),
            Some(v1.digest.as_str())
        );
    }
    let engine = ws.engine();
    assert_eq!(
        engine.state().active("42", "prod").unwrap().unwrap().digest,
        v1.digest
    );
    assert_eq!(
        audit_events(&engine).last().map(String::as_str),
        Some("deploy_failed")
    );

    // The bundle does not depend on the environment: without one, nothing is
    // active and the same v2 passes (and packages).
    let neutral = engine
        .validate_policy("42", None)
        .expect("passes without an env");
    assert!(neutral.active.is_none());
    assert!(!has(
        &neutral,
        "benefit-change",
        "benefit-change.short-notice",
        "error"
    ));

    // With 90 days' notice the same cut deploys; routers of both versions
    // route it, and benefit-change said what it compared with.
    ws.write_policy("42.json", &heating("2.0.0", 150, "2031-06-01", &[]));
    ws.commit("v2: effective with 90 days' notice");
    let v2 = ws.engine().deploy_policy("42", "prod").expect("v2 deploys");
    assert_eq!(v2.routes.len(), 2);
    assert!(has(
        &v2.validation,
        "benefit-change",
        "benefit-change.compared",
        "info"
    ));
    assert_eq!(
        v2.validation.active.as_ref().map(|a| a.digest.as_str()),
        Some(v1.digest.as_str())
    );
    assert_eq!(
        support::active_digest(&urls[0]).as_deref(),
        Some(v2.digest.as_str())
    );
}

#[test]
fn an_active_version_whose_bundle_is_gone_blocks_0_2_0_validators_until_it_is_found() {
    let (ws, _urls) = mixed_versions();
    let v1 = ws.engine().deploy_policy("42", "prod").expect("v1 deploys");
    // As if v1 had been deployed by a pde that did not keep bundles in the
    // state, from another checkout: neither the state nor dist/ has it.
    let db = ws.root().join(".pde/state.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    assert_eq!(conn.execute("DELETE FROM bundles", []).unwrap(), 1);
    drop(conn);
    let file = v1.bundle_path.clone().unwrap();
    let saved = std::fs::read(&file).unwrap();
    std::fs::remove_file(&file).unwrap();

    // A 0.2.0 validator would be told "nothing is active" and pass the
    // change unjudged: refused, naming it and what to do.
    ws.write_policy("42.json", &heating("2.0.0", 150, "2031-06-01", &["raise"]));
    ws.commit("v2");
    let d = active_unavailable(&ws);
    assert!(d.message.contains(&v1.digest), "{}", d.message);
    assert!(d.message.contains("benefit-change"), "{}", d.message);
    assert!(
        !d.message.contains("legacy-validator"),
        "a 0.1.0 plugin is never told: {}",
        d.message
    );
    assert!(
        d.message
            .contains(&file.file_name().unwrap().to_string_lossy().to_string())
    );

    // The checkout's dist/ copy (what a pde before 0.2.0 left behind) is
    // found again, digest checked.
    std::fs::write(&file, &saved).unwrap();
    let report = ws
        .engine()
        .validate_policy("42", Some("prod"))
        .expect("judged against v1 from dist/");
    assert_eq!(report.active.map(|a| a.digest), Some(v1.digest.clone()));
    // A copy that does not hash to the active digest is not used.
    let mut tampered: serde_json::Value = serde_json::from_slice(&saved).unwrap();
    tampered["payload"]["policy"]["rules"][0]["value"] = serde_json::json!(999);
    std::fs::write(&file, tampered.to_string()).unwrap();
    let d = active_unavailable(&ws);
    assert!(d.message.contains("is damaged"), "{}", d.message);
}

/// A validator whose manifest says `uses_environment = false` is never given
/// the environment and runs once per `validate --env`, not twice; one without
/// the declaration still sees the environment in its second run.
#[test]
fn an_environment_neutral_validator_runs_once_and_never_sees_the_environment() {
    let ws = Workspace::new(&Workspace::env_toml("prod", "", &[]));
    let misbehave = std::path::PathBuf::from(pde_plugin_artifacts::wasm("misbehave").unwrap());
    let echo = "[settings]\nmode = \"context\"\n";
    ws.install_plugin("echo-used", "validator", &misbehave, echo, false);
    ws.install_plugin(
        "echo-neutral",
        "validator",
        &misbehave,
        &format!("uses_environment = false\n{echo}"),
        false,
    );
    ws.commit("plugins");
    let engine = ws.engine();
    let seen = |report: &pde::steps::validate::ValidationReport, plugin: &str| {
        let mut messages: Vec<String> = report
            .diagnostics
            .iter()
            .filter(|d| d.source == plugin)
            .map(|d| d.message.clone())
            .collect();
        messages.sort();
        messages
    };
    let fuel = |report: &pde::steps::validate::ValidationReport, plugin: &str| {
        report
            .plugins
            .iter()
            .find(|p| p.name == plugin)
            .unwrap()
            .fuel_used
    };
    let neutral = engine.validate_policy("42", None).unwrap();
    let with_env = engine.validate_policy("42", Some("prod")).unwrap();

    assert_eq!(
        seen(&with_env, "echo-neutral"),
        vec![r#"environment="" settings={"mode":"context"}"#.to_string()]
    );
    // Fuel of one call, not two (allowing for a few instructions of noise).
    let one = fuel(&neutral, "echo-neutral");
    assert!(fuel(&with_env, "echo-neutral") < one * 5 / 4, "one run");

    assert_eq!(
        seen(&with_env, "echo-used"),
        vec![
            r#"environment="" settings={"mode":"context"}"#.to_string(),
            r#"environment="prod" settings={"mode":"context"}"#.to_string(),
        ]
    );
    let one = fuel(&neutral, "echo-used");
    assert!(fuel(&with_env, "echo-used") > one * 3 / 2, "two runs");
}
