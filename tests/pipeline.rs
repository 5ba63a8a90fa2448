//! The deploy pipeline end to end, over real parts: temp Git repositories,
//! the example plugins compiled from source, in-process `pde agent`s and §8
//! receivers with injected faults, all on 127.0.0.1.

mod support;

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
    assert_eq!(outcome, "rolled-back");
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
