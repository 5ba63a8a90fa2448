"""Exceptions of policy_deploy: one class per exit code of ``pde``.

Every exception carries what ``pde ... --output json`` prints on failure:
``message``, ``exit_code``, and ``detail`` (a dict with ``error``, ``causes``,
``exit_code``, ``kind`` and ``report``: the validation findings, the health
of each service, or the per-target results of a push).
"""

from typing import Any, Dict, Optional


class PolicyDeployError(Exception):
    """Any failure of the engine."""

    exit_code: int = 1

    def __init__(self, message: str, detail: Optional[Dict[str, Any]] = None):
        super().__init__(message)
        self.message = message
        self.detail: Dict[str, Any] = detail or {}
        self.exit_code = int(self.detail.get("exit_code", type(self).exit_code))

    @property
    def report(self) -> Optional[Dict[str, Any]]:
        """The report the failure carries, if any."""
        return self.detail.get("report")


class DeployFailed(PolicyDeployError):
    """Push, verification or compensation failed (exit 1). ``report`` says
    what each target runs now: ``outcome`` is ``rolled-back`` or
    ``needs-attention``."""

    exit_code = 1


class UsageError(PolicyDeployError):
    """Bad arguments or configuration, unknown policy or environment (exit 2)."""

    exit_code = 2


class ValidationFailed(PolicyDeployError):
    """The policy did not pass validation (exit 3); ``report`` has every finding."""

    exit_code = 3


class EnvironmentUnhealthy(PolicyDeployError):
    """A target service is unhealthy; nothing was pushed (exit 4)."""

    exit_code = 4


class PluginFault(PolicyDeployError):
    """A plugin trapped, hit a limit, or is not a valid component (exit 5)."""

    exit_code = 5


class IntegrityError(PolicyDeployError):
    """A digest, signature or the audit chain does not check out (exit 6)."""

    exit_code = 6


class Locked(PolicyDeployError):
    """Another deploy of the same policy and environment is running (exit 7)."""

    exit_code = 7


class RolloutHalted(PolicyDeployError):
    """A rollout stopped: a gate failed or had no data, or a person aborted
    it; every wave pushed was sent back and nothing was tagged (exit 8)."""

    exit_code = 8


BY_EXIT_CODE = {
    cls.exit_code: cls
    for cls in (
        DeployFailed,
        UsageError,
        ValidationFailed,
        EnvironmentUnhealthy,
        PluginFault,
        IntegrityError,
        Locked,
        RolloutHalted,
    )
}
