"""The engine's operations, as Python functions.

Each call opens the workspace (``workspace``, default the current directory),
runs one operation in Rust with the GIL released, and returns plain Python
data: a :class:`DeployReport` for deploys, dicts (the ``--output json``
documents) for the rest. Failures raise the :mod:`policy_deploy.errors`
class of their exit code.
"""

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Union

from . import _native
from .errors import BY_EXIT_CODE, PolicyDeployError

PolicyId = Union[int, str]
PathLike = Union[str, "os.PathLike[str]"]
Progress = Callable[[str, str, Dict[str, Any]], None]


@dataclass(frozen=True)
class TargetResult:
    """What happened at one service during a push."""

    service: str
    url: str
    state: str
    previous_digest: Optional[str]
    attempts: int
    detail: str


@dataclass(frozen=True)
class DeployReport:
    """What a deploy did. ``raw`` is the whole ``--output json`` document."""

    policy_id: str
    version: str
    env: str
    digest: str
    outcome: str
    already_active: bool
    targets: List[TargetResult] = field(default_factory=list)
    tag: Optional[str] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)


def _call(fn: Callable[..., str], *args: Any, **kwargs: Any) -> Any:
    try:
        return json.loads(fn(*args, **kwargs))
    except _native.NativeError as e:
        code, message, detail = e.args
        cls = BY_EXIT_CODE.get(code, PolicyDeployError)
        raise cls(message, json.loads(detail)) from None


def _report(raw: Dict[str, Any]) -> DeployReport:
    push = raw.get("push") or {}
    targets = [
        TargetResult(
            service=t["service"],
            url=t["url"],
            state=t["state"],
            previous_digest=t.get("previous_digest"),
            attempts=t["attempts"],
            detail=t["detail"],
        )
        for t in push.get("targets", [])
    ]
    tag = (raw.get("tag") or {}).get("name")
    return DeployReport(
        policy_id=raw["policy_id"],
        version=raw["version"],
        env=raw["env"],
        digest=raw["digest"],
        outcome=raw["outcome"],
        already_active=raw["already_active"],
        targets=targets,
        tag=tag,
        raw=raw,
    )


def _progress(callback: Optional[Progress]) -> Optional[Callable[[str, str, str], None]]:
    if callback is None:
        return None

    def forward(service: str, event: str, detail: str) -> None:
        callback(service, event, json.loads(detail))

    return forward


def deploy_policy(
    policy_id: PolicyId,
    target_env: str,
    *,
    workspace: PathLike = ".",
    dry_run: bool = False,
    progress: Optional[Progress] = None,
) -> DeployReport:
    """Validate, package, check, route, push, tag and audit ``policy_id`` in
    ``target_env``, as ``pde deploy`` does.

    ``progress(service, event, detail)`` is called for each target's steps
    (``started``, ``attempt``, ``retried``, ``delivered``, ``verified``,
    ``failed``, ``rolling-back``, ``rolled-back``, ``rollback-failed``), from
    the engine's thread. With a rollout in the environment it is also called
    as ``progress(wave, event, detail)`` for each wave and gate
    (``wave-started``, ``wave-pushed``, ``baking``, ``gate`` with the query,
    values and verdict, ``paused``, ``promoted``, ``wave-passed``, ``halted``,
    ``rolled-back``). A halted rollout raises
    :class:`~policy_deploy.errors.RolloutHalted`. Without a callback, nothing
    is printed.
    """
    raw = _call(
        _native.deploy_policy,
        policy_id,
        target_env,
        workspace=os.fspath(workspace),
        dry_run=dry_run,
        progress=_progress(progress),
    )
    return _report(raw)


def validate(
    policy_id: PolicyId, env: Optional[str] = None, *, workspace: PathLike = "."
) -> Dict[str, Any]:
    """Step 1 alone; with ``env``, its version, approval and plugin gates too."""
    return _call(_native.validate, policy_id, env, workspace=os.fspath(workspace))


def plan(policy_id: PolicyId, env: str, *, workspace: PathLike = ".") -> Dict[str, Any]:
    """What a deploy would do, and what each routed service runs now."""
    return _call(_native.plan, policy_id, env, workspace=os.fspath(workspace))


def status(env: Optional[str] = None, *, workspace: PathLike = ".") -> List[Dict[str, Any]]:
    """What is active where: per policy and environment, with each service."""
    return _call(_native.status, env, workspace=os.fspath(workspace))


def history(policy_id: PolicyId, *, workspace: PathLike = ".") -> List[Dict[str, Any]]:
    """Every deploy and rollback of ``policy_id``, newest first."""
    return _call(_native.history, policy_id, workspace=os.fspath(workspace))


def rollback(
    policy_id: PolicyId,
    env: str,
    to: Optional[str] = None,
    *,
    workspace: PathLike = ".",
) -> Dict[str, Any]:
    """Return ``env`` to the previous version of ``policy_id`` (or ``to``)."""
    return _call(_native.rollback, policy_id, env, to, workspace=os.fspath(workspace))


def audit_verify(*, workspace: PathLike = ".") -> Dict[str, Any]:
    """Check the audit log: chain, head, release tags. Raises
    :class:`~policy_deploy.errors.IntegrityError` on tampering."""
    return _call(_native.audit_verify, workspace=os.fspath(workspace))


def rollout_status(policy_id: PolicyId, env: str, *, workspace: PathLike = ".") -> Dict[str, Any]:
    """The latest rollout of ``policy_id`` in ``env``: its waves, the gate
    results so far and the time left in the bake (``pde rollout status``)."""
    return _call(_native.rollout_status, policy_id, env, workspace=os.fspath(workspace))


def rollout_promote(policy_id: PolicyId, env: str, *, workspace: PathLike = ".") -> Dict[str, Any]:
    """Let a paused rollout go past its pause (``pde rollout promote``)."""
    return _call(_native.rollout_promote, policy_id, env, workspace=os.fspath(workspace))


def rollout_abort(policy_id: PolicyId, env: str, *, workspace: PathLike = ".") -> Dict[str, Any]:
    """Stop a rollout and send back every service it pushed
    (``pde rollout abort``)."""
    return _call(_native.rollout_abort, policy_id, env, workspace=os.fspath(workspace))
