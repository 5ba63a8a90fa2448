//! The security team's trust where policy authors cannot reach it (issue
//! 27): agents that check which validators ran on a bundle and who signed
//! them (the validation attestation), a signed trust file that may live in
//! the repository, and `pde plugin review`. Real `pde` processes, real
//! agents on loopback, real Git repositories.
// Test code: a failed unwrap is a failed test, with its location.

use crate::support;

use std::ffi::OsStr;
use std::path::Path;

use support::{AgentProcess, Svc, Workspace, both, code, pde};

/// A workspace with the example plugins, signed by its security key, and
/// one environment `prod` whose only service is `url`. `prod` asks for no
/// plugin (as a careless or compromised pusher would): only the agent does.
fn workspace_for(url: &str) -> Workspace {
    let ws = Workspace::new(&Workspace::env_toml(
        "prod",
        "",
        &[Svc {
            name: "HMS-API",
            url: url.to_string(),
            tags: &["api", "eligibility"],
        }],
    ));
    ws.install_examples();
    ws.commit("init");
    ws
}

fn remove_plugin(ws: &Workspace, name: &str) {
    for ext in ["wasm", "toml", "wasm.sig"] {
        let _ = std::fs::remove_file(ws.root().join(format!("plugins/{name}.{ext}")));
    }
}

#[test]
fn an_agent_requiring_pii_guard_refuses_bundles_it_did_not_check_or_the_team_did_not_sign() {
    let dir = tempfile::tempdir().unwrap();
    // The agent starts before the workspace exists (it needs its URL), so
    // the keys it trusts are made here and copied into the workspace.
    let keys = dir.path().join("keys");
    pde::keys::generate(&keys, "release.ed25519").unwrap();
    pde::keys::generate(&keys, "security.ed25519").unwrap();
    pde::keys::generate(&keys, "rogue.ed25519").unwrap();
    let agent = AgentProcess::start_with(
        &dir.path().join("data"),
        &keys.join("release.ed25519.pub"),
        &[
            OsStr::new("--plugin-key"),
            keys.join("security.ed25519.pub").as_os_str(),
            OsStr::new("--require-plugin"),
            OsStr::new("pii-guard"),
        ],
    );
    let ws = workspace_for(&agent.url);
    for name in ["release.ed25519", "security.ed25519"] {
        for ext in ["", ".pub"] {
            std::fs::copy(
                keys.join(format!("{name}{ext}")),
                ws.root().join(format!("keys/{name}{ext}")),
            )
            .unwrap();
        }
    }
    // Re-sign the plugins with the team's key the agent trusts.
    ws.install_examples();
    ws.commit("plugins signed by the security team");
    let deploy = || pde(ws.root(), &["deploy", "42", "--env", "prod"]);

    // 1. Validated without pii-guard: the pusher is content, the agent is not.
    remove_plugin(&ws, "pii-guard");
    ws.commit("drop pii-guard");
    let o = deploy();
    assert_ne!(code(&o), 0, "{}", both(&o));
    let out = both(&o);
    assert!(out.contains("attestation_rejected"), "{out}");
    assert!(
        out.contains("required validator pii-guard did not run"),
        "{out}"
    );
    assert_eq!(support::active_digest(&agent.url), None);

    // 2. pii-guard back, signed by a key the committer added to pde.toml
    //    ("Security team (reviewer)"): pde runs it, the agent refuses it.
    let rogue = keys.join("rogue.ed25519");
    std::fs::copy(
        keys.join("rogue.ed25519.pub"),
        ws.root().join("keys/rogue.pub"),
    )
    .unwrap();
    let toml_path = ws.root().join("pde.toml");
    let toml = std::fs::read_to_string(&toml_path).unwrap().replace(
        "plugin_keys = [\"keys/security.ed25519.pub\"]",
        "plugin_keys = [\"keys/security.ed25519.pub\", \"keys/rogue.pub\"]",
    );
    std::fs::write(&toml_path, toml).unwrap();
    ws.install_plugin(
        "pii-guard",
        "validator",
        Path::new(pde_plugin_artifacts::PII_GUARD),
        "",
        false,
    );
    let wasm = ws.root().join("plugins/pii-guard.wasm");
    let o = pde(
        ws.root(),
        &[
            "plugin",
            "sign",
            wasm.to_str().unwrap(),
            "--key",
            rogue.to_str().unwrap(),
            "--signer",
            "Security team (reviewer)",
        ],
    );
    assert_eq!(code(&o), 0, "{}", both(&o));
    ws.commit("pii-guard, signed by 'the security team'");
    let o = pde(ws.root(), &["validate", "42", "--env", "prod"]);
    assert_eq!(code(&o), 0, "pde itself trusts pde.toml: {}", both(&o));
    let o = deploy();
    assert_ne!(code(&o), 0, "{}", both(&o));
    let out = both(&o);
    assert!(out.contains("attestation_rejected"), "{out}");
    assert!(
        out.contains("validator pii-guard") && out.contains("not signed by a trusted plugin key"),
        "{out}"
    );
    assert_eq!(support::active_digest(&agent.url), None);

    // 3. Signed by the security team: accepted, and the stored bundle keeps
    //    its attestation.
    ws.install_plugin(
        "pii-guard",
        "validator",
        Path::new(pde_plugin_artifacts::PII_GUARD),
        "",
        true,
    );
    ws.commit("pii-guard signed by the security team");
    let o = deploy();
    assert_eq!(code(&o), 0, "{}", both(&o));
    let digest = support::active_digest(&agent.url).expect("activated");
    let bundle = pde::bundle::Bundle::from_slice(
        &std::fs::read(
            std::fs::read_dir(ws.root().join(".pde/dist"))
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| p.to_string_lossy().contains(&digest[7..19]))
                .unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    let release = pde::keys::TrustedKeys::from_files(&[keys.join("release.ed25519.pub")]).unwrap();
    let statement = bundle.attestation.as_ref().unwrap().open(&release).unwrap();
    let ran: Vec<&str> = statement
        .predicate
        .validators
        .iter()
        .map(|v| v.name.as_str())
        .collect();
    assert!(ran.contains(&"pii-guard"), "{ran:?}");
    let pii = &statement.predicate.validators[ran.iter().position(|n| *n == "pii-guard").unwrap()];
    assert_eq!(pii.verdict, "pass");
    assert_eq!(pii.signer.as_deref(), Some("security team"));
}

#[test]
fn an_agent_refuses_to_require_a_plugin_it_has_no_key_for() {
    let dir = tempfile::tempdir().unwrap();
    let ws = Workspace::new("");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_pde"))
        .args(["agent", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .arg("--trusted-key")
        .arg(ws.release_pub())
        .args(["--require-plugin", "pii-guard"])
        .output()
        .unwrap();
    assert_eq!(code(&o), 2, "{}", both(&o));
    assert!(both(&o).contains("--require-plugin needs at least one --plugin-key"));
}

/// Issue 27 "Done when": a plugin key trusted by the committed `pde.toml`
/// but not listed by the floor counts for nothing, whoever signed with it.
#[test]
fn a_committed_trusted_key_the_floor_does_not_list_does_not_count() {
    let ws = Workspace::new(&Workspace::env_toml(
        "prod",
        "require_signed_plugins = true",
        &[],
    ));
    ws.install_examples();
    ws.commit("plugins signed with keys/security.ed25519, trusted in pde.toml");
    let floor_dir = tempfile::tempdir().unwrap();
    pde::keys::generate(floor_dir.path(), "team.ed25519").unwrap();
    let floor = floor_dir.path().join("trust.toml");
    std::fs::write(
        &floor,
        "[[plugin_keys]]\nfile = \"team.ed25519.pub\"\nname = \"Security team\"\n\
         [environments.prod]\nrequire_signed_plugins = true\n",
    )
    .unwrap();
    let with_floor = [("PDE_TRUST", floor.to_str().unwrap())];
    // Without the floor, pde.toml's key is enough.
    let o = pde(ws.root(), &["validate", "42", "--env", "prod"]);
    assert_eq!(code(&o), 0, "{}", both(&o));
    let o = support::pde_env(
        ws.root(),
        &["-v", "validate", "42", "--env", "prod"],
        &with_floor,
    );
    assert_eq!(code(&o), 6, "{}", both(&o));
    let out = both(&o);
    assert!(out.contains("pii-guard"), "{out}");
    assert!(
        out.contains("is trusted in pde.toml but not by the trust floor"),
        "{out}"
    );
}

/// The security team's gates and keys in a trust file committed to the
/// repository, signed by a key the machine floor names: it counts while
/// its signature holds; pde.toml cannot go below it; editing, removing or
/// re-signing it with another key is refused (exit 6).
#[test]
fn a_signed_trust_file_in_the_repository_counts_until_it_is_edited() {
    let gates =
        "require_signed_plugins = true\nmin_approvals = 1\nrequired_plugins = [\"pii-guard\"]";
    let ws = Workspace::new(&Workspace::env_toml("prod", gates, &[]));
    ws.install_examples();
    // pde.toml trusts no plugin key: the signed trust file brings it.
    let toml_path = ws.root().join("pde.toml");
    let toml = std::fs::read_to_string(&toml_path)
        .unwrap()
        .replace("plugin_keys = [\"keys/security.ed25519.pub\"]", "");
    std::fs::write(&toml_path, toml).unwrap();
    let reviewer = std::fs::read_to_string(ws.root().join("keys/security.ed25519.pub")).unwrap();
    let trust_file = ws.root().join("pde-trust.toml");
    let write_trust = |min: u32| {
        std::fs::write(
            &trust_file,
            format!(
                "[[plugin_keys]]\nkey = \"{}\"\nname = \"Rae (reviewer)\"\nexpires = \"2999-12-31\"\n\
                 [environments.prod]\nmin_approvals = {min}\nrequire_signed_plugins = true\n\
                 required_plugins = [\"pii-guard\"]\n",
                reviewer.trim()
            ),
        )
        .unwrap();
    };
    write_trust(1);
    // The machine floor: only the key that verifies the trust file.
    let machine = tempfile::tempdir().unwrap();
    pde::keys::generate(machine.path(), "team.ed25519").unwrap();
    let floor = machine.path().join("trust.toml");
    std::fs::write(
        &floor,
        "[trust_file]\nkeys = [{ file = \"team.ed25519.pub\", name = \"Security team\" }]\n",
    )
    .unwrap();
    let team_key = machine.path().join("team.ed25519");
    let sign = |key: &Path| {
        let o = pde(
            ws.root(),
            &[
                "trust",
                "sign",
                "--key",
                key.to_str().unwrap(),
                "--signer",
                "Security team",
            ],
        );
        assert_eq!(code(&o), 0, "{}", both(&o));
    };
    sign(&team_key);
    ws.commit("signed trust file");
    let with_floor = [("PDE_TRUST", floor.to_str().unwrap())];
    let validate =
        || support::pde_env(ws.root(), &["validate", "42", "--env", "prod"], &with_floor);
    let o = validate();
    assert_eq!(code(&o), 0, "{}", both(&o));

    // pde.toml cannot go below the signed file's gates.
    let toml = std::fs::read_to_string(&toml_path).unwrap();
    std::fs::write(&toml_path, toml.replace(gates, "min_approvals = 0")).unwrap();
    ws.commit("relax prod");
    let o = validate();
    assert_eq!(code(&o), 6, "{}", both(&o));
    for gate in [
        "min_approvals = 0 is below the floor's 1",
        "required_plugins lacks pii-guard",
        "require_signed_plugins",
    ] {
        assert!(both(&o).contains(gate), "{gate}: {}", both(&o));
    }
    std::fs::write(&toml_path, toml).unwrap();
    ws.commit("prod as the security team wants it");
    assert_eq!(code(&validate()), 0);

    // A committer lowers the signed file itself: the signature breaks.
    write_trust(0);
    ws.commit("lower the trust file");
    let o = validate();
    assert_eq!(code(&o), 6, "{}", both(&o));
    assert!(
        both(&o).contains("edited after Security team signed it"),
        "{}",
        both(&o)
    );
    // ...and re-signs it with a key of their own: not the machine's.
    sign(&ws.root().join("keys/security.ed25519"));
    ws.commit("re-signed");
    let o = validate();
    assert_eq!(code(&o), 6, "{}", both(&o));
    assert!(both(&o).contains("untrusted key"), "{}", both(&o));
    // ...or deletes it.
    std::fs::remove_file(&trust_file).unwrap();
    ws.commit("no trust file");
    let o = validate();
    assert_eq!(code(&o), 6, "{}", both(&o));
    assert!(both(&o).contains("pde-trust.toml: missing"), "{}", both(&o));
}

/// `pde plugin review`: a loosened pii-guard (an `allow` setting) against
/// the approved one, on a policy exposing an SSN on the portal: the
/// findings that went away are shown, and the review fails (exit 3).
#[test]
fn plugin_review_shows_findings_that_changed_and_exits_non_zero() {
    let ws = Workspace::new("");
    ws.install_plugin(
        "pii-guard",
        "validator",
        Path::new(pde_plugin_artifacts::PII_GUARD),
        "",
        true,
    );
    let approved = ws.root().join("approved");
    std::fs::create_dir(&approved).unwrap();
    for ext in ["wasm", "toml", "wasm.sig"] {
        std::fs::copy(
            ws.root().join(format!("plugins/pii-guard.{ext}")),
            approved.join(format!("pii-guard.{ext}")),
        )
        .unwrap();
    }
    ws.install_plugin(
        "pii-guard",
        "validator",
        Path::new(pde_plugin_artifacts::PII_GUARD),
        "[settings]\nallow = [\"ssn\"]\n",
        false,
    );
    let mut policy = support::policy_42("1.0.0");
    policy["config"] = serde_json::json!({"portal_fields": ["name", "ssn", "email"]});
    ws.write_policy("42.json", &policy.to_string());
    ws.commit("candidate");
    let args = [
        "plugin",
        "review",
        "plugins/pii-guard.wasm",
        "--policy",
        "policies/42.json",
        "--against",
        "approved/pii-guard.wasm",
    ];
    let o = pde(ws.root(), &args);
    assert_eq!(code(&o), 3, "{}", both(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    for line in [
        "plugin review: ",
        "capabilities",
        "limits in force",
        "fuel",
        "from default",
        "against ",
        "~ settings.allow",
        "- error pii.",
        "fewer findings on",
        "verdict: RISKY",
        "signature: INVALID: the manifest changed",
        "old signature: valid: signed by security team",
        "versions: pde ",
    ] {
        assert!(out.contains(line), "{line:?} missing:\n{out}");
    }
    let r = support::json(&pde(
        ws.root(),
        &[&args[..], &["--output", "json"]].concat(),
    ));
    let run = &r["against"]["runs"][0];
    assert!(run["count"][0].as_u64() > run["count"][1].as_u64(), "{run}");
    assert!(!run["removed"].as_array().unwrap().is_empty(), "{run}");
    assert_eq!(r["runs"][0]["verdict"], "pass", "{r}");
    assert!(
        r["versions"]["wasmtime"]
            .as_str()
            .unwrap()
            .starts_with("48."),
        "{r}"
    );

    // The approved version against itself: nothing risky, exit 0.
    let o = pde(
        ws.root(),
        &[
            "plugin",
            "review",
            "approved/pii-guard.wasm",
            "--policy",
            "policies/42.json",
            "--against",
            "approved/pii-guard.wasm",
        ],
    );
    assert_eq!(code(&o), 0, "{}", both(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("verdict: no risky change"));
}

fn repo() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// docs/security-review.md, run as written: every `sh` block between its
/// `security-review: begin` and `end` markers, in order, as one `bash -euo
/// pipefail` script, in a workspace made by `pde init` with policy 42, the
/// candidate handed over in `~/incoming/`.
#[test]
fn security_review_walkthrough_runs_as_written() {
    let script = support::doc_script("docs/security-review.md", "security-review");
    for command in [
        "pde keygen",
        "pde plugin review",
        "pde plugin sign",
        "pde plugin verify",
    ] {
        assert!(script.contains(command), "{command}: {script}");
    }

    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let ws = home.join("policies-repo");
    support::init_workspace(&ws, &home.join("cache"));
    // init_workspace adds a production environment; the walk-through adds
    // its own, as a reviewer of a fresh workspace would.
    let toml = std::fs::read_to_string(ws.join("pde.toml")).unwrap();
    std::fs::write(
        ws.join("pde.toml"),
        toml.replace(
            "\n[environments.production]\nrequire_signed_plugins = true\n",
            "",
        ),
    )
    .unwrap();
    support::git(&ws, &["add", "-A"]);
    support::git(&ws, &["commit", "-qm", "init"]);
    let incoming = home.join("incoming");
    std::fs::create_dir_all(&incoming).unwrap();
    std::fs::copy(
        pde_plugin_artifacts::PII_GUARD,
        incoming.join("pii-guard.wasm"),
    )
    .unwrap();
    std::fs::copy(
        repo().join("plugins/pii-guard/pii-guard.toml"),
        incoming.join("pii-guard.toml"),
    )
    .unwrap();

    let pde_dir = Path::new(env!("CARGO_BIN_EXE_pde")).parent().unwrap();
    let path = std::env::join_paths(
        std::iter::once(pde_dir.to_path_buf())
            .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap())),
    )
    .unwrap();
    let o = std::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(&ws)
        .env("HOME", home)
        .env("PATH", path)
        .env("PDE_CACHE_DIR", home.join("cache"))
        .env("GIT_AUTHOR_NAME", "Security Reviewer")
        .env("GIT_AUTHOR_EMAIL", "security@hms.example.gov")
        .env("GIT_COMMITTER_NAME", "Security Reviewer")
        .env("GIT_COMMITTER_EMAIL", "security@hms.example.gov")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env_remove("RUST_LOG")
        .env_remove("PDE_TRUST")
        .env_remove("XDG_CACHE_HOME")
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let all = both(&o);
    assert!(o.status.success(), "{all}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("verdict: no risky change"), "{all}");
    assert!(
        out.contains("signed by \"HMS security team (j.doe)\"")
            || out.contains("HMS security team (j.doe)"),
        "{all}"
    );
    let review: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ws.join("review.json")).unwrap()).unwrap();
    assert_eq!(review["identity"]["name"], "pii-guard", "{review}");
}
