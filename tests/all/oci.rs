//! OCI delivery (issue 23) against a real registry (Debian's
//! `docker-registry`, the CNCF distribution registry): `pde deploy`
//! publishes to an environment's registry and waits for real `pde agent
//! --pull` processes to converge; rollback re-points the tag; agents refuse
//! what does not verify and keep their last good bundle; credentials never
//! show.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::prom::Prometheus;
use crate::support::registry::{self, Registry};
use crate::support::{self, Workspace, both, code, json, pde, pde_env, policy_42};

/// A `pde agent --pull` process; killed on drop. Its stderr (the log) goes
/// to a file, so tests can read what it logged.
struct PullAgent {
    child: Child,
    url: String,
    log: PathBuf,
}

impl PullAgent {
    fn start(dir: &Path, trusted: &Path, reference: &str, extra: &[&str]) -> PullAgent {
        std::fs::create_dir_all(dir).unwrap();
        let log = dir.with_extension("log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_pde"))
            .args(["-v", "agent", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.join("data"))
            .arg("--trusted-key")
            .arg(trusted)
            .args(["--pull", reference, "--env", "production"])
            .args(["--interval", "300ms", "--registry-plain-http"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .expect("pde agent starts");
        let mut line = String::new();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        out.read_line(&mut line).unwrap();
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| {
                panic!(
                    "unexpected first line {line:?}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            })
            .to_string();
        PullAgent {
            child,
            url: format!("http://{addr}"),
            log,
        }
    }

    fn healthz(&self) -> serde_json::Value {
        support::runtime().block_on(async {
            reqwest::get(format!("{}/healthz", self.url))
                .await
                .unwrap()
                .json()
                .await
                .unwrap()
        })
    }

    fn metrics(&self) -> String {
        support::runtime().block_on(async {
            reqwest::get(format!("{}/metrics", self.url))
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        })
    }
}

impl Drop for PullAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn policy_43(version: &str) -> String {
    let mut p = policy_42(version);
    p["id"] = "43".into();
    for rule in p["rules"].as_array_mut().unwrap() {
        let key = rule["key"].as_str().unwrap().replace("heating.", "p43.");
        rule["key"] = key.into();
    }
    p.to_string()
}

/// A workspace whose `production` is delivered through `reg`, waiting on
/// `agents` (named s0, s1, …), with policies 42 and 43, committed.
fn workspace(ws: &Workspace, reg: &Registry, agents: &[&PullAgent], extra: &str) {
    let services: Vec<support::Svc> = agents
        .iter()
        .enumerate()
        .map(|(i, a)| support::Svc {
            name: Box::leak(format!("s{i}").into_boxed_str()),
            url: a.url.clone(),
            tags: &["api"],
        })
        .collect();
    let delivery = format!(
        "delivery = {{ kind = \"oci\", reference = \"{}\", plain_http = true, converge_timeout_ms = 30000{extra} }}",
        reg.reference()
    );
    let env = Workspace::env_toml("production", &delivery, &services);
    // Twenty agents and a registry on a shared 2-core machine: health
    // checks get more than the default test workspace's 1.5 s.
    let toml = std::fs::read_to_string(ws.root().join("pde.toml"))
        .unwrap()
        .replace("timeout_ms = 1500", "timeout_ms = 10000")
        + &env;
    std::fs::write(ws.root().join("pde.toml"), toml).unwrap();
    ws.write_policy("43.json", &policy_43("1.0.0"));
    ws.commit("policies 42 and 43, delivered through a registry");
}

fn start_agents(ws: &Workspace, reg: &Registry, n: usize, extra: &[&str]) -> Vec<PullAgent> {
    (0..n)
        .map(|i| {
            PullAgent::start(
                &ws.root().join("agents").join(format!("a{i}")),
                &ws.release_pub(),
                &reg.reference(),
                extra,
            )
        })
        .collect()
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A registry client for the test's own moves (as an attacker, or a hand).
fn client(reg: &Registry) -> pde_core::oci::Registry {
    pde_core::oci::Registry::new(
        reg.reference().parse().unwrap(),
        pde_core::oci::RegistryOptions {
            plain_http: true,
            ..Default::default()
        },
    )
    .unwrap()
}

fn deploy(ws: &Workspace, id: &str) -> serde_json::Value {
    let o = pde(
        ws.root(),
        &["--output", "json", "deploy", id, "--env", "production"],
    );
    assert_eq!(code(&o), 0, "{}", both(&o));
    json(&o)
}

#[test]
fn publish_converge_a_second_policy_and_rollback_with_twenty_pull_agents() {
    let reg = Registry::start();
    let ws = Workspace::new("");
    let agents = start_agents(&ws, &reg, 20, &[]);
    workspace(&ws, &reg, &agents.iter().collect::<Vec<_>>(), "");

    // Publish: every listed agent reports the digest, and pde says so.
    let r1 = deploy(&ws, "42");
    let d1 = r1["digest"].as_str().unwrap().to_string();
    let targets = r1["push"]["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 20);
    assert!(
        targets.iter().all(|t| t["state"] == "delivered"),
        "{targets:#?}"
    );
    let tag_manifest = r1["push"]["registry"]["manifest_digest"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(r1["push"]["registry"]["tag"], "42.production");
    for a in &agents {
        assert_eq!(support::active_digest(&a.url).as_deref(), Some(d1.as_str()));
    }
    // The tag holds what pde says, and agents report it.
    let resolved = support::runtime()
        .block_on(client(&reg).resolve("42.production"))
        .unwrap();
    assert_eq!(resolved.as_deref(), Some(tag_manifest.as_str()));
    let health = agents[0].healthz();
    assert_eq!(health["pull"]["status"], "ok", "{health}");
    assert_eq!(
        health["pull"]["tags"]["42.production"]["digest"], tag_manifest,
        "{health}"
    );
    let metrics = agents[0].metrics();
    assert!(
        metrics.contains(&format!(
            "pde_agent_pull_tag{{tag=\"42.production\",digest=\"{tag_manifest}\"}} 1"
        )),
        "{metrics}"
    );
    assert!(metrics.contains("pde_agent_pull_last_success_timestamp_seconds"));
    // Git tag and audit as for a push.
    assert!(
        ws.tags()
            .contains(&"policy/42/v1.0.0/production".to_string()),
        "{:?}",
        ws.tags()
    );
    let audit = std::fs::read_to_string(ws.root().join(".pde/audit.jsonl")).unwrap();
    assert!(
        audit.contains("\"42.production\""),
        "the pushed record names the tag"
    );
    // `pde status` shows what the tag points at.
    let o = pde(ws.root(), &["--output", "json", "status", "--registry"]);
    assert_eq!(code(&o), 0, "{}", both(&o));
    let tags = json(&o);
    assert_eq!(tags["tags"][0]["tag"], "42.production", "{tags}");
    assert_eq!(tags["tags"][0]["manifest_digest"], tag_manifest.as_str());

    // A second policy through the registry leaves 42 where it was.
    let r43 = deploy(&ws, "43");
    let d43 = r43["digest"].as_str().unwrap().to_string();
    for a in &agents {
        let active = support::active_policies(&a.url);
        assert_eq!(active.get("42"), Some(&d1), "agent {}", a.url);
        assert_eq!(active.get("43"), Some(&d43), "agent {}", a.url);
    }

    // A new version, then rollback: the tag is re-pointed and agents follow.
    ws.write_policy("42.json", &policy_42("1.1.0").to_string());
    ws.commit("42 v1.1.0");
    let r2 = deploy(&ws, "42");
    let d2 = r2["digest"].as_str().unwrap().to_string();
    assert_ne!(d1, d2);
    for a in &agents {
        assert_eq!(support::active_digest(&a.url).as_deref(), Some(d2.as_str()));
    }
    let o = pde(
        ws.root(),
        &["--output", "json", "rollback", "42", "--env", "production"],
    );
    assert_eq!(code(&o), 0, "{}", both(&o));
    for a in &agents {
        assert_eq!(
            support::active_digest(&a.url).as_deref(),
            Some(d1.as_str()),
            "agent {} followed the tag back",
            a.url
        );
    }
    let back = support::runtime()
        .block_on(client(&reg).resolve("42.production"))
        .unwrap();
    assert_eq!(
        back.as_deref(),
        Some(tag_manifest.as_str()),
        "the same release is the same manifest"
    );
    // The rollback's audit record says what moved in the registry, as the
    // deploy's `pushed` record does.
    let m2 = r2["push"]["registry"]["manifest_digest"].as_str().unwrap();
    let audit = std::fs::read_to_string(ws.root().join(".pde/audit.jsonl")).unwrap();
    let rolled: serde_json::Value = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .rfind(|r| r["event"] == "rolled_back")
        .expect("a rolled_back record");
    let moved = &rolled["data"]["registry"];
    assert_eq!(moved["tag"], "42.production", "{rolled:#}");
    assert_eq!(moved["repository"], reg.reference().as_str(), "{rolled:#}");
    assert_eq!(
        moved["manifest_digest"],
        tag_manifest.as_str(),
        "{rolled:#}"
    );
    assert_eq!(moved["previous_manifest_digest"], m2, "{rolled:#}");
    assert_eq!(moved["tag_now"], tag_manifest.as_str(), "{rolled:#}");
}

/// The bundle of `ws`'s policy 42 as `pde package` writes it.
fn package(ws: &Workspace) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    let o = pde(ws.root(), &["package", "42", "-o", out.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", both(&o));
    let file = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "json"))
        .unwrap();
    serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap()
}

fn push_by_hand(reg: &Registry, tag: &str, bundle: &serde_json::Value) -> String {
    let bytes = serde_json::to_vec(bundle).unwrap();
    support::runtime()
        .block_on(client(reg).push_bundle(
            tag,
            &bytes,
            "42",
            bundle["payload"]["manifest"]["version"].as_str().unwrap(),
            bundle["digest"].as_str().unwrap(),
            bundle["format"].as_str().unwrap(),
        ))
        .unwrap()
}

fn last_error(a: &PullAgent) -> String {
    a.healthz()["pull"]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn agents_keep_their_last_good_bundle_through_bad_artifacts_and_a_registry_outage() {
    let mut reg = Registry::start();
    let ws = Workspace::new("");
    let agents = start_agents(&ws, &reg, 3, &[]);
    workspace(&ws, &reg, &agents.iter().collect::<Vec<_>>(), "");
    let d1 = deploy(&ws, "42")["digest"].as_str().unwrap().to_string();
    let good = |a: &PullAgent| support::active_digest(&a.url).as_deref() == Some(d1.as_str());

    // Untrusted: a bundle signed by another release key, pointed at by hand.
    let other = Workspace::new("");
    other.write_policy("42.json", &policy_42("9.0.0").to_string());
    other.commit("someone else's 42");
    let foreign = package(&other);
    push_by_hand(&reg, "42.production", &foreign);
    wait_until(
        "the untrusted artifact to be refused",
        Duration::from_secs(20),
        || agents.iter().all(|a| last_error(a).contains("signature")),
    );
    assert!(agents.iter().all(good), "the last good bundle stays active");
    let health = agents[0].healthz();
    assert_eq!(health["pull"]["status"], "failing", "{health}");
    assert!(agents[0].metrics().contains("pde_agent_pull_failing 1"));

    // Unsigned: the same bundle with its signatures taken off.
    let mut unsigned = package(&ws);
    unsigned["signatures"] = serde_json::json!([]);
    push_by_hand(&reg, "42.production", &unsigned);
    wait_until(
        "the unsigned artifact to be refused",
        Duration::from_secs(20),
        || {
            agents.iter().all(|a| {
                let e = last_error(a);
                e.contains("signature") && !e.contains(foreign["digest"].as_str().unwrap())
            })
        },
    );
    assert!(agents.iter().all(good));

    // A corrupted blob: a validly signed release whose layer is damaged in
    // the registry's storage after the push.
    ws.write_policy("42.json", &policy_42("1.1.0").to_string());
    ws.commit("42 v1.1.0");
    let next = package(&ws);
    let bytes = serde_json::to_vec(&next).unwrap();
    let manifest = push_by_hand(&reg, "scratch", &next);
    let blob = reg.blob_file(&pde_core::oci::sha256_digest(&bytes));
    let mut damaged = std::fs::read(&blob).unwrap();
    let at = damaged.len() / 2;
    damaged[at] ^= 0x20;
    std::fs::write(&blob, damaged).unwrap();
    support::runtime()
        .block_on(client(&reg).retag("42.production", &manifest))
        .unwrap();
    wait_until(
        "the corrupted blob to be refused",
        Duration::from_secs(20),
        || {
            agents.iter().all(|a| {
                let e = last_error(a);
                e.contains(&manifest) && !e.contains("signature")
            })
        },
    );
    assert!(agents.iter().all(good), "nothing unverified is activated");
    let why = last_error(&agents[0]);
    assert!(
        why.to_lowercase().contains("digest"),
        "/healthz says why: {why}"
    );

    // The registry goes away: agents keep serving and say so.
    reg.stop();
    wait_until(
        "agents to notice the outage",
        Duration::from_secs(20),
        || agents.iter().all(|a| !last_error(a).contains(&manifest)),
    );
    assert!(agents.iter().all(good));
    let health = agents[1].healthz();
    assert_eq!(health["pull"]["status"], "failing", "{health}");
    // Back again: the next release converges.
    reg.resume();
    ws.write_policy("42.json", &policy_42("1.2.0").to_string());
    ws.commit("42 v1.2.0");
    let d3 = deploy(&ws, "42")["digest"].as_str().unwrap().to_string();
    for a in &agents {
        assert_eq!(support::active_digest(&a.url).as_deref(), Some(d3.as_str()));
    }
    wait_until("the error to clear", Duration::from_secs(20), || {
        agents.iter().all(|a| a.healthz()["pull"]["status"] == "ok")
    });
}

#[test]
fn a_service_that_does_not_converge_is_named_and_the_tag_goes_back() {
    let reg = Registry::start();
    let ws = Workspace::new("");
    let agents = start_agents(&ws, &reg, 2, &[]);
    // A third service whose agent does not pull: it never converges.
    let deaf = support::start_agent(&ws.root().join("agents/deaf"), &ws.release_pub());
    workspace(&ws, &reg, &[&agents[0], &agents[1]], "");
    let d1 = deploy(&ws, "42")["digest"].as_str().unwrap().to_string();
    let before = support::runtime()
        .block_on(client(&reg).resolve("42.production"))
        .unwrap();
    // Now list the deaf service too, with a short wait.
    let toml = std::fs::read_to_string(ws.root().join("pde.toml"))
        .unwrap()
        .replace("converge_timeout_ms = 30000", "converge_timeout_ms = 3000")
        + &format!(
            "[[environments.production.services]]\nname = \"deaf\"\nurl = \"{}\"\ntags = [\"api\"]\n",
            deaf
        );
    std::fs::write(ws.root().join("pde.toml"), toml).unwrap();
    ws.write_policy("42.json", &policy_42("1.1.0").to_string());
    ws.commit("42 v1.1.0, and a deaf service");
    let o = pde(
        ws.root(),
        &["--output", "json", "deploy", "42", "--env", "production"],
    );
    assert_eq!(code(&o), 1, "{}", both(&o));
    let text = both(&o);
    assert!(text.contains("deaf"), "the laggard is named: {text}");
    assert!(text.contains("did not converge"), "{text}");
    let after = support::runtime()
        .block_on(client(&reg).resolve("42.production"))
        .unwrap();
    assert_eq!(
        after, before,
        "the tag was re-pointed to the previous release"
    );
    for a in &agents {
        assert_eq!(
            support::active_digest(&a.url).as_deref(),
            Some(d1.as_str()),
            "agents followed the tag back"
        );
    }
}

/// Pulled artifacts carry no fence (docs/agent.md "Fences and pulled
/// artifacts"): the tag is the agent's one writer. An agent that was also
/// pushed to under a deploy lock's fence for the policy has been told that
/// only a newer lock may change it, which an unfenced artifact cannot show:
/// it keeps the pushed bundle and says why, and still follows other policies.
#[test]
fn a_pulled_artifact_cannot_override_a_fenced_push_of_the_same_policy() {
    let reg = Registry::start();
    let ws = Workspace::new("");
    let agents = start_agents(&ws, &reg, 1, &[]);
    let agent = &agents[0];
    workspace(&ws, &reg, &[agent], "");
    let d1 = deploy(&ws, "42")["digest"].as_str().unwrap().to_string();

    // A fenced push of 42 v1.1.0 straight to the agent, as `pde deploy`
    // with push delivery sends it.
    ws.write_policy("42.json", &policy_42("1.1.0").to_string());
    ws.commit("42 v1.1.0");
    let pushed = pde::bundle::Bundle::from_value(package(&ws)).unwrap();
    let key = pde_core::keys::load_signing_key(&ws.root().join("keys/release.ed25519")).unwrap();
    let report = support::runtime().block_on(pde::push::push(
        &pde::push::client(Duration::from_secs(10)).unwrap(),
        &pushed,
        "production",
        &[pde::push::Target::new("s0", &agent.url, None)],
        &pde::config::PushConfig::default(),
        pde::push::Fenced {
            signer: Some(&key),
            fence: Some(pde_core::fence::now_micros()),
        },
        &(),
    ));
    assert_eq!(report.outcome, pde::push::Outcome::Deployed, "{report:?}");
    assert_ne!(pushed.digest, d1);

    // The tag moves to 42 v1.2.0, validly signed: refused for want of a fence.
    ws.write_policy("42.json", &policy_42("1.2.0").to_string());
    ws.commit("42 v1.2.0");
    let v12 = package(&ws);
    push_by_hand(&reg, "42.production", &v12);
    wait_until(
        "the unfenced artifact to be refused",
        Duration::from_secs(20),
        || last_error(agent).contains("fence"),
    );
    let why = last_error(agent);
    assert!(why.contains("pulled artifacts carry no fence"), "{why}");
    assert_eq!(
        support::active_digest(&agent.url).as_deref(),
        Some(pushed.digest.as_str()),
        "the pushed bundle stays active"
    );
    // Policy 43, never pushed with a fence, still follows its tag.
    let d43 = deploy(&ws, "43")["digest"].as_str().unwrap().to_string();
    assert_eq!(
        support::active_digest_of(&agent.url, "43").as_deref(),
        Some(d43.as_str())
    );
}

/// The converge gate of an environment whose fleet is too large to list:
/// `[[…delivery.converge_gates]]` with `${policy_id}`/`${digest}` and `min = N`.
fn fleet_gate(prom: &Prometheus, min: u32) -> String {
    format!(
        ", converge_gates = [{{ kind = \"prometheus\", name = \"fleet-on-release\", url = \"{}\", \
         query = 'count(pde_agent_active_policy{{policy_id=\"${{policy_id}}\", digest=\"${{digest}}\"}})', \
         min = {min} }}]",
        prom.url
    )
}

/// Issue 23 §3: a fleet too large to list is watched through the agents'
/// `/metrics` in a real Prometheus. Four real pull agents, one listed in
/// pde.toml; the deploy waits until Prometheus counts four agents on the new
/// digest, and a gate asking for more agents than there are takes the tag
/// back when its time is up (and the agents follow it).
#[test]
fn a_deploy_waits_for_n_agents_on_the_release_in_prometheus_and_takes_the_tag_back_below_n() {
    let reg = Registry::start();
    let ws = Workspace::new("");
    let agents = start_agents(&ws, &reg, 4, &[]);
    let scraped: Vec<String> = agents
        .iter()
        .map(|a| a.url.trim_start_matches("http://").to_string())
        .collect();
    let prom = Prometheus::start(&scraped);
    prom.wait_for("up == 1", 4);
    // Only s0 is listed: the other three are the fleet nobody lists.
    workspace(&ws, &reg, &[&agents[0]], &fleet_gate(&prom, 4));

    let r1 = deploy(&ws, "42");
    let d1 = r1["digest"].as_str().unwrap().to_string();
    let fleet = &r1["push"]["registry"]["fleet"];
    assert_eq!(fleet["passed"], true, "{r1:#}");
    let gate = &fleet["gates"][0];
    assert_eq!(gate["values"], serde_json::json!([4.0]), "{fleet:#}");
    assert!(
        gate["query"]
            .as_str()
            .unwrap()
            .contains(&format!("digest=\"{d1}\"")),
        "the query names the release: {gate}"
    );
    for a in &agents {
        assert_eq!(support::active_digest(&a.url).as_deref(), Some(d1.as_str()));
    }
    // The gauge carries what the gate selects on.
    assert!(
        agents[3].metrics().contains(&format!("digest=\"{d1}\"")),
        "{}",
        agents[3].metrics()
    );
    let before = support::runtime()
        .block_on(client(&reg).resolve("42.production"))
        .unwrap();

    // Five agents on 1.1.0 are asked for, and there are four: when the
    // (short) time is up, the tag goes back and every agent follows it.
    let toml = std::fs::read_to_string(ws.root().join("pde.toml"))
        .unwrap()
        .replace("converge_timeout_ms = 30000", "converge_timeout_ms = 8000")
        .replace("min = 4 }", "min = 5 }");
    std::fs::write(ws.root().join("pde.toml"), toml).unwrap();
    ws.write_policy("42.json", &policy_42("1.1.0").to_string());
    ws.commit("42 v1.1.0, and a fleet gate asking for five agents");
    let o = pde(
        ws.root(),
        &["--output", "json", "deploy", "42", "--env", "production"],
    );
    assert_eq!(code(&o), 1, "{}", both(&o));
    let r2 = json(&o);
    let d2 = r2["digest"].as_str().unwrap().to_string();
    // A failed deploy's JSON holds its report under `report`.
    let registry = &r2["report"]["push"]["registry"];
    assert_eq!(registry["repointed_back"], true, "{r2:#}");
    assert_eq!(registry["fleet"]["passed"], false, "{r2:#}");
    let gate = &registry["fleet"]["gates"][0];
    assert!(
        gate["detail"].as_str().unwrap().contains("below min 5"),
        "{gate}"
    );
    assert!(
        gate["query"].as_str().unwrap().contains(&d2),
        "evaluated for the new release: {gate}"
    );
    assert!(
        both(&o).contains("the fleet did not converge"),
        "{}",
        both(&o)
    );
    let after = support::runtime()
        .block_on(client(&reg).resolve("42.production"))
        .unwrap();
    assert_eq!(
        after, before,
        "the tag was re-pointed to the previous release"
    );
    wait_until(
        "every agent to follow the tag back",
        Duration::from_secs(30),
        || {
            agents
                .iter()
                .all(|a| support::active_digest(&a.url).as_deref() == Some(d1.as_str()))
        },
    );
}

#[test]
fn registry_credentials_never_show_in_output_logs_or_audit() {
    let reg = Registry::start_with_auth();
    let ws = Workspace::new("");
    let credentials = format!("{}:{}", registry::USER, registry::PASSWORD);
    // SAFETY of the test: set for this process's children only through `.env`.
    let agents: Vec<PullAgent> = (0..2)
        .map(|i| {
            let dir = ws.root().join("agents").join(format!("a{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            let log = dir.with_extension("log");
            let mut child = Command::new(env!("CARGO_BIN_EXE_pde"))
                .args(["-vvv", "agent", "--listen", "127.0.0.1:0", "--data-dir"])
                .arg(dir.join("data"))
                .arg("--trusted-key")
                .arg(ws.release_pub())
                .args(["--pull", &reg.reference(), "--env", "production"])
                .args(["--interval", "300ms", "--registry-plain-http"])
                .args(["--registry-credentials-env", "PDE_TEST_REGISTRY_AUTH"])
                .env("PDE_TEST_REGISTRY_AUTH", &credentials)
                .env("RUST_LOG", "trace")
                .stdout(Stdio::piped())
                .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
                .spawn()
                .unwrap();
            let mut line = String::new();
            let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
            out.read_line(&mut line).unwrap();
            std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
            PullAgent {
                child,
                url: format!(
                    "http://{}",
                    line.trim().strip_prefix("listening on ").unwrap()
                ),
                log,
            }
        })
        .collect();
    workspace(
        &ws,
        &reg,
        &agents.iter().collect::<Vec<_>>(),
        ", credentials_env = \"PDE_TEST_REGISTRY_AUTH\"",
    );
    let env = [
        ("PDE_TEST_REGISTRY_AUTH", credentials.as_str()),
        ("RUST_LOG", "trace"),
    ];
    let o = pde_env(
        ws.root(),
        &[
            "-vvv",
            "--output",
            "json",
            "deploy",
            "42",
            "--env",
            "production",
        ],
        &env,
    );
    assert_eq!(code(&o), 0, "{}", both(&o));
    let digest = json(&o)["digest"].as_str().unwrap().to_string();
    for a in &agents {
        assert_eq!(
            support::active_digest(&a.url).as_deref(),
            Some(digest.as_str())
        );
    }
    // A wrong password: the registry check fails (exit 4), without echoing it.
    let wrong = format!("{}:not-the-{}", registry::USER, registry::PASSWORD);
    ws.write_policy("42.json", &policy_42("1.1.0").to_string());
    ws.commit("42 v1.1.0");
    let bad = pde_env(
        ws.root(),
        &["-vvv", "deploy", "42", "--env", "production"],
        &[
            ("PDE_TEST_REGISTRY_AUTH", wrong.as_str()),
            ("RUST_LOG", "trace"),
        ],
    );
    assert_eq!(code(&bad), 4, "{}", both(&bad));
    assert!(both(&bad).contains("registry"), "{}", both(&bad));

    let mut seen = vec![
        ("deploy output", both(&o)),
        ("failed deploy output", both(&bad)),
    ];
    for a in &agents {
        seen.push(("agent log", std::fs::read_to_string(&a.log).unwrap()));
    }
    for entry in walk(&ws.root().join(".pde")) {
        if let Ok(text) = std::fs::read_to_string(&entry) {
            seen.push(("state file", text));
        }
    }
    let status = pde_env(ws.root(), &["status"], &env);
    seen.push(("status", both(&status)));
    for (what, text) in &seen {
        assert!(
            !text.contains(registry::PASSWORD),
            "the registry password appears in the {what}"
        );
    }
    assert!(
        seen.iter()
            .any(|(w, t)| *w == "agent log" && t.contains("pull"))
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// A workspace holding `eligibility-bounds`, signed by its security-team
/// key: what an agency publishes.
fn signed_plugin_workspace() -> Workspace {
    let ws = Workspace::new("");
    ws.install_plugin(
        "eligibility-bounds",
        "validator",
        Path::new(pde_plugin_artifacts::ELIGIBILITY_BOUNDS),
        "",
        true,
    );
    ws
}

/// A fresh workspace that trusts the same security-team key as `ws`.
fn trusting(ws: &Workspace) -> Workspace {
    let fresh = Workspace::new("");
    std::fs::copy(
        ws.root().join("keys/security.ed25519.pub"),
        fresh.root().join("keys/security.ed25519.pub"),
    )
    .unwrap();
    fresh
}

/// `pde --output json plugin push plugins/eligibility-bounds.wasm REFERENCE --plain-http`.
fn push_plugin(ws: &Workspace, reference: &str) -> std::process::Output {
    pde(
        ws.root(),
        &[
            "--output",
            "json",
            "plugin",
            "push",
            "plugins/eligibility-bounds.wasm",
            reference,
            "--plain-http",
        ],
    )
}

/// `pde plugin pull REFERENCE --out plugins --plain-http` in `ws`.
fn pull_plugin(ws: &Workspace, reference: &str) -> std::process::Output {
    pde(
        ws.root(),
        &[
            "plugin",
            "pull",
            reference,
            "--out",
            "plugins",
            "--plain-http",
        ],
    )
}

/// `pde plugin verify` of the installed `eligibility-bounds` passes.
fn assert_installed_plugin_verifies(ws: &Workspace) {
    let installed = ws.root().join("plugins/eligibility-bounds.wasm");
    let o = pde(
        ws.root(),
        &["plugin", "verify", installed.to_str().unwrap()],
    );
    assert_eq!(code(&o), 0, "{}", both(&o));
}

#[test]
fn a_plugin_pushed_once_is_pulled_pinned_and_verified_into_a_fresh_workspace() {
    let reg = Registry::start();
    let ws = signed_plugin_workspace();
    let repo = format!(
        "oci://127.0.0.1:{}/pde/plugins/eligibility-bounds",
        reg.port
    );
    let o = push_plugin(&ws, &repo);
    assert_eq!(code(&o), 0, "{}", both(&o));
    let pushed = json(&o);
    assert_eq!(pushed["tag"], "1.0.0");
    assert_eq!(pushed["signed"], true);
    let pinned = pushed["reference"].as_str().unwrap().to_string();
    let digest = pushed["digest"].as_str().unwrap().to_string();
    assert_eq!(pinned, format!("{repo}@{digest}"));

    // The CNCF Wasm layout that wkg reads: wasm config, one application/wasm layer.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(reg.blob_file(&digest)).unwrap()).unwrap();
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.wasm.config.v0+json"
    );
    assert_eq!(manifest["layers"].as_array().unwrap().len(), 1);
    assert_eq!(manifest["layers"][0]["mediaType"], "application/wasm");

    // A fresh workspace that trusts the same security-team key.
    let fresh = trusting(&ws);
    let o = pull_plugin(&fresh, &pinned);
    assert_eq!(code(&o), 0, "{}", both(&o));
    let pulled = std::fs::read(fresh.root().join("plugins/eligibility-bounds.wasm")).unwrap();
    assert_eq!(
        pulled,
        std::fs::read(ws.root().join("plugins/eligibility-bounds.wasm")).unwrap(),
        "the exact bytes"
    );
    assert_installed_plugin_verifies(&fresh);

    // Not pinned: refused before anything is fetched.
    let elsewhere = Workspace::new("");
    let o = pull_plugin(&elsewhere, &format!("{repo}:1.0.0"));
    assert_eq!(code(&o), 2, "{}", both(&o));
    // A workspace that does not trust the signer writes nothing.
    let o = pull_plugin(&elsewhere, &pinned);
    assert_eq!(code(&o), 6, "{}", both(&o));
    assert!(
        !elsewhere
            .root()
            .join("plugins/eligibility-bounds.wasm")
            .exists()
    );

    // The registry serves other bytes than the digest asked for: refused.
    let file = reg.blob_file(&digest);
    let mut bytes = std::fs::read(&file).unwrap();
    // A digit of the plugin manifest's text in the annotations: still a
    // manifest the registry parses and serves, but not the bytes pinned.
    let annotations = bytes.windows(11).position(|w| w == b"annotations").unwrap();
    let at = annotations
        + bytes[annotations..]
            .iter()
            .position(|b| *b == b'1')
            .unwrap();
    bytes[at] = b'2';
    std::fs::write(&file, bytes).unwrap();
    let again = trusting(&ws);
    let o = pull_plugin(&again, &pinned);
    assert_eq!(code(&o), 6, "{}", both(&o));
    assert!(both(&o).contains("digest"), "{}", both(&o));
    assert!(
        !again
            .root()
            .join("plugins/eligibility-bounds.wasm")
            .exists()
    );
}

/// Issue 23 §4: pde's plugin artifacts and `wkg`'s are one layout. `wkg`
/// reads and writes registries through `oci-wasm` (bytecodealliance): its
/// client pulls a plugin `pde plugin push`ed (config parsed as its
/// `WasmConfig`, the component list equal to what oci-wasm derives from the
/// bytes itself), and pde pulls a plugin oci-wasm pushed with pde's manifest
/// and signature as annotations (and refuses, by name, one without them).
#[test]
fn wkg_s_oci_wasm_client_and_pde_read_each_other_s_plugin_artifacts() {
    use oci_client::client::{ClientConfig, ClientProtocol};
    use oci_client::secrets::RegistryAuth;

    let reg = Registry::start();
    let ws = signed_plugin_workspace();
    let wasm = std::fs::read(ws.root().join("plugins/eligibility-bounds.wasm")).unwrap();
    let repo = format!("127.0.0.1:{}/pde/plugins/eligibility-bounds", reg.port);
    let o = push_plugin(&ws, &format!("oci://{repo}"));
    assert_eq!(code(&o), 0, "{}", both(&o));
    let digest = json(&o)["digest"].as_str().unwrap().to_string();

    // wkg's side reads pde's artifact.
    let wkg = oci_wasm::WasmClient::new(oci_client::Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..ClientConfig::default()
    }));
    let auth = RegistryAuth::Anonymous;
    let pinned: oci_client::Reference = format!("{repo}@{digest}").parse().unwrap();
    let (manifest, config, _) = support::runtime()
        .block_on(wkg.pull_manifest_and_config(&pinned, &auth))
        .unwrap_or_else(|e| panic!("oci-wasm cannot read pde's artifact: {e:#}"));
    assert_eq!(config.architecture, oci_wasm::WASM_ARCHITECTURE);
    assert_eq!(config.os, oci_wasm::COMPONENT_OS);
    assert_eq!(config.layer_digests, [manifest.layers[0].digest.clone()]);
    let ours = config
        .component
        .expect("a wasip2 config lists its component");
    let theirs = oci_wasm::Component::from_raw_component(&wasm).unwrap();
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    assert_eq!(sorted(ours.exports), sorted(theirs.exports), "exports");
    assert_eq!(sorted(ours.imports), sorted(theirs.imports), "imports");
    let image = support::runtime()
        .block_on(wkg.pull(&pinned, &auth))
        .unwrap();
    assert_eq!(image.layers[0].data, wasm, "the exact component");
    // The same component pushed again is the same manifest (no time in it).
    let o = push_plugin(&ws, &format!("oci://{repo}:again"));
    assert_eq!(json(&o)["digest"], digest.as_str(), "{}", both(&o));

    // pde reads wkg's artifact: pushed by oci-wasm, pde's manifest and
    // signature as manifest annotations. oci-client writes manifests in
    // OLPC canonical JSON, which leaves newlines in strings raw, so the
    // registry refuses a multi-line annotation from it (MANIFEST_INVALID):
    // the texts travel as `base64:…`.
    let by_wkg = format!("127.0.0.1:{}/pde/plugins/by-wkg", reg.port);
    let push = |tag: &str, annotated: bool| -> String {
        let (config, layer) =
            oci_wasm::WasmConfig::from_raw_component(wasm.clone(), Some("wkg".into())).unwrap();
        let annotations = annotated.then(|| {
            let file = |f: &str| {
                use base64::Engine as _;
                let text = std::fs::read(ws.root().join("plugins").join(f)).unwrap();
                format!(
                    "{}{}",
                    pde_core::oci::BASE64_ANNOTATION_PREFIX,
                    base64::engine::general_purpose::STANDARD.encode(text)
                )
            };
            std::collections::BTreeMap::from([
                (
                    pde_core::oci::ANNOTATION_PLUGIN_MANIFEST.to_string(),
                    file("eligibility-bounds.toml"),
                ),
                (
                    pde_core::oci::ANNOTATION_PLUGIN_SIGNATURE.to_string(),
                    file("eligibility-bounds.wasm.sig"),
                ),
            ])
        });
        let reference: oci_client::Reference = format!("{by_wkg}:{tag}").parse().unwrap();
        support::runtime()
            .block_on(wkg.push(&reference, &auth, layer, config, annotations))
            .unwrap();
        let registry = pde_core::oci::Registry::new(
            by_wkg.parse().unwrap(),
            pde_core::oci::RegistryOptions {
                plain_http: true,
                ..Default::default()
            },
        )
        .unwrap();
        support::runtime()
            .block_on(registry.resolve(tag))
            .unwrap()
            .unwrap()
    };
    let fresh = trusting(&ws);
    let pull = |digest: &str| pull_plugin(&fresh, &format!("oci://{by_wkg}@{digest}"));
    let bare = push("bare", false);
    let o = pull(&bare);
    assert_ne!(code(&o), 0, "{}", both(&o));
    assert!(
        both(&o).contains("carries no pde plugin manifest"),
        "{}",
        both(&o)
    );
    let annotated = push("1.0.0", true);
    let o = pull(&annotated);
    assert_eq!(code(&o), 0, "{}", both(&o));
    assert_eq!(
        std::fs::read(fresh.root().join("plugins/eligibility-bounds.wasm")).unwrap(),
        wasm
    );
    assert_installed_plugin_verifies(&fresh);
}
