"""The one Definitions of the platform: per-group lists merged, global policies applied here only.

Loaded as a file (`-f platform/definitions.py -d .`), never imported as a package: a `platform`
package would shadow the standard-library module of the same name.
"""

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
from mlplatform.spec import DatasetSpec, dataset_spec
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


def follow_inputs() -> dg.AutomationCondition:
    # `since_last_handled`: an update is remembered until the asset is requested, so a dep that is
    # in progress at that tick (e.g. a label run rebuilding `features`) delays the run instead of losing it.
    return (
        dg.AutomationCondition.any_deps_updated().ignore(dg.AssetSelection.keys("features", "reference_features")).since_last_handled()
        & ~dg.AutomationCondition.any_deps_missing()
        & ~dg.AutomationCondition.any_deps_in_progress()
        & ~dg.AutomationCondition.in_progress()
    ).with_label("follows its partition's inputs")


def apply_policies(spec: DatasetSpec, defs: dg.Definitions) -> dg.Definitions:
    """Freshness SLAs from the spec and automation conditions, applied to the whole graph in one place."""
    def policy(asset_spec: dg.AssetSpec) -> dg.AssetSpec:
        name = asset_spec.key.to_user_string()
        attrs = {}
        windows = spec.freshness.get(name)
        if windows:
            attrs["freshness_policy"] = dg.FreshnessPolicy.time_window(fail_window=windows.fail,
                                                                       warn_window=windows.warn)
        if name in FOLLOWERS:
            attrs["automation_condition"] = follow_inputs()
        return asset_spec.replace_attributes(**attrs) if attrs else asset_spec

    known = {key.to_user_string() for key in defs.resolve_all_asset_keys()}
    unknown = sorted(set(spec.freshness) - known)
    if unknown:
        from mlplatform.spec import SettingError

        raise SettingError(f"{spec.path}: setting 'freshness' names {unknown}, which are not assets of the graph; "
                           f"assets: {sorted(known)}")
    return defs.map_asset_specs(func=policy)


def build_definitions() -> dg.Definitions:
    spec = dataset_spec()
    lifecycle = build_lifecycle(spec)
    online = build_online_sensors(spec)
    jobs = [*lifecycle["jobs"], *online["jobs"]]
    defs = dg.Definitions(
        assets=[*build_ingestion(spec), *build_features(spec), *build_training(spec), *build_evaluation(spec),
                *build_serving(spec), *build_monitoring(spec), *build_report(spec), *build_online(spec)],
        jobs=jobs,
        sensors=[*build_publish_sensors(jobs), *lifecycle["sensors"], *online["sensors"], *build_alert_sensors(spec),
                 # Evaluates the automation conditions above; on by default so the lifecycle runs by itself.
                 dg.AutomationConditionSensorDefinition(
                     # model_health_report carries its own condition (assets/report.py: after_monitoring)
                     "follow_inputs", target=dg.AssetSelection.keys(*FOLLOWERS, "model_health_report"),
                     minimum_interval_seconds=20,
                     default_status=dg.DefaultSensorStatus.RUNNING)],
        schedules=lifecycle["schedules"],
        # Secrets and endpoints as dg.EnvVars: resolved when a run starts, never read into the definitions.
        resources=build_resources(Settings.from_env(), deferred=True),
        # In-process: steps of a run commit to one lakeFS branch one after another, so each commit
        # holds exactly its own asset (lakeFS commits everything staged on a branch).
        executor=dg.in_process_executor,
    )
    return apply_policies(spec, defs)


defs = build_definitions()
