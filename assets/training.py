"""Training: point-in-time labelled examples, the time-split training set, and the LightGBM candidate."""



import datetime as dt
import hashlib
import json
import os

import dagster as dg
from mlplatform.lazy import lazy_import
np = lazy_import("numpy")
pl = lazy_import("polars")

from mlplatform import modeling
from mlplatform.audit import AuditTrail
from resources.audit import AuditResource
from resources.io import git_commit, latest_checked_materialization, read_upstream_table
from resources.lakefs import LakeFSResource
from resources.mlflow import MLflowResource
from resources.naming import ns
from mlplatform.spec import DatasetSpec


class ExamplesConfig(dg.Config):
    cutoff: str = ""  # ISO datetime of the training cut-off; default: the latest event time in the features


class TrainConfig(dg.Config):
    num_boost_round: int = 400
    early_stopping_rounds: int = 30
    learning_rate: float = 0.05
    num_leaves: int = 31
    seed: int = 42
    shuffle_labels: bool = False  # train on permuted labels: a deliberately worse candidate, for drills


def build_training(spec: DatasetSpec) -> list:
    n = ns(spec)

    @dg.asset(
        key_prefix=[spec.name], group_name="training", kinds={"polars", "lakefs"}, code_version="2",
        deps=n.keys("reference_features", "stg_reference_labels", "features", "stg_labels"),
        description="Features joined with the labels known at the cut-off (point in time, no leakage).",
        check_specs=[dg.AssetCheckSpec("no_label_leakage", asset=n.key("labelled_examples"), blocking=True)],
    )
    def labelled_examples(context: dg.AssetExecutionContext, config: ExamplesConfig, lakefs: LakeFSResource):
        """The labelled window: the history (reference_features, stg_reference_labels) plus the batch partitions
        that can hold an example at the cut-off, i.e. whose window starts by then and whose labels are known by
        then; the features of a batch are read only if it has such labels. Partitions after the cut-off are
        never read."""
        ref_features, fcommit = read_upstream_table(context, lakefs, n.key("reference_features"))
        ref_labels, lcommit = read_upstream_table(context, lakefs, n.key("stg_reference_labels"))
        commits = {"reference_features": fcommit, "stg_reference_labels": lcommit}
        checked = checked_partitions(context, n.key("features"))
        if config.cutoff:
            cutoff = dt.datetime.fromisoformat(config.cutoff)
        else:  # the latest event time in the features: it lies in the newest batch (or the history)
            cutoff = ref_features[spec.time_column].max()
            if checked:
                last = max(checked)
                newest = load_partition(context, lakefs, "features", last, checked[last], commits)
                if newest.height:
                    cutoff = max(cutoff, newest[spec.time_column].max())
        label_parts = checked_partitions(context, n.key("stg_labels"))
        window_keys = labelled_window(spec, sorted(label_parts), cutoff)
        feature_frames, label_frames = [ref_features], [ref_labels]
        late = int(ref_labels.filter(pl.col("label_available_at") > cutoff).height)
        for p in window_keys:
            labels_p = load_partition(context, lakefs, "stg_labels", p, label_parts[p], commits)
            late += int(labels_p.filter(pl.col("label_available_at") > cutoff).height)
            labels_p = labels_p.filter(pl.col("label_available_at") <= cutoff)
            if labels_p.height and p in checked:
                label_frames.append(labels_p)
                feature_frames.append(load_partition(context, lakefs, "features", p, checked[p], commits))
        features = pl.concat(feature_frames, how="diagonal_relaxed")
        labels = pl.concat(label_frames, how="diagonal_relaxed")
        examples = modeling.point_in_time_examples(features, labels, spec, cutoff)
        problems = modeling.leakage_violations(examples, spec, cutoff)
        yield dg.Output(examples, metadata={
            "cutoff": str(cutoff), "rows": examples.height,
            "labels_known_at_cutoff": int(labels.filter(pl.col("label_available_at") <= cutoff).height),
            "labels_after_cutoff_excluded": late,
            "batch_partitions_read": dg.MetadataValue.json(sorted(p for p in commits if "[" in p)),
            "upstream_commits": dg.MetadataValue.json(commits),
        })
        yield dg.AssetCheckResult(check_name="no_label_leakage", passed=not problems,
                                  description="; ".join(problems) or f"no label known after {cutoff} is used")

    ts_checks = ["splits_not_empty", "target_valid"]

    @dg.asset(
        key_prefix=[spec.name], group_name="training", kinds={"polars", "lakefs"}, code_version="1",
        ins=n.ins("labelled_examples"),
        description="Time-ordered train / validation / test split of the labelled examples, frozen in lakeFS.",
        check_specs=[dg.AssetCheckSpec(c, asset=n.key("training_set"), blocking=True) for c in ts_checks],
    )
    def training_set(context: dg.AssetExecutionContext, labelled_examples):
        ts = modeling.time_split(labelled_examples, spec)
        rows = []
        for s in modeling.SPLITS:
            part = ts.filter(pl.col("split") == s)
            y = part[spec.target]
            rows.append(dg.TableRecord({
                "split": s, "rows": part.height,
                "from": str(part[spec.time_column].min()), "to": str(part[spec.time_column].max()),
                ("positive_rate" if spec.is_classification else "target_mean"):
                    round(float(y.mean()), 4) if part.height else 0.0,
            }))
        summary_col = "positive_rate" if spec.is_classification else "target_mean"
        yield dg.Output(ts, metadata={
            "splits": dg.MetadataValue.table(rows, schema=dg.TableSchema(columns=[
                dg.TableColumn("split"), dg.TableColumn("rows", "int"), dg.TableColumn("from"),
                dg.TableColumn("to"), dg.TableColumn(summary_col, "float")])),
            **{f"rows_{s}": int(ts.filter(pl.col("split") == s).height) for s in modeling.SPLITS},
        })
        problems = modeling.training_set_problems(ts, spec)
        empty = [p for p in problems if "is empty" in p]
        other = [p for p in problems if "is empty" not in p]
        yield dg.AssetCheckResult(check_name="splits_not_empty", passed=not empty,
                                  description="; ".join(empty) or "every split has rows")
        yield dg.AssetCheckResult(check_name="target_valid", passed=not other,
                                  description="; ".join(other) or "targets finite, both classes in every split")

    @dg.asset(
        key_prefix=[spec.name], group_name="training", kinds={"lightgbm", "mlflow"}, code_version="1",
        ins=n.ins("training_set"),
        description="A LightGBM candidate trained on the training set, tracked and registered in MLflow.",
        pool="training",  # one training at a time, however it was launched (platform/dagster.yaml: pools)
    )
    def candidate_model(context: dg.AssetExecutionContext, config: TrainConfig, training_set,
                        mlflow: MLflowResource, lakefs: LakeFSResource, audit: AuditResource) -> dg.Output:
        mlflow = mlflow.scoped(spec)  # this data set's registered model and experiment
        if context.run.tags.get("retrain/trigger"):  # requested by a trigger: its audit entry, once
            record_retrain_trigger(context.run, mlflow.model_name, audit.trail())
        found = latest_checked_materialization(context.instance, n.key("training_set"), None, context.run_id)
        ts_commit = found[0] if found else "unknown"
        result = train_and_register(spec, training_set, config, mlflow, lakefs, ts_commit, context.run_id,
                                    actor=f"dagster:{context.run.tags.get('retrain/trigger', 'run')}",
                                    audit=audit)
        if result.get("reused"):
            context.log.info(f"v{result['version']} has the same fingerprint (training data, code, params) and its "
                             f"training data is on main: reused, no new version registered")
        return dg.Output(result, metadata={
            "model_version": dg.MetadataValue.int(int(result["version"])),
            "reused_existing_version": dg.MetadataValue.bool(bool(result.get("reused"))),
            "fingerprint": dg.MetadataValue.text(result["fingerprint"]),
            "mlflow_run": dg.MetadataValue.url(mlflow.run_url(result["run_id"])),
            "mlflow_model_version": dg.MetadataValue.url(mlflow.model_version_url(result["version"])),
            "training_set_commit": dg.MetadataValue.text(result["training_set_commit"]),
            "training_set_link": dg.MetadataValue.url(lakefs.commit_url(result["training_set_commit"])),
            f"validation_{result['params']['metric']}": dg.MetadataValue.float(result["validation_score"]),
            "best_iteration": dg.MetadataValue.int(result["best_iteration"]),
            "train_seconds": dg.MetadataValue.float(result["train_seconds"]),
        })

    return [labelled_examples, training_set, candidate_model]


def labelled_window(spec: DatasetSpec, partitions: list[str], cutoff: dt.datetime) -> list[str]:
    """The batch partitions that can hold a labelled example at `cutoff`: those whose window starts by then
    (a record is never later than its label, and the label must be known by the cut-off)."""
    from mlplatform.batches import window

    return [p for p in partitions if window(spec, p)[0] <= cutoff]


def checked_partitions(context, key: str | dg.AssetKey) -> dict[str, tuple[str, str]]:
    """partition -> (commit, path) of the newest checked version (from this run or a successful run) of each
    materialized partition of `key`."""
    key = key if isinstance(key, dg.AssetKey) else dg.AssetKey.from_user_string(key)
    out = {}
    for p in sorted(context.instance.get_materialized_partitions(key)):
        found = latest_checked_materialization(context.instance, key, p, context.run_id)
        if found:
            out[p] = (found[0], found[1])
    return out


def load_partition(context, lakefs: LakeFSResource, key: str, partition: str, found: tuple[str, str],
                   commits: dict) -> "pl.DataFrame":
    """One partition of a dbt model at its checked commit; the commit is recorded as upstream lineage."""
    from resources.io import deserialize

    commit, path = found
    commits[f"{key}[{partition}]"] = commit
    return deserialize(lakefs.get(commit, path), path)


def record_retrain_trigger(run: dg.DagsterRun, model: str, audit: AuditTrail | None = None) -> bool:
    """Write the `retrain_triggered` audit entry of a run requested by a trigger, from its `retrain/*` tags,
    once per run (the sensor only requests the run; it writes nothing). True if written now. Without `audit`,
    the trail the resource factory configures for this environment."""
    trigger = run.tags.get("retrain/trigger")
    if not trigger:
        return False
    if audit is None:
        from resources.environment import default_audit_trail

        audit = default_audit_trail()
    if any(e.action == "retrain_triggered" and e.evidence.get("dagster_run_id") == run.run_id
           for e in audit.history(model)):
        return False
    raw = run.tags.get("retrain/evidence", "{}")
    try:
        evidence = json.loads(raw)
    except ValueError:  # truncated in the tag
        evidence = {"evidence_truncated": raw}
    if run.tags.get("dagster/sensor_name"):
        actor = f"sensor:{run.tags['dagster/sensor_name']}"
    elif run.tags.get("dagster/schedule_name"):
        actor = f"schedule:{run.tags['dagster/schedule_name']}"
    else:
        actor = f"dagster:{trigger}"
    reason = run.tags.get("retrain/reason") or f"retrain requested by {trigger}"
    audit.record("retrain_triggered", model, None, reason,
                 {**evidence, "dagster_run_id": run.run_id, "trigger": trigger}, actor=actor)
    return True


def content_digest(ts: "pl.DataFrame") -> str:
    """A digest of the training set's content (schema, rows and their order)."""
    h = hashlib.sha256(json.dumps([[n, str(t)] for n, t in ts.schema.items()]).encode())
    h.update(pl.__version__.encode())
    h.update(str(ts.height).encode())
    if ts.height:
        h.update(ts.hash_rows(seed=0).to_numpy().tobytes())
    return h.hexdigest()


def _mlflow_error(exc: BaseException) -> type:
    """MLflowUnavailable for a fault another attempt may not meet (the run is then retried), else RegistryError."""
    from mlplatform.registry import RegistryError
    from resources.io import is_transient_exception
    from resources.mlflow import MLflowUnavailable

    return MLflowUnavailable if is_transient_exception(exc) else RegistryError


def code_is_exact(code_version: str) -> bool:
    """A git commit with no uncommitted change: the only code version a fingerprint may vouch for."""
    return bool(code_version) and code_version != "unknown" and not code_version.endswith("-dirty")


def fingerprint(ts: "pl.DataFrame", code_version: str, params: dict, config: TrainConfig) -> str:
    """Same fingerprint = same model: training-set content, code version, training parameters."""
    payload = {"data": content_digest(ts), "code": code_version, "params": params,
               "config": config.model_dump() if hasattr(config, "model_dump") else dict(config)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _reusable(spec: DatasetSpec, mlflow: MLflowResource, lakefs: LakeFSResource, fp: str, params: dict) -> dict | None:
    """A registered version with this fingerprint whose training data is on main, as a candidate result."""
    from mlplatform import registry
    from resources.publish import commit_on_main

    for mv in registry.find_by_fingerprint(mlflow, fp):
        tags = dict(mv.tags or {})
        commit = tags.get("lakefs_commit", "")
        if not commit_on_main(lakefs, commit):
            continue  # its data never reached main: train and register afresh
        metrics = mlflow.client().get_run(mv.run_id).data.metrics if mv.run_id else {}
        return {"version": str(mv.version), "run_id": mv.run_id, "model_uri": f"models:/{mlflow.model_name}/{mv.version}",
                "training_set_commit": commit, "params": json.loads(tags.get("lgb_params", "null")) or params,
                "validation_score": float(metrics.get(f"validation_{params['metric']}", float("nan"))),
                "best_iteration": int(metrics.get("best_iteration", 0)), "train_seconds": 0.0, "tags": tags,
                "fingerprint": fp, "reused": True}
    return None


def _discard_versions(mlflow: MLflowResource, mlflow_run_id: str, version: str | None) -> list[str]:
    """Delete the versions this registration attempt created; returns those that could not be deleted."""
    from mlplatform.registry import _is_missing

    client = mlflow.client()
    found = {version} if version else set()
    try:
        found |= {str(mv.version) for mv in client.search_model_versions(
            f"name='{mlflow.model_name}' and run_id='{mlflow_run_id}'")}
    except Exception:  # noqa: BLE001 - the store is down: only the version we know of can be tried
        pass
    left = []
    for v in sorted(found):
        try:
            mlflow.with_retries(lambda v=v: client.delete_model_version(mlflow.model_name, v))
        except Exception as exc:  # noqa: BLE001
            if not _is_missing(exc):
                left.append(v)
    return left


def train_and_register(spec: DatasetSpec, ts: "pl.DataFrame", config: TrainConfig, mlflow: MLflowResource,
                       lakefs: LakeFSResource, ts_commit: str, run_id: str, actor: str, audit: AuditResource) -> dict:
    """Train, log and register one model version; on any failure no version is left behind (the audit trail is
    opened when the version is registered, so a trail that cannot be written is such a failure).

    A version with the same fingerprint (data, code, params) whose data is on main is reused instead."""
    import time

    import mlflow as mlf
    from mlflow.models import infer_signature

    from assets.features import manifest_hash
    from mlplatform.registry import RegistryError, store_name, _redact
    from resources.io import asset_path

    ts_path = asset_path(ns(spec).key("training_set"), None, "parquet")

    mlflow = mlflow.scoped(spec)  # the data set's registered model, whoever calls this
    if config.shuffle_labels:
        rng = np.random.default_rng(config.seed)
        ts = ts.with_columns(pl.Series(spec.target, rng.permutation(ts[spec.target].to_numpy())))
    params = modeling.lgb_params(spec, {"learning_rate": config.learning_rate, "num_leaves": config.num_leaves},
                                 config.seed)
    try:
        mlflow.setup()
    except Exception as exc:  # noqa: BLE001 - nothing is registered yet; name the store, never its credentials
        raise _mlflow_error(exc)(f"MLflow at {store_name(mlflow)} is not usable, so no model is registered: "
                            f"{_redact(str(exc))[:500]}") from None
    code = git_commit()
    fp = fingerprint(ts, code, params, config)
    # Reuse needs a code version that names the code exactly: a dirty or unknown tree could be any code.
    reused = _reusable(spec, mlflow, lakefs, fp, params) if code_is_exact(code) else None
    if reused is not None:
        return reused
    t0 = time.perf_counter()
    trained = modeling.train(ts, spec, params, config.num_boost_round, config.early_stopping_rounds)
    train_seconds = time.perf_counter() - t0
    try:
        dbt_hash = manifest_hash(spec)
    except OSError:
        dbt_hash = "unknown"
    tags = {"dagster_run_id": run_id, "code_version": git_commit(), "git_commit": git_commit(),
            "lakefs_commit": ts_commit, "lakefs_repository": lakefs.repository,
            "training_set_uri": lakefs.uri(ts_commit, ts_path),
            # The same object through lakeFS's S3 gateway: a source MLflow can resolve.
            "training_set_s3_uri": lakefs.s3_uri(ts_commit, ts_path),
            "dbt_manifest_hash": dbt_hash, "dataset": spec.name, "shuffled_labels": str(config.shuffle_labels),
            # Exactly what `mlp reproduce` needs to retrain bit for bit.
            "lgb_params": json.dumps(params, sort_keys=True), "num_boost_round": str(config.num_boost_round),
            "early_stopping_rounds": str(config.early_stopping_rounds),
            # A retrain with the same fingerprint reuses this version instead of registering another.
            "fingerprint": fp}
    test = ts.filter(pl.col("split") == "test")
    version = None
    # MLflow's fluent API quotes the full tracking URI in its errors: redact them on the way out.
    with mlflow.redacting(), mlf.start_run(run_name=f"candidate-{run_id[:8]}") as run:
        try:
            mlf.set_tags(tags)
            mlf.log_params({**{k: v for k, v in params.items()}, "num_boost_round": config.num_boost_round,
                            "early_stopping_rounds": config.early_stopping_rounds})
            mlf.log_metrics({f"validation_{params['metric']}": trained.validation_score,
                             "best_iteration": trained.best_iteration, "train_rows":
                             ts.filter(pl.col("split") == "train").height, "train_seconds": train_seconds})
            # The training set as an MLflow dataset input: its source is the lakeFS object at the commit and
            # its digest the commit id. A MetaDataset, so MLflow does not hash and profile every row (~2 s).
            from mlflow.data.dataset_source_registry import resolve_dataset_source
            from mlflow.data.meta_dataset import MetaDataset
            from mlflow.types import ColSpec, Schema

            schema = Schema([ColSpec("double" if dtype.is_numeric() else "string", name)
                             for name, dtype in ts.schema.items() if name in spec.model_feature_names])
            dataset = MetaDataset(source=resolve_dataset_source(tags["training_set_s3_uri"]), name="training_set",
                                  digest=ts_commit[:16], schema=schema)
            mlf.log_input(dataset, context="training", tags={"rows": str(ts.height), "lakefs_commit": ts_commit})
            x_example = modeling.feature_matrix(test.head(5), spec)
            signature = infer_signature(x_example, trained.booster.predict(x_example))
            # Explicit requirements: MLflow's own inference imports the model in a subprocess (~25 s).
            import lightgbm

            mlf.lightgbm.log_model(trained.booster, name="model", signature=signature, input_example=x_example,
                                   pip_requirements=[f"lightgbm=={lightgbm.__version__}",
                                                     f"pandas=={__import__('pandas').__version__}",
                                                     f"numpy=={np.__version__}"])
        except Exception as exc:  # noqa: BLE001 - nothing is registered yet
            raise _mlflow_error(exc)(f"logging the candidate to MLflow at {store_name(mlflow)} failed: "
                                f"{type(exc).__name__}: {_redact(str(exc))[:500]}") from None
        stage = "registering"
        try:
            mv = mlflow.with_retries(lambda: mlf.register_model(f"runs:/{run.info.run_id}/model", mlflow.model_name,
                                                                tags=tags))
            version = str(mv.version)
            stage = "writing the audit entry of"
            audit.trail().record("registered", mlflow.model_name, version,
                                f"trained on lakeFS commit {ts_commit[:12]}",
                                {"run_id": run.info.run_id, "dagster_run_id": run_id, "lakefs_commit": ts_commit,
                                 "fingerprint": fp, f"validation_{params['metric']}": trained.validation_score}, actor)
        except BaseException as exc:
            # Never leave a half-registered version behind: delete what this attempt created.
            left = _discard_versions(mlflow, run.info.run_id, version)
            detail = (f"; version(s) {left} could not be deleted and have no audit entry: delete them by hand"
                      if left else "; no version left behind")
            if not isinstance(exc, Exception):
                raise
            raise _mlflow_error(exc)(f"{stage} {mlflow.model_name} "
                                f"{('v' + version + ' ') if version and stage != 'registering' else ''}"
                                f"in MLflow at {store_name(mlflow)} failed: {type(exc).__name__}: "
                                f"{_redact(str(exc))[:500]}{detail}") from None
    return {"version": version, "run_id": run.info.run_id, "model_uri": f"models:/{mlflow.model_name}/{version}",
            "training_set_commit": ts_commit, "params": params, "validation_score": trained.validation_score,
            "best_iteration": trained.best_iteration, "train_seconds": train_seconds, "tags": tags,
            "fingerprint": fp, "reused": False}
