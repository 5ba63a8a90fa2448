//! A real Prometheus for the rollout tests, and the small exporters it
//! scrapes: one per service, reporting an error ratio that turns bad when
//! the service's agent activates the bad version (its `--on-activate` hook
//! writes the version it activated to a file the exporter reads).
//!
//! Each test starts its own Prometheus (Debian's `prometheus` package,
//! which `scripts/test.sh` installs) with a generated config listing its
//! exporters, a 1 s scrape interval and storage in a temp dir; it is killed
//! when the test ends. Without the binary the tests fail, they do not skip.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `prometheus` binary: `$PDE_TEST_PROMETHEUS`, else on `PATH`.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("PDE_TEST_PROMETHEUS") {
        return p.into();
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let p = dir.join("prometheus");
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "the rollout tests need a real Prometheus: `apt-get install -y prometheus` (scripts/test.sh \
         does this), or set PDE_TEST_PROMETHEUS to its binary"
    );
}

/// A running Prometheus; killed on drop.
pub struct Prometheus {
    child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (`host:port`) every second.
    pub fn start(targets: &[String]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: services\n    static_configs:\n      - targets: [{}]\n",
                list.join(", ")
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new(binary())
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus starts");
        let p = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while get(&format!("{}/-/ready", p.url)).map(|(s, _)| s) != Some(200) {
            assert!(Instant::now() < deadline, "prometheus did not become ready");
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    /// The values of an instant query's series.
    pub fn query(&self, q: &str) -> Vec<f64> {
        let url =
            reqwest::Url::parse_with_params(&format!("{}/api/v1/query", self.url), [("query", q)])
                .unwrap();
        let Some((200, body)) = get(url.as_str()) else {
            return Vec::new();
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["data"]["result"]
            .as_array()
            .map(|r| {
                r.iter()
                    .filter_map(|s| s["value"][1].as_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until `q` returns `n` series (the exporters were scraped).
    pub fn wait_for(&self, q: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.query(q).len() != n {
            assert!(
                Instant::now() < deadline,
                "prometheus never had {n} series of {q}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain blocking `GET` (no runtime needed): status and body.
fn get(url: &str) -> Option<(u16, String)> {
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let mut s = std::net::TcpStream::connect(host).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Some((status, body))
}

/// The `--on-activate` hook that writes the activated version to `file`.
pub fn hook(file: &Path) -> String {
    format!("printf %s \"$PDE_VERSION\" > '{}'; :", file.display())
}

/// Starts an exporter for `service` on 127.0.0.1: `/metrics` reports
/// `pde_test_error_ratio{service}` as 0.5 while `version_file` holds
/// `bad_version`, else 0.01. Returns `host:port`.
pub fn exporter(service: &str, version_file: PathBuf, bad_version: &str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (service, bad) = (service.to_string(), bad_version.to_string());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let running = std::fs::read_to_string(&version_file).unwrap_or_default();
            let ratio = if running.trim() == bad { 0.5 } else { 0.01 };
            let body = format!(
                "# TYPE pde_test_error_ratio gauge\npde_test_error_ratio{{service=\"{service}\"}} {ratio}\n"
            );
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    addr
}
