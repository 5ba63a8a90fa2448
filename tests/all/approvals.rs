//! Signed approvals (issue 11, part 2): `pde approve`, counting per distinct
//! trusted key over the policy's content digest, the bundle carrying them,
//! and an agent that re-checks them. Real `pde` processes, real agents on
//! loopback, real Git repositories.
// Test code: a failed unwrap is a failed test, with its location.

use crate::support;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Output;

use pde::approval::{self, SignedApproval, Statement};
use pde::bundle::{self, Bundle, Manifest, Payload};
use pde::keys;
use serde_json::{Value, json};
use support::{AgentProcess, Svc, Workspace, both, code, pde, policy_42};

/// Codes of the diagnostics in a `pde validate --output json` answer (the
/// report of a failure, or of a pass).
fn diagnostic_codes(o: &Output) -> Vec<String> {
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", both(o)));
    let diags = v
        .pointer("/report/diagnostics")
        .or_else(|| v.pointer("/diagnostics"))
        .unwrap_or_else(|| panic!("no diagnostics in {v}"));
    diags
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["code"].as_str().unwrap().to_string())
        .collect()
}

/// Three approvers: ana (trusted for legal), bo (trusted for program) and
/// carol (not trusted).
struct Approvers {
    dir: PathBuf,
}

impl Approvers {
    fn new(root: &Path) -> Approvers {
        let dir = root.join("keys/approvers");
        for name in ["ana", "bo", "carol"] {
            keys::generate(&dir, name).unwrap();
        }
        Approvers { dir }
    }
    fn secret(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    fn public(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pub"))
    }
    fn key(&self, name: &str) -> ed25519_dalek::SigningKey {
        keys::load_signing_key(&self.secret(name)).unwrap()
    }
    fn keyid(&self, name: &str) -> String {
        keys::key_id(&self.key(name).verifying_key())
    }
    /// `pde approve 42 --key <name's key> EXTRA…`, which must succeed.
    fn approve(&self, ws: &Workspace, name: &str, extra: &[&str]) -> Output {
        let key = self.secret(name);
        let mut args = vec!["approve", "42", "--key", key.to_str().unwrap()];
        args.extend_from_slice(extra);
        let o = pde(ws.root(), &args);
        assert_eq!(code(&o), 0, "{}", both(&o));
        o
    }

    fn sign(&self, name: &str, policy: &Value, role: Option<&str>) -> SignedApproval {
        SignedApproval::sign(
            Statement {
                format: approval::FORMAT.into(),
                policy_id: policy["id"].as_str().unwrap().into(),
                version: policy["version"].as_str().unwrap().into(),
                policy_digest: approval::policy_digest(policy).unwrap(),
                by: name.into(),
                role: role.map(str::to_string),
                note: None,
                at: "2026-11-29T12:00:00Z".into(),
            },
            &self.key(name),
        )
        .unwrap()
    }
}

/// Adds `[trust] approver_keys` for ana (legal) and bo (program).
fn trust_approvers(ws: &Workspace) {
    let path = ws.root().join("pde.toml");
    let toml = std::fs::read_to_string(&path).unwrap().replace(
        "plugin_keys = [\"keys/security.ed25519.pub\"]\n",
        "plugin_keys = [\"keys/security.ed25519.pub\"]\n\
         approver_keys = [\n  { file = \"keys/approvers/ana.pub\", roles = [\"legal\"] },\n  \
         { file = \"keys/approvers/bo.pub\", roles = [\"program\"] },\n]\n",
    );
    std::fs::write(path, toml).unwrap();
}

fn approvals_dir(ws: &Workspace) -> PathBuf {
    ws.root().join("policies/42.approvals")
}

#[test]
fn approvals_are_signed_bound_to_the_content_and_counted_per_distinct_trusted_key() {
    let data = tempfile::tempdir().unwrap();
    let ws = Workspace::new(&format!(
        "{}{}",
        Workspace::env_toml(
            "prod",
            "min_approvals = 2\nrequired_roles = [\"legal\"]\nrequire_signed_approvals = true",
            &[]
        ),
        Workspace::env_toml("staging", "min_approvals = 2", &[]),
    ));
    let people = Approvers::new(ws.root());
    trust_approvers(&ws);
    ws.commit("workspace");

    // Unsigned entries still count where signatures are not required…
    let o = pde(ws.root(), &["validate", "42", "--env", "staging"]);
    assert_eq!(code(&o), 0, "{}", both(&o));
    // …and not in production, which also wants a legal sign-off.
    let o = pde(
        ws.root(),
        &["--output", "json", "validate", "42", "--env", "prod"],
    );
    assert_eq!(code(&o), 3, "{}", both(&o));
    let codes = diagnostic_codes(&o);
    for want in [
        "approvals.insufficient",
        "approvals.role-missing",
        "approvals.unsigned-ignored",
    ] {
        assert!(codes.iter().any(|c| c == want), "{want} missing: {codes:?}");
    }

    // ana approves as legal: one of two.
    people.approve(
        &ws,
        "ana",
        &["--role", "legal", "--by", "ana", "--note", "reviewed"],
    );
    let ana_file = approvals_dir(&ws).join(format!("{}.json", people.keyid("ana")));
    let written: SignedApproval =
        serde_json::from_slice(&std::fs::read(&ana_file).unwrap()).unwrap();
    assert_eq!(written.statement.role.as_deref(), Some("legal"));
    assert_eq!(written.statement.note.as_deref(), Some("reviewed"));
    assert_eq!(
        written.statement.policy_digest,
        approval::policy_digest(&policy_42("1.0.0")).unwrap()
    );

    // A duplicate of ana's approval, carol's (untrusted) approval, and a
    // forgery: carol's signature under bo's key id. None may count.
    std::fs::copy(&ana_file, approvals_dir(&ws).join("copy-of-ana.json")).unwrap();
    let o = people.approve(&ws, "carol", &["--role", "legal"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not in [trust] approver_keys"),
        "{}",
        both(&o)
    );
    let mut forged = people.sign("carol", &policy_42("1.0.0"), Some("program"));
    forged.signature.keyid = people.keyid("bo");
    forged.statement.by = "bo".into();
    std::fs::write(
        approvals_dir(&ws).join("forged.json"),
        serde_json::to_vec(&forged).unwrap(),
    )
    .unwrap();
    let o = pde(
        ws.root(),
        &["--output", "json", "validate", "42", "--env", "prod"],
    );
    assert_eq!(code(&o), 3, "{}", both(&o));
    let codes = diagnostic_codes(&o);
    assert!(
        codes.contains(&"approvals.duplicate".to_string()),
        "{codes:?}"
    );
    assert_eq!(
        codes.iter().filter(|c| *c == "approvals.untrusted").count(),
        2,
        "carol's and the forgery: {codes:?}"
    );
    assert!(
        codes.contains(&"approvals.insufficient".to_string()),
        "{codes:?}"
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("has 1 valid approval"),
        "{}",
        both(&o)
    );
    std::fs::remove_file(approvals_dir(&ws).join("forged.json")).unwrap();
    std::fs::remove_file(approvals_dir(&ws).join("copy-of-ana.json")).unwrap();

    // bo approves: two distinct trusted keys, legal among them.
    people.approve(&ws, "bo", &["--role", "program", "--by", "bo"]);
    let o = pde(ws.root(), &["validate", "42", "--env", "prod"]);
    assert_eq!(code(&o), 0, "{}", both(&o));

    // Approvals are committed with the policy, or nothing is packaged.
    let o = pde(ws.root(), &["package", "42"]);
    assert_eq!(code(&o), 2, "{}", both(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("42.approvals"),
        "{}",
        both(&o)
    );
    ws.commit("approvals of 42");

    // The bundle carries the two counted approvals (not carol's), and an
    // agent that requires two approvals by ana and bo activates it.
    let agent = AgentProcess::start_with(
        &data.path().join("prod"),
        &ws.release_pub(),
        &[
            OsStr::new("--min-approvals"),
            OsStr::new("2"),
            OsStr::new("--approver-key"),
            people.public("ana").as_os_str(),
            OsStr::new("--approver-key"),
            people.public("bo").as_os_str(),
        ],
    );
    set_services(&ws, "prod", &agent.url);
    ws.commit("prod service");
    let o = pde(
        ws.root(),
        &["--output", "json", "deploy", "42", "--env", "prod"],
    );
    assert_eq!(code(&o), 0, "{}", both(&o));
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    let digest = report["digest"].as_str().unwrap().to_string();
    assert_eq!(
        support::active_digest(&agent.url).as_deref(),
        Some(digest.as_str())
    );
    let bundle_path = report["bundle_path"].as_str().unwrap();
    let bundle = Bundle::from_slice(&std::fs::read(bundle_path).unwrap()).unwrap();
    let mut carried: Vec<&str> = bundle.approvals.iter().map(|a| a.keyid()).collect();
    carried.sort();
    let mut expected = vec![people.keyid("ana"), people.keyid("bo")];
    expected.sort();
    assert_eq!(carried, expected);

    // The audit log records who approved which content digest.
    let audit = std::fs::read_to_string(ws.root().join(".pde/audit.jsonl")).unwrap();
    let validated: Value = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|r| r["event"] == "validated")
        .unwrap();
    let content = approval::policy_digest(&policy_42("1.0.0")).unwrap();
    assert_eq!(validated["data"]["policy_digest"], json!(content));
    let recorded: Vec<(String, String, Value)> = validated["data"]["approvals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["keyid"].as_str().unwrap().to_string(),
                a["policy_digest"].as_str().unwrap().to_string(),
                a["role"].clone(),
            )
        })
        .collect();
    assert_eq!(recorded.len(), 2, "{validated}");
    assert!(recorded.contains(&(people.keyid("ana"), content.clone(), json!("legal"))));
    assert!(recorded.contains(&(people.keyid("bo"), content.clone(), json!("program"))));

    // Any edit after approval invalidates every approval, and says so.
    let mut edited = policy_42("1.1.0");
    edited["rules"][1]["value"] = json!(99000);
    ws.write_policy("42.json", &edited.to_string());
    ws.commit("raise the income limit");
    let o = pde(
        ws.root(),
        &["--output", "json", "validate", "42", "--env", "prod"],
    );
    assert_eq!(code(&o), 3, "{}", both(&o));
    let codes = diagnostic_codes(&o);
    assert_eq!(
        codes.iter().filter(|c| *c == "approvals.stale").count(),
        2,
        "{codes:?}"
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("edited after it was approved"),
        "{}",
        both(&o)
    );
    let o = pde(ws.root(), &["deploy", "42", "--env", "prod"]);
    assert_eq!(code(&o), 3, "{}", both(&o));
    assert_eq!(
        support::active_digest(&agent.url).as_deref(),
        Some(digest.as_str())
    );
}

/// Points every service of `env` at `url` (one service, `HMS-API`).
fn set_services(ws: &Workspace, env: &str, url: &str) {
    let path = ws.root().join("pde.toml");
    let mut toml = std::fs::read_to_string(&path).unwrap();
    toml.push_str(&format!(
        "[[environments.{env}.services]]\nname = \"HMS-API\"\nurl = \"{url}\"\ntags = [\"api\"]\n"
    ));
    std::fs::write(path, toml).unwrap();
}

fn sealed(format: &str, policy: Value, approvals: Vec<SignedApproval>) -> Bundle {
    let release = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    let mut b = Bundle::seal_as(
        format,
        Payload {
            manifest: Manifest {
                policy_id: "42".into(),
                version: policy["version"].as_str().unwrap().into(),
                source_commit: "0".repeat(40),
                validators: vec![],
            },
            policy,
        },
        &[&release],
    )
    .unwrap();
    b.approvals = approvals;
    b
}

fn post_deploy(url: &str, bundle: &Bundle) -> (u16, Value) {
    support::runtime().block_on(async {
        let body = json!({"bundle": bundle, "env": "prod"});
        let r = reqwest::Client::new()
            .post(format!("{url}/deploy"))
            .header("Idempotency-Key", format!("{}:prod", bundle.digest))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    })
}

#[test]
fn an_agent_that_requires_approvals_refuses_bundles_without_them() {
    let dir = tempfile::tempdir().unwrap();
    let people = Approvers::new(dir.path());
    let release = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    std::fs::write(
        dir.path().join("release.pub"),
        hex::encode(release.verifying_key().to_bytes()),
    )
    .unwrap();
    let agent = AgentProcess::start_with(
        &dir.path().join("data"),
        &dir.path().join("release.pub"),
        &[
            OsStr::new("--min-approvals"),
            OsStr::new("2"),
            OsStr::new("--approver-key"),
            people.public("ana").as_os_str(),
            OsStr::new("--approver-key"),
            people.public("bo").as_os_str(),
        ],
    );
    let p = policy_42("1.0.0");
    let mut other = p.clone();
    other["rules"][0]["value"] = json!(21);
    let mut forged = people.sign("carol", &p, None);
    forged.signature.keyid = people.keyid("bo");

    let refused = [
        ("no approvals", vec![]),
        (
            "one key twice",
            vec![
                people.sign("ana", &p, None),
                people.sign("ana", &p, Some("legal")),
            ],
        ),
        (
            "an untrusted key",
            vec![people.sign("ana", &p, None), people.sign("carol", &p, None)],
        ),
        (
            "an approval of other content",
            vec![
                people.sign("ana", &p, None),
                people.sign("bo", &other, None),
            ],
        ),
        ("a forgery", vec![people.sign("ana", &p, None), forged]),
    ];
    for (what, approvals) in refused {
        let (status, body) = post_deploy(&agent.url, &sealed(bundle::FORMAT, p.clone(), approvals));
        assert_eq!(status, 403, "{what}: {body}");
        assert_eq!(body["error"], "approvals_insufficient", "{what}: {body}");
        assert_eq!(support::active_digest(&agent.url), None, "{what}");
    }

    let good = sealed(
        bundle::FORMAT,
        p.clone(),
        vec![people.sign("ana", &p, None), people.sign("bo", &p, None)],
    );
    let (status, body) = post_deploy(&agent.url, &good);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        support::active_digest(&agent.url),
        Some(good.digest.clone())
    );
    // The stored bundle keeps its approvals, and still hashes to its digest.
    let stored = support::runtime().block_on(async {
        reqwest::get(format!("{}/bundles?policy_id=42", agent.url))
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    });
    assert!(stored.to_string().contains(&good.digest), "{stored}");

    // A v1 bundle is still accepted, approvals checked the same way.
    let p11 = policy_42("1.1.0");
    let v1 = sealed(
        bundle::FORMAT_V1,
        p11.clone(),
        vec![
            people.sign("ana", &p11, None),
            people.sign("bo", &p11, None),
        ],
    );
    let (status, body) = post_deploy(&agent.url, &v1);
    assert_eq!(status, 200, "{body}");
    assert_eq!(support::active_digest(&agent.url), Some(v1.digest.clone()));

    // And an agent without the requirement takes a v1 bundle with none.
    let plain = AgentProcess::start(&dir.path().join("plain"), &dir.path().join("release.pub"));
    let bare = sealed(bundle::FORMAT_V1, p11, vec![]);
    let (status, body) = post_deploy(&plain.url, &bare);
    assert_eq!(status, 200, "{body}");
}

#[test]
fn a_pusher_that_skips_approvals_is_stopped_by_the_agent() {
    // The workspace asks for no approvals (as a compromised or misconfigured
    // pusher would); the service does, so nothing is activated.
    let scratch = tempfile::tempdir().unwrap();
    let people = Approvers::new(scratch.path());
    let data = tempfile::tempdir().unwrap();
    let ws = Workspace::new("");
    let agent = AgentProcess::start_with(
        &data.path().join("a"),
        &ws.release_pub(),
        &[
            OsStr::new("--min-approvals"),
            OsStr::new("1"),
            OsStr::new("--approver-key"),
            people.public("ana").as_os_str(),
        ],
    );
    let envs = Workspace::env_toml(
        "dev",
        "",
        &[Svc {
            name: "HMS-API",
            url: agent.url.clone(),
            tags: &["api"],
        }],
    );
    let path = ws.root().join("pde.toml");
    let mut toml = std::fs::read_to_string(&path).unwrap();
    toml.push_str(&envs);
    std::fs::write(&path, toml).unwrap();
    ws.commit("dev");
    let o = pde(ws.root(), &["deploy", "42", "--env", "dev"]);
    assert_eq!(code(&o), 1, "{}", both(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("approvals_insufficient")
            || String::from_utf8_lossy(&o.stdout).contains("approvals_insufficient"),
        "{}",
        both(&o)
    );
    assert_eq!(support::active_digest(&agent.url), None);
}

/// Issue 26 §1: build once, promote the artifact. Approvals and unrelated
/// commits made after staging do not change what production receives: the
/// very digest staging runs. A change of content under the same version is
/// still refused, naming what changed.
#[test]
fn production_receives_the_digest_staging_runs_after_unrelated_commits_and_approvals() {
    let data = tempfile::tempdir().unwrap();
    let ws = Workspace::new("");
    let staging = AgentProcess::start(&data.path().join("staging"), &ws.release_pub());
    let prod = AgentProcess::start(&data.path().join("prod"), &ws.release_pub());
    let envs = Workspace::env_toml(
        "staging",
        "",
        &[Svc {
            name: "API",
            url: staging.url.clone(),
            tags: &["api"],
        }],
    ) + &Workspace::env_toml(
        "production",
        "promote_from = \"staging\"\nmin_approvals = 1\nrequire_signed_approvals = true",
        &[Svc {
            name: "API",
            url: prod.url.clone(),
            tags: &["api"],
        }],
    );
    let toml = ws.root().join("pde.toml");
    let mut text = std::fs::read_to_string(&toml).unwrap();
    text.push_str(&envs);
    std::fs::write(&toml, text).unwrap();
    let people = Approvers::new(ws.root());
    trust_approvers(&ws);
    ws.install_examples();
    ws.commit("workspace");

    let o = pde(
        ws.root(),
        &["--output", "json", "deploy", "42", "--env", "staging"],
    );
    assert_eq!(code(&o), 0, "{}", both(&o));
    let staged: Value = serde_json::from_slice(&o.stdout).unwrap();
    let digest = staged["digest"].as_str().unwrap().to_string();

    // An unrelated commit, then the approval production needs.
    std::fs::write(ws.root().join("NOTES.md"), "release notes\n").unwrap();
    ws.commit("unrelated");
    people.approve(&ws, "ana", &["--role", "legal"]);
    ws.commit("legal approval of 42");

    // The plan names the staging bundle it will promote.
    let o = pde(ws.root(), &["plan", "42", "--env", "production"]);
    assert_eq!(code(&o), 0, "{}", both(&o));
    let plan = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        plan.contains(&format!("shipping the bundle staging runs, {digest}")),
        "{plan}"
    );

    // Staging again: the same artifact, already active there.
    let o = pde(
        ws.root(),
        &["--output", "json", "deploy", "42", "--env", "staging"],
    );
    assert_eq!(code(&o), 0, "{}", both(&o));
    let again: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(again["digest"], digest.as_str());
    assert_eq!(again["already_active"], true);

    let o = pde(
        ws.root(),
        &["--output", "json", "deploy", "42", "--env", "production"],
    );
    assert_eq!(code(&o), 0, "{}", both(&o));
    let promoted: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(promoted["digest"], digest.as_str(), "{promoted}");
    assert_eq!(promoted["artifact"]["reused_from"], "staging");
    assert_eq!(
        promoted["artifact"]["source_commit"],
        staged["artifact"]["source_commit"]
    );
    assert_eq!(
        support::active_digest_of(&prod.url, "42"),
        Some(digest.clone())
    );
    // The shipped bundle carries the approval that was added after staging.
    let shipped = std::fs::read(promoted["bundle_path"].as_str().unwrap()).unwrap();
    let shipped = Bundle::from_slice(&shipped).unwrap();
    assert_eq!(shipped.digest, digest);
    assert_eq!(shipped.approvals.len(), 1);
    assert_eq!(shipped.approvals[0].signature.keyid, people.keyid("ana"));

    // New content under the same version: refused, naming what changed.
    let mut doc = policy_42("1.0.0");
    doc["rules"][0]["value"] = json!(99);
    ws.write_policy("42.json", &doc.to_string());
    ws.commit("same version, other rules");
    for env in ["staging", "production"] {
        if env == "production" {
            // Production validates approvals first: approve the new content.
            people.approve(&ws, "ana", &["--role", "legal"]);
            ws.commit("legal approval of the new rules");
        }
        let o = pde(ws.root(), &["deploy", "42", "--env", env]);
        assert_eq!(code(&o), 3, "{env}: {}", both(&o));
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(
            err.contains("the policy's content changed (rules)") && err.contains(&digest),
            "{env}: {err}"
        );
    }
}

/// Issue 21 gap: an agent restarted with another approver set re-checks the
/// approvals of what it serves, as it re-checks signatures: the active
/// bundle no longer approved by the keys trusted now is not served, the
/// policy falls back to the newest earlier activation that is, `/healthz`
/// names the problem, and the first approver set brings it back.
#[test]
fn an_agent_restarted_with_other_approvers_re_checks_what_it_serves() {
    let dir = tempfile::tempdir().unwrap();
    let people = Approvers::new(dir.path());
    let release = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    let release_pub = dir.path().join("release.pub");
    std::fs::write(
        &release_pub,
        hex::encode(release.verifying_key().to_bytes()),
    )
    .unwrap();
    let data = dir.path().join("data");
    let start = |approvers: &[&str]| {
        let mut args: Vec<std::ffi::OsString> = vec!["--min-approvals".into(), "1".into()];
        for a in approvers {
            args.push("--approver-key".into());
            args.push(people.public(a).into_os_string());
        }
        let args: Vec<&OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        AgentProcess::start_with(&data, &release_pub, &args)
    };
    let health = |url: &str| -> Value {
        support::runtime().block_on(async {
            reqwest::get(format!("{url}/healthz"))
                .await
                .unwrap()
                .json()
                .await
                .unwrap()
        })
    };

    // bo approved 1.0.0, ana approved 1.1.0; both count at first.
    let mut agent = start(&["ana", "bo"]);
    let p10 = policy_42("1.0.0");
    let by_bo = sealed(
        bundle::FORMAT,
        p10.clone(),
        vec![people.sign("bo", &p10, None)],
    );
    let p11 = policy_42("1.1.0");
    let by_ana = sealed(
        bundle::FORMAT,
        p11.clone(),
        vec![people.sign("ana", &p11, None)],
    );
    for b in [&by_bo, &by_ana] {
        let (status, body) = post_deploy(&agent.url, b);
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(
        support::active_digest(&agent.url),
        Some(by_ana.digest.clone())
    );
    agent.stop();

    // Restarted trusting bo's approvals only: 1.1.0 is no longer approved.
    let mut agent = start(&["bo"]);
    assert_eq!(
        support::active_digest(&agent.url),
        Some(by_bo.digest.clone()),
        "the newest activation still approved is served"
    );
    let h = health(&agent.url);
    let problems = h["integrity"].to_string();
    assert!(
        problems.contains(&by_ana.digest) && problems.contains("approval"),
        "{h}"
    );
    agent.stop();

    // Restarted trusting nobody who approved anything: nothing is served.
    let mut agent = start(&["carol"]);
    assert_eq!(support::active_digest(&agent.url), None);
    agent.stop();

    // The first approver set brings 1.1.0 back: nothing was written.
    let agent = start(&["ana", "bo"]);
    assert_eq!(
        support::active_digest(&agent.url),
        Some(by_ana.digest.clone())
    );
    assert!(health(&agent.url).get("integrity").is_none());
}
