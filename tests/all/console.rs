//! The web console (`pde serve`) and the self-contained report (`pde report
//! --html`), in a real browser: Debian's Chromium driven over WebDriver
//! (chromedriver) by fantoccini, against the demo's workspace with real
//! agents, on loopback only (issue 25).
//!
//! Without `chromium` and `chromedriver` on PATH these tests fail, naming
//! the packages (scripts/test.sh installs them). Screenshots of every page
//! go to the test's temp dir, and also to `$PDE_CONSOLE_SHOTS` when set
//! (how docs/console-*.png were made).

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::support::{self, both, code, git, pde, pde_env};

/// A chromedriver process on a free loopback port; killed on drop.
struct Driver {
    child: Child,
    url: String,
    /// Fresh profiles, one per session.
    profiles: tempfile::TempDir,
}

impl Driver {
    fn start() -> Driver {
        for bin in ["chromium", "chromedriver"] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {bin}")])
                .output()
                .is_ok_and(|o| o.status.success());
            assert!(
                found,
                "{bin} is not installed: these tests need a real browser. Install Debian's \
                 `chromium` and `chromium-driver` (scripts/test.sh does: apt-get install -y \
                 chromium chromium-driver)"
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
        Driver {
            child,
            url,
            profiles: tempfile::tempdir().unwrap(),
        }
    }

    /// A headless Chromium session; `scripts` off blocks JavaScript, and
    /// `offline` sends every request to a closed loopback port.
    async fn session(&self, scripts: bool, offline: bool) -> Client {
        let profile = tempfile::Builder::new()
            .prefix("profile")
            .tempdir_in(self.profiles.path())
            .unwrap()
            .keep();
        let mut args: Vec<String> = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1400,1000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        if offline {
            args.push("--proxy-server=http://127.0.0.1:9".into());
            args.push("--proxy-bypass-list=<-loopback>".into());
            args.push("--host-resolver-rules=MAP * ~NOTFOUND".into());
        }
        let mut options = json!({ "args": args, "binary": "/usr/bin/chromium" });
        if !scripts {
            options["prefs"] = json!({ "profile.managed_default_content_settings.javascript": 2 });
        }
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), "chrome".into());
        caps.insert("goog:chromeOptions".into(), options);
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("a Chromium session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `pde serve` on a free port; killed on drop.
struct Console {
    child: Child,
    url: String,
}

impl Console {
    fn start(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Console {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pde"));
        cmd.arg("-C")
            .arg(dir)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(extra)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        if !extra.contains(&"--live-every") {
            cmd.args(["--live-every", "1"]);
        }
        let mut child = cmd.spawn().expect("pde serve starts");
        let mut line = String::new();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        out.read_line(&mut line).unwrap();
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        let url = line
            .trim()
            .strip_prefix("console on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .trim_end_matches('/')
            .to_string();
        Console { child, url }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The demo's workspace (scripts/lib.sh `example_workspace`): the example
/// policies and plugins, installed, pinned, signed and committed, with one
/// agent per service; then the demo's deploys of 42 and 43 through dev,
/// staging and production.
struct Demo {
    dir: tempfile::TempDir,
    /// (environment, service) → agent URL.
    agents: Vec<(String, String, String)>,
}

fn demo() -> Demo {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path();
    copy_dir(&root.join("examples/workspace"), ws);
    for name in ["release.ed25519", "security-team.ed25519"] {
        let o = pde(ws, &["keygen", "--out", "keys", "--name", name]);
        assert_eq!(code(&o), 0, "{}", both(&o));
    }
    std::fs::write(ws.join(".gitignore"), ".pde/\nagents/\nkeys/*.ed25519\n").unwrap();
    for (name, wasm) in support::example_plugins() {
        let dest = ws.join(format!("plugins/{name}.wasm"));
        std::fs::copy(&wasm, &dest).unwrap();
        let sum = pde::plugin::sha256_hex(&std::fs::read(&dest).unwrap());
        let template =
            std::fs::read_to_string(root.join(format!("plugins/{name}/{name}.toml"))).unwrap();
        let body: String = template
            .lines()
            .filter(|l| !l.starts_with("sha256"))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(
            ws.join(format!("plugins/{name}.toml")),
            format!("sha256 = \"{sum}\"\n{body}"),
        )
        .unwrap();
        let o = pde(
            ws,
            &[
                "plugin",
                "sign",
                dest.to_str().unwrap(),
                "--key",
                ws.join("keys/security-team.ed25519").to_str().unwrap(),
                "--signer",
                "HMS Security Team",
            ],
        );
        assert_eq!(code(&o), 0, "{}", both(&o));
    }
    // One in-process agent per service, in place of the demo's fixed ports.
    let mut toml = std::fs::read_to_string(ws.join("pde.toml")).unwrap();
    let config = pde::config::Config::load(ws).unwrap();
    let mut agents = Vec::new();
    for (env, e) in &config.environments {
        for s in &e.services {
            let url = support::start_agent(
                &ws.join("agents").join(format!("{env}-{}", s.name)),
                &ws.join("keys/release.ed25519.pub"),
            );
            toml = toml.replacen(
                &format!("url = \"{}\"", s.url),
                &format!("url = \"{url}\""),
                1,
            );
            agents.push((env.clone(), s.name.clone(), url));
        }
    }
    std::fs::write(ws.join("pde.toml"), toml).unwrap();
    git(ws, &["init", "-q"]);
    git(ws, &["add", "-A"]);
    git(ws, &["commit", "-qm", "HMS policies 42, 43, 44"]);
    for env in ["dev", "staging", "production"] {
        for policy in ["42", "43"] {
            deploy(ws, policy, env);
        }
    }
    Demo { dir, agents }
}

fn deploy(ws: &Path, policy: &str, env: &str) {
    let o = pde_env(
        ws,
        &["deploy", policy, "--env", env],
        &[("PDE_ACTOR", "release-engineer@hms.example.gov")],
    );
    assert_eq!(code(&o), 0, "deploy {policy} to {env}: {}", both(&o));
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), &dest).unwrap();
        }
    }
}

/// Saves a screenshot of the current page under `dir` (and
/// `$PDE_CONSOLE_SHOTS`).
async fn shot(c: &Client, dir: &Path, name: &str) {
    let png = c.screenshot().await.unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(format!("{name}.png")), &png).unwrap();
    if let Some(keep) = std::env::var_os("PDE_CONSOLE_SHOTS") {
        let keep = PathBuf::from(keep);
        std::fs::create_dir_all(&keep).unwrap();
        std::fs::write(keep.join(format!("console-{name}.png")), &png).unwrap();
    }
}

async fn text(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"))
        .text()
        .await
        .unwrap()
}

/// Asserts the page rendered with scripts off: the `<noscript>` line shows.
async fn assert_scripts_off(c: &Client) {
    let t = text(c, "#scripts-off").await;
    assert!(t.contains("Scripts are off"), "{t}");
}

/// Presses Tab once, wherever the focus is.
async fn tab(c: &Client) {
    use fantoccini::actions::{InputSource, KeyAction, KeyActions};
    let key = '\u{e004}';
    let press = KeyActions::new("keyboard".into())
        .then(KeyAction::Down { value: key })
        .then(KeyAction::Up { value: key });
    c.perform_actions(press).await.unwrap();
}

/// Keyboard navigation of the current page: no positive `tabindex` (which
/// would reorder the page), every link and control is reached by Tab in
/// document order, and Tab from the last one moves on (no trap).
async fn assert_keyboard_reaches_every_control(c: &Client, page: &str) {
    // Start from the top of the document, nothing focused.
    c.refresh().await.unwrap();
    for e in c.find_all(Locator::Css("[tabindex]")).await.unwrap() {
        let t = e.attr("tabindex").await.unwrap().unwrap_or_default();
        assert!(
            t.trim().parse::<i32>().is_ok_and(|t| t <= 0),
            "{page}: tabindex={t} reorders the keyboard path"
        );
    }
    let controls = c
        .find_all(Locator::Css(
            "a[href], button, input:not([type=hidden]), select, textarea, summary",
        ))
        .await
        .unwrap();
    assert!(!controls.is_empty(), "{page}: nothing to reach");
    for (i, want) in controls.iter().enumerate() {
        tab(c).await;
        let got = c.active_element().await.unwrap();
        assert_eq!(
            got.element_id(),
            want.element_id(),
            "{page}: Tab #{} reached {:?}, not {:?}",
            i + 1,
            got.html(false).await.unwrap_or_default(),
            want.html(false).await.unwrap_or_default()
        );
    }
    tab(c).await;
    let after = c.active_element().await.unwrap();
    assert_ne!(
        after.element_id(),
        controls.last().unwrap().element_id(),
        "{page}: focus is trapped on the last control"
    );
}

fn get_json(url: &str, accept_json: bool) -> Value {
    support::runtime().block_on(async {
        let mut req = reqwest::Client::new().get(url);
        if accept_json {
            req = req.header("accept", "application/json");
        }
        let r = req.send().await.unwrap();
        assert!(r.status().is_success(), "{url}: {}", r.status());
        r.json().await.unwrap()
    })
}

/// A rollback sent straight to an agent, behind pde's back.
async fn rollback_on(ws: &Path, agent: &str, policy_id: &str, env: &str) {
    let key = pde::keys::load_signing_key(&ws.join("keys/release.ed25519")).unwrap();
    // A fence from the clock: newer than the deploy lock the agent last saw.
    let fence = Some(pde_core::fence::now_micros());
    let body = pde_core::rollback::request_body(policy_id, None, env, fence, Some(&key)).unwrap();
    let r = reqwest::Client::new()
        .post(format!("{agent}/rollback"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
}

#[test]
fn the_console_and_the_report_show_the_demo_drift_a_diff_and_a_broken_chain() {
    let demo = demo();
    let ws = demo.dir.path();
    let shots = ws.join("screenshots");
    let versions = [("42", "1.3.0"), ("43", "2.0.1")];

    // The JSON behind the pages is the CLI's own.
    let console = Console::start(ws, &[], &[]);
    let status = pde(ws, &["status", "--output", "json"]);
    assert_eq!(code(&status), 0, "{}", both(&status));
    assert_eq!(
        get_json(&format!("{}/api/status", console.url), false),
        support::json(&status)
    );
    let overview = get_json(&format!("{}/", console.url), true);
    assert_eq!(overview["schema"], "pde.console.overview/v1");
    assert_eq!(overview["status"], support::json(&status));
    let history = pde(ws, &["history", "42", "--output", "json"]);
    assert_eq!(
        get_json(&format!("{}/api/history/42", console.url), false),
        support::json(&history)
    );
    let plugins = pde(ws, &["plugin", "list", "--output", "json"]);
    assert_eq!(
        get_json(&format!("{}/api/plugins", console.url), false),
        support::json(&plugins)
    );
    let listed = support::json(&plugins);
    let guard = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "pii-guard")
        .unwrap();
    // The imports and what pde grants are `pde plugin inspect`'s, though
    // listing compiles nothing.
    let inspect = pde(ws, &["--output", "json", "plugin", "inspect", "pii-guard"]);
    assert_eq!(code(&inspect), 0, "{}", both(&inspect));
    let sorted = |v: &Value| {
        let mut v = v.as_array().unwrap().clone();
        v.sort_by_key(|c| c["import"].as_str().unwrap().to_string());
        v
    };
    assert_eq!(
        sorted(&guard["imports"]),
        sorted(&support::json(&inspect)["capabilities"])
    );
    let denied: Vec<&str> = guard["imports"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["granted"] == false)
        .map(|i| i["import"].as_str().unwrap())
        .collect();
    assert!(
        denied.iter().any(|i| i.starts_with("wasi:cli/environment")),
        "{guard:#}"
    );
    let page = get_json(&format!("{}/plugins", console.url), true);
    let row = page
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "pii-guard")
        .unwrap();
    assert_eq!(row["denied"], json!(denied), "{row:#}");
    assert_eq!(row["imports"], guard["imports"], "{row:#}");

    let driver = Driver::start();
    support::runtime().block_on(async {
        let c = driver.session(false, false).await;

        // Overview: 42 and 43 in every environment, at their versions, on
        // every service they were routed to.
        c.goto(&format!("{}/", console.url)).await.unwrap();
        assert_scripts_off(&c).await;
        for env in ["dev", "staging", "production"] {
            for (policy, version) in versions {
                let cell = text(&c, &format!("td[data-env='{env}'][data-policy='{policy}']")).await;
                assert!(
                    cell.starts_with(version) && cell.contains("(in sync)"),
                    "{policy} in {env}: {cell}"
                );
                assert!(!cell.contains("DRIFT"), "{policy} in {env}: {cell}");
            }
        }
        shot(&c, &shots, "overview").await;

        // Keyboard: the first Tab reaches the skip link, the next the first page link.
        let body = c.find(Locator::Css("body")).await.unwrap();
        body.send_keys("\u{e004}").await.unwrap();
        let active = c.active_element().await.unwrap();
        assert_eq!(active.text().await.unwrap(), "Skip to content");
        assert_keyboard_reaches_every_control(&c, "overview").await;

        // A changed rule: 42 v1.3.1 with a new income limit, deployed to dev.
        let path = ws.join("policies/42.json");
        let doc = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            doc.replace("\"1.3.0\"", "\"1.3.1\"")
                .replace("\"value\": 42000", "\"value\": 45000"),
        )
        .unwrap();
        git(ws, &["commit", "-qam", "42 v1.3.1: income limit 45000"]);
        deploy(ws, "42", "dev");
        c.goto(&format!("{}/policies/42", console.url))
            .await
            .unwrap();
        assert_scripts_off(&c).await;
        let diff = text(&c, "#changed-rules").await;
        assert!(
            diff.contains("heating.income-limit")
                && diff.contains("42000")
                && diff.contains("45000"),
            "{diff}"
        );
        assert!(!diff.contains("heating.min-age"), "{diff}");
        let dev = text(&c, "table.history[data-env='dev']").await;
        assert!(dev.contains("1.3.1") && dev.contains("deployed"), "{dev}");
        assert!(dev.contains("legal-counsel"), "approvals shown: {dev}");
        assert!(dev.contains("policy/42/v1.3.1/dev"), "tag shown: {dev}");
        shot(&c, &shots, "policy").await;
        assert_keyboard_reaches_every_control(&c, "policy").await;

        // Drift: production's HMS-API loses 42 behind pde's back.
        let (_, _, api) = demo
            .agents
            .iter()
            .find(|(e, s, _)| e == "production" && s == "HMS-API")
            .unwrap();
        rollback_on(ws, api, "42", "production").await;
        let cell_css = "td[data-env='production'][data-policy='42']";
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            c.goto(&format!("{}/", console.url)).await.unwrap();
            let cell = text(&c, cell_css).await;
            if cell.contains("DRIFT") {
                assert!(cell.contains("HMS-API"), "{cell}");
                break;
            }
            assert!(Instant::now() < deadline, "no drift shown: {cell}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let other = text(&c, "td[data-env='staging'][data-policy='43']").await;
        assert!(!other.contains("DRIFT"), "{other}");
        let read_at = text(&c, "#live-read-at").await;
        assert!(read_at.starts_with("20"), "{read_at}");
        shot(&c, &shots, "overview-drift").await;

        // Plugins: all signed by the trusted key, then one re-signed by an
        // untrusted key shows as unsigned.
        c.goto(&format!("{}/plugins", console.url)).await.unwrap();
        let row = text(&c, "tr[data-plugin='pii-guard'] td.signature").await;
        assert!(
            row.starts_with(
                "signed by HMS Security Team with key keys/security-team.ed25519.pub ("
            ),
            "{row}"
        );
        let o = pde(ws, &["keygen", "--for", "plugin", "--out", "untrusted"]);
        assert_eq!(code(&o), 0, "{}", both(&o));
        let o = pde(
            ws,
            &[
                "plugin",
                "sign",
                ws.join("plugins/pii-guard.wasm").to_str().unwrap(),
                "--key",
                ws.join("untrusted/plugin.ed25519").to_str().unwrap(),
            ],
        );
        assert_eq!(code(&o), 0, "{}", both(&o));
        c.goto(&format!("{}/plugins", console.url)).await.unwrap();
        assert_scripts_off(&c).await;
        let row = text(&c, "tr[data-plugin='pii-guard'] td.signature").await;
        assert!(row.starts_with("UNSIGNED"), "{row}");
        let other = text(&c, "tr[data-plugin='effective-date'] td.signature").await;
        assert!(other.starts_with("signed by"), "{other}");
        // What each imports, and what pde denies it: the environment is
        // linked but empty.
        let denied = text(&c, "tr[data-plugin='pii-guard'] td.denied").await;
        assert!(denied.contains("wasi:cli/environment"), "{denied}");
        assert!(
            !denied.contains("wasi:cli/stdout"),
            "granted, not denied: {denied}"
        );
        let summary = text(&c, "tr[data-plugin='pii-guard'] td.imports summary").await;
        assert!(
            summary.contains("import(s)") && summary.contains("denied"),
            "{summary}"
        );
        shot(&c, &shots, "plugins").await;
        assert_keyboard_reaches_every_control(&c, "plugins").await;

        // Timeline: an inline SVG, and its counts as a table.
        c.goto(&format!("{}/timeline", console.url)).await.unwrap();
        c.find(Locator::Css("figure svg")).await.unwrap();
        let table = text(&c, "#timeline").await;
        assert!(table.contains("production"), "{table}");
        shot(&c, &shots, "timeline").await;

        // The audit page while the chain is intact.
        c.goto(&format!("{}/audit", console.url)).await.unwrap();
        let v = text(&c, "#verification").await;
        assert!(v.contains("INTACT"), "{v}");
        let anchors = text(&c, "#anchors").await;
        assert!(
            anchors.contains("tag policy/43/v2.0.1/production"),
            "{anchors}"
        );
        // Filters work without scripts: a GET form.
        c.goto(&format!(
            "{}/audit?event=deployed&env=production",
            console.url
        ))
        .await
        .unwrap();
        let rows = c.find_all(Locator::Css("#records tbody tr")).await.unwrap();
        assert_eq!(
            rows.len(),
            2,
            "one deployed record per policy in production"
        );
        assert_keyboard_reaches_every_control(&c, "audit").await;
        c.close().await.unwrap();
    });

    // The report, written while the chain is intact, opened from file://
    // with every request sent nowhere.
    let verify = pde(ws, &["audit", "verify", "--output", "json"]);
    assert_eq!(code(&verify), 0, "{}", both(&verify));
    let verify = support::json(&verify);
    let o = pde(ws, &["report", "--html", "report.html", "--output", "json"]);
    assert_eq!(code(&o), 0, "{}", both(&o));
    let summary = support::json(&o);
    assert_eq!(summary["audit_status"], "intact");
    let report = ws.join("report.html");
    let html = std::fs::read_to_string(&report).unwrap();
    // Service URLs appear as text in the records; nothing refers to one.
    for external in ["src=", "href=\"http", "url(", "<script", "<link", "@import"] {
        assert!(!html.contains(external), "the report has {external:?}");
    }
    support::runtime().block_on(async {
        let c = driver.session(true, true).await;
        c.goto(&format!("file://{}", report.display()))
            .await
            .unwrap();
        let v = text(&c, "#verification").await;
        assert!(v.contains("INTACT"), "{v}");
        assert!(v.contains(verify["last_hash"].as_str().unwrap()), "{v}");
        assert_eq!(text(&c, "#pde-version").await, env!("CARGO_PKG_VERSION"));
        assert!(!text(&c, "#pde-commit").await.is_empty());
        let head = git(ws, &["rev-parse", "HEAD"]);
        assert_eq!(text(&c, "#workspace-commit").await, head.trim());
        for env in ["staging", "production"] {
            for (policy, version) in versions {
                let cell = text(&c, &format!("td[data-env='{env}'][data-policy='{policy}']")).await;
                assert!(cell.starts_with(version), "{policy} in {env}: {cell}");
            }
        }
        let dev42 = text(&c, "td[data-env='dev'][data-policy='42']").await;
        assert!(dev42.starts_with("1.3.1"), "{dev42}");
        // Nothing was fetched: the page's only resource is itself.
        let fetched = c
            .execute(
                "return performance.getEntriesByType('resource').length",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(fetched, json!(0));
        shot(&c, &shots, "report").await;
        c.close().await.unwrap();
    });

    // An audit log edited on disk: the page names the first bad record.
    let log = ws.join(".pde/audit.jsonl");
    let text_log = std::fs::read_to_string(&log).unwrap();
    let mut lines: Vec<String> = text_log.lines().map(str::to_string).collect();
    let mut third: Value = serde_json::from_str(&lines[2]).unwrap();
    third["actor"] = "mallory".into();
    lines[2] = serde_json::to_string(&third).unwrap();
    std::fs::write(&log, lines.join("\n") + "\n").unwrap();
    support::runtime().block_on(async {
        let c = driver.session(false, false).await;
        c.goto(&format!("{}/audit", console.url)).await.unwrap();
        assert_scripts_off(&c).await;
        let v = text(&c, "#verification").await;
        assert!(v.contains("BROKEN"), "{v}");
        let first = text(&c, "#first-bad").await;
        assert!(first.contains("line 3"), "{first}");
        let row = text(&c, "tr.first-bad").await;
        assert!(
            row.starts_with("3 FIRST BAD RECORD") && row.contains("mallory"),
            "{row}"
        );
        shot(&c, &shots, "audit-broken").await;
        c.close().await.unwrap();
    });
    let o = pde(ws, &["report", "--html", "broken.html"]);
    assert_eq!(code(&o), 0, "{}", both(&o));
    let html = std::fs::read_to_string(ws.join("broken.html")).unwrap();
    assert!(
        html.contains("BROKEN") && html.contains("line 3"),
        "report names it"
    );
    for name in [
        "overview",
        "policy",
        "overview-drift",
        "plugins",
        "timeline",
        "report",
        "audit-broken",
    ] {
        assert!(shots.join(format!("{name}.png")).is_file(), "{name}");
    }
}

#[test]
fn off_loopback_the_console_needs_a_token() {
    let ws = support::Workspace::new("");
    ws.commit("init");
    // No token: refused before binding, exit 2.
    let o = pde(ws.root(), &["serve", "--listen", "0.0.0.0:0"]);
    assert_eq!(code(&o), 2, "{}", both(&o));
    assert!(
        support::stderr(&o).contains("not a loopback address"),
        "{}",
        both(&o)
    );
    // With one, a request without it is 401 and one with it is served.
    let console = Console::start(
        ws.root(),
        &["--token-env", "CONSOLE_TOKEN", "--live-every", "0"],
        &[("CONSOLE_TOKEN", "s3cret-token")],
    );
    support::runtime().block_on(async {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let r = http
            .get(format!("{}/api/status", console.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let r = http
            .get(format!("{}/api/status", console.url))
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let r = http
            .get(format!("{}/api/status", console.url))
            .bearer_auth("s3cret-token")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.json::<Value>().await.unwrap(), json!([]));
        // A browser without scripts: ?token= once sets a cookie.
        let r = http
            .get(format!("{}/audit?token=s3cret-token", console.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 303);
        let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
        assert!(cookie.contains("HttpOnly"), "{cookie}");
        let r = http
            .get(format!("{}/audit", console.url))
            .header("cookie", cookie.split(';').next().unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let csp = r.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(csp.starts_with("default-src 'none'"), "{csp}");
    });
}

/// A workspace whose production deploys go out in two waves judged by an
/// HTTP gate against the real agents.
fn rollout_workspace(gate_path: &str) -> (support::Workspace, Vec<String>) {
    let ws = support::Workspace::new("");
    let urls: Vec<String> = ["S0", "S1"].iter().map(|s| ws.agent(s)).collect();
    let services: Vec<support::Svc> = ["S0", "S1"]
        .into_iter()
        .zip(&urls)
        .map(|(name, url)| support::Svc {
            name,
            url: url.clone(),
            tags: &["api"],
        })
        .collect();
    let toml = std::fs::read_to_string(ws.root().join("pde.toml")).unwrap()
        + &support::Workspace::env_toml("production", "", &services)
        + &rollout_toml(gate_path);
    std::fs::write(ws.root().join("pde.toml"), toml).unwrap();
    ws.commit("two waves, an HTTP gate");
    (ws, urls)
}

fn rollout_toml(gate_path: &str) -> String {
    format!(
        "[environments.production.rollout]\npoll_ms = 100\n\
         [[environments.production.rollout.gates]]\nkind = \"http\"\nname = \"serves-digest\"\n\
         url = \"${{service_url}}{gate_path}\"\njson_field = \"/digest\"\nequals = \"${{digest}}\"\n\
         [[environments.production.rollout.waves]]\nname = \"canary\"\ncount = 1\nbake = \"0s\"\n\
         [[environments.production.rollout.waves]]\nname = \"rest\"\nbake = \"0s\"\n"
    )
}

#[test]
fn the_policy_page_shows_each_rollouts_waves_and_gate_results() {
    let (ws, _urls) = rollout_workspace("/active/${policy_id}");
    let root = ws.root();
    // 1.0.0 passes both waves; 1.0.1 fails its canary's gate (the gate asks
    // a path the agent does not serve) and is sent back: exit 8.
    let o = pde(root, &["deploy", "42", "--env", "production"]);
    assert_eq!(code(&o), 0, "{}", both(&o));
    ws.write_policy("42.json", &support::policy_42("1.0.1").to_string());
    let toml = std::fs::read_to_string(root.join("pde.toml")).unwrap();
    std::fs::write(
        root.join("pde.toml"),
        toml.replace("/active/${policy_id}", "/no-such-path/${policy_id}"),
    )
    .unwrap();
    ws.commit("1.0.1, a gate that cannot pass");
    let o = pde(root, &["deploy", "42", "--env", "production"]);
    assert_eq!(code(&o), 8, "{}", both(&o));

    let console = Console::start(root, &["--live-every", "0"], &[]);
    let page = get_json(&format!("{}/api/policies/42", console.url), false);
    let rollouts = page["rollouts"].as_array().unwrap();
    assert_eq!(rollouts.len(), 2, "{page:#}");
    let (failed, passed) = (&rollouts[0], &rollouts[1]);
    assert_eq!(passed["status"], "deployed", "{passed:#}");
    assert_eq!(passed["version"], "1.0.0");
    for w in passed["report"]["waves"].as_array().unwrap() {
        assert_eq!(w["status"], "passed", "{w:#}");
        assert_eq!(w["results"][0]["gate"], "serves-digest", "{w:#}");
        assert_eq!(w["results"][0]["verdict"], "pass", "{w:#}");
    }
    assert_eq!(failed["status"], "rolled-back", "{failed:#}");
    let canary = &failed["report"]["waves"][0];
    assert_eq!(canary["results"][0]["passed"], false, "{canary:#}");
    assert_eq!(failed["report"]["waves"][1]["status"], "pending");
    // Each deployment names the rollout that delivered it.
    let history = &page["envs"]["production"];
    assert_eq!(history[0]["rollout"], failed["id"], "{history:#}");
    assert_eq!(history[1]["rollout"], passed["id"], "{history:#}");
    // The CLI's history lists the same rollouts from the same function.
    let h = pde(root, &["history", "42"]);
    let text_h = String::from_utf8_lossy(&h.stdout);
    assert!(
        text_h.contains("wave 1 canary") && text_h.contains("FAILS THE WAVE"),
        "{text_h}"
    );

    let driver = Driver::start();
    support::runtime().block_on(async {
        let c = driver.session(false, false).await;
        c.goto(&format!("{}/policies/42", console.url))
            .await
            .unwrap();
        assert_scripts_off(&c).await;
        let id = failed["id"].as_i64().unwrap();
        let table = text(&c, &format!("#rollout-{id}")).await;
        assert!(
            table.contains("rolled-back")
                && table.contains("1 canary")
                && table.contains("serves-digest")
                && table.contains("FAILS THE WAVE"),
            "{table}"
        );
        let ok = text(&c, &format!("#rollout-{}", passed["id"])).await;
        assert!(
            ok.contains("deployed") && ok.contains("pass (passed)"),
            "{ok}"
        );
        assert!(!ok.contains("FAILS"), "{ok}");
        // The history row links to its rollout's waves.
        let link = c
            .find(Locator::Css(&format!(
                "table.history a[href='#rollout-{id}']"
            )))
            .await
            .unwrap();
        assert_eq!(link.text().await.unwrap(), format!("rollout {id}"));
        shot(&c, &root.join("screenshots"), "policy-rollout").await;
        c.close().await.unwrap();
    });
}
