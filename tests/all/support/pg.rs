//! A real PostgreSQL server for the team-state tests, and a fresh database
//! per test so tests run in parallel.
//!
//! `scripts/test.sh` starts one throw-away cluster and exports
//! `PDE_TEST_PG_URL` (a superuser URL, no password) and
//! `PDE_TEST_PG_PASSWORD`. Without them, in CI, every test that needs the
//! server fails: a missing database must never read as a pass. Locally, the
//! first test starts a cluster of its own with the same script, which stops
//! it once this test process exits.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;

/// The server: its superuser URL and password.
pub struct Server {
    pub url: String,
    pub password: String,
}

/// The environment variable tests put the password in, as `password_env`.
pub const PASSWORD_ENV: &str = "PDE_TEST_PG_PASSWORD";

pub fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        if let (Ok(url), Ok(password)) = (
            std::env::var("PDE_TEST_PG_URL"),
            std::env::var(PASSWORD_ENV),
        ) {
            return Server { url, password };
        }
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but PDE_TEST_PG_URL/PDE_TEST_PG_PASSWORD are not: scripts/test.sh \
             must start the PostgreSQL cluster; the team-state tests refuse to skip"
        );
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/pg-cluster.sh");
        // Under /tmp itself, not a 0700 temp dir: the cluster may run as
        // another user, who must reach it.
        let dir = std::env::temp_dir().join(format!(
            "pde-test-pg-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let out = Command::new("bash")
            .arg(script)
            .arg("start")
            .arg(&dir)
            .arg(std::process::id().to_string())
            .output()
            .expect("bash runs");
        assert!(
            out.status.success(),
            "starting PostgreSQL failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8(out.stdout).unwrap();
        let (url, password) = line.trim().split_once(' ').expect("URL PASSWORD");
        // pde processes get the password in their environment from the
        // tests (`PASSWORD_ENV`), as a team's pde reads `password_env`.
        Server {
            url: url.to_string(),
            password: password.to_string(),
        }
    })
}

/// Runs SQL through psql as the superuser on database `db`.
pub fn psql(db: &str, sql: &str) -> String {
    let s = server();
    let url = with_database(&s.url, db);
    let out = Command::new("psql")
        .arg("-d")
        .arg(&url)
        .args(["-v", "ON_ERROR_STOP=1", "-Atc", sql])
        .env("PGPASSWORD", &s.password)
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "psql {sql:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `url` with its database replaced by `db`.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("URL has a database");
    format!("{base}/{db}")
}

/// Creates a new, empty database; returns its URL (no password).
pub fn fresh_database() -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let name = format!(
        "pde_t{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    psql("postgres", &format!("CREATE DATABASE {name}"));
    with_database(&server().url, &name)
}

/// The database name of a URL from [`fresh_database`].
pub fn database_of(url: &str) -> &str {
    url.rsplit_once('/').expect("URL has a database").1
}

/// `pde -C dir args…` with the cluster's password in the environment that
/// a team workspace's `[state] password_env` names.
pub fn command(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pde"));
    c.arg("-C")
        .arg(dir)
        .args(args)
        .env_remove("RUST_LOG")
        .env(PASSWORD_ENV, &server().password);
    c
}

/// Runs [`command`] to its end.
pub fn pde(dir: &Path, args: &[&str]) -> Output {
    command(dir, args).output().expect("pde runs")
}

/// Starts [`command`] with its output piped.
pub fn spawn(dir: &Path, args: &[&str]) -> Child {
    command(dir, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pde starts")
}
