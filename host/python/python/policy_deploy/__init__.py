"""policy_deploy: deploy approved policy changes with pde, from Python.

The same Rust engine as the ``pde`` command line, not a re-implementation and
not a wrapper around the binary::

    from policy_deploy.engine import deploy_policy

    deploy_policy(policy_id=42, target_env="production")
"""

from .errors import (
    DeployFailed,
    EnvironmentUnhealthy,
    IntegrityError,
    Locked,
    PluginFault,
    PolicyDeployError,
    RolloutHalted,
    UsageError,
    ValidationFailed,
)
from .engine import (
    DeployReport,
    TargetResult,
    audit_verify,
    deploy_policy,
    history,
    plan,
    rollback,
    rollout_abort,
    rollout_promote,
    rollout_status,
    status,
    validate,
)

__all__ = [
    "DeployFailed",
    "DeployReport",
    "EnvironmentUnhealthy",
    "IntegrityError",
    "Locked",
    "PluginFault",
    "PolicyDeployError",
    "RolloutHalted",
    "TargetResult",
    "UsageError",
    "ValidationFailed",
    "audit_verify",
    "deploy_policy",
    "history",
    "plan",
    "rollback",
    "rollout_abort",
    "rollout_promote",
    "rollout_status",
    "status",
    "validate",
]
