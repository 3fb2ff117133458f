"""The one Definitions of the platform: per-group lists merged, global policies applied here only.

Many data sets, one code location (README "Many data sets"): every live spec (MLP_DATASETS, else MLP_DATASET, else
every *.yaml under platform/datasets/) is its own namespaced slice of the graph, built by the same builders:
asset keys `[<data set>, <asset>]`, groups `<data set>_<stage>`, the asset tag `mlp/dataset=<data set>`, and its
own jobs, sensors and schedules named `<data set>__<name>` (resources/naming.py). Adding a model is adding a
YAML file; removing one removes its slice and leaves the others as they were. One set of resources serves all
of them (Dagster allows one resource per key in a Definitions); what differs per data set (MLflow model and
experiment, landing folder, lakeFS paths, DuckDB files) is derived from the spec inside that data set's own
assets and sensors. The publish sensors are the platform's (one set for every data set's runs).

Loaded as a file (`-f platform/definitions.py -d .`), never imported as a package: a `platform`
package would shadow the standard-library module of the same name.
"""

import gc

import dagster as dg

from assets.evaluation import build_evaluation
from assets.features import build_features
from assets.ingestion import build_ingestion
from assets.monitoring import build_monitoring
from assets.online import build_online
from assets.report import build_report
from assets.serving import build_serving
from assets.training import build_training
from resources.environment import Settings, build_resources
from resources.naming import DATASET_TAG, Namespace, dataset_of_key, local_name, ns
from mlplatform.spec import DatasetSpec, SettingError, dataset_specs
from sensors.alerts import build_alert_sensors
from sensors.lifecycle import build_lifecycle
from sensors.online import build_online_sensors
from sensors.publish import build_publish_sensors

# Per-batch assets that simply follow their own partition's inputs: declarative automation, not sensors.
# Scoring and monitoring of a batch (batch_predictions, drift_report, performance_estimate) are NOT here: the
# publish sensor requests them in one `score_batch` run once the batch's records are on main (sensors/publish.py);
# a second, automatic path for the same assets would race it and score a batch twice. `data_quality_report` is
# made in the records run itself. What stays: the realized metric, when a batch's labels arrive (and
# model_health_report, with its own condition in assets/report.py), and the online experiment, when a batch's
# labels and its online predictions are both there (online_predictions itself: sensors/online.py).
# `features` and `reference_features` are ignored: a batch is re-evaluated when its raw inputs change, not when a
# feature rebuild or a retrain rewrites the features (an unpartitioned update would re-request every partition).
FOLLOWERS = ["realized_performance", "online_experiment_report"]


def follow_inputs(n: Namespace) -> dg.AutomationCondition:
    # `since_last_handled`: an update is remembered until the asset is requested, so a dep that is
    # in progress at that tick (e.g. a label run rebuilding `features`) delays the run instead of losing it.
    return (
        dg.AutomationCondition.any_deps_updated().ignore(
            dg.AssetSelection.assets(*n.keys("features", "reference_features"))).since_last_handled()
        & ~dg.AutomationCondition.any_deps_missing()
        & ~dg.AutomationCondition.any_deps_in_progress()
        & ~dg.AutomationCondition.in_progress()
    ).with_label("follows its partition's inputs")


def apply_policies(specs: list[DatasetSpec], defs: dg.Definitions) -> dg.Definitions:
    """Per data set, applied to the whole graph in one place: freshness SLAs from its spec, automation
    conditions, the group `<data set>_<stage>` and the tag `mlp/dataset=<data set>`."""
    by_name = {s.name: s for s in specs}

    def policy(asset_spec: dg.AssetSpec) -> dg.AssetSpec:
        spec = by_name[dataset_of_key(asset_spec.key)]
        n, name = ns(spec), local_name(asset_spec.key)
        attrs: dict = {"tags": {**asset_spec.tags, **n.tags}}
        if asset_spec.group_name and not asset_spec.group_name.startswith(f"{spec.name}_"):
            attrs["group_name"] = n.group(asset_spec.group_name)
        windows = spec.freshness.get(name)
        if windows:
            attrs["freshness_policy"] = dg.FreshnessPolicy.time_window(fail_window=windows.fail,
                                                                       warn_window=windows.warn)
        if name in FOLLOWERS:
            attrs["automation_condition"] = follow_inputs(n)
        return asset_spec.replace_attributes(**attrs)

    keys = [k for a in defs.assets or [] for k in a.keys]  # from the assets themselves: no repository built twice
    strays = sorted(k.to_user_string() for k in keys if dataset_of_key(k) not in by_name)
    if strays:
        raise SettingError(f"assets {strays} belong to no live data set ({sorted(by_name)}): every asset key is "
                           f"[<data set>, <asset>]")
    for spec in specs:
        known = {local_name(k) for k in keys if dataset_of_key(k) == spec.name}
        unknown = sorted(set(spec.freshness) - known)
        if unknown:
            raise SettingError(f"{spec.path}: setting 'freshness' names {unknown}, which are not assets of the "
                               f"graph; assets: {sorted(known)}")
    return defs.map_asset_specs(func=policy)


def build_dataset(spec: DatasetSpec, catch_all: bool = False) -> dict:
    """One data set's slice: its assets, jobs, sensors and schedules (everything it automates is its own)."""
    n = ns(spec)
    lifecycle = build_lifecycle(spec)
    assets = [*build_ingestion(spec), *build_features(spec), *build_training(spec), *build_evaluation(spec),
              *build_serving(spec), *build_monitoring(spec), *build_report(spec), *build_online(spec)]
    online = build_online_sensors(spec)
    sensors = [*lifecycle["sensors"], *online["sensors"], *build_alert_sensors(spec, catch_all=catch_all),
               # Evaluates the automation conditions above; on by default so the lifecycle runs by itself. It
               # targets this data set's assets only: one data set's updates never request another's runs.
               dg.AutomationConditionSensorDefinition(
                   # model_health_report carries its own condition (assets/report.py: after_monitoring)
                   n.sensor("follow_inputs"),
                   target=dg.AssetSelection.assets(*n.keys(*FOLLOWERS, "model_health_report")),
                   # Its runs carry the data set's tag (a partition tag cannot be static: these runs write only
                   # their own assets' partition paths, which no other run of the batch writes).
                   run_tags=n.tags, minimum_interval_seconds=20, default_status=dg.DefaultSensorStatus.RUNNING)]
    return {"assets": assets, "jobs": [*lifecycle["jobs"], *online["jobs"]], "sensors": sensors,
            "schedules": lifecycle["schedules"]}


def build_definitions(specs: list[DatasetSpec] | None = None) -> dg.Definitions:
    specs = dataset_specs() if specs is None else specs
    # The first live data set's failure sensor also alerts on failed runs that belong to no data set.
    slices = [build_dataset(spec, catch_all=i == 0) for i, spec in enumerate(specs)]
    jobs = [j for s in slices for j in s["jobs"]]
    defs = dg.Definitions(
        assets=[a for s in slices for a in s["assets"]],
        jobs=jobs,
        sensors=[*build_publish_sensors(jobs), *(x for s in slices for x in s["sensors"])],
        schedules=[x for s in slices for x in s["schedules"]],
        # Secrets and endpoints as dg.EnvVars: resolved when a run starts, never read into the definitions.
        resources=build_resources(Settings.from_env(), deferred=True),
        # In-process: steps of a run commit to one lakeFS branch one after another, so each commit
        # holds exactly its own asset (lakeFS commits everything staged on a branch).
        executor=dg.in_process_executor,
    )
    return apply_policies(specs, defs)


__all__ = ["DATASET_TAG", "FOLLOWERS", "apply_policies", "build_dataset", "build_definitions", "follow_inputs"]

defs = build_definitions()

# The definitions live as long as the code-location process. Frozen, they leave the garbage collector's generations:
# no later collection (nor the interpreter's last one at exit) traverses the whole graph of every data set again.
gc.freeze()
