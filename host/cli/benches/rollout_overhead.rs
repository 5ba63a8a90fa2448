//! What a rollout costs beyond its bakes (issue 22): `pde deploy` of a
//! policy to N services in three waves (canary, half, rest) with every bake
//! set to zero and the demo's `http` gate, against a plain `pde deploy` of
//! the same kind of policy to N other services of the same kind.
//!
//! Whole `pde` processes, as a release engineer runs them, against real
//! `pde agent` processes on loopback (one per service). The two kinds of
//! deploy run side by side in one run: each round deploys a new policy to
//! both environments, and the rounds alternate which goes first, so drift in
//! the machine's load falls on both. Beside them it times one gate round
//! trip (`GET /active/{id}` on an agent over a new connection), which is
//! what the goal allows per wave: a rollout costs at most 1.2× the plain
//! deploy plus one gate round trip per wave.
//!
//! Run: `cargo bench --workspace --bench rollout_overhead` (15 rounds).
//! `cargo test --workspace --benches` runs one round, as a smoke test.
// Bench code: a failed unwrap is a failed bench, with its location.
#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SERVICES: usize = 10;
const WAVES: usize = 3;

fn pde(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pde"))
        .args(args)
        .current_dir(dir)
        .env("PDE_ACTOR", "bench@example.gov")
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn ok(dir: &Path, args: &[&str]) {
    let o = pde(dir, args);
    assert!(
        o.status.success(),
        "pde {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn services_toml(env: &str, prefix: &str, ports: &[u16]) -> String {
    ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            format!(
                "[[environments.{env}.services]]\nname = \"{prefix}{i}\"\n\
                 url = \"http://127.0.0.1:{port}\"\ntags = [\"api\"]\n"
            )
        })
        .collect()
}

/// The workspace: `rounds + 1` policies (the first warms both sides up),
/// an environment `plain` and an environment `waves` with a rollout.
fn workspace(dir: &Path, rounds: usize, plain: &[u16], waves: &[u16]) {
    let template = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/workspace/policies/42.json"),
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::create_dir_all(dir.join("plugins")).unwrap();
    for r in 0..=rounds {
        // Rule keys are owned by one policy each.
        let policy = template
            .replacen("\"id\": \"42\"", &format!("\"id\": \"{}\"", 100 + r), 1)
            .replace("\"heating.", &format!("\"heating{r}."));
        std::fs::write(dir.join(format!("policies/{}.json", 100 + r)), policy).unwrap();
    }
    let toml = format!(
        "policies = \"policies\"\nplugins = \"plugins\"\nstate = \".pde\"\n\n\
         [signing]\nkey_file = \"keys/release.ed25519\"\n\n\
         [environments.plain]\n{}\n[environments.waves]\n{}\n\
         [environments.waves.rollout]\npoll_ms = 50\n\n\
         [[environments.waves.rollout.gates]]\nkind = \"http\"\nname = \"serves-the-new-digest\"\n\
         url = \"${{service_url}}/active/${{policy_id}}\"\njson_field = \"/digest\"\nequals = \"${{digest}}\"\n\n\
         [[environments.waves.rollout.waves]]\nname = \"canary\"\ncount = 1\nbake = \"0s\"\n\n\
         [[environments.waves.rollout.waves]]\nname = \"half\"\npercent = 50\nbake = \"0s\"\n\n\
         [[environments.waves.rollout.waves]]\nname = \"rest\"\nbake = \"0s\"\n",
        services_toml("plain", "P", plain),
        services_toml("waves", "W", waves),
    );
    std::fs::write(dir.join("pde.toml"), toml).unwrap();
    ok(
        dir,
        &["keygen", "--out", "keys", "--name", "release.ed25519"],
    );
    std::fs::write(dir.join(".gitignore"), ".pde/\nagents/\nkeys/*.ed25519\n").unwrap();
    for args in [
        &["init", "-q"][..],
        &["add", "-A"],
        &[
            "-c",
            "user.name=Bench",
            "-c",
            "user.email=bench@example.gov",
            "commit",
            "-qm",
            "bench workspace",
        ],
    ] {
        assert!(
            Command::new("git")
                .args(args)
                .current_dir(dir)
                .status()
                .unwrap()
                .success()
        );
    }
}

struct Agents(Vec<Child>);

impl Drop for Agents {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn agents(dir: &Path, ports: &[u16]) -> Agents {
    Agents(
        ports
            .iter()
            .map(|port| {
                Command::new(env!("CARGO_BIN_EXE_pde"))
                    .args([
                        "agent",
                        "--listen",
                        &format!("127.0.0.1:{port}"),
                        "--data-dir",
                        &format!("agents/{port}"),
                        "--trusted-key",
                        "keys/release.ed25519.pub",
                    ])
                    .current_dir(dir)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect(),
    )
}

fn timed(dir: &Path, args: &[&str]) -> Duration {
    let start = Instant::now();
    ok(dir, args);
    start.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// One gate round trip as a fresh `pde` process makes it: a new client, a
/// new connection, `GET /active/{id}`, the JSON read.
fn gate_round_trip(rt: &tokio::runtime::Runtime, url: &str) -> Duration {
    rt.block_on(async {
        let start = Instant::now();
        let client = reqwest::Client::new();
        let v: serde_json::Value = client.get(url).send().await.unwrap().json().await.unwrap();
        assert!(v["digest"].is_string(), "{v}");
        start.elapsed()
    })
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let rounds = if full { 15 } else { 1 };
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let plain: Vec<u16> = (0..SERVICES).map(|_| free_port()).collect();
    let waves: Vec<u16> = (0..SERVICES).map(|_| free_port()).collect();
    workspace(dir, rounds, &plain, &waves);
    let _agents = agents(dir, &[plain.clone(), waves.clone()].concat());
    let deadline = Instant::now() + Duration::from_secs(30);
    for env in ["plain", "waves"] {
        while !pde(dir, &["env", "check", env]).status.success() {
            assert!(Instant::now() < deadline, "the agents never answered");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // Round 0 warms both sides (files, page cache, the agents' stores).
    for env in ["plain", "waves"] {
        ok(dir, &["deploy", "100", "--env", env]);
    }

    let (mut p, mut w) = (Vec::new(), Vec::new());
    for r in 1..=rounds {
        let policy = (100 + r).to_string();
        let plain_deploy = ["deploy", policy.as_str(), "--env", "plain"];
        let waves_deploy = ["deploy", policy.as_str(), "--env", "waves"];
        if r % 2 == 0 {
            p.push(timed(dir, &plain_deploy));
            w.push(timed(dir, &waves_deploy));
        } else {
            w.push(timed(dir, &waves_deploy));
            p.push(timed(dir, &plain_deploy));
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let gate_url = format!("http://127.0.0.1:{}/active/100", waves[0]);
    let gates: Vec<Duration> = (0..rounds * 10)
        .map(|_| gate_round_trip(&rt, &gate_url))
        .collect();

    let (p, w, g) = (median(p), median(w), median(gates));
    let allowed = p.mul_f64(1.2) + g * WAVES as u32;
    println!(
        "rollout_overhead ({SERVICES} services, {WAVES} waves, zero bakes, {rounds} round(s), medians):"
    );
    println!("  plain deploy          {:>9.1} ms", ms(p));
    println!("  rollout in waves      {:>9.1} ms", ms(w));
    println!("  gate round trip       {:>9.2} ms", ms(g));
    println!(
        "  ratio                 {:>9.2}x  (beyond the gates: {:.2}x)",
        w.as_secs_f64() / p.as_secs_f64(),
        w.saturating_sub(g * WAVES as u32).as_secs_f64() / p.as_secs_f64()
    );
    println!(
        "  goal: <= 1.2 x plain + {WAVES} gate round trips = {:.1} ms: {}",
        ms(allowed),
        if w <= allowed { "met" } else { "NOT met" }
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
