"""Model registry operations on MLflow: register with lineage, gate, promote, approve, roll back.

Every decision is written to the audit trail. MLflow is imported inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlplatform.audit import AuditTrail
from resources.mlflow import MLflowResource
from resources.settings import DatasetSpec

CHAMPION, PREVIOUS, CHALLENGER, AWAITING = "champion", "previous", "challenger", "awaiting-approval"


class RegistryError(RuntimeError):
    pass


@dataclass
class GateOutcome:
    passed: bool
    action: str           # promoted | rejected | awaiting_approval
    reason: str
    evidence: dict[str, Any]


def aliases(mlflow: MLflowResource) -> dict[str, str]:
    """alias -> version of the registered model (empty if the model is not registered yet)."""
    from mlflow.exceptions import MlflowException

    try:
        rm = mlflow.client().get_registered_model(mlflow.model_name)
    except MlflowException:
        return {}
    return {a: str(v) for a, v in (rm.aliases or {}).items()}


def set_alias(mlflow: MLflowResource, alias: str, version: str | None) -> None:
    client = mlflow.client()
    if version is None:
        try:
            client.delete_registered_model_alias(mlflow.model_name, alias)
        except Exception:  # noqa: BLE001 - deleting an alias that is not set is fine
            pass
        return
    client.set_registered_model_alias(mlflow.model_name, alias, str(version))


def decide(spec: DatasetSpec, candidate_score: float, comparison: dict | None) -> tuple[bool, str]:
    """The gate's rule: above the floor, and not significantly worse than the champion by more than the margin."""
    better = (candidate_score >= spec.floor) if spec.higher_is_better else (candidate_score <= spec.floor)
    if not better:
        return False, (f"{spec.metric}={candidate_score:.4f} fails the floor {spec.floor} "
                       f"({'>=' if spec.higher_is_better else '<='} required)")
    if comparison is None:
        return True, f"first model: {spec.metric}={candidate_score:.4f} passes the floor {spec.floor}"
    low = comparison["ci_low"]
    if low < -spec.margin:
        return False, (f"not shown to be within {spec.margin} of the champion: 95% CI of the improvement in "
                       f"{spec.metric} is [{low:.4f}, {comparison['ci_high']:.4f}], below -{spec.margin}")
    return True, (f"{spec.metric}={candidate_score:.4f}; improvement over the champion "
                  f"{comparison['diff']:+.4f}, 95% CI [{low:.4f}, {comparison['ci_high']:.4f}] > -{spec.margin}")


def apply_gate(mlflow: MLflowResource, audit: AuditTrail, spec: DatasetSpec, version: str, passed: bool,
               reason: str, evidence: dict, manual: bool, actor: str) -> GateOutcome:
    current = aliases(mlflow)
    if not passed:
        set_alias(mlflow, CHALLENGER, version)
        audit.record("rejected", mlflow.model_name, version, reason, evidence, actor)
        return GateOutcome(False, "rejected", reason, evidence)
    if manual:
        set_alias(mlflow, AWAITING, version)
        audit.record("awaiting_approval", mlflow.model_name, version, reason, evidence, actor)
        return GateOutcome(True, "awaiting_approval", reason + " (manual mode: `mlp approve` to promote)", evidence)
    promote(mlflow, version, current)
    audit.record("promoted", mlflow.model_name, version, reason,
                 {**evidence, "previous_champion": current.get(CHAMPION)}, actor)
    return GateOutcome(True, "promoted", reason, evidence)


def promote(mlflow: MLflowResource, version: str, current: dict[str, str] | None = None) -> None:
    current = current if current is not None else aliases(mlflow)
    old = current.get(CHAMPION)
    if old and old != str(version):
        set_alias(mlflow, PREVIOUS, old)
    set_alias(mlflow, CHAMPION, version)
    if current.get(CHALLENGER) == str(version):
        set_alias(mlflow, CHALLENGER, None)
    if current.get(AWAITING) == str(version):
        set_alias(mlflow, AWAITING, None)


def approve(mlflow: MLflowResource, audit: AuditTrail, version: str, approver: str, reason: str) -> None:
    current = aliases(mlflow)
    if current.get(AWAITING) != str(version):
        raise RegistryError(f"version {version} of {mlflow.model_name} is not awaiting approval "
                            f"(aliases: {current})")
    promote(mlflow, version, current)
    audit.record("approved", mlflow.model_name, version, reason, {"previous_champion": current.get(CHAMPION)},
                 actor=f"user:{approver}")


def rollback(mlflow: MLflowResource, audit: AuditTrail, reason: str, actor: str,
             evidence: dict | None = None) -> tuple[str, str]:
    """Move `champion` back to `previous` in one step; returns (from_version, to_version)."""
    current = aliases(mlflow)
    champ, prev = current.get(CHAMPION), current.get(PREVIOUS)
    if not champ or not prev:
        raise RegistryError(f"{mlflow.model_name}: nothing to roll back to (aliases: {current})")
    set_alias(mlflow, CHAMPION, prev)
    set_alias(mlflow, PREVIOUS, None)
    set_alias(mlflow, CHALLENGER, champ)  # the demoted model stays visible, never acted on
    audit.record("rolled_back", mlflow.model_name, prev, reason,
                 {**(evidence or {}), "from_version": champ, "to_version": prev}, actor)
    return champ, prev


def load_booster(mlflow: MLflowResource, version: str):
    import mlflow as mlf

    mlflow.setup()
    return mlf.lightgbm.load_model(f"models:/{mlflow.model_name}/{version}")


def version_tags(mlflow: MLflowResource, version: str) -> dict[str, str]:
    return dict(mlflow.client().get_model_version(mlflow.model_name, str(version)).tags or {})
