//! Real parts for the integration tests: policy workspaces in temp Git
//! repositories, the example plugins built from source, `pde agent`s and a
//! §8 test receiver with injectable faults, all on 127.0.0.1.

pub mod pg;
pub mod prom;
pub mod receiver;
pub mod registry;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use pde::keys::{self, TrustedKeys};

/// A tokio runtime shared by every server a test starts; it lives on its own
/// threads so the blocking [`pde::blocking::Engine`] can be driven from the test.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("test runtime")
    })
}

/// Starts an in-process `pde agent` that trusts `trusted`; returns its base URL.
pub fn start_agent(data_dir: &Path, trusted: &Path) -> String {
    let cfg = pde_agent::AgentConfig {
        data_dir: data_dir.to_path_buf(),
        trusted: TrustedKeys::from_files(&[trusted]).expect("trusted key"),
        insecure_accept_unsigned: false,
        token: None,
        max_body_bytes: 16 << 20,
        keep: 10,
        on_activate: None,
        max_concurrent_deploys: 4,
        approvers: pde::approval::Approvers::new(),
        min_approvals: 0,
        validation: Default::default(),
        max_connections: pde_agent::DEFAULT_MAX_CONNECTIONS,
        header_read_timeout: pde_agent::DEFAULT_HEADER_TIMEOUT,
    };
    let agent = pde_agent::Agent::open(cfg).expect("agent opens");
    let listener = runtime()
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr: SocketAddr = listener.local_addr().unwrap();
    runtime().spawn(async move {
        let _ = agent.serve(listener, std::future::pending::<()>()).await;
    });
    format!("http://{addr}")
}

/// Runs git in `dir`, panicking with its stderr on failure.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .current_dir(dir)
        .args(["-c", "user.name=Test", "-c", "user.email=test@example.gov"])
        .args(args)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One service line of a test `pde.toml`.
pub struct Svc {
    pub name: &'static str,
    pub url: String,
    pub tags: &'static [&'static str],
}

/// A policy workspace in a temp Git repository.
pub struct Workspace {
    pub dir: tempfile::TempDir,
}

/// Example plugins to install: (name, kind, wasm path).
pub fn example_plugins() -> Vec<(&'static str, PathBuf)> {
    vec![
        (
            "eligibility-bounds",
            PathBuf::from(pde_plugin_artifacts::ELIGIBILITY_BOUNDS),
        ),
        ("pii-guard", PathBuf::from(pde_plugin_artifacts::PII_GUARD)),
        (
            "effective-date",
            PathBuf::from(pde_plugin_artifacts::EFFECTIVE_DATE),
        ),
        (
            "category-router",
            PathBuf::from(pde_plugin_artifacts::CATEGORY_ROUTER),
        ),
    ]
}

impl Workspace {
    /// A workspace with a signing key, a plugin-signing key, the given
    /// environments and policy 42 (see [`policy_42`]). Nothing committed yet.
    pub fn new(envs: &str) -> Workspace {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        keys::generate(&root.join("keys"), "release.ed25519").unwrap();
        keys::generate(&root.join("keys"), "security.ed25519").unwrap();
        std::fs::create_dir_all(root.join("policies")).unwrap();
        std::fs::create_dir_all(root.join("plugins")).unwrap();
        std::fs::write(
            root.join("pde.toml"),
            format!(
                "policies = \"policies\"\nplugins = \"plugins\"\nstate = \".pde\"\n\
                 [signing]\nkey_file = \"keys/release.ed25519\"\n\
                 [trust]\nplugin_keys = [\"keys/security.ed25519.pub\"]\n\
                 [push]\ntimeout_ms = 1500\nretries = 2\nbackoff_ms = 20\n{envs}"
            ),
        )
        .unwrap();
        std::fs::write(root.join(".gitignore"), ".pde/\nagents/\n").unwrap();
        let ws = Workspace { dir };
        ws.write_policy("42.json", &policy_42("1.0.0").to_string());
        git(ws.root(), &["init", "-q"]);
        ws
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// `[environments.<name>]` with services; `extra` goes in the table.
    pub fn env_toml(name: &str, extra: &str, services: &[Svc]) -> String {
        let mut s = format!("[environments.{name}]\n{extra}\n");
        for svc in services {
            s.push_str(&format!(
                "[[environments.{name}.services]]\nname = \"{}\"\nurl = \"{}\"\ntags = {:?}\n",
                svc.name, svc.url, svc.tags
            ));
        }
        s
    }

    pub fn write_policy(&self, file: &str, text: &str) {
        std::fs::write(self.root().join("policies").join(file), text).unwrap();
    }

    /// Installs a plugin as a security team would: copy, pin the sha256 in
    /// its manifest, and sign it when `sign` is set.
    pub fn install_plugin(&self, name: &str, kind: &str, wasm: &Path, settings: &str, sign: bool) {
        let dest = self.root().join("plugins").join(format!("{name}.wasm"));
        std::fs::copy(wasm, &dest).unwrap();
        let bytes = std::fs::read(&dest).unwrap();
        let sum = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        std::fs::write(
            self.root().join("plugins").join(format!("{name}.toml")),
            format!(
                "name = \"{name}\"\nkind = \"{kind}\"\nversion = \"1.0.0\"\nsha256 = \"{sum}\"\n\
                 description = \"test install\"\n{settings}"
            ),
        )
        .unwrap();
        if sign {
            let key = keys::load_signing_key(&self.root().join("keys/security.ed25519")).unwrap();
            let host = pde::plugin::PluginHost::new(Default::default(), None).unwrap();
            let signer = pde::plugin::signature::Signer {
                name: "security team".into(),
                note: None,
            };
            host.sign_file(&dest, &key, &signer).unwrap();
        }
    }

    /// Installs every example plugin, signed.
    pub fn install_examples(&self) {
        for (name, wasm) in example_plugins() {
            let kind = if name.ends_with("router") {
                "router"
            } else {
                "validator"
            };
            self.install_plugin(name, kind, &wasm, "", true);
        }
    }

    pub fn commit(&self, message: &str) {
        git(self.root(), &["add", "-A"]);
        git(
            self.root(),
            &["commit", "-q", "--allow-empty", "-m", message],
        );
    }

    pub fn engine(&self) -> pde::blocking::Engine {
        pde::blocking::Engine::open(self.root()).expect("engine opens")
    }

    pub fn release_pub(&self) -> PathBuf {
        self.root().join("keys/release.ed25519.pub")
    }

    /// Starts an agent trusting this workspace's release key.
    pub fn agent(&self, name: &str) -> String {
        start_agent(&self.root().join("agents").join(name), &self.release_pub())
    }

    pub fn tags(&self) -> Vec<String> {
        git(self.root(), &["tag", "-l"])
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// A workspace as `pde init` makes it at `dir` (a new Git repository),
/// plus policy 42, an empty `plugins/` and a `production` environment that
/// requires signed plugins: what an author installs a new plugin into.
pub fn init_workspace(dir: &Path, cache: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    git(dir, &["init", "-q"]);
    let o = pde_env(
        dir,
        &["init"],
        &[("PDE_CACHE_DIR", cache.to_str().unwrap())],
    );
    assert_eq!(code(&o), 0, "{}", both(&o));
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::create_dir_all(dir.join("plugins")).unwrap();
    std::fs::write(dir.join("policies/42.json"), policy_42("1.0.0").to_string()).unwrap();
    let mut config = std::fs::read_to_string(dir.join("pde.toml")).unwrap();
    assert!(config.contains("plugin_keys = []"), "{config}");
    config.push_str("\n[environments.production]\nrequire_signed_plugins = true\n");
    std::fs::write(dir.join("pde.toml"), config).unwrap();
}

/// A valid policy 42 at `version`, with two approvals, an effective date
/// in the future and rules of every category the example router knows.
pub fn policy_42(version: &str) -> serde_json::Value {
    serde_json::json!({
        "id": "42",
        "version": version,
        "title": "Winter heating assistance",
        "agency": "HMS",
        "effective": "2099-01-01",
        "approvals": [
            {"by": "director@hms.example.gov", "role": "program-director", "at": "2026-11-20T15:04:00Z"},
            {"by": "counsel@hms.example.gov", "role": "legal-counsel", "at": "2026-11-21T09:30:00Z"}
        ],
        "rules": [
            {"key": "heating.min-age", "category": "eligibility", "value": 18, "description": "Applicant must be at least 18 years of age"},
            {"key": "heating.income-limit", "category": "eligibility", "value": 42000, "description": "Annual household income threshold in USD"},
            {"key": "heating.payment-day", "category": "payments", "value": 15, "description": "Day of the month payments are scheduled"},
            {"key": "heating.application-form", "category": "forms", "value": "HMS-HEAT-2027", "description": "Application form on the portal"}
        ],
        "config": {}
    })
}

/// GET `{url}/active/42` → policy 42's digest, if it is active.
pub fn active_digest(url: &str) -> Option<String> {
    active_digest_of(url, "42")
}

/// GET `{url}/active/{policy_id}` → the digest, if that policy is active.
pub fn active_digest_of(url: &str, policy_id: &str) -> Option<String> {
    runtime().block_on(async {
        let r = reqwest::get(format!("{url}/active/{policy_id}"))
            .await
            .unwrap();
        if r.status() == 404 {
            return None;
        }
        let v: serde_json::Value = r.json().await.unwrap();
        v["digest"].as_str().map(str::to_string)
    })
}

/// GET `{url}/active` → every active policy id and its digest.
pub fn active_policies(url: &str) -> std::collections::BTreeMap<String, String> {
    runtime().block_on(async {
        let v: serde_json::Value = reqwest::get(format!("{url}/active"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["policies"]
            .as_object()
            .expect("a v2 /active lists policies")
            .iter()
            .map(|(id, a)| (id.clone(), a["digest"].as_str().unwrap().to_string()))
            .collect()
    })
}

/// A `pde agent` process; killed on drop.
pub struct AgentProcess {
    pub child: std::process::Child,
    pub url: String,
}

impl AgentProcess {
    pub fn start(data_dir: &Path, trusted: &Path) -> AgentProcess {
        Self::start_with(data_dir, trusted, &[])
    }

    /// Starts `pde agent` with `extra` arguments after the usual ones.
    pub fn start_with(data_dir: &Path, trusted: &Path, extra: &[&std::ffi::OsStr]) -> AgentProcess {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_pde"))
            .args(["agent", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .arg("--trusted-key")
            .arg(trusted)
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("agent starts");
        let mut line = String::new();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        out.read_line(&mut line).unwrap();
        // Keep draining, so a later line never meets a closed pipe.
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        AgentProcess {
            child,
            url: format!("http://{addr}"),
        }
    }
}

impl AgentProcess {
    /// Kills the agent now (as a crash would) and reaps it.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs the `pde` binary in `dir` (`-C`), with `RUST_LOG` cleared so log
/// lines never mix into what a test reads.
pub fn pde(dir: &Path, args: &[&str]) -> std::process::Output {
    pde_env(dir, args, &[])
}

/// [`pde`] with extra environment variables.
pub fn pde_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pde"));
    cmd.arg("-C").arg(dir).args(args).env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("pde runs")
}

/// The exit code of a process that exited normally.
pub fn code(o: &std::process::Output) -> i32 {
    o.status.code().expect("exited normally")
}

/// stderr as text.
pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// stdout and stderr, for assertion messages.
pub fn both(o: &std::process::Output) -> String {
    format!(
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// stdout parsed as JSON (`--output json`), or a panic showing both streams.
pub fn json(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", both(o)))
}

/// The `sh` blocks of `doc` (a path under the repository) between its
/// `<!-- MARKER: begin` and `<!-- MARKER: end` comments, in order, joined
/// into one script: docs that tests run as written.
pub fn doc_script(doc: &str, marker: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let text = std::fs::read_to_string(root.join(doc)).unwrap();
    let section = text
        .split_once(&format!("<!-- {marker}: begin"))
        .expect("the begin marker")
        .1
        .split_once(&format!("<!-- {marker}: end"))
        .expect("the end marker")
        .0;
    let mut script = String::new();
    let mut rest = section;
    while let Some((_, after)) = rest.split_once("```sh\n") {
        let (block, after) = after.split_once("```").expect("the block ends");
        script.push_str(block);
        script.push('\n');
        rest = after;
    }
    script
}

/// Bytes of linear memory the core modules of `component` define at start.
pub fn initial_memory_bytes(component: &[u8]) -> u64 {
    wasmparser::Parser::new(0)
        .parse_all(component)
        .filter_map(|payload| match payload.unwrap() {
            wasmparser::Payload::MemorySection(memories) => Some(memories),
            _ => None,
        })
        .flatten()
        .map(|memory| memory.unwrap().initial * 64 * 1024)
        .sum()
}
