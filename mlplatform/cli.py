"""`mlp`: the operator's command line (simulator, publishing, branches, models, lifecycle state)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from mlplatform.services import load_env_file


def _lakefs():
    from resources.lakefs import LakeFSResource
    from resources.settings import SettingError

    missing = [k for k in ("LAKEFS_ENDPOINT", "LAKEFS_ACCESS_KEY_ID", "LAKEFS_SECRET_ACCESS_KEY")
               if not os.environ.get(k)]
    if missing:
        raise SettingError(f"setting(s) {missing} not set: run `make up`, or export them for your lakeFS")
    return LakeFSResource(endpoint=os.environ["LAKEFS_ENDPOINT"],
                          access_key_id=os.environ["LAKEFS_ACCESS_KEY_ID"],
                          secret_access_key=os.environ["LAKEFS_SECRET_ACCESS_KEY"],
                          repository=os.environ.get("LAKEFS_REPOSITORY", "mlplatform"))


def _instance():
    import dagster as dg

    return dg.DagsterInstance.get()


def _simulator(scale: int = 1):
    from mlplatform.batches import Landing
    from mlplatform.simulator import Simulator
    from resources.settings import dataset_name, load_spec, state_dir

    spec = load_spec(dataset_name())
    return Simulator(spec, Landing(state_dir() / ".landing" / spec.name), scale=scale)


def cmd_simulate(args) -> int:
    sim = _simulator(args.scale)
    if args.action == "reset":
        sim.reset()
        print(f"landing zone {sim.landing.root} reset")
    elif args.action == "next":
        rel = sim.release(args.n)
        print(json.dumps({"released_batches": rel.records, "released_labels": rel.labels, "clock": rel.clock}))
    else:
        st = sim.state()
        print(json.dumps({**st, "clock": sim.clock(st), "remaining": [b for b in sim.batches()
                                                                      if b not in st["released"]]}))
    return 0


def cmd_publish(args) -> int:
    from resources.publish import publish_pending, publish_run

    lakefs, instance = _lakefs(), _instance()
    outcomes = [publish_run(instance, lakefs, args.run_id)] if args.run_id else publish_pending(instance, lakefs)
    for o in outcomes:
        print(f"{o.run_id}: {o.status}: {o.detail}" + (f" (commit {o.commit})" if o.commit else ""))
    print(f"main is at {lakefs.head()}  {lakefs.commit_url(lakefs.head())}")
    return 1 if any(o.status == "conflict" for o in outcomes) else 0


def cmd_branches(args) -> int:
    from resources.publish import KEPT_TAG, prune_branches

    lakefs, instance = _lakefs(), _instance()
    if args.prune is not None:
        pruned = prune_branches(instance, lakefs, args.prune, dry_run=args.dry_run)
        print(("would delete: " if args.dry_run else "deleted: ") + (", ".join(pruned) or "nothing"))
        return 0
    for b in lakefs.branches():
        run = instance.get_run_by_id(b.run_id) if b.run_id else None
        status = run.status.value if run else "unknown run"
        kept = " (kept: failed checks or conflict)" if run and run.tags.get(KEPT_TAG) else ""
        print(f"{b.name}  {b.commit_id[:12]}  {status}{kept}")
    return 0


def _spec():
    from resources.settings import dataset_name, load_spec

    return load_spec(dataset_name())


def _mlflow():
    from resources.mlflow import MLflowResource
    from resources.settings import SettingError, dataset_name

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise SettingError("setting MLFLOW_TRACKING_URI is not set: run `make up`, or export it")
    return MLflowResource(tracking_uri=uri, model_name=f"{dataset_name()}-model", experiment=dataset_name())


def cmd_approve(args) -> int:
    from mlplatform import registry
    from mlplatform.audit import AuditTrail

    registry.approve(_mlflow(), AuditTrail(), str(args.version), args.by, args.reason)
    print(f"version {args.version} approved by {args.by} and promoted to champion")
    return 0


def cmd_rollback(args) -> int:
    from mlplatform import registry
    from mlplatform.audit import AuditTrail, default_actor

    old, new = registry.rollback(_mlflow(), AuditTrail(), args.reason, actor=default_actor())
    print(f"champion rolled back from version {old} to version {new}")
    return 0


def reproduce(version: str, mlflow=None, lakefs=None, spec=None) -> dict:
    """Rebuild a version's training set from its lakeFS commit, retrain, compare test predictions."""
    import numpy as np
    import polars as pl

    from mlplatform import modeling, registry
    from mlplatform.audit import AuditTrail, default_actor
    from resources.io import load_asset

    mlflow, lakefs, spec = mlflow or _mlflow(), lakefs or _lakefs(), spec or _spec()
    tags = registry.version_tags(mlflow, version)
    commit = tags["lakefs_commit"]
    ts = load_asset(lakefs, "training_set", ref=commit)
    params = json.loads(tags["lgb_params"])
    trained = modeling.train(ts, spec, params, int(tags["num_boost_round"]), int(tags["early_stopping_rounds"]))
    test = ts.filter(pl.col("split") == "test")
    registered = registry.load_booster(mlflow, version)
    diff = float(np.max(np.abs(modeling.predict(trained.booster, test, spec) - modeling.predict(registered, test, spec))))
    result = {"version": version, "lakefs_commit": commit, "test_rows": test.height, "max_abs_diff": diff,
              "identical": diff <= 1e-12}
    AuditTrail().record("reproduced", mlflow.model_name, version,
                        f"retrained from lakeFS commit {commit[:12]}: max |diff| {diff:.3g} on {test.height} rows",
                        result, default_actor())
    return result


def cmd_reproduce(args) -> int:
    result = reproduce(str(args.version))
    print(json.dumps(result, indent=1))
    return 0 if result["identical"] else 1


def cmd_history(args) -> int:
    from mlplatform.audit import AuditTrail

    trail = AuditTrail()
    model = _mlflow().model_name
    for e in trail.history(model, args.version):
        print(f"{e.seq:>4} {e.at[:19]} {e.actor:<28} {e.action:<18} v{e.version or '-':<4} {e.reason}")
    broken = trail.verify()
    print("audit trail intact" if not broken else f"audit trail TAMPERED at entries {broken}")
    return 0 if not broken else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlp", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("simulate", help="release production batches and delayed labels into the landing zone")
    s.add_argument("action", choices=["next", "reset", "status"])
    s.add_argument("n", nargs="?", type=int, default=1)
    s.add_argument("--scale", type=int, default=1, help="resample the production data this many times")
    s.set_defaults(fn=cmd_simulate)
    s = sub.add_parser("publish", help="merge finished, passing runs' lakeFS branches into main")
    s.add_argument("--run-id")
    s.set_defaults(fn=cmd_publish)
    s = sub.add_parser("branches", help="list run branches; --prune DAYS deletes failed runs' branches")
    s.add_argument("--prune", type=float, metavar="DAYS")
    s.add_argument("--dry-run", action="store_true")
    s.set_defaults(fn=cmd_branches)
    s = sub.add_parser("approve", help="promote a version awaiting approval (manual gate mode)")
    s.add_argument("version")
    s.add_argument("--by", required=True, help="who approves")
    s.add_argument("--reason", required=True)
    s.set_defaults(fn=cmd_approve)
    s = sub.add_parser("rollback", help="move `champion` back to the previous version, in one step")
    s.add_argument("--reason", default="manual rollback")
    s.set_defaults(fn=cmd_rollback)
    s = sub.add_parser("reproduce", help="rebuild a version's training set from lakeFS and retrain it")
    s.add_argument("version")
    s.set_defaults(fn=cmd_reproduce)
    s = sub.add_parser("history", help="the audit trail of the model (every decision, in order)")
    s.add_argument("--version")
    s.set_defaults(fn=cmd_history)
    return p


def main(argv: list[str] | None = None) -> int:
    load_env_file()
    os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except Exception as exc:  # noqa: BLE001 - the operator gets one clear line, not a stack trace
        from resources.lakefs import LakeFSError
        from resources.settings import SettingError

        from mlplatform.registry import RegistryError
        from resources.mlflow import MLflowUnavailable

        if isinstance(exc, (LakeFSError, SettingError, RegistryError, MLflowUnavailable)):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    raise SystemExit(main())
