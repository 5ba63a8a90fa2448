//! Fan-out cost on the deployer's side, push against pull (issue 23).
//!
//! The delivery step of a deploy (step 5; validate, package, tag and audit
//! are the same for both and not measured here) to a fleet of 1, 100 and
//! 1,000 **real agents** (`pde_agent::Agent`, the library `pde agent` and
//! `pde-agent` run, each with its own data dir, verifying signatures and
//! fences and writing durably) that live in a **second process**, so the
//! deployer's memory is its own:
//! - **push**: `pde::push::push`, fenced and signed as `pde deploy` sends
//!   it, to every agent (`[push] concurrency` at its default, 128);
//! - **publish**: `pde::push::publish::publish` once to a real registry
//!   (Debian's `docker-registry`, the CNCF distribution registry, on
//!   loopback), with no listed services to wait for (a fleet too large to
//!   list), while every agent of the fleet polls the registry (`--pull`,
//!   interval 5 s). Then the fleet process reports how long after the
//!   publish its last agent reported the new digest on `GET /active/42`
//!   (goal: within 3 poll intervals; a miss is printed, not a panic: the
//!   bench reports what this machine did).
//!
//! For each, the wall time of the step and the deployer process's peak RSS
//! (`VmHWM`, reset through `/proc/self/clear_refs` before each step).
//!
//! Run (release): `cargo bench --bench fanout_oci` from the workspace, with
//! `ulimit -n` at 8192 or more. Without
//! `--bench` (`cargo test --benches`, as `scripts/test.sh` runs it) it is a
//! smoke run: fleets of 1 and 10, one round, 1 s interval. It needs the
//! registry binary (`$PDE_TEST_REGISTRY_BIN` or `docker-registry` on `PATH`)
//! and fails without it.
// Bench code: a failed unwrap is a failed bench, with its location.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
#[path = "../../../tests/all/support/registry.rs"]
mod registry;

#[path = "../../engine/benches/common/release.rs"]
mod release;

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use pde::config::PushConfig;
use pde::push::publish::{Publish, publish};
use pde::push::{self, Fenced, Outcome, Target};
use pde_agent::pull::PullConfig;
use pde_agent::{Agent, AgentConfig};
use pde_core::keys::TrustedKeys;
use pde_core::oci::{Registry, RegistryOptions};

const ENV: &str = "production";
const POLICY: &str = "42";
/// Set in the fleet process: `push` (agents that are pushed to) or `pull`.
const ROLE: &str = "PDE_FANOUT_ROLE";

/// A line of /proc/<pid>/status, in KiB.
fn status_kib(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with(field))?.to_string();
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn env_var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"))
}

/// The fleet process: `n` agents on loopback; prints `url …` per agent and
/// `ready`, then answers `await <digest>` with `converged <ms> <rss KiB>`
/// once every agent reports that digest for policy 42.
fn fleet_main(role: &str) {
    let n: usize = env_var("PDE_FANOUT_N").parse().unwrap();
    let dir = PathBuf::from(env_var("PDE_FANOUT_DIR"));
    let interval = Duration::from_millis(env_var("PDE_FANOUT_INTERVAL_MS").parse().unwrap());
    let reference = env_var("PDE_FANOUT_REFERENCE");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let urls: Vec<String> = rt.block_on(async {
        let mut urls = Vec::with_capacity(n);
        for i in 0..n {
            let mut trusted = TrustedKeys::new();
            trusted.add(release::release_key().verifying_key());
            let mut agent = Agent::open(AgentConfig {
                trusted,
                ..AgentConfig::new(dir.join(format!("a{i}")))
            })
            .unwrap();
            if role == "pull" {
                agent = agent
                    .with_pull(PullConfig {
                        repository: reference.parse().unwrap(),
                        env: ENV.into(),
                        policies: vec![POLICY.into()],
                        interval,
                        options: RegistryOptions {
                            plain_http: true,
                            ..RegistryOptions::default()
                        },
                    })
                    .unwrap();
            }
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            urls.push(format!("http://{}", listener.local_addr().unwrap()));
            tokio::spawn(agent.serve(listener, std::future::pending()));
        }
        urls
    });
    let mut out = std::io::stdout().lock();
    for u in &urls {
        writeln!(out, "url {u}").unwrap();
    }
    writeln!(out, "ready").unwrap();
    out.flush().unwrap();
    let client = push::client(Duration::from_secs(10)).unwrap();
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let Some(digest) = line.strip_prefix("await ") else {
            continue;
        };
        let started = Instant::now();
        rt.block_on(await_all(&client, &urls, digest));
        writeln!(
            out,
            "converged {} {}",
            started.elapsed().as_millis(),
            status_kib("self", "VmRSS:")
        )
        .unwrap();
        out.flush().unwrap();
    }
}

/// Reads `GET /active/42` of every agent not yet on `digest` until all are
/// (64 reads at a time, a round every 100 ms), for at most two minutes.
async fn await_all(client: &reqwest::Client, urls: &[String], digest: &str) {
    use futures::stream::{self, StreamExt};
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut waiting: Vec<&String> = urls.iter().collect();
    while !waiting.is_empty() {
        let seen: Vec<bool> = stream::iter(waiting.iter().map(|u| async move {
            let Ok(r) = client.get(format!("{u}/active/{POLICY}")).send().await else {
                return false;
            };
            let v: serde_json::Value = r.json().await.unwrap_or_default();
            v["digest"] == digest
        }))
        .buffered(64)
        .collect()
        .await;
        waiting = waiting
            .into_iter()
            .zip(seen)
            .filter(|(_, ok)| !ok)
            .map(|(u, _)| u)
            .collect();
        assert!(
            Instant::now() < deadline,
            "{} agents did not converge on {digest} within 2 minutes",
            waiting.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A fleet process and its agents' URLs; killed on drop.
struct Fleet {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    urls: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Fleet {
    fn start(role: &str, n: usize, reference: &str, interval: Duration) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env(ROLE, role)
            .env("PDE_FANOUT_N", n.to_string())
            .env("PDE_FANOUT_DIR", dir.path())
            .env("PDE_FANOUT_INTERVAL_MS", interval.as_millis().to_string())
            .env("PDE_FANOUT_REFERENCE", reference)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut urls = Vec::with_capacity(n);
        loop {
            let mut line = String::new();
            assert!(
                stdout.read_line(&mut line).unwrap() > 0,
                "the fleet process of {n} agents ended before it was ready"
            );
            match line.trim().strip_prefix("url ") {
                Some(u) => urls.push(u.to_string()),
                None if line.trim() == "ready" => break,
                None => {}
            }
        }
        Fleet {
            child,
            stdin,
            stdout,
            urls,
            _dir: dir,
        }
    }

    /// Waits until every agent reports `digest`: milliseconds since asked,
    /// and the fleet process's RSS then (KiB).
    fn converge(&mut self, digest: &str) -> (u64, u64) {
        writeln!(self.stdin, "await {digest}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let mut words = line.split_whitespace().skip(1);
        let mut next = || -> u64 {
            words
                .next()
                .and_then(|w| w.parse().ok())
                .unwrap_or_else(|| panic!("the fleet process said {line:?}"))
        };
        (next(), next())
    }

    fn targets(&self) -> Vec<Target> {
        self.urls
            .iter()
            .enumerate()
            .map(|(i, u)| Target::new(format!("svc-{i}"), u, None))
            .collect()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `step` with the process's high-water mark reset before it: its wall
/// time and the peak RSS while it ran (KiB).
fn measured<T>(step: impl FnOnce() -> T) -> (T, Duration, u64) {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let started = Instant::now();
    let out = step();
    let took = started.elapsed();
    (out, took, status_kib("self", "VmHWM:"))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    if let Ok(role) = std::env::var(ROLE) {
        return fleet_main(&role);
    }
    let args: Vec<String> = std::env::args().collect();
    // criterion's rule: without `--bench` (cargo test --benches), or with
    // `--test`, a bench only proves that it runs.
    let smoke = !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--test");
    let (sizes, rounds, interval): (&[usize], usize, Duration) = if smoke {
        (&[1, 10], 1, Duration::from_secs(1))
    } else {
        (&[1, 100, 1000], 3, Duration::from_secs(5))
    };
    if !smoke {
        // 1,000 agents, their listeners, data dirs and connections.
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let soft = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3)?.parse::<u64>().ok());
        assert!(
            soft.is_none_or(|s| s >= 8192),
            "1,000 agents need about 8192 open files and `ulimit -n` is {soft:?}: raise it"
        );
    }
    let reg = registry::Registry::start();
    let reference = reg.reference();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = push::client(Duration::from_secs(10)).unwrap();
    let key = release::release_key();
    let push_cfg = PushConfig::default();
    let mut fence = pde_core::fence::now_micros();
    let mut version = 0;
    let mut next_bundle = || {
        version += 1;
        release::bundle(POLICY, &format!("1.{version}.0"))
    };
    let mut rows = Vec::new();

    let registry = Registry::new(
        reference.parse().unwrap(),
        RegistryOptions {
            plain_http: true,
            ..RegistryOptions::default()
        },
    )
    .unwrap();
    let p = Publish {
        registry: &registry,
        http: &client,
        push: &push_cfg,
        converge_timeout: Duration::from_secs(120),
        fleet: None,
    };
    for &n in sizes {
        let mut fleet = Fleet::start("pull", n, &reference, interval);
        // Let every agent poll (and find its tag absent) at least once.
        std::thread::sleep(interval.mul_f64(1.3));
        let (mut times, mut peak, mut slowest, mut fleet_rss) = (Vec::new(), 0, 0, 0);
        for _ in 0..rounds {
            let b = next_bundle();
            let ((report, _), took, hwm) = measured(|| rt.block_on(publish(&p, &b, ENV, &[], &())));
            assert_eq!(report.outcome, Outcome::Deployed, "publish: {report:?}");
            let (converged_ms, rss) = fleet.converge(&b.digest);
            times.push(took);
            peak = peak.max(hwm);
            slowest = slowest.max(converged_ms);
            fleet_rss = fleet_rss.max(rss);
        }
        let intervals = slowest as f64 / interval.as_millis() as f64;
        println!(
            "fanout_oci/publish/{n}: median {:?} of {rounds}, deployer peak RSS {:.1} MiB; \
             all {n} pull agents converged within {slowest} ms at worst ({intervals:.2} poll \
             intervals of {interval:?}; fleet process RSS {:.1} MiB)",
            median(times.clone()),
            mib(peak),
            mib(fleet_rss),
        );
        if !smoke && intervals > 3.0 {
            println!(
                "fanout_oci/publish/{n}: GOAL MISSED: {intervals:.2} poll intervals to converge (goal: 3)"
            );
        }
        rows.push(("publish", n, median(times), peak, Some(intervals)));
    }

    // Push after publish: a process's high-water mark can only be reset down
    // to what it holds, and the allocator keeps what 1,000 pushes took.
    for &n in sizes {
        let fleet = Fleet::start("push", n, &reference, interval);
        let targets = fleet.targets();
        let (mut times, mut peak) = (Vec::new(), 0);
        for _ in 0..rounds {
            let b = next_bundle();
            fence += 1;
            let fenced = Fenced {
                signer: Some(&key),
                fence: Some(fence),
            };
            let (report, took, hwm) = measured(|| {
                rt.block_on(push::push(
                    &client,
                    &b,
                    ENV,
                    &targets,
                    &push_cfg,
                    fenced,
                    &(),
                ))
            });
            assert_eq!(report.outcome, Outcome::Deployed, "push to {n}: {report:?}");
            times.push(took);
            peak = peak.max(hwm);
        }
        println!(
            "fanout_oci/push/{n}: median {:?} of {rounds}, deployer peak RSS {:.1} MiB",
            median(times.clone()),
            mib(peak)
        );
        rows.push(("push", n, median(times), peak, None));
    }

    println!(
        "\n| delivery | targets | step time (median) | deployer peak RSS | pull agents converged within |"
    );
    println!("|---|---|---|---|---|");
    for (kind, n, t, peak, conv) in &rows {
        println!(
            "| {kind} | {n} | {t:.1?} | {:.1} MiB | {} |",
            mib(*peak),
            conv.map_or("—".to_string(), |c| format!("{c:.2} intervals"))
        );
    }
    let ratio = |kind: &str| {
        let at = |n: usize| rows.iter().find(|r| r.0 == kind && r.1 == n).map(|r| r.2);
        let (lo, hi) = (sizes[0], sizes[sizes.len() - 1]);
        at(hi).unwrap().as_secs_f64() / at(lo).unwrap().as_secs_f64()
    };
    println!(
        "\nratio {} : {} targets: push {:.1}x, publish {:.2}x",
        sizes[sizes.len() - 1],
        sizes[0],
        ratio("push"),
        ratio("publish")
    );
}
