//! A release team on shared state (issue 12): one PostgreSQL database, and
//! separate checkouts driving real `pde` processes against agents on
//! loopback, as two engineers on two machines would.
//!
//! Needs a PostgreSQL server: `scripts/test.sh` starts one; run alone, the
//! first test starts its own (see `support::pg`). In CI without one, every
//! test here fails.
// Test code: a failed unwrap is a failed test, with its location.

use crate::support;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use pde::error::HasExitCode;
use pde::state::postgres::{PgState, PgTarget};
use pde::state::{
    DeploymentRecord, RecordOutcome, RolloutRecord, SqliteState, StateBackend, StateError,
    TargetRecord,
};
use support::pg::{command, pde, spawn};
use support::receiver::{Fault, Receiver};
use support::{Svc, Workspace, code, git, pg, stderr};

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&o.stdout),
            stderr(o)
        )
    })
}

/// The `state` line of a workspace whose state is in `db_url`.
fn shared_state(db_url: &str) -> String {
    format!(
        "state = {{ dir = \".pde\", url = \"{db_url}\", password_env = \"{}\" }}\n",
        pg::PASSWORD_ENV
    )
}

/// A workspace on shared state with `envs`, committed: engineer A's checkout.
fn team_workspace(db_url: &str, envs: &str) -> Workspace {
    team_workspace_with(db_url, |_| envs.to_string())
}

/// [`team_workspace`], with environments that may name the workspace's own
/// agents (which must trust its key, so start after it exists).
fn team_workspace_with(db_url: &str, envs: impl FnOnce(&Workspace) -> String) -> Workspace {
    let ws = Workspace::new("");
    let envs = envs(&ws);
    let toml = std::fs::read_to_string(ws.root().join("pde.toml")).unwrap() + &envs;
    let toml = toml
        .replace("state = \".pde\"\n", &shared_state(db_url))
        // Long enough for a second engineer to run while a push hangs.
        .replace("timeout_ms = 1500", "timeout_ms = 6000");
    std::fs::write(ws.root().join("pde.toml"), toml).unwrap();
    ws.write_policy("43.json", &policy_43("1.0.0").to_string());
    ws.commit("init");
    ws
}

/// Policy 43: policy 42's shape with its own rule keys (keys are owned by
/// one policy).
fn policy_43(version: &str) -> serde_json::Value {
    let text = support::policy_42(version)
        .to_string()
        .replace("heating.", "cooling.");
    let mut p: serde_json::Value = serde_json::from_str(&text).unwrap();
    p["id"] = "43".into();
    p
}

/// Engineer B's checkout: a clone of A's repository, its own `.pde/`.
fn checkout(ws: &Workspace) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    git(
        dir.path(),
        &["clone", "-q", &ws.root().display().to_string(), "b"],
    );
    dir
}

fn env_with(name: &str, extra: &str, services: &[(&'static str, &str)]) -> String {
    let svcs: Vec<Svc> = services
        .iter()
        .map(|(n, url)| Svc {
            name: n,
            url: url.to_string(),
            tags: &["api"],
        })
        .collect();
    Workspace::env_toml(name, extra, &svcs)
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// The conformance test: one set of behaviours, run against every backend
// (SQLite and a real PostgreSQL). What only one backend does (SQLite's
// files, WAL and IMMEDIATE transactions) is tested beside it, in
// host/engine/src/state/sqlite.rs.

fn record(policy: &str, env: &str, digest: &str, outcome: RecordOutcome) -> DeploymentRecord {
    DeploymentRecord {
        id: None,
        policy_id: policy.into(),
        env: env.into(),
        version: "1.0.0".into(),
        digest: digest.into(),
        outcome,
        started_at: "2026-11-29T10:00:00Z".into(),
        finished_at: "2026-11-29T10:00:01Z".into(),
        actor: "ana".into(),
        targets: vec![
            TargetRecord {
                service: "HMS-API".into(),
                outcome: "deployed".into(),
                previous_digest: Some("sha256:00".into()),
                detail: "200".into(),
            },
            TargetRecord {
                service: "HMS-BATCH".into(),
                outcome: "rolled-back".into(),
                previous_digest: None,
                detail: "500 then rollback".into(),
            },
        ],
    }
}

/// Every behaviour of a state backend: `s` is a fresh one, and `fresh`
/// opens another empty one of the same kind (the target of a migration).
fn behaves_as_state(s: &dyn StateBackend, fresh: &dyn Fn() -> Box<dyn StateBackend>) {
    // History: newest first, targets kept in order, ids increasing.
    let first = record("42", "staging", "sha256:aa", RecordOutcome::RolledBack);
    let second = record("42", "staging", "sha256:bb", RecordOutcome::Deployed);
    let id1 = s.record(&first).unwrap();
    let id2 = s.record(&second).unwrap();
    assert!(id2 > id1);
    s.record(&record(
        "7",
        "staging",
        "sha256:cc",
        RecordOutcome::Deployed,
    ))
    .unwrap();
    let h = s.history("42").unwrap();
    assert_eq!(
        h,
        vec![
            DeploymentRecord {
                id: Some(id2),
                ..second
            },
            DeploymentRecord {
                id: Some(id1),
                ..first
            }
        ]
    );
    assert_eq!(h[1].targets[1].previous_digest, None);
    assert!(s.history("nope").unwrap().is_empty());

    // The promotion gate counts successful deployments in that env only.
    assert!(s.was_deployed("staging", "42", "sha256:bb").unwrap());
    assert!(!s.was_deployed("staging", "42", "sha256:aa").unwrap());
    assert!(!s.was_deployed("production", "42", "sha256:bb").unwrap());
    assert!(!s.was_deployed("staging", "7", "sha256:bb").unwrap());

    // Active versions upsert; status sorts by env, then policy, with services.
    assert_eq!(s.active("42", "staging").unwrap(), None);
    s.set_active("42", "staging", "1.0.0", "sha256:aa").unwrap();
    s.set_active("42", "staging", "1.1.0", "sha256:bb").unwrap();
    s.set_active("7", "dev", "0.1.0", "sha256:cc").unwrap();
    s.set_service_active("42", "staging", "HMS-API", Some(("1.1.0", "sha256:bb")))
        .unwrap();
    s.set_service_active("42", "staging", "HMS-BATCH", None)
        .unwrap();
    let active = s.active("42", "staging").unwrap().unwrap();
    assert_eq!(
        (active.version.as_str(), active.digest.as_str()),
        ("1.1.0", "sha256:bb")
    );
    // Stamped now, in RFC 3339 UTC (`2026-11-29T10:00:00Z`, maybe with
    // fractions).
    let at = active.deployed_at.as_bytes();
    assert!(
        at.len() >= 20 && at[4] == b'-' && at[10] == b'T' && at.ends_with(b"Z"),
        "{}",
        active.deployed_at
    );
    let all = s.status(None).unwrap();
    let keys: Vec<_> = all
        .iter()
        .map(|e| (e.env.as_str(), e.policy_id.as_str()))
        .collect();
    assert_eq!(keys, [("dev", "7"), ("staging", "42")]);
    let staging = s.status(Some("staging")).unwrap();
    assert_eq!(staging.len(), 1);
    let services: Vec<_> = staging[0]
        .services
        .iter()
        .map(|h| (h.service.as_str(), h.digest.as_deref()))
        .collect();
    assert_eq!(
        services,
        [("HMS-API", Some("sha256:bb")), ("HMS-BATCH", None)]
    );

    // Deploys recorded before they push: in progress while the lock is
    // held, interrupted once it is not, settled by the next holder.
    let planned = record("9", "qa", "sha256:dd", RecordOutcome::Deployed);
    let lock = s.lock("9", "qa").unwrap();
    let id = s.begin(&planned).unwrap();
    assert_eq!(
        s.history_checked("9").unwrap()[0].outcome,
        RecordOutcome::InProgress
    );
    assert!(
        s.status(Some("qa")).unwrap().is_empty(),
        "a live deploy is not interrupted"
    );
    drop(lock); // the holder died
    assert_eq!(
        s.history_checked("9").unwrap()[0].outcome,
        RecordOutcome::Interrupted
    );
    let qa = s.status(Some("qa")).unwrap();
    assert_eq!(qa.len(), 1, "{qa:?}");
    let shown = qa[0].interrupted.as_ref().expect("shown as interrupted");
    assert_eq!((shown.id, shown.digest.as_str()), (Some(id), "sha256:dd"));
    let next = s.lock("9", "qa").unwrap();
    assert_eq!(s.settle_interrupted("9", "qa").unwrap(), [id]);
    assert_eq!(
        s.history("9").unwrap()[0].outcome,
        RecordOutcome::Interrupted
    );
    let id2 = s.begin(&planned).unwrap();
    s.finish(id2, &planned).unwrap();
    let h = s.history_checked("9").unwrap();
    assert_eq!(
        h.iter().map(|d| d.outcome).collect::<Vec<_>>(),
        [RecordOutcome::Deployed, RecordOutcome::Interrupted]
    );
    assert_eq!(h[0].targets, planned.targets);
    drop(next);

    // Locks: one holder per (policy, env), named to the next; released on drop.
    let held = s.lock("42", "production").unwrap();
    let e = s.lock("42", "production").unwrap_err();
    assert_eq!(e.exit_code().code(), 7, "{e}");
    let message = e.to_string();
    assert!(
        message.contains(&format!("pid {}", std::process::id())) && message.contains("since"),
        "{message}"
    );
    let leases = s.leases().unwrap();
    assert_eq!(leases.len(), 1, "{leases:?}");
    assert!(!leases[0].stale);
    assert_eq!(leases[0].pid, i64::from(std::process::id()));
    // A live holder cannot be unlocked.
    assert_eq!(
        s.unlock("42", "production").unwrap_err().exit_code().code(),
        7
    );
    let _other_env = s.lock("42", "staging").unwrap();
    let _other_policy = s.lock("7", "production").unwrap();
    drop(held);
    let _again = s.lock("42", "production").unwrap();
    // Names that could escape a lock's namespace are refused.
    assert!(matches!(
        s.lock("../x", "production"),
        Err(StateError::BadName { .. })
    ));
    assert!(matches!(
        s.lock("42", "a/b"),
        Err(StateError::BadName { .. })
    ));

    // Bundles by digest: stored once, read back byte for byte.
    assert_eq!(s.bundle("sha256:ee").unwrap(), None);
    s.put_bundle("sha256:ee", b"{\"a\":1}").unwrap();
    s.put_bundle("sha256:ee", b"other bytes").unwrap();
    assert_eq!(
        s.bundle("sha256:ee").unwrap().as_deref(),
        Some(&b"{\"a\":1}"[..]),
        "the bytes of a digest never change"
    );

    // One state, many threads (the pipeline shares it across its tasks).
    std::thread::scope(|scope| {
        for i in 0..4 {
            scope.spawn(move || {
                for j in 0..5 {
                    let d = record(
                        "5",
                        "dev",
                        &format!("sha256:{i}{j}"),
                        RecordOutcome::Deployed,
                    );
                    s.record(&d).unwrap();
                }
            });
        }
    });
    assert_eq!(s.history("5").unwrap().len(), 20);

    migrates_as_state(s, fresh);
}

/// `pde state migrate`: a state's stored rows copied into an empty one, as
/// they are. The red team's case (issue 21 item 8): a first deploy killed
/// mid-push has no active version, and must not gain one with no digest.
fn migrates_as_state(s: &dyn StateBackend, fresh: &dyn Fn() -> Box<dyn StateBackend>) {
    // A first deploy of policy 8 killed mid-push: in progress, one service
    // told, nothing active.
    let killed = record("8", "dev", "sha256:ff", RecordOutcome::Deployed);
    let lock = s.lock("8", "dev").unwrap();
    let id = s.begin(&killed).unwrap();
    s.set_service_active("8", "dev", "HMS-API", Some(("1.0.0", "sha256:ff")))
        .unwrap();
    drop(lock);
    let dev = s.status(Some("dev")).unwrap();
    let shown: Vec<_> = dev
        .iter()
        .map(|e| (e.policy_id.as_str(), e.version.as_str()))
        .collect();
    assert_eq!(shown, [("7", "0.1.0"), ("8", "")], "{dev:?}");
    assert!(dev[1].interrupted.is_some(), "{dev:?}");

    // A rollout paused for a person, with a promotion asked for: the
    // second engineer promotes it by the id they were shown.
    let paused = RolloutRecord {
        id: None,
        policy_id: "42".into(),
        env: "dev".into(),
        version: "1.1.0".into(),
        digest: "sha256:ee".into(),
        status: "paused".into(),
        control: None,
        doc: serde_json::json!({"waves": [{"name": "canary", "status": "passed"}]}),
        started_at: "2026-12-06T07:00:00Z".into(),
        updated_at: "2026-12-06T07:00:00Z".into(),
        actor: "ana@agency.gov".into(),
    };
    let rollout = s.rollout_begin(&paused).unwrap();
    s.rollout_control(rollout, Some("promote")).unwrap();

    let dump = s.dump().unwrap();
    assert_eq!(dump.rollouts.len(), 1, "{dump:?}");
    let to = fresh();
    to.import(&dump).unwrap();
    let copied = to
        .rollout(rollout)
        .unwrap()
        .expect("the rollout, by its id");
    assert_eq!(
        (copied.status.as_str(), copied.control.as_deref()),
        ("paused", Some("promote"))
    );
    assert!(
        to.rollout_begin(&paused).unwrap() > rollout,
        "new ids follow"
    );
    assert_eq!(
        to.active("8", "dev").unwrap(),
        None,
        "nothing was ever active"
    );
    let mut now = to.dump().unwrap();
    now.rollouts.pop();
    assert_eq!(now, dump, "every stored row, as it was");
    for policy in ["42", "7", "9", "8", "5"] {
        assert_eq!(to.history(policy).unwrap(), s.history(policy).unwrap());
    }
    // The shared view is the same: 8 still shows as interrupted, with no
    // version.
    assert_eq!(to.status(None).unwrap(), s.status(None).unwrap());
    let h = to.history_checked("8").unwrap();
    assert_eq!(
        (h[0].id, h[0].outcome),
        (Some(id), RecordOutcome::Interrupted)
    );
    // New records continue after the imported ids.
    let next = to.record(&killed).unwrap();
    assert!(next > dump.deployments.last().unwrap().id.unwrap());
    // Importing twice would duplicate history: refused, nothing written.
    let e = to.import(&dump).unwrap_err();
    assert!(matches!(e, StateError::Config { .. }), "{e}");
    assert_eq!(e.exit_code().code(), 2);
}

#[test]
fn sqlite_state_behaves_as_state() {
    let dirs = std::sync::Mutex::new(Vec::new());
    let fresh = || -> Box<dyn StateBackend> {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteState::open(dir.path()).unwrap();
        dirs.lock().unwrap().push(dir);
        Box::new(s)
    };
    behaves_as_state(&*fresh(), &fresh);
}

#[test]
fn postgres_state_behaves_as_state() {
    let fresh = || -> Box<dyn StateBackend> {
        let url = pg::fresh_database();
        let target = PgTarget::with_password(&url, Some(&pg::server().password)).unwrap();
        Box::new(PgState::open(target).unwrap())
    };
    behaves_as_state(&*fresh(), &fresh);
}

// ---------------------------------------------------------------------------
// Two checkouts, one database.

#[test]
fn a_second_engineer_gets_exit_7_naming_the_holder_while_the_first_deploys() {
    let db = pg::fresh_database();
    let slow = Receiver::start(Fault::Hang);
    let ws = team_workspace(&db, &env_with("production", "", &[("HMS-API", &slow.url)]));
    let b = checkout(&ws);
    let b = b.path().join("b");

    // A's push hangs at the service, holding the lock.
    let a = spawn(ws.root(), &["deploy", "42", "--env", "production"]);
    wait_until("A's push to arrive", || slow.deploys() >= 1);
    let o = pde(&b, &["deploy", "42", "--env", "production"]);
    assert_eq!(code(&o), 7, "{}", stderr(&o));
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let message = stderr(&o);
    assert!(
        message.contains(host.trim())
            && message.contains(&format!("pid {}", a.id()))
            && message.contains("since"),
        "names holder, host and since: {message}"
    );
    // A's retry goes through once the service answers.
    slow.set_fault(Fault::None);
    let a = a.wait_with_output().unwrap();
    assert_eq!(code(&a), 0, "{}", stderr(&a));
    assert!(slow.active_digest_of("42").is_some());
    // B sees A's deploy: the history is shared, and the lock is free again.
    let history = json(&pde(&b, &["history", "42", "--output", "json"]));
    assert_eq!(history[0]["outcome"], "deployed");
    let o = pde(&b, &["deploy", "42", "--env", "production"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

#[test]
fn a_killed_holder_frees_the_lock_and_its_stale_lease_is_unlocked_with_an_audit_record() {
    let db = pg::fresh_database();
    let slow = Receiver::start(Fault::Hang);
    let ws = team_workspace(&db, &env_with("production", "", &[("HMS-API", &slow.url)]));
    let b = checkout(&ws);
    let b = b.path().join("b");

    let mut a = spawn(ws.root(), &["deploy", "42", "--env", "production"]);
    wait_until("A's push to arrive", || slow.deploys() >= 1);
    a.kill().unwrap(); // SIGKILL: no cleanup runs
    a.wait().unwrap();

    // The server closed A's session, so the lock is free; the lease row
    // A left behind is stale, and `pde unlock` clears it with a record.
    // The server ends A's session as soon as it sees the socket close.
    wait_until("status to report A's lease as stale", || {
        let text = String::from_utf8(pde(&b, &["status"]).stdout).unwrap();
        text.contains("STALE LEASE: policy 42 in production")
            && text.contains(&format!("pid {}", a.id()))
    });
    let mut o = pde(
        &b,
        &["unlock", "42", "--env", "production", "--output", "json"],
    );
    wait_until("the server to free A's lock", || {
        if code(&o) == 7 {
            o = pde(
                &b,
                &["unlock", "42", "--env", "production", "--output", "json"],
            );
        }
        code(&o) != 7
    });
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let cleared = json(&o);
    assert_eq!(cleared["cleared"]["pid"], a.id());
    assert_eq!(cleared["cleared"]["stale"], true);
    let o = pde(
        &b,
        &["unlock", "42", "--env", "production", "--output", "json"],
    );
    assert_eq!(json(&o)["cleared"], serde_json::Value::Null, "cleared once");
    let shown = json(&pde(&b, &["audit", "show", "--output", "json"]));
    let unlocked: Vec<_> = shown
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["event"] == "unlocked")
        .collect();
    assert_eq!(unlocked.len(), 1, "{shown}");
    assert_eq!(unlocked[0]["data"]["pid"], a.id());

    slow.set_fault(Fault::None);
    let o = pde(&b, &["deploy", "42", "--env", "production"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(code(&pde(&b, &["audit", "verify"])), 0);
}

#[test]
fn concurrent_deploys_of_different_policies_from_two_checkouts_make_one_gap_free_chain() {
    let db = pg::fresh_database();
    let ws = team_workspace_with(&db, |ws| {
        env_with(
            "dev",
            "",
            &[
                ("HMS-API", &ws.agent("api")),
                ("HMS-BATCH", &ws.agent("batch")),
            ],
        )
    });
    let b = checkout(&ws);
    let b = b.path().join("b");

    for round in 0..2 {
        if round == 1 {
            // Second round: new versions, so each deploy pushes again.
            for dir in [ws.root(), b.as_path()] {
                for (file, p) in [
                    ("42.json", support::policy_42("1.1.0")),
                    ("43.json", policy_43("1.1.0")),
                ] {
                    std::fs::write(dir.join("policies").join(file), p.to_string()).unwrap();
                }
                git(dir, &["commit", "-qam", "1.1.0"]);
            }
        }
        let a = spawn(ws.root(), &["deploy", "42", "--env", "dev"]);
        let bb = spawn(&b, &["deploy", "43", "--env", "dev"]);
        let (a, bb) = (
            a.wait_with_output().unwrap(),
            bb.wait_with_output().unwrap(),
        );
        assert_eq!(code(&a), 0, "{}", stderr(&a));
        assert_eq!(code(&bb), 0, "{}", stderr(&bb));
    }

    // One chain, verified from either checkout.
    for dir in [ws.root(), b.as_path()] {
        let o = pde(dir, &["audit", "verify", "--output", "json"]);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
    }
    let export = pde(ws.root(), &["audit", "export"]);
    assert_eq!(code(&export), 0, "{}", stderr(&export));
    let records: Vec<serde_json::Value> = String::from_utf8(export.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seqs: Vec<u64> = records.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "gap-free"
    );
    for pair in records.windows(2) {
        assert_eq!(pair[1]["prev"], pair[0]["hash"], "chained");
    }
    let deployed = |id: &str| {
        records
            .iter()
            .filter(|r| r["event"] == "deployed" && r["policy_id"] == id)
            .count()
    };
    assert_eq!((deployed("42"), deployed("43")), (2, 2));
    // Both machines' records are in it, interleaved or not.
    let starts = records
        .iter()
        .filter(|r| r["event"] == "deploy_start")
        .count();
    assert_eq!(starts, 4);
    // The exported lines are exactly what `audit show` reads.
    let shown = json(&pde(&b, &["audit", "show", "--output", "json"]));
    assert_eq!(shown.as_array().unwrap().len(), records.len());
    // Tampering in the database is caught like an edited file.
    pg::psql(
        pg::database_of(&db),
        "UPDATE audit_log SET line = replace(line, '\"dev\"', '\"prod\"') WHERE seq = 2",
    );
    assert_eq!(code(&pde(&b, &["audit", "verify"])), 6);
    // A deleted head row is tampering too (issue 21 item 4: it was exit 2,
    // "query returned an unexpected number of rows"), named as such.
    pg::psql(pg::database_of(&db), "DELETE FROM audit_head");
    let o = pde(&b, &["audit", "verify"]);
    assert_eq!(code(&o), 6, "{}", stderr(&o));
    assert!(stderr(&o).contains("no audit_head row"), "{}", stderr(&o));
}

#[test]
fn engineer_b_promotes_what_engineer_a_deployed_to_staging() {
    let db = pg::fresh_database();
    let ws = team_workspace_with(&db, |ws| {
        env_with("staging", "", &[("HMS-API", &ws.agent("staging-api"))])
            + &env_with(
                "production",
                "promote_from = \"staging\"",
                &[("HMS-API", &ws.agent("prod-api"))],
            )
    });
    let b = checkout(&ws);
    let b = b.path().join("b");

    // B cannot promote what nobody deployed to staging.
    let o = pde(&b, &["deploy", "42", "--env", "production"]);
    assert_ne!(code(&o), 0, "promotion without staging must fail");
    let a = pde(
        ws.root(),
        &["deploy", "42", "--env", "staging", "--output", "json"],
    );
    assert_eq!(code(&a), 0, "{}", stderr(&a));
    let digest = json(&a)["digest"].clone();
    let o = pde(
        &b,
        &["deploy", "42", "--env", "production", "--output", "json"],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(json(&o)["digest"], digest);
    // Both see both environments.
    let status = json(&pde(ws.root(), &["status", "--output", "json"]));
    let envs: Vec<_> = status
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["env"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(envs, ["production", "staging"]);
}

#[test]
fn engineer_b_sees_the_version_engineer_a_made_active_through_the_shared_state() {
    // Validators built against pde:plugin@0.2.0 are shown the active
    // version; B's checkout never had A's bundle in its dist/, so it comes
    // from the shared database.
    let db = pg::fresh_database();
    let ws = team_workspace_with(&db, |ws| {
        env_with("dev", "", &[("HMS-API", &ws.agent("dev-api"))])
    });
    ws.install_plugin(
        "benefit-change",
        "validator",
        Path::new(pde_plugin_artifacts::BENEFIT_CHANGE),
        "[settings]\ntoday = \"2031-03-01\"\ncategories = [\"eligibility\"]\n",
        true,
    );
    ws.commit("benefit-change");
    let b = checkout(&ws);
    let b = b.path().join("b");
    let a = pde(
        ws.root(),
        &["deploy", "42", "--env", "dev", "--output", "json"],
    );
    assert_eq!(code(&a), 0, "{}", stderr(&a));
    let digest = json(&a)["digest"].as_str().unwrap().to_string();

    // B raises the version and cuts the income limit by half, effective in
    // 2099: enough notice, so it passes, judged against A's version.
    let mut v2 = support::policy_42("1.1.0");
    v2["rules"][1]["value"] = 21000.into();
    std::fs::write(b.join("policies/42.json"), v2.to_string()).unwrap();
    let o = pde(&b, &["validate", "42", "--env", "dev", "--output", "json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let report = json(&o);
    assert_eq!(report["active"]["version"], "1.0.0", "{report}");
    assert_eq!(report["active"]["digest"], digest.as_str());
    assert!(report["active"].get("document").is_none(), "{report}");
    let compared: Vec<&str> = report["diagnostics"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["code"] == "benefit-change.compared")
        .map(|d| d["message"].as_str().unwrap())
        .collect();
    assert_eq!(compared.len(), 1, "{report}");
    assert!(compared[0].contains(&digest), "{}", compared[0]);
    assert!(
        !b.join(".pde/dist").exists(),
        "B's checkout had no bundle of its own"
    );
    // Too little notice for that cut, and B is refused by A's version.
    v2["effective"] = "2031-04-01".into();
    std::fs::write(b.join("policies/42.json"), v2.to_string()).unwrap();
    let o = pde(&b, &["validate", "42", "--env", "dev"]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
}

/// Points the workspace (whose `pde.toml` is `toml`) at a fresh database,
/// commits that, and runs `pde state migrate --from sqlite`: the database
/// URL and the report.
fn migrate_to_a_fresh_database(ws: &Workspace, toml: &str) -> (String, serde_json::Value) {
    let db = pg::fresh_database();
    std::fs::write(
        ws.root().join("pde.toml"),
        toml.replace("state = \".pde\"\n", &shared_state(&db)),
    )
    .unwrap();
    ws.commit("shared state");
    let o = pde(
        ws.root(),
        &["state", "migrate", "--from", "sqlite", "--output", "json"],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    (db, json(&o))
}

#[test]
fn a_sqlite_workspace_migrates_with_its_chain_intact() {
    let ws = Workspace::new("");
    let api = ws.agent("api");
    let toml = std::fs::read_to_string(ws.root().join("pde.toml")).unwrap()
        + &env_with("dev", "", &[("HMS-API", &api)]);
    std::fs::write(ws.root().join("pde.toml"), &toml).unwrap();
    ws.commit("init");
    let o = pde(ws.root(), &["deploy", "42", "--env", "dev"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let file_log = std::fs::read(ws.root().join(".pde/audit.jsonl")).unwrap();
    let history_before = json(&pde(ws.root(), &["history", "42", "--output", "json"]));
    assert_eq!(history_before[0]["outcome"], "deployed");

    let (_, report) = migrate_to_a_fresh_database(&ws, &toml);
    assert_eq!(report["deployments"], 1);
    assert_eq!(report["bundles"], 1, "{report}");
    assert!(report["audit_records"].as_u64().unwrap() >= 8, "{report}");

    // The same bytes, the same history, and a verified chain (release tag
    // anchors and the signed head included).
    let export = pde(ws.root(), &["audit", "export"]);
    assert_eq!(code(&export), 0, "{}", stderr(&export));
    assert_eq!(export.stdout, file_log);
    let o = pde(ws.root(), &["audit", "verify", "--output", "json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let verified = json(&o);
    assert_eq!(verified["head_signature"], "valid");
    assert!(verified["anchors_checked"].as_u64().unwrap() >= 1);
    let history_after = json(&pde(ws.root(), &["history", "42", "--output", "json"]));
    assert_eq!(history_after, history_before);
    // A second migration would duplicate history: refused.
    let o = pde(ws.root(), &["state", "migrate", "--from", "sqlite"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    // The chain continues in the database after the migrated records.
    let mut p = support::policy_42("1.1.0");
    p["id"] = "42".into();
    ws.write_policy("42.json", &p.to_string());
    ws.commit("1.1.0");
    let o = pde(ws.root(), &["deploy", "42", "--env", "dev"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(code(&pde(ws.root(), &["audit", "verify"])), 0);
}

/// Issue 21 item 8 (the red team's case): a first deploy killed mid-push
/// leaves no `active` row in SQLite, only an in-progress record. Migrating
/// must not invent an active version out of it (an entry with an empty
/// version and digest), or every validation of the policy afterwards fails
/// with `active.unavailable` (exit 3).
#[test]
fn an_interrupted_first_deploy_migrates_as_interrupted_not_as_active() {
    let slow = Receiver::start(Fault::None);
    let ws = Workspace::new("");
    let toml = std::fs::read_to_string(ws.root().join("pde.toml")).unwrap()
        + &env_with("dev", "", &[("HMS-API", &slow.url)]);
    let toml = toml.replace("timeout_ms = 1500", "timeout_ms = 6000");
    std::fs::write(ws.root().join("pde.toml"), &toml).unwrap();
    // A pde:plugin@0.2.0 validator, which is shown the active version: an
    // active row whose bundle cannot be read fails validation for it.
    let artifact = std::path::PathBuf::from(pde_plugin_artifacts::wasm("benefit-change").unwrap());
    ws.install_plugin(
        "benefit-change",
        "validator",
        &artifact,
        "[settings]\ntoday = \"2031-03-01\"\n",
        true,
    );
    ws.commit("init");
    let history = kill_mid_push(&ws, &slow, "dev");
    let o = pde(ws.root(), &["validate", "42", "--env", "dev"]);
    assert_eq!(code(&o), 0, "before the migration: {}", stderr(&o));

    let (db, report) = migrate_to_a_fresh_database(&ws, &toml);

    // The red team's probe: validation against dev has no active version
    // to compare with, as before the migration.
    let v = pde(ws.root(), &["validate", "42", "--env", "dev"]);
    assert_eq!(
        code(&v),
        0,
        "after the migration: {}{}",
        String::from_utf8_lossy(&v.stdout),
        stderr(&v)
    );
    assert_eq!(report["deployments"], 1, "{report}");
    assert_eq!(report["active"], 0, "nothing was ever active: {report}");
    assert_eq!(
        pg::psql(pg::database_of(&db), "SELECT count(*) FROM active").trim(),
        "0"
    );
    let history_after = json(&pde(ws.root(), &["history", "42", "--output", "json"]));
    assert_eq!(history_after, history);
    let status = json(&pde(ws.root(), &["status", "--output", "json"]));
    assert_eq!(status.as_array().unwrap().len(), 1, "{status}");
    assert_eq!(
        status[0]["interrupted"]["outcome"], "interrupted",
        "{status}"
    );
    assert_eq!(status[0]["version"], "", "{status}");

    // And the next deploy settles it on the shared state.
    slow.set_fault(Fault::None);
    let o = pde(ws.root(), &["deploy", "42", "--env", "dev"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let history = json(&pde(ws.root(), &["history", "42", "--output", "json"]));
    assert_eq!(history[0]["outcome"], "deployed", "{history}");
    assert_eq!(history[1]["outcome"], "interrupted", "{history}");
}

#[test]
fn a_database_with_a_newer_schema_is_refused_with_exit_2() {
    let db = pg::fresh_database();
    let ws = team_workspace(&db, "");
    let o = pde(ws.root(), &["status", "--output", "json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        pg::psql(pg::database_of(&db), "SELECT version FROM pde_schema").trim(),
        pde::state::postgres::schema_version().to_string()
    );
    pg::psql(pg::database_of(&db), "UPDATE pde_schema SET version = 99");
    let o = pde(ws.root(), &["status"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("schema version 99"), "{}", stderr(&o));
}

/// Databases in the field keep working: one written by the pde of issue 12
/// (`pde_schema.version` 1, its first migration: history, services, leases
/// and the audit chain at once) opens, gains the later steps, and reads as
/// before; the stored version stays in the numbers older pde reads.
#[test]
fn a_database_of_an_older_pde_is_migrated_from_where_it_stopped() {
    let db = pg::fresh_database();
    pg::psql(
        pg::database_of(&db),
        "CREATE TABLE pde_schema (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL);
         INSERT INTO pde_schema VALUES (1, 1);
         CREATE TABLE deployments (id BIGSERIAL PRIMARY KEY, policy_id TEXT NOT NULL,
             env TEXT NOT NULL, version TEXT NOT NULL, digest TEXT NOT NULL,
             outcome TEXT NOT NULL, started_at TEXT NOT NULL, finished_at TEXT NOT NULL,
             actor TEXT NOT NULL);
         CREATE INDEX deployments_by_policy ON deployments (policy_id, id);
         CREATE INDEX deployments_by_digest ON deployments (env, policy_id, digest, outcome);
         CREATE TABLE targets (id BIGSERIAL PRIMARY KEY,
             deployment_id BIGINT NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
             service TEXT NOT NULL, outcome TEXT NOT NULL, previous_digest TEXT,
             detail TEXT NOT NULL);
         CREATE INDEX targets_by_deployment ON targets (deployment_id, id);
         CREATE TABLE active (policy_id TEXT NOT NULL, env TEXT NOT NULL,
             version TEXT NOT NULL, digest TEXT NOT NULL, deployed_at TEXT NOT NULL,
             PRIMARY KEY (policy_id, env));
         CREATE TABLE service_active (policy_id TEXT NOT NULL, env TEXT NOT NULL,
             service TEXT NOT NULL, version TEXT, digest TEXT, updated_at TEXT NOT NULL,
             PRIMARY KEY (policy_id, env, service));
         CREATE TABLE leases (policy_id TEXT NOT NULL, env TEXT NOT NULL,
             holder TEXT NOT NULL, host TEXT NOT NULL, pid BIGINT NOT NULL,
             since TEXT NOT NULL, PRIMARY KEY (policy_id, env));
         CREATE TABLE audit_log (seq BIGINT PRIMARY KEY, line TEXT NOT NULL);
         CREATE TABLE audit_head (id INTEGER PRIMARY KEY CHECK (id = 1), head TEXT);
         INSERT INTO audit_head (id, head) VALUES (1, NULL);
         CREATE TABLE audit_sink_cursor (id INTEGER PRIMARY KEY CHECK (id = 1),
             cursor BIGINT NOT NULL);
         INSERT INTO audit_sink_cursor (id, cursor) VALUES (1, 0);
         INSERT INTO deployments (policy_id, env, version, digest, outcome, started_at,
             finished_at, actor)
             VALUES ('42', 'dev', '1.0.0', 'sha256:aa', 'deployed', 't0', 't1', 'ana');
         INSERT INTO active VALUES ('42', 'dev', '1.0.0', 'sha256:aa', 't1');",
    );
    let target = PgTarget::with_password(&db, Some(&pg::server().password)).unwrap();
    let s = PgState::open(target).unwrap();
    assert_eq!(
        pg::psql(pg::database_of(&db), "SELECT version FROM pde_schema").trim(),
        pde::state::postgres::schema_version().to_string(),
        "stored as every pde stores its newest schema: one less than the steps (5: fences, 6: rollouts)"
    );
    assert_eq!(s.history("42").unwrap()[0].digest, "sha256:aa");
    assert_eq!(s.active("42", "dev").unwrap().unwrap().version, "1.0.0");
    s.put_bundle("sha256:aa", b"{}").unwrap();
    assert_eq!(s.bundle("sha256:aa").unwrap().as_deref(), Some(&b"{}"[..]));
    let id = s
        .begin(&record("42", "dev", "sha256:bb", RecordOutcome::Deployed))
        .unwrap();
    assert_eq!(s.in_progress(Some("dev")).unwrap()[0].id, Some(id));
    // Opening it again changes nothing.
    let target = PgTarget::with_password(&db, Some(&pg::server().password)).unwrap();
    drop(PgState::open(target).unwrap());
    assert_eq!(
        pg::psql(pg::database_of(&db), "SELECT version FROM pde_schema").trim(),
        pde::state::postgres::schema_version().to_string()
    );
}

#[test]
fn the_password_comes_only_from_the_named_variable_and_is_never_shown() {
    let db = pg::fresh_database();
    let ws = team_workspace(&db, "");
    let o = command(ws.root(), &["status", "-vvv"])
        .env_remove(pg::PASSWORD_ENV)
        .output()
        .unwrap();
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains(pg::PASSWORD_ENV), "{}", stderr(&o));
    let o = pde(ws.root(), &["status", "-vvv"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let password = &pg::server().password;
    assert!(!stderr(&o).contains(password.as_str()));
    assert!(!String::from_utf8_lossy(&o.stdout).contains(password.as_str()));
    // A password in the URL itself is refused.
    let toml = std::fs::read_to_string(ws.root().join("pde.toml")).unwrap();
    std::fs::write(
        ws.root().join("pde.toml"),
        toml.replace("postgres://postgres@", "postgres://postgres:hunter2@"),
    )
    .unwrap();
    let o = pde(ws.root(), &["status"]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("password_env"), "{}", stderr(&o));
}

/// Deploys policy 42 to `env`, whose one service `slow` hangs on the push,
/// and kills the deploy there; returns `pde history 42` once the dead
/// deploy's record reads as interrupted.
fn kill_mid_push(ws: &Workspace, slow: &Receiver, env: &str) -> serde_json::Value {
    slow.set_fault(Fault::Hang);
    let before = slow.deploys();
    let mut a = spawn(ws.root(), &["deploy", "42", "--env", env]);
    wait_until("the push to arrive", || slow.deploys() > before);
    a.kill().unwrap();
    a.wait().unwrap();
    let mut history = serde_json::Value::Null;
    wait_until("the dead deploy's lock to be freed", || {
        history = json(&pde(ws.root(), &["history", "42", "--output", "json"]));
        history[0]["outcome"] != "in-progress"
    });
    assert_eq!(history[0]["outcome"], "interrupted", "{history}");
    history
}

/// A deploy killed mid-push shows as interrupted in `status` and `history`,
/// with what each service was last known to run; the next deploy settles it
/// with a verified outcome.
fn an_interrupted_deploy_is_shown_then_settled(db: Option<&str>) {
    let slow = Receiver::start(Fault::None);
    let ws = Workspace::new("");
    let toml = std::fs::read_to_string(ws.root().join("pde.toml")).unwrap()
        + &env_with("production", "", &[("HMS-API", &slow.url)]);
    let toml = match db {
        Some(db) => toml.replace("state = \".pde\"\n", &shared_state(db)),
        None => toml,
    }
    .replace("timeout_ms = 1500", "timeout_ms = 6000");
    std::fs::write(ws.root().join("pde.toml"), toml).unwrap();
    ws.commit("init");
    let o = pde(
        ws.root(),
        &["deploy", "42", "--env", "production", "--output", "json"],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v1 = json(&o)["digest"].as_str().unwrap().to_string();

    // v1.1.0's push hangs at the service; the deploy is killed there.
    ws.write_policy("42.json", &support::policy_42("1.1.0").to_string());
    ws.commit("1.1.0");
    let history = kill_mid_push(&ws, &slow, "production");
    assert_eq!(history[0]["version"], "1.1.0");
    assert_eq!(history[1]["outcome"], "deployed");
    let status = json(&pde(ws.root(), &["status", "--output", "json"]));
    let entry = &status[0];
    assert_eq!(entry["interrupted"]["version"], "1.1.0", "{status}");
    assert_eq!(entry["interrupted"]["outcome"], "interrupted");
    assert_eq!(entry["version"], "1.0.0", "still the last verified release");
    assert_eq!(entry["services"][0]["service"], "HMS-API");
    assert_eq!(entry["services"][0]["digest"], v1.as_str(), "last known");
    let text = String::from_utf8(pde(ws.root(), &["status"]).stdout).unwrap();
    assert!(text.contains("INTERRUPTED"), "{text}");

    // The next deploy settles it: pushed, verified, and the history says so.
    slow.set_fault(Fault::None);
    let o = pde(
        ws.root(),
        &["deploy", "42", "--env", "production", "--output", "json"],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v2 = json(&o)["digest"].as_str().unwrap().to_string();
    assert_eq!(slow.active_digest_of("42").as_deref(), Some(v2.as_str()));
    let history = json(&pde(ws.root(), &["history", "42", "--output", "json"]));
    let outcomes: Vec<_> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["deployed", "interrupted", "deployed"]);
    let status = json(&pde(ws.root(), &["status", "--output", "json"]));
    assert!(status[0].get("interrupted").is_none(), "{status}");
    assert_eq!(status[0]["digest"], v2.as_str());
    assert_eq!(code(&pde(ws.root(), &["audit", "verify"])), 0);
}

#[test]
fn an_interrupted_deploy_is_shown_then_settled_on_sqlite() {
    an_interrupted_deploy_is_shown_then_settled(None);
}

#[test]
fn an_interrupted_deploy_is_shown_then_settled_on_postgres() {
    an_interrupted_deploy_is_shown_then_settled(Some(&pg::fresh_database()));
}

/// An audit sink on loopback that keeps what it takes.
fn start_sink() -> (
    std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    String,
) {
    use axum::routing::post;
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let store = got.clone();
    let app = axum::Router::new().route(
        "/audit",
        post(move |axum::Json(v): axum::Json<serde_json::Value>| {
            let store = store.clone();
            async move {
                store.lock().unwrap().push(v);
                axum::http::StatusCode::ACCEPTED
            }
        }),
    );
    let rt = support::runtime();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move { axum::serve(listener, app).await });
    (got, format!("http://{addr}/audit"))
}

#[test]
fn the_sink_gets_every_record_of_the_shared_chain_exactly_once_across_machines() {
    let db = pg::fresh_database();
    let (got, sink) = start_sink();
    let ws = team_workspace_with(&db, |ws| {
        env_with("dev", "", &[("HMS-API", &ws.agent("api"))])
            + &format!("[audit]\nsink_url = \"{sink}\"\nsink_flush_ms = 5000\n")
    });
    let b = checkout(&ws);
    let b = b.path().join("b");

    let a = spawn(ws.root(), &["deploy", "42", "--env", "dev"]);
    let bb = spawn(&b, &["deploy", "43", "--env", "dev"]);
    let (a, bb) = (
        a.wait_with_output().unwrap(),
        bb.wait_with_output().unwrap(),
    );
    assert_eq!(code(&a), 0, "{}", stderr(&a));
    assert_eq!(code(&bb), 0, "{}", stderr(&bb));
    // Any later run on any machine forwards what is still pending.
    assert_eq!(code(&pde(&b, &["audit", "verify"])), 0);

    let export = pde(ws.root(), &["audit", "export"]);
    let chain: Vec<serde_json::Value> = String::from_utf8(export.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(chain.len() >= 16, "two deploys' records: {}", chain.len());
    let got = got.lock().unwrap().clone();
    let seqs: Vec<u64> = got.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=chain.len() as u64).collect::<Vec<_>>(),
        "each record once, in order"
    );
    assert_eq!(got, chain, "the sink holds the chain's records, unchanged");
}
