"""`mlp`: the operator's command line (simulator, publishing, branches, models, lifecycle state).

Many data sets: the commands about a data set take `--dataset NAME` (repeatable, or comma-separated; default:
every live data set, MLP_DATASETS / MLP_DATASET / platform/datasets/*.yaml). `mlp status` shows every model's
lifecycle in one table; `simulate`, `doctor` and `history` run for each chosen data set; `approve`,
`rollback` and `reproduce` act on one model, so they need `--dataset` when more than one data set is live.
`publish` and `branches` are the platform's (one lakeFS repository, every data set's run branches)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from tooling.services import load_env_file


def _resources(*required: str) -> dict:
    """The platform's resources from the one factory, for this process's environment; SettingError naming each
    of the `required` settings' environment variables that is not set."""
    from resources.environment import Settings, build_resources

    return build_resources(Settings.from_env().require(*required))


def _lakefs():
    from resources.environment import LAKEFS

    return _resources(*LAKEFS)["lakefs"]


def _audit():
    return _resources()["audit"].trail()


def _instance():
    import dagster as dg

    return dg.DagsterInstance.get()


def _specs(args=None) -> list:
    """The data sets a command is about: `--dataset` (names or spec paths), else every live data set."""
    from mlplatform.spec import dataset_specs

    chosen = [v.strip() for given in (getattr(args, "dataset", None) or []) for v in given.split(",") if v.strip()]
    return dataset_specs(chosen or None)


def _one_spec(args, what: str):
    """The one data set a command acts on: `--dataset`, or the only live one."""
    from mlplatform.spec import SettingError

    specs = _specs(args)
    if len(specs) != 1:
        raise SettingError(f"`mlp {what}` acts on one model and {len(specs)} data sets are live "
                           f"({', '.join(s.name for s in specs)}): name one with --dataset")
    return specs[0]


def _simulator(scale: int = 1, spec=None):
    from tooling.simulator import Simulator
    from mlplatform.spec import dataset_spec

    spec = spec or dataset_spec()
    return Simulator(spec, _resources()["landing"].zone(spec), scale=scale)


def cmd_simulate(args) -> int:
    for spec in _specs(args):
        sim = _simulator(args.scale, spec)
        if args.action == "reset":
            sim.reset()
            print(f"{spec.name}: landing zone {sim.landing.root} reset")
        elif args.action == "next":
            rel = sim.release(args.n, start=args.start)
            print(json.dumps({"dataset": spec.name, "released_batches": rel.records, "released_labels": rel.labels,
                              "clock": rel.clock}))
        else:
            st = sim.state()
            print(json.dumps({"dataset": spec.name, **st, "clock": sim.clock(st),
                              "remaining": [b for b in sim.batches() if b not in st["released"]]}))
    return 0


def cmd_publish(args) -> int:
    from resources.environment import LAKEFS
    from resources.publish import publish_pending, publish_run

    res, instance = _resources(*LAKEFS), _instance()
    lakefs, audit = res["lakefs"], res["audit"].trail()
    mlflow = res.get("mlflow")  # present when MLFLOW_TRACKING_URI is set
    outcomes = ([publish_run(instance, lakefs, args.run_id, mlflow, audit)] if args.run_id
                else publish_pending(instance, lakefs, mlflow, audit))
    for o in outcomes:
        print(f"{o.run_id}: {o.status}: {o.detail}" + (f" (commit {o.commit})" if o.commit else ""))
    print(f"main is at {lakefs.head()}  {lakefs.commit_url(lakefs.head())}")
    return 1 if any(o.status == "conflict" or o.promotion_pending for o in outcomes) else 0


def cmd_branches(args) -> int:
    from resources.publish import KEPT_TAG, prune_branches

    lakefs, instance = _lakefs(), _instance()
    if args.prune is not None:
        result = prune_branches(instance, lakefs, args.prune, dry_run=args.dry_run)
        print(("would delete: " if args.dry_run else "deleted: ") + (", ".join(result.pruned) or "nothing"))
        for name, why in result.kept.items():
            print(f"kept {name}: {why}")
        return 0
    for b in lakefs.branches():
        run = instance.get_run_by_id(b.run_id) if b.run_id else None
        status = run.status.value if run else "unknown run"
        kept = " (kept: failed checks or conflict)" if run and run.tags.get(KEPT_TAG) else ""
        print(f"{b.name}  {b.commit_id[:12]}  {status}{kept}")
    return 0


def _spec():
    from mlplatform.spec import dataset_spec

    return dataset_spec()


def _mlflow(spec=None):
    """The MLflow store, scoped to `spec`'s registered model (default: MLP_DATASET's)."""
    from resources.environment import MLFLOW

    return _resources(*MLFLOW)["mlflow"].scoped(spec or _spec())


def cmd_approve(args) -> int:
    from mlplatform import registry

    spec = _one_spec(args, "approve")
    registry.approve(_mlflow(spec), _audit(), str(args.version), args.by, args.reason)
    print(f"{spec.name}-model version {args.version} approved by {args.by} and promoted to champion")
    return 0


def cmd_rollback(args) -> int:
    from mlplatform import registry
    from mlplatform.audit import default_actor

    spec = _one_spec(args, "rollback")
    old, new = registry.rollback(_mlflow(spec), _audit(), args.reason, actor=default_actor())
    print(f"{spec.name}-model: champion rolled back from version {old} to version {new}")
    return 0


def reproduce(version: str, mlflow=None, lakefs=None, spec=None, audit=None) -> dict:
    """Rebuild a version's training set from its lakeFS commit, retrain, compare test predictions."""
    import numpy as np
    import polars as pl

    from mlplatform import modeling, registry
    from mlplatform.audit import default_actor
    from resources.io import load_asset
    from resources.naming import ns

    spec = spec or _spec()
    mlflow, lakefs = (mlflow or _mlflow(spec)).scoped(spec), lakefs or _lakefs()
    tags = registry.version_tags(mlflow, version)
    commit = tags["lakefs_commit"]
    ts = load_asset(lakefs, ns(spec).key("training_set"), ref=commit)
    params = json.loads(tags["lgb_params"])
    trained = modeling.train(ts, spec, params, int(tags["num_boost_round"]), int(tags["early_stopping_rounds"]))
    test = ts.filter(pl.col("split") == "test")
    registered = registry.load_booster(mlflow, version)
    diff = float(np.max(np.abs(modeling.predict(trained.booster, test, spec) - modeling.predict(registered, test, spec))))
    result = {"version": version, "lakefs_commit": commit, "test_rows": test.height, "max_abs_diff": diff,
              "identical": diff <= 1e-12}
    (audit or _audit()).record("reproduced", mlflow.model_name, version,
                        f"retrained from lakeFS commit {commit[:12]}: max |diff| {diff:.3g} on {test.height} rows",
                        result, default_actor())
    return result


def cmd_reproduce(args) -> int:
    result = reproduce(str(args.version), spec=_one_spec(args, "reproduce"))
    print(json.dumps(result, indent=1))
    return 0 if result["identical"] else 1


def cmd_history(args) -> int:
    trail = _audit()
    for spec in _specs(args):
        model = f"{spec.name}-model"
        print(f"== {model}")
        for e in trail.history(model, args.version):
            print(f"{e.seq:>4} {e.at[:19]} {e.actor:<28} {e.action:<18} v{e.version or '-':<4} {e.reason}")
    broken = trail.verify()
    print("audit trail intact" if not broken else f"audit trail TAMPERED at entries {broken}")
    return 0 if not broken else 1


def doctor(mlflow, lakefs, instance=None, audit=None) -> list[str]:
    """Divergences between the audit trail, the MLflow aliases and the lakeFS commits (empty: they agree)."""
    import dagster as dg

    from mlplatform import registry
    from resources.publish import GATE_TAG, MODEL_NAME_TAG, PUBLISHED_TAG, commit_on_main

    trail = audit or _audit()
    model, store = mlflow.model_name, registry.store_name(mlflow)
    problems = []
    broken = trail.verify()
    if broken:
        problems.append(f"audit hash chain broken at entries {broken} of {trail.path}: entries were changed "
                        f"behind the platform's back")
    events = trail.history(model)
    try:
        versions = sorted({str(v.version) for v in mlflow.client().search_model_versions(f"name='{model}'")},
                          key=int)
        current = registry.aliases(mlflow)
    except Exception as exc:  # noqa: BLE001 - the doctor reports; it does not crash
        return problems + [f"cannot read {model} from MLflow at {store}: {registry._redact(str(exc))[:300]}"]
    registered = {e.version for e in events if e.action == "registered"}
    for v in versions:
        if v not in registered:
            problems.append(f"{model} v{v} is in MLflow at {store} but has no `registered` entry in the audit trail "
                            f"(half-registered, or registered behind the platform's back)")
    for e in registry.pending_intents(trail, model):
        problems.append(f"audit entry {e.seq} ({e.action} v{e.version}, {e.at[:19]}, {e.actor}) has no outcome: "
                        f"the alias move was cut short or is in progress (aliases before "
                        f"{e.evidence.get('aliases_before')}, planned {e.evidence.get('aliases_after')}, now {current})")
    moves = [e for e in events if e.action in registry.OUTCOMES]
    champ_moves = [e for e in moves if e.action in ("promoted", "approved", "rolled_back")]
    expected = None
    if champ_moves:
        last = champ_moves[-1]
        expected = (last.evidence.get("aliases_after") or {}).get(registry.CHAMPION, last.version)
    if current.get(registry.CHAMPION) != expected:
        where = (f"the last completed champion decision (audit entry {champ_moves[-1].seq}, "
                 f"{champ_moves[-1].action}) makes v{expected} champion" if champ_moves
                 else "the audit trail records no promotion")
        problems.append(f"alias champion of {model} is {('v' + current[registry.CHAMPION]) if current.get(registry.CHAMPION) else 'unset'} "
                        f"in MLflow at {store}, but {where}: moved behind the platform's back")
    if moves and "aliases_after" in moves[-1].evidence:
        planned = moves[-1].evidence["aliases_after"]
        for alias in registry.ALIASES:
            if alias != registry.CHAMPION and planned.get(alias) != current.get(alias):
                problems.append(f"alias {alias} of {model} is {current.get(alias) or 'unset'} in MLflow, but the last "
                                f"alias move in the audit trail (entry {moves[-1].seq}, {moves[-1].action}) left it "
                                f"{planned.get(alias) or 'unset'}")
    champ = current.get(registry.CHAMPION)
    if champ:
        commit = registry.version_tags(mlflow, champ).get("lakefs_commit", "")
        if not commit_on_main(lakefs, commit):
            problems.append(f"champion v{champ} was trained on lakeFS commit {commit[:12] or '(none)'}, which is not "
                            f"reachable from {lakefs.main_branch} of repository {lakefs.repository}: its data was "
                            f"never published")
    if instance is not None:
        done = {e.evidence.get("dagster_run_id") for e in moves if e.action in ("promoted", "awaiting_approval")}
        for decision in (registry.PROMOTE, registry.AWAIT_APPROVAL):
            # this model's runs only: another data set's runs carry their own model's name
            for run in instance.get_runs(filters=dg.RunsFilter(tags={GATE_TAG: decision, MODEL_NAME_TAG: model})):
                if run.tags.get(PUBLISHED_TAG) and run.run_id not in done:
                    problems.append(f"run {run.run_id} was published with gate decision {decision} for "
                                    f"v{run.tags.get('mlp/model_version')}, but its alias move is not recorded: "
                                    f"run `mlp publish --run-id {run.run_id}`")
    return problems


def cmd_doctor(args) -> int:
    lakefs, instance, status = _lakefs(), _instance(), 0
    for spec in _specs(args):
        mlflow = _mlflow(spec)
        problems = doctor(mlflow, lakefs, instance)
        for p in problems:
            print(f"DIVERGENCE: {p}")
        if not problems:
            print(f"ok: the audit trail, the MLflow aliases of {mlflow.model_name} and lakeFS {lakefs.repository} "
                  f"agree")
        status = status or (1 if problems else 0)
    return status


def _sensor_cursor(instance, name: str) -> str | None:
    for state in instance.all_instigator_state():
        if state.name == name and state.instigator_data is not None:
            return getattr(state.instigator_data, "cursor", None)
    return None


def lifecycle_state(instance, mlflow, spec, audit=None) -> dict:
    """Everything the operator view shows about one data set's model, as data (the `status` command prints it)."""
    import dagster as dg

    from mlplatform import registry
    from resources.naming import ns
    from sensors.lifecycle import evaluate_triggers, latest_materializations, meta_value

    n = ns(spec)
    mlflow = mlflow.scoped(spec)
    out: dict = {"dataset": spec.name, "model": mlflow.model_name, "aliases": {}}
    for alias, version in sorted(registry.aliases(mlflow).items()):
        tags = registry.version_tags(mlflow, version)
        out["aliases"][alias] = {"version": version, "training_commit": tags.get("lakefs_commit", "?"),
                                 "dagster_run_id": tags.get("dagster_run_id", "?")}
    trail = (audit or _audit()).history(mlflow.model_name)
    retrains = [e for e in trail if e.action == "retrain_triggered"]
    decisions = [e for e in trail if e.action in ("gate_decision", "rejected", "promoted", "awaiting_approval",
                                                  "rolled_back", "approved")]
    out["last_retrain"] = ({"at": retrains[-1].at, "why": retrains[-1].reason, "by": retrains[-1].actor}
                           if retrains else None)
    out["last_decision"] = ({"at": decisions[-1].at, "version": decisions[-1].version,
                             "action": (f"gate:{decisions[-1].evidence.get('decision')}"
                                        if decisions[-1].action == "gate_decision" else decisions[-1].action),
                             "why": decisions[-1].reason} if decisions else None)
    batches = sorted(instance.get_materialized_partitions(n.key("raw_records")))
    out["last_batch"] = batches[-1] if batches else None
    drift = latest_materializations(instance, n.key("drift_report"))
    if drift:
        summary = meta_value(drift[0].asset_materialization.metadata, "summary", {}) or {}
        out["latest_drift"] = {"partition": drift[0].partition_key, "n_alerts": summary.get("n_alerts"),
                               "alerting_features": summary.get("alerting_features"),
                               "multivariate_alert": summary.get("multivariate", {}).get("alert")}
    est = latest_materializations(instance, n.key("performance_estimate"))
    if est:
        meta = est[0].asset_materialization.metadata
        metric = spec.estimated_metric
        out["latest_estimate"] = {"partition": est[0].partition_key, metric: meta_value(meta, f"estimated_{metric}"),
                                  "champion_test_score": meta_value(meta, "champion_test_score"), "alert": meta_value(meta, "alert")}
    keys = n.keys(*spec.freshness)
    records = instance.get_freshness_state_records(keys)
    out["freshness"] = {k.path[-1]: (records[k].freshness_state.value if k in records else "UNKNOWN") for k in keys}
    cursor = _sensor_cursor(instance, n.sensor("retrain_on_evidence"))
    seen = json.loads(cursor)["seen"] if cursor else {}
    out["pending_triggers"] = [{"trigger": t.name, "reason": t.reason} for t in evaluate_triggers(instance, spec, seen)]
    return out


STATUS_COLUMNS = ("data set", "champion", "challenger", "awaiting", "last batch", "last retrain", "last decision",
                  "latest drift", "latest estimate", "freshness", "pending triggers")


def status_row(state: dict) -> dict[str, str]:
    """One model's lifecycle as the cells of the `mlp status` table."""
    def version(alias):
        v = state["aliases"].get(alias)
        return f"v{v['version']}" if v else "-"

    lr, ld, d, e = (state.get(k) for k in ("last_retrain", "last_decision", "latest_drift", "latest_estimate"))
    bad = sorted(k for k, v in state["freshness"].items() if v in ("FAIL", "WARN"))
    return {
        "data set": state["dataset"], "champion": version("champion"), "challenger": version("challenger"),
        "awaiting": version("awaiting-approval"), "last batch": state.get("last_batch") or "-",
        "last retrain": f"{lr['at'][:16]} {lr['by']}" if lr else "-",
        "last decision": f"{ld['action']} v{ld['version']}" if ld else "-",
        "latest drift": (f"{d['partition']}: {d['n_alerts']} alert(s)" + (", multivariate" if d["multivariate_alert"]
                                                                        else "")) if d else "-",
        "latest estimate": (f"{e['partition']}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                             for k, v in e.items() if k not in ("partition",)))
        if e else "-",
        "freshness": ", ".join(f"{k}={state['freshness'][k]}" for k in bad) or "ok",
        "pending triggers": ", ".join(t["trigger"] for t in state["pending_triggers"]) or "-",
    }


def status_table(states: list[dict]) -> str:
    """Every model's lifecycle in one table: one row per data set."""
    rows = [status_row(s) for s in states]
    widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in STATUS_COLUMNS}
    line = lambda cells: "  ".join(str(cells[c]).ljust(widths[c]) for c in STATUS_COLUMNS).rstrip()  # noqa: E731
    return "\n".join([line({c: c for c in STATUS_COLUMNS}), line({c: "-" * widths[c] for c in STATUS_COLUMNS}),
                      *(line(r) for r in rows)])


def cmd_status(args) -> int:
    instance, audit = _instance(), _audit()
    states = [lifecycle_state(instance, _mlflow(spec), spec, audit) for spec in _specs(args)]
    if args.json:
        print(json.dumps(states, indent=1, default=str))
        return 0
    print(status_table(states))
    for state in states:  # the reasons behind the table's cells
        lr, ld = state["last_retrain"], state["last_decision"]
        why = [f"last retrain: {lr['why']}" if lr else "", f"last decision: {ld['why']}" if ld else "",
               *(f"pending {t['trigger']}: {t['reason']}" for t in state["pending_triggers"])]
        why = [w for w in why if w]
        if why:
            print(f"\n{state['model']}:\n  " + "\n  ".join(why))
    return 0


def _add_dataset(p) -> None:
    p.add_argument("--dataset", action="append", metavar="NAME",
                   help="a data set (spec name or path; repeat or comma-separate; default: every live data set)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlp", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("simulate", help="release production batches and delayed labels into the landing zone")
    s.add_argument("action", choices=["next", "reset", "status"])
    s.add_argument("n", nargs="?", type=int, default=1)
    s.add_argument("--scale", type=int, default=1, help="resample the production data this many times")
    s.add_argument("--start", help="jump ahead: release batches from this partition key on")
    _add_dataset(s)
    s.set_defaults(fn=cmd_simulate)
    s = sub.add_parser("publish", help="merge finished, passing runs' lakeFS branches into main")
    s.add_argument("--run-id")
    s.set_defaults(fn=cmd_publish)
    s = sub.add_parser("branches", help="list run branches; --prune DAYS deletes failed runs' branches (never "
                                        "those of queued, running or unknown runs)")
    s.add_argument("--prune", type=float, metavar="DAYS")
    s.add_argument("--dry-run", action="store_true")
    s.set_defaults(fn=cmd_branches)
    s = sub.add_parser("approve", help="promote a version awaiting approval (manual gate mode)")
    s.add_argument("version")
    s.add_argument("--by", required=True, help="who approves")
    s.add_argument("--reason", required=True)
    _add_dataset(s)
    s.set_defaults(fn=cmd_approve)
    s = sub.add_parser("rollback", help="move `champion` back to the previous version, in one step")
    s.add_argument("--reason", default="manual rollback")
    _add_dataset(s)
    s.set_defaults(fn=cmd_rollback)
    s = sub.add_parser("reproduce", help="rebuild a version's training set from lakeFS and retrain it")
    s.add_argument("version")
    _add_dataset(s)
    s.set_defaults(fn=cmd_reproduce)
    s = sub.add_parser("status", help="every model's lifecycle in one table: champion, challenger, last batch, "
                                      "retrains, decisions, drift, estimates, freshness, pending triggers")
    s.add_argument("--json", action="store_true")
    _add_dataset(s)
    s.set_defaults(fn=cmd_status)
    s = sub.add_parser("doctor", help="check that the audit trail, the MLflow aliases and lakeFS agree; "
                                      "names each divergence (exit 1 if any)")
    _add_dataset(s)
    s.set_defaults(fn=cmd_doctor)
    s = sub.add_parser("history", help="the audit trail of the model (every decision, in order)")
    s.add_argument("--version")
    _add_dataset(s)
    s.set_defaults(fn=cmd_history)
    return p


def main(argv: list[str] | None = None) -> int:
    load_env_file()
    os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")
    args = build_parser().parse_args(argv)
    from mlplatform.redact import redact, redacting

    try:
        with redacting():  # an unexpected traceback carries no credentials either
            return args.fn(args)
    except Exception as exc:  # noqa: BLE001 - the operator gets one clear line, not a stack trace
        from resources.lakefs import LakeFSError
        from mlplatform.spec import SettingError

        from mlplatform.registry import RegistryError
        from resources.mlflow import MLflowUnavailable

        if isinstance(exc, (LakeFSError, SettingError, RegistryError, MLflowUnavailable)):
            print(f"error: {redact(exc)}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    raise SystemExit(main())
