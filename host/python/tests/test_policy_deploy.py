"""policy_deploy over the real engine: real agents, real Git, real files."""

import fcntl
import hashlib
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import policy_deploy
from policy_deploy import (
    DeployFailed,
    EnvironmentUnhealthy,
    IntegrityError,
    Locked,
    PluginFault,
    PolicyDeployError,
    UsageError,
    ValidationFailed,
)
from policy_deploy.engine import deploy_policy

from conftest import Agent, policy

SEED_SCRIPT = '''from policy_deploy.engine import deploy_policy

deploy_policy(policy_id=42, target_env="production")
print("\\u2705 Policy 42 deployed to production.")
'''


def test_the_seed_script_runs_unchanged(workspace):
    script = workspace.root / "release.py"
    script.write_text(SEED_SCRIPT)
    out = subprocess.run(
        [sys.executable, str(script)], cwd=workspace.root, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "\u2705 Policy 42 deployed to production.\n"
    assert out.stderr == "", "no terminal output without a progress callback"
    for agent in workspace.agents:
        assert "42" in agent.active()


def test_a_deploy_returns_a_report_and_ids_may_be_int_or_str(workspace):
    report = deploy_policy(42, "production", workspace=workspace.root)
    assert report.outcome == "deployed"
    assert report.policy_id == "42" and report.version == "1.0.0"
    assert report.digest.startswith("sha256:")
    assert {t.service for t in report.targets} == {"SVC-0", "SVC-1"}
    assert all(t.state == "delivered" for t in report.targets)
    assert report.tag == "policy/42/v1.0.0/production"
    again = deploy_policy("42", "production", workspace=workspace.root)
    assert again.digest == report.digest and again.already_active
    status = policy_deploy.status("production", workspace=workspace.root)
    assert status[0]["policy_id"] == "42"
    assert {s["service"] for s in status[0]["services"]} == {"SVC-0", "SVC-1"}
    assert policy_deploy.history(42, workspace=workspace.root)[0]["outcome"] == "deployed"
    assert policy_deploy.validate(43, "production", workspace=workspace.root)["policy_id"] == "43"
    assert policy_deploy.plan(43, "production", workspace=workspace.root)["targets"][0]["change"] == "install"
    assert policy_deploy.audit_verify(workspace=workspace.root)["records"] > 0


def test_the_progress_callback_sees_every_target(workspace):
    events = []
    deploy_policy(
        42,
        "production",
        workspace=workspace.root,
        progress=lambda service, event, detail: events.append((service, event, detail)),
    )
    for service in ("SVC-0", "SVC-1"):
        seen = [e for s, e, _ in events if s == service]
        assert seen[0] == "started", seen
        assert "delivered" in seen and seen[-1] == "verified", seen
    assert all(isinstance(d, dict) and "event" in d for _, _, d in events)


def test_two_threads_deploy_different_policies_at_once(workspace):
    results, errors = {}, []

    def run(pid):
        try:
            results[pid] = deploy_policy(pid, "production", workspace=workspace.root)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(pid,)) for pid in (42, 43)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for agent in workspace.agents:
        active = agent.active()
        assert active["42"] == results[42].digest
        assert active["43"] == results[43].digest


def test_validation_failed(workspace):
    bad = policy("45")
    bad["version"] = "not-semver"
    workspace.write_policy("45", bad)
    workspace.commit("a bad policy")
    with pytest.raises(ValidationFailed) as e:
        policy_deploy.validate(45, workspace=workspace.root)
    assert e.value.exit_code == 3
    assert e.value.detail["kind"] == "validation-failed"
    assert any(d["path"] == "/version" for d in e.value.report["diagnostics"]), e.value.report
    assert isinstance(e.value, PolicyDeployError)


def test_usage_error(workspace):
    with pytest.raises(UsageError) as e:
        deploy_policy(42, "nowhere", workspace=workspace.root)
    assert e.value.exit_code == 2
    assert "nowhere" in e.value.message


def test_environment_unhealthy(workspace, closed_port_url):
    workspace.envs["down"] = [closed_port_url]
    workspace.write_config()
    workspace.commit("an environment that is down")
    with pytest.raises(EnvironmentUnhealthy) as e:
        deploy_policy(42, "down", workspace=workspace.root)
    assert e.value.exit_code == 4
    assert e.value.report["services"][0]["healthy"] is False


def test_deploy_failed_carries_the_report(workspace, tmp_path):
    # An agent that trusts another key refuses the bundle: permanent 403.
    subprocess.run(
        [policy_deploy_bin(), "keygen", "--out", str(tmp_path / "other")], check=True, capture_output=True
    )
    stranger = Agent(tmp_path / "stranger", tmp_path / "other" / "release.ed25519.pub")
    try:
        workspace.envs["mixed"] = [workspace.agents[0].url, stranger.url]
        workspace.write_config()
        workspace.commit("a mixed environment")
        with pytest.raises(DeployFailed) as e:
            deploy_policy(42, "mixed", workspace=workspace.root)
        assert e.value.exit_code == 1
        assert e.value.report["outcome"] == "rolled-back"
        states = {t["service"]: t["state"] for t in e.value.report["push"]["targets"]}
        assert states["SVC-1"] == "failed", states
        assert "42" not in workspace.agents[0].active(), "compensated"
    finally:
        stranger.stop()


def test_plugin_fault(workspace):
    plugins = workspace.root / "plugins"
    plugins.mkdir()
    garbage = b"\x00asm not really a component"
    (plugins / "broken.wasm").write_bytes(garbage)
    (plugins / "broken.toml").write_text(
        'name = "broken"\nkind = "validator"\nversion = "1.0.0"\n'
        f'sha256 = "{hashlib.sha256(garbage).hexdigest()}"\ndescription = "not a component"\n'
    )
    workspace.commit("a broken plugin")
    with pytest.raises(PluginFault) as e:
        policy_deploy.validate(42, workspace=workspace.root)
    assert e.value.exit_code == 5


def test_integrity_error(workspace):
    deploy_policy(42, "production", workspace=workspace.root)
    log = workspace.root / ".pde" / "audit.jsonl"
    log.write_text(log.read_text().replace('"42"', '"43"', 1))
    with pytest.raises(IntegrityError) as e:
        policy_deploy.audit_verify(workspace=workspace.root)
    assert e.value.exit_code == 6


def test_locked(workspace):
    deploy_policy(42, "production", workspace=workspace.root)
    lock = workspace.root / ".pde" / "locks" / "42@production.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(Locked) as e:
            deploy_policy(42, "production", workspace=workspace.root)
    assert e.value.exit_code == 7


def policy_deploy_bin() -> str:
    from conftest import pde_bin

    return pde_bin()


def test_the_seed_script_runs_against_the_example_workspace(tmp_path):
    """The example workspace of the README's demo, with its real plugins
    (built from source, signed as a security team would), staging first
    because production only takes what staging runs; then the seed script,
    unchanged, deploys to production."""
    import re
    import shutil

    from conftest import git, pde_bin

    root = Path(__file__).resolve().parents[3]
    wasm_dir = root / "target" / "wasm-plugins" / "wasm32-wasip2" / "plugin"
    ws = tmp_path / "workspace"
    shutil.copytree(root / "examples" / "workspace", ws)
    pde = pde_bin()
    for name in ("release.ed25519", "security-team.ed25519"):
        subprocess.run([pde, "keygen", "--out", str(ws / "keys"), "--name", name], check=True, capture_output=True)
    for name in ("eligibility-bounds", "pii-guard", "effective-date", "category-router"):
        wasm = wasm_dir / (name.replace("-", "_") + ".wasm")
        assert wasm.is_file(), f"{wasm} is built by `cargo test` (plugins/artifacts)"
        target = ws / "plugins" / f"{name}.wasm"
        shutil.copy(wasm, target)
        manifest = (root / "plugins" / name / f"{name}.toml").read_text()
        manifest = "\n".join(l for l in manifest.splitlines() if not l.startswith("sha256"))
        digest = hashlib.sha256(target.read_bytes()).hexdigest()
        (ws / "plugins" / f"{name}.toml").write_text(f'sha256 = "{digest}"\n{manifest}\n')
        subprocess.run(
            [pde, "plugin", "sign", f"plugins/{name}.wasm", "--key", "keys/security-team.ed25519"],
            cwd=ws,
            check=True,
            capture_output=True,
        )
    # One real agent per service of staging and production, on free ports.
    config = (ws / "pde.toml").read_text()
    agents = {}
    for url in sorted(set(re.findall(r'"(http://127\.0\.0\.1:187[12]\d)"', config))):
        agent = Agent(tmp_path / "agents" / url[-5:], ws / "keys" / "release.ed25519.pub")
        agents[url] = agent
        config = config.replace(f'"{url}"', f'"{agent.url}"')
    (ws / "pde.toml").write_text(config)
    (ws / ".gitignore").write_text(".pde/\nkeys/*.ed25519\n")
    git(ws, "init", "-q")
    git(ws, "add", "-A")
    git(ws, "commit", "-qm", "HMS policies")
    try:
        staged = deploy_policy(42, "staging", workspace=ws)
        assert staged.outcome == "deployed"
        script = tmp_path / "release.py"
        script.write_text(SEED_SCRIPT)
        out = subprocess.run([sys.executable, str(script)], cwd=ws, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout == "\u2705 Policy 42 deployed to production.\n"
        production = [a.active() for u, a in agents.items() if u.startswith("http://127.0.0.1:1872")]
        holders = [active["42"] for active in production if "42" in active]
        # The router sends 42 to the services its categories need; each runs
        # the very bundle staging checked.
        assert holders and all(d == staged.digest for d in holders), production
        assert policy_deploy.status("production", workspace=ws)[0]["digest"] == staged.digest
    finally:
        for a in agents.values():
            a.stop()


ROLLOUT = '''
[environments.production.rollout]
poll_ms = 100
[[environments.production.rollout.gates]]
kind = "http"
name = "serves-digest"
url = "${service_url}/active/${policy_id}"
json_field = "/digest"
equals = "${digest}"
[[environments.production.rollout.waves]]
name = "canary"
count = 1
pause = true
[[environments.production.rollout.waves]]
name = "rest"
'''


def _start_paused_rollout(workspace):
    with open(workspace.root / "pde.toml", "a") as f:
        f.write(ROLLOUT)
    workspace.commit("production rolls out in two waves")
    events = []
    outcome = {}

    def run():
        try:
            outcome["report"] = deploy_policy(
                42, "production", workspace=workspace.root,
                progress=lambda who, event, detail: events.append((who, event, detail)),
            )
        except policy_deploy.PolicyDeployError as e:
            outcome["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    import time

    deadline = time.time() + 60
    while True:
        try:
            status = policy_deploy.rollout_status(42, "production", workspace=workspace.root)
            if status["report"]["status"] == "paused":
                break
        except UsageError:
            pass  # no rollout recorded yet
        assert time.time() < deadline, "the rollout never paused"
        time.sleep(0.1)
    return thread, events, outcome, status


def test_a_rollout_reports_waves_and_gates_and_is_promoted(workspace):
    thread, events, outcome, status = _start_paused_rollout(workspace)
    assert status["wave"] == 1 and status["live"]
    gate = status["report"]["waves"][0]["results"][0]
    assert gate["gate"] == "serves-digest" and gate["verdict"] == "pass"
    promoted = policy_deploy.rollout_promote(42, "production", workspace=workspace.root)
    assert promoted["id"] == status["id"]
    thread.join(60)
    report = outcome["report"]
    assert report.outcome == "deployed" and report.tag == "policy/42/v1.0.0/production"
    assert [w["status"] for w in report.raw["rollout"]["waves"]] == ["passed", "passed"]
    names = [e for _, e, _ in events]
    for expected in ("wave-started", "gate", "paused", "promoted", "wave-passed"):
        assert expected in names, names
    gates = [d for _, e, d in events if e == "gate"]
    assert all(g["verdict"] == "pass" and g["query"].endswith("/active/42") for g in gates)
    assert all("42" in a.active() for a in workspace.agents)


def test_an_aborted_rollout_sends_every_wave_back_and_raises_rollout_halted(workspace):
    thread, events, outcome, _ = _start_paused_rollout(workspace)
    aborted = policy_deploy.rollout_abort(42, "production", workspace=workspace.root)
    thread.join(60)
    assert isinstance(outcome.get("error"), policy_deploy.RolloutHalted), outcome
    assert outcome["error"].exit_code == 8
    status = policy_deploy.rollout_status(42, "production", workspace=workspace.root)
    assert status["report"]["status"] == "aborted", (aborted, status)
    assert status["report"]["log"][-1]["action"] == "abort"
    assert all("42" not in a.active() for a in workspace.agents)
    assert "halted" in [e for _, e, _ in events]
