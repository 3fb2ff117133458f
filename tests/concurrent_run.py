"""Helper process for the concurrency test: materialize one partition of `slices` on a shared instance."""

import os
import sys

import dagster as dg

from resources.io import LakeFSIOManager
from resources.lakefs import LakeFSResource
from tests.test_foundation import slices

if __name__ == "__main__":
    home, partition, value = sys.argv[1], sys.argv[2], int(sys.argv[3])
    os.environ["DAGSTER_HOME"] = home
    instance = dg.DagsterInstance.get()
    lakefs = LakeFSResource(endpoint=os.environ["LAKEFS_ENDPOINT"], access_key_id=os.environ["LAKEFS_ACCESS_KEY_ID"],
                            secret_access_key=os.environ["LAKEFS_SECRET_ACCESS_KEY"],
                            repository=os.environ["LAKEFS_REPOSITORY"])
    result = dg.materialize([slices], instance=instance, partition_key=partition,
                            resources={"io_manager": LakeFSIOManager(lakefs=lakefs, publish_before_branching=False)},
                            run_config={"ops": {"slices": {"config": {"value": value}}}})
    print(result.run_id)
