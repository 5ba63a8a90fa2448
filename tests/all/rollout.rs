//! Progressive rollouts (issue 22) over real parts: `pde` processes, real
//! agents whose `--on-activate` hook flips their service's exporter to
//! "bad", a real Prometheus scraping those exporters every second, the
//! test receiver where a service must never be pushed to, and the shared
//! PostgreSQL for a rollout promoted from a second checkout.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::prom::{self, Prometheus};
use crate::support::receiver::{Fault, Receiver};
use crate::support::{self, Svc, Workspace, git, pg};

/// Exit code of a halted rollout (README).
pub(crate) const HALTED: i32 = 8;

fn command(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pde"));
    c.arg("-C").arg(dir).args(args).env_remove("RUST_LOG");
    c
}

pub(crate) fn pde(dir: &Path, args: &[&str]) -> Output {
    command(dir, args).output().expect("pde runs")
}

fn pg_pde(dir: &Path, args: &[&str], actor: &str) -> Output {
    command(dir, args)
        .env(pg::PASSWORD_ENV, &pg::server().password)
        .env("PDE_ACTOR", actor)
        .output()
        .expect("pde runs")
}

pub(crate) fn code(o: &Output) -> i32 {
    o.status.code().expect("exited normally")
}

/// `pde deploy 42 --env production --output json`, which must halt a
/// rollout (exit 8): its error message.
pub(crate) fn halted_deploy(root: &Path) -> String {
    let o = pde(
        root,
        &["deploy", "42", "--env", "production", "--output", "json"],
    );
    assert_eq!(code(&o), HALTED, "{}", support::both(&o));
    json(&o)["error"].as_str().unwrap_or_default().to_string()
}

pub(crate) fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", support::both(o)))
}

/// An in-process agent whose activation hook writes the version it
/// activated to `version_file`.
fn agent(ws: &Workspace, name: &str, version_file: &Path) -> String {
    let cfg = pde_agent::AgentConfig {
        data_dir: ws.root().join("agents").join(name),
        trusted: pde::keys::TrustedKeys::from_files(&[ws.release_pub()]).unwrap(),
        insecure_accept_unsigned: false,
        token: None,
        max_body_bytes: 16 << 20,
        keep: 10,
        on_activate: Some(prom::hook(version_file)),
        max_concurrent_deploys: 4,
        approvers: pde::approval::Approvers::new(),
        min_approvals: 0,
        max_connections: pde_agent::DEFAULT_MAX_CONNECTIONS,
        header_read_timeout: pde_agent::DEFAULT_HEADER_TIMEOUT,
        validation: Default::default(),
    };
    let agent = pde_agent::Agent::open(cfg).expect("agent opens");
    let rt = support::runtime();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move {
        let _ = agent.serve(listener, std::future::pending::<()>()).await;
    });
    format!("http://{addr}")
}

/// Services S0..Sn: real agents (those in `agents`) or test receivers,
/// each with an exporter; Prometheus scraping them when `with_prometheus`.
pub(crate) struct Fleet {
    pub(crate) ws: Workspace,
    pub(crate) urls: Vec<String>,
    pub(crate) receivers: Vec<Option<Receiver>>,
    pub(crate) prom: Option<Prometheus>,
    _files: tempfile::TempDir,
}

/// Three services: S0 a real agent tagged `canary` (its exporter turns bad
/// when it activates 1.0.0), S1 and S2 test receivers; Prometheus scrapes
/// all three, and pde.toml gets `rollout(prometheus_url)`.
pub(crate) fn canary_fleet(rollout: impl FnOnce(&str) -> String) -> Fleet {
    fleet(3, 1, &[&["canary"]], true, rollout, "")
}

pub(crate) const GATE_QUERY: &str = "max(pde_test_error_ratio{service=~\"${services_regex}\"})";

pub(crate) fn fleet(
    n: usize,
    agents: usize,
    tags: &[&'static [&'static str]],
    with_prometheus: bool,
    rollout: impl FnOnce(&str) -> String,
    extra_toml: &str,
) -> Fleet {
    let ws = Workspace::new("");
    let files = tempfile::tempdir().unwrap();
    let mut urls = Vec::new();
    let mut receivers = Vec::new();
    let mut exporters = Vec::new();
    for i in 0..n {
        let name = format!("S{i}");
        let file = files.path().join(format!("{name}.version"));
        exporters.push(prom::exporter(&name, file.clone(), "1.0.0"));
        if i < agents {
            urls.push(agent(&ws, &name, &file));
            receivers.push(None);
        } else {
            let r = Receiver::start(Fault::None);
            urls.push(r.url.clone());
            receivers.push(Some(r));
        }
    }
    let prom = with_prometheus.then(|| {
        let p = Prometheus::start(&exporters);
        p.wait_for("pde_test_error_ratio", n);
        p
    });
    let prom_url = prom
        .as_ref()
        .map_or(String::from("http://127.0.0.1:9"), |p| p.url.clone());
    let names: Vec<&'static str> = (0..n)
        .map(|i| &*Box::leak(format!("S{i}").into_boxed_str()))
        .collect();
    let services: Vec<Svc> = (0..n)
        .map(|i| Svc {
            name: names[i],
            url: urls[i].clone(),
            tags: tags.get(i).copied().unwrap_or(&["api"]),
        })
        .collect();
    let toml = std::fs::read_to_string(ws.root().join("pde.toml")).unwrap()
        + extra_toml
        + &Workspace::env_toml("production", "", &services)
        + &rollout(&prom_url);
    std::fs::write(ws.root().join("pde.toml"), toml).unwrap();
    ws.commit("workspace with a rollout");
    Fleet {
        ws,
        urls,
        receivers,
        prom,
        _files: files,
    }
}

/// The audit records of a SQLite workspace, as JSON.
pub(crate) fn audit(ws: &Workspace) -> Vec<serde_json::Value> {
    let o = pde(ws.root(), &["audit", "show", "--output", "json"]);
    assert_eq!(code(&o), 0, "{}", support::both(&o));
    let v = json(&o);
    v.as_array()
        .cloned()
        .or_else(|| v["records"].as_array().cloned())
        .unwrap_or_default()
}

pub(crate) fn events<'a>(
    records: &'a [serde_json::Value],
    event: &str,
) -> Vec<&'a serde_json::Value> {
    records.iter().filter(|r| r["event"] == event).collect()
}

/// The canary fleet rolled out behind the error-ratio gate: wave "first"
/// (S1) with no bake, then the wave(s) `middle` writes (given Prometheus's
/// URL), then "rest".
fn quick_first_wave_then(middle: impl Fn(&str) -> String) -> Fleet {
    canary_fleet(|prom| {
        format!(
            "[environments.production.rollout]\npoll_ms = 100\n\
                 [[environments.production.rollout.gates]]\nkind = \"prometheus\"\nname = \"error-ratio\"\n\
                 url = \"{prom}\"\nquery = '{GATE_QUERY}'\nmax = 0.1\n\
                 [[environments.production.rollout.waves]]\nname = \"first\"\nservices = [\"S1\"]\nbake = \"0s\"\n\
                 {}[[environments.production.rollout.waves]]\nname = \"rest\"\n",
            middle(prom)
        )
    })
}

#[test]
fn a_wave_with_no_bake_is_recorded_in_order_before_a_later_wave_halts_and_both_go_back() {
    // Wave "first" (S1, no bake) passes: its records wait for the next
    // append. Wave "canary" (S0, a real agent that turns bad) is baked and
    // fails. The audit log must still tell it in order, each wave once, and
    // both waves are sent back.
    let f = quick_first_wave_then(|_| {
        "[[environments.production.rollout.waves]]\nname = \"canary\"\ntags = [\"canary\"]\nbake = \"3s\"\n"
            .into()
    });
    halted_deploy(f.ws.root());
    let records = audit(&f.ws);
    let story: Vec<(String, String)> = records
        .iter()
        .filter(|r| {
            ["wave_pushed", "gate_evaluated", "rollout_finished"]
                .contains(&r["event"].as_str().unwrap_or(""))
        })
        .map(|r| {
            (
                r["event"].as_str().unwrap_or("").to_string(),
                r["data"]["wave"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let pair = |e: &str, w: &str| (e.to_string(), w.to_string());
    assert_eq!(
        story,
        [
            pair("wave_pushed", "first"),
            pair("gate_evaluated", "first"),
            pair("wave_pushed", "canary"),
            pair("gate_evaluated", "canary"),
            pair("rollout_finished", ""),
        ],
        "{records:#?}"
    );
    assert_eq!(
        events(&records, "gate_evaluated")[1]["data"]["verdict"],
        "fail"
    );
    // Both waves went back: S0 (an agent) holds nothing, S1 (a receiver)
    // got the push and then the compensation.
    assert_eq!(support::active_digest(&f.urls[0]), None);
    let s1 = f.receivers[1].as_ref().expect("S1 is a receiver");
    assert_eq!(s1.deploys(), 1);
    assert_eq!(s1.active_digest(), None, "S1 was not sent back");
    assert!(
        f.receivers[2].as_ref().unwrap().deploys() == 0,
        "the rest was pushed to"
    );
    assert!(f.ws.tags().is_empty(), "{:?}", f.ws.tags());
}

#[test]
fn a_wave_with_no_bake_is_recorded_even_when_a_later_wave_stops_the_rollout_with_an_error() {
    // Wave "first" (S1, no bake) passes: its records wait for the next
    // append. Wave "second"'s own gate needs a token whose variable is not
    // set, so judging it is an error, not a verdict. The push to S1
    // happened, so the audit log must still say so.
    let f = quick_first_wave_then(|prom| {
        format!(
            "[[environments.production.rollout.waves]]\nname = \"second\"\nservices = [\"S2\"]\nbake = \"0s\"\n\
                 [[environments.production.rollout.waves.gates]]\nkind = \"prometheus\"\nname = \"guarded\"\n\
                 url = \"{prom}\"\nquery = '{GATE_QUERY}'\nmax = 0.1\ntoken_env = \"PDE_TEST_NO_SUCH_TOKEN\"\n"
        )
    });
    let o = pde(f.ws.root(), &["deploy", "42", "--env", "production"]);
    assert_ne!(code(&o), 0, "{}", support::both(&o));
    assert!(
        support::stderr(&o).contains("PDE_TEST_NO_SUCH_TOKEN"),
        "{}",
        support::both(&o)
    );
    let records = audit(&f.ws);
    let first: Vec<&str> = records
        .iter()
        .filter(|r| r["data"]["wave"] == "first")
        .map(|r| r["event"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(first, ["wave_pushed", "gate_evaluated"], "{records:#?}");
    assert_eq!(
        f.receivers[1].as_ref().expect("S1 is a receiver").deploys(),
        1
    );
    assert!(f.ws.tags().is_empty(), "{:?}", f.ws.tags());
}

#[test]
fn a_bad_canary_fails_its_gate_is_rolled_back_and_nothing_else_is_pushed() {
    let f = canary_fleet(|prom| {
        format!(
            "[environments.production.rollout]\npoll_ms = 100\n\
                 [[environments.production.rollout.waves]]\nname = \"canary\"\ntags = [\"canary\"]\nbake = \"3s\"\n\
                 [[environments.production.rollout.waves.gates]]\nkind = \"prometheus\"\nname = \"error-ratio\"\n\
                 url = \"{prom}\"\nquery = '{GATE_QUERY}'\nmax = 0.1\n\
                 [[environments.production.rollout.waves]]\nname = \"rest\"\n"
        )
    });
    let message = halted_deploy(f.ws.root());
    assert!(message.contains("error-ratio"), "{message}");
    assert!(
        message.contains("pde_test_error_ratio{service=~\\\"(S0)\\\"}") || message.contains("(S0)"),
        "{message}"
    );
    assert!(message.contains("0.5"), "{message}");
    // The canary took it, then was sent back: policy 42 is not active there.
    assert_eq!(support::active_digest(&f.urls[0]), None);
    // The later wave never received a POST /deploy.
    for r in f.receivers.iter().flatten() {
        assert_eq!(r.deploys(), 0, "a later wave was pushed to");
    }
    assert!(f.ws.tags().is_empty(), "{:?}", f.ws.tags());
    let records = audit(&f.ws);
    let gates = events(&records, "gate_evaluated");
    assert_eq!(gates.len(), 1, "{records:#?}");
    let g = &gates[0]["data"];
    assert_eq!(g["verdict"], "fail");
    assert_eq!(g["query"], "max(pde_test_error_ratio{service=~\"(S0)\"})");
    assert_eq!(g["values"], serde_json::json!([0.5]));
    assert_eq!(events(&records, "wave_pushed").len(), 1);
    assert_eq!(
        events(&records, "rollout_finished")[0]["data"]["outcome"],
        "rolled-back"
    );
    assert!(events(&records, "tagged").is_empty());
    // The state says so too, and a new deploy is not refused by it.
    let s = json(&pde(
        f.ws.root(),
        &[
            "rollout",
            "status",
            "42",
            "--env",
            "production",
            "--output",
            "json",
        ],
    ));
    assert_eq!(s["report"]["status"], "rolled-back", "{s:#}");
    assert_eq!(s["report"]["waves"][0]["status"], "rolled-back", "{s:#}");
    assert_eq!(s["report"]["waves"][1]["status"], "pending", "{s:#}");
}

#[test]
fn a_good_rollout_passes_three_waves_against_prometheus_and_tags_once_at_the_end() {
    let f = fleet(
        4,
        4,
        &[],
        true,
        |prom| {
            format!(
                "[environments.production.rollout]\npoll_ms = 100\n\
                 [[environments.production.rollout.gates]]\nkind = \"prometheus\"\nname = \"error-ratio\"\n\
                 url = \"{prom}\"\nquery = '{GATE_QUERY}'\nmax = 0.1\n\
                 [[environments.production.rollout.waves]]\nname = \"canary\"\nservices = [\"S0\"]\nbake = \"2s\"\n\
                 [[environments.production.rollout.waves.gates]]\nkind = \"prometheus\"\nname = \"vs-baseline\"\n\
                 url = \"{prom}\"\nquery = '{GATE_QUERY}'\nbaseline = {{ factor = 1.5, offset = 0.001 }}\n\
                 [[environments.production.rollout.waves]]\nname = \"half\"\npercent = 50\nbake = \"1s\"\n\
                 [[environments.production.rollout.waves]]\nname = \"rest\"\nbake = \"1s\"\n"
            )
        },
        "",
    );
    // A version the exporters do not call bad.
    f.ws.write_policy("42.json", &support::policy_42("1.0.1").to_string());
    f.ws.commit("1.0.1");
    let plan = pde(f.ws.root(), &["plan", "42", "--env", "production"]);
    assert_eq!(code(&plan), 0, "{}", support::both(&plan));
    let text = String::from_utf8_lossy(&plan.stdout);
    assert!(
        text.contains("wave 1 canary") && text.contains("wave 3 rest"),
        "{text}"
    );
    let o = pde(
        f.ws.root(),
        &["deploy", "42", "--env", "production", "--output", "json"],
    );
    assert_eq!(code(&o), 0, "{}", support::both(&o));
    let r = json(&o);
    let waves = r["rollout"]["waves"].as_array().unwrap();
    let services: Vec<&serde_json::Value> = waves.iter().map(|w| &w["services"]).collect();
    assert_eq!(
        services,
        [
            &serde_json::json!(["S0"]),
            &serde_json::json!(["S1", "S2"]),
            &serde_json::json!(["S3"])
        ]
    );
    for w in waves {
        assert_eq!(w["status"], "passed", "{w:#}");
        let results = w["results"].as_array().unwrap();
        assert!(!results.is_empty());
        for g in results {
            assert_eq!(g["verdict"], "pass", "{g:#}");
            assert!(
                !g["values"].as_array().unwrap().is_empty(),
                "evaluated against Prometheus: {g:#}"
            );
        }
    }
    assert_eq!(waves[0]["results"][1]["baseline"], 0.01, "{:#}", waves[0]);
    for url in &f.urls {
        assert_eq!(support::active_digest(url).as_deref(), r["digest"].as_str());
    }
    assert_eq!(f.ws.tags(), ["policy/42/v1.0.1/production"]);
    let records = audit(&f.ws);
    assert_eq!(events(&records, "tagged").len(), 1);
    let last_gate = records
        .iter()
        .rposition(|r| r["event"] == "gate_evaluated")
        .unwrap();
    let tagged = records.iter().position(|r| r["event"] == "tagged").unwrap();
    assert!(
        tagged > last_gate,
        "the tag comes after the last wave's gates"
    );
    assert_eq!(events(&records, "wave_pushed").len(), 3);
    // `pde history` shows the rollout wave by wave.
    let h = pde(f.ws.root(), &["history", "42"]);
    let text = String::from_utf8_lossy(&h.stdout);
    assert!(
        text.contains("wave 2 half") && text.contains("S1, S2"),
        "{text}"
    );
    drop(f.prom);
}

#[test]
fn no_data_is_inconclusive_and_fails_the_wave_and_a_dry_run_shows_it_first() {
    let f = fleet(
        2,
        2,
        &[],
        true,
        |prom| {
            format!(
                "[environments.production.rollout]\npoll_ms = 100\n\
                 [[environments.production.rollout.waves]]\ncount = 1\n\
                 [[environments.production.rollout.waves.gates]]\nkind = \"prometheus\"\nname = \"misspelt\"\n\
                 url = \"{prom}\"\nquery = 'max(pde_test_eror_ratio{{service=~\"${{services_regex}}\"}})'\nmax = 0.1\n\
                 [[environments.production.rollout.waves]]\n"
            )
        },
        "",
    );
    f.ws.write_policy("42.json", &support::policy_42("1.0.1").to_string());
    f.ws.commit("1.0.1");
    let dry = pde(
        f.ws.root(),
        &[
            "deploy",
            "42",
            "--env",
            "production",
            "--dry-run",
            "--output",
            "json",
        ],
    );
    assert_eq!(code(&dry), 0, "{}", support::both(&dry));
    let d = json(&dry);
    assert_eq!(
        d["rollout"]["waves"][0]["results"][0]["verdict"], "inconclusive",
        "{d:#}"
    );
    assert!(
        f.urls.iter().all(|u| support::active_digest(u).is_none()),
        "a dry run pushes nothing"
    );
    assert!(halted_deploy(f.ws.root()).contains("inconclusive"));
    assert!(f.urls.iter().all(|u| support::active_digest(u).is_none()));
    assert!(f.ws.tags().is_empty());
}

/// The http gate the demo uses: each service of the wave serves the digest.
const HTTP_GATE: &str = "[[environments.production.rollout.gates]]\nkind = \"http\"\nname = \"serves-digest\"\n\
     url = \"${service_url}/active/${policy_id}\"\njson_field = \"/digest\"\nequals = \"${digest}\"\n";

fn wait_status(
    dir: &Path,
    actor: &str,
    pg: bool,
    want: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let args = [
            "rollout",
            "status",
            "42",
            "--env",
            "production",
            "--output",
            "json",
        ];
        let o = if pg {
            pg_pde(dir, &args, actor)
        } else {
            pde(dir, &args)
        };
        if code(&o) == 0 {
            let s = json(&o);
            if want(&s) {
                return s;
            }
        }
        assert!(
            Instant::now() < deadline,
            "rollout never reached the state: {}",
            support::both(&o)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn spawn_deploy(dir: &Path, env: &[(&str, &str)]) -> Child {
    let mut c = command(
        dir,
        &["deploy", "42", "--env", "production", "--output", "json"],
    );
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_child(mut child: Child) -> Output {
    let deadline = Instant::now() + Duration::from_secs(90);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the deploy never finished");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_paused_rollout_is_promoted_from_a_second_checkout_on_shared_postgresql() {
    let db = pg::fresh_database();
    let state = format!(
        "state = {{ dir = \".pde\", url = \"{db}\", password_env = \"{}\" }}\n",
        pg::PASSWORD_ENV
    );
    let f = fleet(
        2,
        2,
        &[],
        false,
        |_| {
            format!(
                "[environments.production.rollout]\npoll_ms = 100\n{HTTP_GATE}\
                 [[environments.production.rollout.waves]]\nname = \"canary\"\ncount = 1\npause = true\n\
                 [[environments.production.rollout.waves]]\nname = \"rest\"\n"
            )
        },
        "",
    );
    let toml = std::fs::read_to_string(f.ws.root().join("pde.toml"))
        .unwrap()
        .replace("state = \".pde\"\n", &state);
    std::fs::write(f.ws.root().join("pde.toml"), toml).unwrap();
    f.ws.commit("shared state");
    let b = tempfile::tempdir().unwrap();
    git(
        b.path(),
        &["clone", "-q", &f.ws.root().display().to_string(), "b"],
    );
    let b: PathBuf = b.path().join("b");

    let password = pg::server().password.clone();
    let child = spawn_deploy(
        f.ws.root(),
        &[(pg::PASSWORD_ENV, &password), ("PDE_ACTOR", "alice")],
    );
    let s = wait_status(&b, "bob", true, |s| s["report"]["status"] == "paused");
    assert_eq!(s["live"], true, "{s:#}");
    assert_eq!(
        s["report"]["waves"][0]["results"][0]["verdict"], "pass",
        "{s:#}"
    );
    assert!(
        support::active_digest(&f.urls[1]).is_none(),
        "the second wave waits"
    );
    // A deploy from the second checkout is refused and names the commands.
    let o = pg_pde(&b, &["deploy", "42", "--env", "production"], "bob");
    assert_eq!(code(&o), 7, "{}", support::both(&o));
    let said = support::stderr(&o);
    assert!(
        said.contains("pde rollout promote") && said.contains("pde rollout abort"),
        "{said}"
    );
    let o = pg_pde(
        &b,
        &[
            "rollout",
            "promote",
            "42",
            "--env",
            "production",
            "--output",
            "json",
        ],
        "bob",
    );
    assert_eq!(code(&o), 0, "{}", support::both(&o));
    let done = wait_child(child);
    assert_eq!(code(&done), 0, "{}", support::both(&done));
    let r = json(&done);
    for url in &f.urls {
        assert_eq!(support::active_digest(url).as_deref(), r["digest"].as_str());
    }
    let s = wait_status(&b, "bob", true, |s| s["report"]["status"] == "deployed");
    let log = &s["report"]["log"];
    assert_eq!(log[0]["action"], "promote", "{s:#}");
    assert_eq!(log[0]["by"], "bob", "{s:#}");
    assert_eq!(f.ws.tags(), ["policy/42/v1.0.0/production"]);
}

#[test]
fn a_rollout_killed_during_its_bake_is_resumed_to_the_end() {
    let f = fleet(
        3,
        3,
        &[],
        false,
        |_| {
            format!(
                "[environments.production.rollout]\npoll_ms = 100\n{HTTP_GATE}\
                 [[environments.production.rollout.waves]]\nname = \"canary\"\ncount = 1\nbake = \"6s\"\n\
                 [[environments.production.rollout.waves]]\nname = \"rest\"\n"
            )
        },
        "",
    );
    let mut child = spawn_deploy(f.ws.root(), &[]);
    let s = wait_status(f.ws.root(), "", false, |s| {
        s["report"]["waves"][0]["status"] == "baking"
    });
    assert_eq!(s["live"], true);
    child.kill().unwrap();
    child.wait().unwrap();
    let s = wait_status(f.ws.root(), "", false, |s| s["live"] == false);
    assert_eq!(s["report"]["status"], "running", "{s:#}");
    assert!(s["bake_left_ms"].as_u64().is_some(), "{s:#}");
    let digest = s["digest"].as_str().unwrap().to_string();
    assert_eq!(
        support::active_digest(&f.urls[0]).as_deref(),
        Some(digest.as_str())
    );
    // A new deploy is refused and told what to run.
    let o = pde(f.ws.root(), &["deploy", "42", "--env", "production"]);
    assert_eq!(code(&o), 7, "{}", support::both(&o));
    assert!(
        support::stderr(&o).contains("pde rollout resume"),
        "{}",
        support::both(&o)
    );
    let o = pde(
        f.ws.root(),
        &[
            "rollout",
            "resume",
            "42",
            "--env",
            "production",
            "--output",
            "json",
        ],
    );
    assert_eq!(code(&o), 0, "{}", support::both(&o));
    let s = json(&o);
    assert_eq!(s["report"]["status"], "deployed", "{s:#}");
    for url in &f.urls {
        assert_eq!(
            support::active_digest(url).as_deref(),
            Some(digest.as_str())
        );
    }
    assert_eq!(f.ws.tags(), ["policy/42/v1.0.0/production"]);
    let records = audit(&f.ws);
    assert_eq!(events(&records, "rollout_resumed").len(), 1);
    assert_eq!(events(&records, "deployed").len(), 1);
}

/// A process killed in the middle of a wave's push leaves some services
/// holding the new digest and no record that they do. An abort must still
/// send each of them back to what it held before the rollout, not to the
/// new digest the push step would read from it now.
#[test]
fn a_rollout_killed_in_the_middle_of_a_push_is_aborted_back_to_what_each_service_held() {
    let f = fleet(
        3,
        0,
        &[],
        false,
        |_| {
            format!(
                "[environments.production.rollout]\npoll_ms = 100\n{HTTP_GATE}\
                 [[environments.production.rollout.waves]]\nname = \"canary\"\ncount = 2\n\
                 [[environments.production.rollout.waves]]\nname = \"rest\"\n"
            )
        },
        "",
    );
    let receiver = |i: usize| f.receivers[i].as_ref().expect("a test receiver");
    receiver(1).set_fault(Fault::Hang);
    let mut child = spawn_deploy(f.ws.root(), &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(receiver(1).deploys() >= 1 && support::active_digest(&f.urls[0]).is_some()) {
        assert!(Instant::now() < deadline, "the canary's push never arrived");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let s = wait_status(f.ws.root(), "", false, |s| s["live"] == false);
    assert_eq!(s["report"]["waves"][0]["status"], "pending", "{s:#}");

    let o = pde(
        f.ws.root(),
        &[
            "rollout",
            "abort",
            "42",
            "--env",
            "production",
            "--output",
            "json",
        ],
    );
    let s = json(&o);
    assert_eq!(s["report"]["status"], "aborted", "{}", support::both(&o));
    assert_eq!(
        support::active_digest(&f.urls[0]),
        None,
        "S0 received the canary before the kill and goes back to holding nothing"
    );
    assert_eq!(receiver(2).deploys(), 0, "the later wave is never pushed");
    assert!(f.ws.tags().is_empty());
}

#[test]
fn a_malformed_rollout_is_refused_when_pde_toml_is_read() {
    for (rollout, says) in [
        (
            "[[environments.production.rollout.waves]]\nservices = [\"NOPE\"]\n[[environments.production.rollout.waves]]\n",
            "selects nothing",
        ),
        (
            "[[environments.production.rollout.waves]]\ncount = 1\n[[environments.production.rollout.waves.gates]]\nkind = \"prometheus\"\nname = \"g\"\nurl = \"http://127.0.0.1:9\"\nquery = 'up{job=\"${job}\"}'\nmax = 1\n[[environments.production.rollout.waves]]\n",
            "unknown variable ${job}",
        ),
        (
            "[[environments.production.rollout.waves]]\ncount = 1\n[[environments.production.rollout.waves.gates]]\nkind = \"prometheus\"\nname = \"g\"\nurl = \"http://127.0.0.1:9\"\nquery = 'up'\n[[environments.production.rollout.waves]]\n",
            "has no bound",
        ),
        (
            "[[environments.production.rollout.waves]]\ncount = 1\n[[environments.production.rollout.waves]]\n\
             [environments.production.delivery]\nkind = \"oci\"\nreference = \"127.0.0.1:9/hms\"\nplain_http = true\n",
            "waves cannot be rolled out through it",
        ),
    ] {
        let ws = Workspace::new(
            &(Workspace::env_toml(
                "production",
                "",
                &[Svc {
                    name: "S0",
                    url: "http://127.0.0.1:9".into(),
                    tags: &["api"],
                }],
            ) + "[environments.production.rollout]\n"
                + rollout),
        );
        ws.commit("bad rollout");
        let o = pde(ws.root(), &["plan", "42", "--env", "production"]);
        assert_eq!(code(&o), 2, "{}", support::both(&o));
        assert!(support::stderr(&o).contains(says), "{}", support::both(&o));
    }
}
