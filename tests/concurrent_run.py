"""Helper process for the concurrency test: materialize one partition of `slices` on a shared instance, with the
lakeFS resource the factory builds from this process's environment (the test's server and repository)."""

import os
import sys

import dagster as dg

from resources.environment import LAKEFS, Settings, build_resources
from resources.io import LakeFSIOManager
from tests.test_foundation import slices

if __name__ == "__main__":
    home, partition, value = sys.argv[1], sys.argv[2], int(sys.argv[3])
    os.environ["DAGSTER_HOME"] = home
    instance = dg.DagsterInstance.get()
    lakefs = build_resources(Settings.from_env().require(*LAKEFS))["lakefs"]
    result = dg.materialize([slices], instance=instance, partition_key=partition,
                            resources={"io_manager": LakeFSIOManager(lakefs=lakefs, await_publication=False)},
                            run_config={"ops": {"slices": {"config": {"value": value}}}})
    print(result.run_id)
