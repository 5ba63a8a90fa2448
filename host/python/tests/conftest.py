"""Real parts for the policy_deploy tests: a Git workspace in a temp dir,
`pde agent` processes on loopback, keys made by `pde keygen`. The `pde`
binary comes from PDE_BIN (scripts/test.sh sets it); without it the tests
fail, they do not skip."""

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest


def pde_bin() -> str:
    path = os.environ.get("PDE_BIN")
    if not path or not os.access(path, os.X_OK):
        pytest.fail("PDE_BIN must name the built `pde` binary (scripts/test.sh sets it)")
    return path


def policy(policy_id: str, version: str = "1.0.0") -> dict:
    rules = [
        ("min-age", "eligibility", 18),
        ("income-limit", "eligibility", 42000),
        ("payment-day", "payments", 15),
    ]
    return {
        "id": policy_id,
        "version": version,
        "title": f"Policy {policy_id}",
        "agency": "HMS",
        "effective": "2099-01-01",
        "approvals": [
            {"by": "director@hms.example.gov", "role": "program-director", "at": "2026-11-20T15:04:00Z"},
            {"by": "counsel@hms.example.gov", "role": "legal-counsel", "at": "2026-11-21T09:30:00Z"},
        ],
        "rules": [
            {"key": f"p{policy_id}.{k}", "category": c, "value": v, "description": k}
            for k, c, v in rules
        ],
        "config": {},
    }


def git(root: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-C", str(root), "-c", "user.name=Test", "-c", "user.email=t@example.gov", *args],
        check=True,
        capture_output=True,
    )


class Agent:
    def __init__(self, data_dir: Path, trusted: Path):
        self.proc = subprocess.Popen(
            [pde_bin(), "agent", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir),
             "--trusted-key", str(trusted)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        line = self.proc.stdout.readline().decode().strip()
        assert line.startswith("listening on "), line
        self.url = "http://" + line[len("listening on "):]

    def active(self) -> dict:
        with urllib.request.urlopen(self.url + "/active") as r:
            return {k: v["digest"] for k, v in json.load(r)["policies"].items()}

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Workspace:
    """A committed policy repository with policies 42 and 43 and an
    environment `production` served by two agents."""

    def __init__(self, root: Path):
        self.root = root
        subprocess.run([pde_bin(), "keygen", "--out", str(root / "keys")], check=True, capture_output=True)
        self.key = root / "keys" / "release.ed25519.pub"
        self.agents = [Agent(root / "agents" / f"a{i}", self.key) for i in range(2)]
        (root / "policies").mkdir()
        for pid in ("42", "43"):
            self.write_policy(pid, policy(pid))
        self.envs = {"production": [a.url for a in self.agents]}
        self.write_config()
        (root / ".gitignore").write_text(".pde/\nagents/\n")
        git(root, "init", "-q")
        self.commit("policies")

    def write_policy(self, pid: str, doc: dict) -> None:
        (self.root / "policies" / f"{pid}.json").write_text(json.dumps(doc, indent=2))

    def write_config(self) -> None:
        lines = [
            'policies = "policies"',
            'plugins = "plugins"',
            'state = ".pde"',
            "[signing]",
            'key_file = "keys/release.ed25519"',
            "[push]",
            "timeout_ms = 2000",
            "retries = 1",
            "backoff_ms = 10",
        ]
        for env, urls in self.envs.items():
            lines.append(f"[environments.{env}]")
            for i, url in enumerate(urls):
                lines += [
                    f"[[environments.{env}.services]]",
                    f'name = "SVC-{i}"',
                    f'url = "{url}"',
                    'tags = ["api"]',
                ]
        (self.root / "pde.toml").write_text("\n".join(lines) + "\n")

    def commit(self, message: str) -> None:
        git(self.root, "add", "-A")
        git(self.root, "commit", "-qm", message)

    def close(self) -> None:
        for a in self.agents:
            a.stop()


@pytest.fixture
def workspace(tmp_path):
    ws = Workspace(tmp_path)
    yield ws
    ws.close()


@pytest.fixture
def closed_port_url():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    url = "http://127.0.0.1:%d" % s.getsockname()[1]
    s.close()
    return url
