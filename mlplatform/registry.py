"""Model registry operations on MLflow: register with lineage, gate, promote, approve, roll back.

The gate only *decides* (an audit `gate_decision`); aliases move once the run's data is on lakeFS main
(`promote_published`, called when the run is published), or by `approve` / `rollback`. Every alias move
is written to the audit trail as an intent first, then the outcome naming its intent, so a move cut
short is visible (`mlp doctor`). Registry reads fail closed: an MLflow error is an error, never "no
champion". MLflow is imported inside the functions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from mlplatform.audit import INTENT_OUTCOME, AuditTrail
from mlplatform.tracking import Tracking  # or resources.mlflow.MLflowResource, which delegates to one
from mlplatform.spec import DatasetSpec

CHAMPION, PREVIOUS, CHALLENGER, AWAITING = "champion", "previous", "challenger", "awaiting-approval"
ALIASES = (CHAMPION, PREVIOUS, CHALLENGER, AWAITING)

# Gate decisions (what evaluation_report records; nothing moves then).
PROMOTE, REJECT, AWAIT_APPROVAL = "promote", "reject", "await_approval"
# intent action -> outcome action, for every alias move.
INTENTS = INTENT_OUTCOME
OUTCOMES = {v: k for k, v in INTENTS.items()}


class RegistryError(RuntimeError):
    pass


@dataclass
class GateOutcome:
    passed: bool
    action: str           # promote | reject | await_approval: the decision, applied at publication
    reason: str
    evidence: dict[str, Any]


_CRED = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)[^/@\s:]+(:[^/@\s]*)?@")


def _redact(text: str) -> str:
    """`scheme://user:pass@host` -> `scheme://***@host` anywhere in `text`."""
    return _CRED.sub(lambda m: m.group("scheme") + "***@", str(text))


def store_name(mlflow: Tracking) -> str:
    return _redact(mlflow.tracking_uri)


def _is_missing(exc: BaseException) -> bool:
    return getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def aliases(mlflow: Tracking) -> dict[str, str]:
    """alias -> version of the registered model; {} only if the model is not registered yet.

    Any other failure raises: a store that cannot be read must never look like "no champion"."""
    try:
        rm = mlflow.client().get_registered_model(mlflow.model_name)
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types for a dead or broken store
        if _is_missing(exc):
            return {}
        raise RegistryError(f"cannot read the aliases of {mlflow.model_name} from MLflow at {store_name(mlflow)}: "
                            f"{type(exc).__name__}: {_redact(str(exc))[:300]}") from None
    return {a: str(v) for a, v in (rm.aliases or {}).items()}


def set_alias(mlflow: Tracking, alias: str, version: str | None) -> None:
    client = mlflow.client()
    if version is None:
        try:
            client.delete_registered_model_alias(mlflow.model_name, alias)
        except Exception as exc:  # noqa: BLE001
            if not _is_missing(exc):  # deleting an alias that is not set is fine; anything else is not
                raise
        return
    client.set_registered_model_alias(mlflow.model_name, alias, str(version))


def decide(spec: DatasetSpec, candidate_score: float, comparison: dict | None,
           behaviour_failures: list[str] | tuple[str, ...] = ()) -> tuple[bool, str]:
    """The gate's rule: every behavioural expectation holds (`behaviour_failures`: one line per failed one, naming
    it; mlplatform.behaviour.failure_reasons), above the floor, and not significantly worse than the champion by
    more than the margin."""
    passed, reason = _decide_metric(spec, candidate_score, comparison)
    if behaviour_failures:
        return False, (f"behavioural expectation(s) failed: {'; '.join(behaviour_failures)}; "
                       f"metric gate: {reason}")
    return passed, reason


def _decide_metric(spec: DatasetSpec, candidate_score: float, comparison: dict | None) -> tuple[bool, str]:
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


def apply_gate(mlflow: Tracking, audit: AuditTrail, spec: DatasetSpec, version: str, passed: bool,
               reason: str, evidence: dict, manual: bool, actor: str) -> GateOutcome:
    """Record the gate's decision; no alias moves here (they wait for the run's data to reach main)."""
    if not passed:
        action = REJECT
    elif manual:
        action, reason = AWAIT_APPROVAL, reason + " (manual mode: `mlp approve` to promote once published)"
    else:
        action = PROMOTE
    audit.record("gate_decision", mlflow.model_name, version, reason, {**evidence, "decision": action}, actor)
    return GateOutcome(passed, action, reason, evidence)


# --- alias moves: plan, intent, move, outcome ---------------------------------------------------------

def plan_promotion(current: dict[str, str], version: str) -> dict[str, str]:
    after = dict(current)
    old = current.get(CHAMPION)
    if old and old != str(version):
        after[PREVIOUS] = old
    after[CHAMPION] = str(version)
    for alias in (CHALLENGER, AWAITING):
        if after.get(alias) == str(version):
            del after[alias]
    return after


def plan_hold(current: dict[str, str], version: str) -> dict[str, str]:
    return {**current, AWAITING: str(version)}


def plan_rollback(current: dict[str, str]) -> dict[str, str]:
    champ, prev = current.get(CHAMPION), current.get(PREVIOUS)
    after = {k: v for k, v in current.items() if k != PREVIOUS}
    after[CHAMPION] = prev
    after[CHALLENGER] = champ  # the demoted model stays visible, never acted on
    return after


def apply_aliases(mlflow: Tracking, before: dict[str, str], after: dict[str, str]) -> None:
    """Make the registry's aliases equal `after` (only the platform's aliases are touched). Idempotent."""
    for alias in ALIASES:
        if after.get(alias) != before.get(alias):
            set_alias(mlflow, alias, after.get(alias))


def _move(mlflow: Tracking, audit: AuditTrail, intent: str, version: str, reason: str, evidence: dict,
          actor: str, before: dict[str, str], after: dict[str, str], once: str | None = None):
    """intent -> alias moves -> outcome naming its intent.

    With `once` (e.g. the publishing run's id), the intent is written once: a second publisher, or a retry
    after a crash between intent and outcome, finds it, applies the same planned aliases, and the outcome
    is written once too."""
    entry = audit.record(intent, mlflow.model_name, version, reason,
                         {**evidence, "aliases_before": before, "aliases_after": after}, actor,
                         once=f"{intent}:{once}" if once else None)
    before = dict(entry.evidence.get("aliases_before", before))
    after = dict(entry.evidence.get("aliases_after", after))
    current = aliases(mlflow)
    # A plan resumed after a crash is applied only if nobody moved the aliases in between: each alias is
    # still as the intent found it, or already as it planned (a move cut short half-way).
    foreign = [a for a in ALIASES if current.get(a) not in (before.get(a), after.get(a))]
    if foreign:
        raise RegistryError(
            f"{intent} #{entry.seq} of {mlflow.model_name} v{version} planned aliases {after} from {before}, but "
            f"{foreign} are now {({a: current.get(a) for a in foreign})}: moved in between, so the stale plan is "
            f"not re-applied; see `mlp doctor` and decide by hand (mlp approve / mlp rollback)")
    apply_aliases(mlflow, current, after)
    return audit.record(INTENTS[intent], mlflow.model_name, version, reason,
                        {**evidence, "intent_seq": entry.seq, "aliases_before": before, "aliases_after": after},
                        actor, once=f"outcome:{entry.seq}")


def pending_intents(audit: AuditTrail, model: str) -> list:
    """Intents with no outcome naming them (a move cut short, or in progress)."""
    events = audit.history(model)
    done = {e.evidence.get("intent_seq") for e in events if e.action in OUTCOMES}
    return [e for e in events if e.action in INTENTS and e.seq not in done]


def promote_published(mlflow: Tracking, audit: AuditTrail, version: str, decision: str, run_id: str,
                      published_commit: str, actor: str) -> str:
    """Apply a gate decision once its run is on main. Idempotent per run: returns what happened."""
    if decision not in (PROMOTE, AWAIT_APPROVAL):
        return f"gate decision {decision!r}: no alias moves"
    intent = "promotion_intent" if decision == PROMOTE else "hold_intent"
    events = audit.history(mlflow.model_name, version)
    if any(e.action == INTENTS[intent] and e.evidence.get("dagster_run_id") == run_id for e in events):
        return f"v{version}: already {INTENTS[intent]} for run {run_id}"
    current = aliases(mlflow)
    after = plan_promotion(current, version) if decision == PROMOTE else plan_hold(current, version)
    evidence = {"dagster_run_id": run_id, "published_commit": published_commit,
                "previous_champion": current.get(CHAMPION)}
    reason = (f"run {run_id} published to main at {published_commit[:12]}" if decision == PROMOTE else
              f"run {run_id} published to main at {published_commit[:12]}; awaiting `mlp approve {version}`")
    _move(mlflow, audit, intent, version, reason, evidence, actor, current, after, once=run_id)
    return f"v{version}: {INTENTS[intent]}"


def promote(mlflow: Tracking, version: str, current: dict[str, str] | None = None) -> None:
    """Low-level alias move, with no audit entry (set-up and drills only; `mlp doctor` flags its use)."""
    current = current if current is not None else aliases(mlflow)
    apply_aliases(mlflow, current, plan_promotion(current, version))


def approve(mlflow: Tracking, audit: AuditTrail, version: str, approver: str, reason: str,
            evidence: dict | None = None, actor: str | None = None) -> None:
    """Promote the version awaiting approval: a person (`mlp approve`, actor `user:<approver>`) or the online
    gate (actor `sensor:online_experiment_gate`, the experiment's comparison as evidence)."""
    current = aliases(mlflow)
    if current.get(AWAITING) != str(version):
        raise RegistryError(f"version {version} of {mlflow.model_name} is not awaiting approval "
                            f"(aliases: {current}); a version awaits approval once its run is published")
    _move(mlflow, audit, "approval_intent", str(version), reason,
          {**(evidence or {}), "previous_champion": current.get(CHAMPION)}, actor or f"user:{approver}", current,
          plan_promotion(current, str(version)))


def rollback(mlflow: Tracking, audit: AuditTrail, reason: str, actor: str,
             evidence: dict | None = None, expected_champion: str | None = None) -> tuple[str, str]:
    """Move `champion` back to `previous` in one step; returns (from_version, to_version)."""
    current = aliases(mlflow)
    champ, prev = current.get(CHAMPION), current.get(PREVIOUS)
    if not champ or not prev:
        raise RegistryError(f"{mlflow.model_name}: nothing to roll back to (aliases: {current})")
    if expected_champion is not None and champ != str(expected_champion):
        raise RegistryError(f"{mlflow.model_name}: the champion is v{champ}, not v{expected_champion} as the "
                            f"evidence says; not rolling back")
    _move(mlflow, audit, "rollback_intent", prev, reason, {**(evidence or {}), "from_version": champ,
                                                           "to_version": prev},
          actor, current, plan_rollback(current))
    return champ, prev


def load_booster(mlflow: Tracking, version: str):
    import mlflow as mlf

    mlflow.setup()
    return mlf.lightgbm.load_model(f"models:/{mlflow.model_name}/{version}")


def version_tags(mlflow: Tracking, version: str) -> dict[str, str]:
    return dict(mlflow.client().get_model_version(mlflow.model_name, str(version)).tags or {})


def find_by_fingerprint(mlflow: Tracking, fingerprint: str) -> list:
    """Registered versions carrying this fingerprint tag, newest first."""
    try:
        found = mlflow.client().search_model_versions(
            f"name='{mlflow.model_name}' and tags.fingerprint='{fingerprint}'")
    except Exception as exc:  # noqa: BLE001
        if _is_missing(exc):
            return []
        raise RegistryError(f"cannot search {mlflow.model_name} in MLflow at {store_name(mlflow)}: "
                            f"{_redact(str(exc))[:300]}") from None
    return sorted(found, key=lambda mv: int(mv.version), reverse=True)
