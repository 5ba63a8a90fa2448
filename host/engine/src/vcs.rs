//! Git plumbing: the policy repository's commit, cleanliness, and reading and
//! writing annotated tags. What a release tag is called and says is step 6's
//! business (`steps::tag`).
//!
//! pde shells out to the `git` CLI rather than linking libgit2. That keeps a
//! C library out of the build, and it means pde sees exactly what engineers
//! see: their config, their hooks' view of the repo, their credential-free
//! local operations. Every call runs as `git -C <root>` with
//! `GIT_TERMINAL_PROMPT=0` (never hang on a prompt), `LC_ALL=C` (stable
//! messages), and without inherited `GIT_DIR`-style variables that would
//! point it at another repository; stderr is captured into the error.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use pde_core::{ExitCode, HasExitCode};

/// Identity used for tags when the repository has none configured.
const FALLBACK_NAME: &str = "pde";
const FALLBACK_EMAIL: &str = "pde@localhost";

/// Why a Git operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VcsError {
    /// `git` could not be started.
    #[error("cannot run git: {source} (install git and make sure it is on PATH)")]
    GitMissing {
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The directory is not inside a Git work tree.
    #[error(
        "{dir} is not inside a Git work tree: run `git init` there (and commit the policies), or pass -C DIR"
    )]
    NotARepo {
        /// The directory given.
        dir: PathBuf,
    },
    /// The repository has no commit yet.
    #[error("the repository at {root} has no commits yet: commit the policy files first")]
    NoCommits {
        /// Work tree root.
        root: PathBuf,
    },
    /// A git command failed.
    #[error("`git {args}` failed in {root}: {stderr}")]
    Command {
        /// Work tree root.
        root: PathBuf,
        /// The arguments, space-joined.
        args: String,
        /// What git printed on stderr.
        stderr: String,
    },
    /// The computed tag name is not a valid Git ref name.
    #[error("{name:?} is not a valid Git tag name")]
    BadTagName {
        /// The name.
        name: String,
    },
}

impl HasExitCode for VcsError {
    fn exit_code(&self) -> ExitCode {
        match self {
            VcsError::GitMissing { .. }
            | VcsError::NotARepo { .. }
            | VcsError::NoCommits { .. }
            | VcsError::BadTagName { .. } => ExitCode::Usage,
            VcsError::Command { .. } => ExitCode::DeployFailed,
        }
    }
}

/// A Git work tree.
#[derive(Debug, Clone)]
pub struct Repo {
    root: PathBuf,
}

fn git_command(dir: &Path) -> Command {
    let mut cmd = Command::new("git");
    cmd.arg("-C")
        .arg(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("LC_ALL", "C")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_INDEX_FILE")
        .env_remove("GIT_COMMON_DIR")
        .stdin(std::process::Stdio::null());
    cmd
}

fn run(mut cmd: Command) -> Result<Output, VcsError> {
    cmd.output()
        .map_err(|source| VcsError::GitMissing { source })
}

fn stdout_line(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl Repo {
    /// The work tree containing `dir`.
    pub fn discover(dir: &Path) -> Result<Repo, VcsError> {
        let mut cmd = git_command(dir);
        cmd.args(["rev-parse", "--is-inside-work-tree", "--show-toplevel"]);
        let out = run(cmd)?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines();
        match (out.status.success(), lines.next(), lines.next()) {
            (true, Some("true"), Some(root)) if !root.is_empty() => Ok(Repo {
                root: PathBuf::from(root),
            }),
            _ => Err(VcsError::NotARepo {
                dir: dir.to_path_buf(),
            }),
        }
    }

    /// `git init` in `dir` (which must exist), for `pde init` outside any
    /// work tree: every deploy needs one, and a new user should not learn
    /// that from the first refusal.
    pub fn init(dir: &Path) -> Result<Repo, VcsError> {
        let mut cmd = git_command(dir);
        cmd.args(["init", "-q"]);
        let out = run(cmd)?;
        if !out.status.success() {
            return Err(VcsError::Command {
                root: dir.to_path_buf(),
                args: "init -q".into(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Repo::discover(dir)
    }

    /// The top directory of the work tree.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn git<I, S>(&self, args: I) -> Result<Output, VcsError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = git_command(&self.root);
        cmd.args(args);
        run(cmd)
    }

    fn git_ok(&self, args: &[&str]) -> Result<Output, VcsError> {
        let out = self.git(args)?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(self.failed(args, &out))
        }
    }

    fn failed(&self, args: &[&str], out: &Output) -> VcsError {
        VcsError::Command {
            root: self.root.clone(),
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }
    }

    /// The repository's `user.email` (its own, the user's or the system's
    /// Git configuration), if one is set.
    pub fn user_email(&self) -> Option<String> {
        let out = self.git(["config", "--get", "user.email"]).ok()?;
        let email = stdout_line(&out);
        (out.status.success() && !email.is_empty()).then_some(email)
    }

    /// The full sha of `HEAD`.
    pub fn head_commit(&self) -> Result<String, VcsError> {
        let out = self.git(["rev-parse", "--verify", "--quiet", "HEAD^{commit}"])?;
        if out.status.success() {
            Ok(stdout_line(&out))
        } else {
            Err(VcsError::NoCommits {
                root: self.root.clone(),
            })
        }
    }

    /// True when `path` is tracked and has no uncommitted changes (staged or
    /// not). An untracked or ignored file is not clean: it is not in any commit.
    /// A relative `path` is taken relative to [`Repo::root`].
    pub fn is_clean(&self, path: &Path) -> Result<bool, VcsError> {
        // git compares absolute paths with its own (symlink-resolved) root.
        let resolved = if path.is_absolute() {
            path.canonicalize().unwrap_or_else(|_| path.to_path_buf())
        } else {
            path.to_path_buf()
        };
        let path = resolved.as_os_str();
        let tracked = self.git([
            OsStr::new("ls-files"),
            OsStr::new("--error-unmatch"),
            OsStr::new("--"),
            path,
        ])?;
        if !tracked.status.success() {
            return Ok(false);
        }
        let status = self.git([
            OsStr::new("status"),
            OsStr::new("--porcelain"),
            OsStr::new("--"),
            path,
        ])?;
        if !status.status.success() {
            return Err(self.failed(&["status", "--porcelain"], &status));
        }
        Ok(status.stdout.iter().all(u8::is_ascii_whitespace))
    }

    /// Every uncommitted change under `dir` (modified, staged, deleted,
    /// untracked or ignored), as `git status --short` lines. An ignored file
    /// counts: it is in no commit either.
    pub fn changes_under(&self, dir: &Path) -> Result<Vec<String>, VcsError> {
        let out = self.git([
            OsStr::new("status"),
            OsStr::new("--porcelain"),
            OsStr::new("--untracked-files=all"),
            OsStr::new("--ignored=matching"),
            OsStr::new("--"),
            dir.as_os_str(),
        ])?;
        if !out.status.success() {
            return Err(self.failed(&["status", "--porcelain"], &out));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect())
    }

    /// The message of tag `name`; `None` if no such tag. A lightweight tag
    /// has an empty message.
    pub fn tag_message(&self, name: &str) -> Result<Option<String>, VcsError> {
        let refname = format!("refs/tags/{name}");
        let exists = self.git(["rev-parse", "--verify", "--quiet", &refname])?;
        if !exists.status.success() {
            return Ok(None);
        }
        let out = self.git_ok(&[
            "for-each-ref",
            "--format=%(objecttype)%00%(contents)",
            &refname,
        ])?;
        let text = String::from_utf8_lossy(&out.stdout);
        match text.split_once('\0') {
            Some(("tag", message)) => Ok(Some(message.trim_end().to_string())),
            _ => Ok(Some(String::new())),
        }
    }

    /// Every release tag (`policy/…`) with its message, in name order. A
    /// lightweight tag has an empty message.
    pub fn release_tags(&self) -> Result<Vec<(String, String)>, VcsError> {
        let out = self.git_ok(&[
            "for-each-ref",
            "--format=%(refname:strip=2)%00%(objecttype)%00%(contents)%00",
            "refs/tags/policy/",
        ])?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text
            .split("\0\n")
            .filter_map(|entry| {
                let mut parts = entry.splitn(3, '\0');
                let name = parts.next()?.trim_start_matches('\n');
                let kind = parts.next()?;
                let message = if kind == "tag" {
                    parts.next().unwrap_or("")
                } else {
                    ""
                };
                (!name.is_empty()).then(|| (name.to_string(), message.to_string()))
            })
            .collect())
    }

    /// Creates annotated tag `name` at `HEAD`. Uses a fallback identity
    /// (`pde <pde@localhost>`) when the repository has none configured.
    pub fn create_annotated_tag(&self, name: &str, message: &str) -> Result<(), VcsError> {
        self.check_tag_name(name)?;
        let mut args: Vec<String> = Vec::new();
        if !self.has_config("user.name")? && std::env::var_os("GIT_COMMITTER_NAME").is_none() {
            args.extend(["-c".into(), format!("user.name={FALLBACK_NAME}")]);
        }
        if !self.has_config("user.email")? && std::env::var_os("GIT_COMMITTER_EMAIL").is_none() {
            args.extend(["-c".into(), format!("user.email={FALLBACK_EMAIL}")]);
        }
        args.extend(["tag", "-a", name, "-m", message].map(String::from));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.git_ok(&refs).map(drop)
    }

    fn has_config(&self, key: &str) -> Result<bool, VcsError> {
        Ok(self.git(["config", "--get", key])?.status.success())
    }

    fn check_tag_name(&self, name: &str) -> Result<(), VcsError> {
        let out = self.git(["check-ref-format", &format!("refs/tags/{name}")])?;
        if out.status.success() {
            Ok(())
        } else {
            Err(VcsError::BadTagName {
                name: name.to_string(),
            })
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::fs;

    /// Runs git in `dir` for a test, panicking with its stderr on failure.
    pub(crate) fn git(dir: &Path, args: &[&str]) {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(["-c", "user.name=Test", "-c", "user.email=test@example.gov"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A repository with one commit (`policies/42.json`), for tests.
    pub(crate) fn repo_with_commit() -> (tempfile::TempDir, Repo) {
        let dir = tempfile::tempdir().unwrap();
        git(dir.path(), &["init", "-q"]);
        fs::create_dir(dir.path().join("policies")).unwrap();
        fs::write(dir.path().join("policies/42.json"), "{}").unwrap();
        git(dir.path(), &["add", "."]);
        git(dir.path(), &["commit", "-q", "-m", "first"]);
        let repo = Repo::discover(&dir.path().join("policies")).unwrap();
        (dir, repo)
    }

    #[test]
    fn discover_finds_the_root_and_refuses_plain_directories() {
        let (dir, repo) = repo_with_commit();
        assert_eq!(
            repo.root().canonicalize().unwrap(),
            dir.path().canonicalize().unwrap()
        );
        let plain = tempfile::tempdir().unwrap();
        let e = Repo::discover(plain.path()).unwrap_err();
        assert!(matches!(e, VcsError::NotARepo { .. }));
        assert!(e.to_string().contains("git init"));
        assert_eq!(e.exit_code(), ExitCode::Usage);
    }

    #[test]
    fn head_commit_is_a_full_sha_and_empty_repos_have_none() {
        let (_dir, repo) = repo_with_commit();
        let sha = repo.head_commit().unwrap();
        assert_eq!(sha.len(), 40);
        assert!(sha.chars().all(|c| c.is_ascii_hexdigit()));
        let empty = tempfile::tempdir().unwrap();
        git(empty.path(), &["init", "-q"]);
        let e = Repo::discover(empty.path())
            .unwrap()
            .head_commit()
            .unwrap_err();
        assert!(matches!(e, VcsError::NoCommits { .. }));
    }

    #[test]
    fn is_clean_sees_edits_staged_changes_and_untracked_files() {
        let (dir, repo) = repo_with_commit();
        let file = dir.path().join("policies/42.json");
        assert!(repo.is_clean(&file).unwrap());
        fs::write(&file, "{\"changed\": true}").unwrap();
        assert!(!repo.is_clean(&file).unwrap());
        git(dir.path(), &["add", "."]);
        assert!(!repo.is_clean(&file).unwrap());
        let new = dir.path().join("policies/7.yaml");
        fs::write(&new, "id: 7").unwrap();
        assert!(!repo.is_clean(&new).unwrap());
        assert!(!repo.is_clean(Path::new("policies/7.yaml")).unwrap());
    }

    #[test]
    fn invalid_tag_names_are_refused() {
        let (_dir, repo) = repo_with_commit();
        let e = repo
            .create_annotated_tag("policy/42/v1..0/dev", "m")
            .unwrap_err();
        assert!(matches!(e, VcsError::BadTagName { .. }));
    }
}
