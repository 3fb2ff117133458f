"""The one Definitions of the platform: per-group lists merged, global policies applied here only.

Loaded as a file (`-f platform/definitions.py -d .`), never imported as a package: a `platform`
package would shadow the standard-library module of the same name.
"""

import dagster as dg

from assets.evaluation import build_evaluation
from assets.features import build_features
from assets.ingestion import build_ingestion
from assets.monitoring import build_monitoring
from assets.serving import build_serving
from assets.training import build_training
from resources.environment import build_resources
from resources.settings import dataset_name, load_spec
from sensors.publish import publish_sensors


def build_definitions() -> dg.Definitions:
    spec = load_spec(dataset_name())
    assets = [*build_ingestion(spec), *build_features(spec), *build_training(spec), *build_evaluation(spec),
              *build_serving(spec), *build_monitoring(spec)]
    return dg.Definitions(
        assets=assets,
        sensors=[*publish_sensors],
        resources=build_resources(),
        # In-process: steps of a run commit to one lakeFS branch one after another, so each commit
        # holds exactly its own asset (lakeFS commits everything staged on a branch).
        executor=dg.in_process_executor,
    )


defs = build_definitions()
