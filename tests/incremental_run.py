"""Helper process for the isolation test: build one batch partition's dbt models on a shared Dagster instance."""

import json
import os
import sys
from pathlib import Path

import dagster as dg

from assets.features import build_features
from mlplatform.spec import load_spec
from resources.lakefs import LakeFSResource
from tests.helpers import K, resources_for

if __name__ == "__main__":
    home, partition = sys.argv[1], sys.argv[2]
    os.environ["DAGSTER_HOME"] = home
    spec = load_spec("car_loan")
    lakefs = LakeFSResource(endpoint=os.environ["LAKEFS_ENDPOINT"], access_key_id=os.environ["LAKEFS_ACCESS_KEY_ID"],
                            secret_access_key=os.environ["LAKEFS_SECRET_ACCESS_KEY"],
                            repository=os.environ["LAKEFS_REPOSITORY"])
    result = dg.materialize(build_features(spec), selection=K("stg_records", "features"), partition_key=partition,
                            instance=dg.DagsterInstance.get(), raise_on_error=False,
                            resources=resources_for(lakefs, Path(os.environ["MLP_STATE_DIR"]), spec))
    print(json.dumps({"run_id": result.run_id, "success": result.success}))
