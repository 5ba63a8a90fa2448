//! A real OCI registry for the OCI delivery tests (issue 23): Debian's
//! `docker-registry` (the CNCF distribution registry, 2.8) on a free
//! loopback port, with filesystem storage in a temp dir, killed on drop.
//!
//! Each test starts its own, because the tests stop it, restart it on the
//! same port and storage, and corrupt blobs in its storage. The binary is
//! `$PDE_TEST_REGISTRY_BIN`, else `docker-registry` on `PATH` (scripts/test.sh
//! installs the package when it is missing); without it the test fails.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The user and password of a registry started with [`Registry::start_with_auth`].
pub const USER: &str = "pde-ci";
/// The password (its bcrypt hash is [`HTPASSWD`]); never in any output.
pub const PASSWORD: &str = "pde-registry-test-pw-7f3a";
const HTPASSWD: &str = "pde-ci:$2b$12$DkbCDpHKUEH2bIq7SCAERu6OU0zTq3TFWnc.7fE2JZltFsMoXQfCC\n";

/// A running (or stopped) registry.
pub struct Registry {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub port: u16,
}

fn binary() -> PathBuf {
    if let Ok(bin) = std::env::var("PDE_TEST_REGISTRY_BIN") {
        return PathBuf::from(bin);
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let candidate = dir.join("docker-registry");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "the OCI delivery tests need a real registry: install Debian's docker-registry \
         (apt-get install -y docker-registry; scripts/test.sh does it), or set \
         PDE_TEST_REGISTRY_BIN to a CNCF distribution `registry` binary"
    );
}

impl Registry {
    /// A registry without authentication.
    pub fn start() -> Registry {
        Self::launch(false)
    }

    /// A registry that wants HTTP basic credentials [`USER`]:[`PASSWORD`].
    pub fn start_with_auth() -> Registry {
        Self::launch(true)
    }

    fn launch(auth: bool) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage).unwrap();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        );
        if auth {
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, HTPASSWD).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: pde-test\n    path: {}\n",
                file.display()
            ));
        }
        std::fs::write(dir.path().join("config.yml"), config).unwrap();
        let mut r = Registry {
            child: None,
            dir,
            port,
        };
        r.resume();
        r
    }

    /// `127.0.0.1:PORT/pde/policies`, the repository the tests publish to.
    pub fn reference(&self) -> String {
        format!("127.0.0.1:{}/pde/policies", self.port)
    }

    /// The storage directory.
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Starts (again) on the same port and storage and waits until `/v2/` answers.
    pub fn resume(&mut self) {
        let child = Command::new(binary())
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(self.dir.path().join("registry.log"))
                    .map(Stdio::from)
                    .unwrap_or_else(|_| Stdio::null()),
            )
            .spawn()
            .expect("docker-registry starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the registry did not listen on 127.0.0.1:{}: {}",
                self.port,
                std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the registry (its storage stays).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The data file of blob `digest` (`sha256:<hex>`) in the storage.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        blob_path(&self.storage(), hex)
    }
}

fn blob_path(storage: &Path, hex: &str) -> PathBuf {
    storage
        .join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data")
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}
