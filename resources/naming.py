"""Names of one data set's slice of the graph, in one place.

Many data sets live in one code location (README "Many data sets"). Each spec is a namespace:
- asset keys `[<data set>, <asset>]` (`car_loan/raw_records`); the spec, the sensors and the CLI name assets
  by their bare name and turn it into a key here;
- groups `<data set>_<stage>` (`car_loan_ingestion`) and the asset tag `mlp/dataset=<data set>`, so the UI
  filters one model's lineage (`tag:mlp/dataset=car_loan`);
- jobs, sensors and schedules `<data set>__<name>` (`car_loan__ingest_batch`), their runs tagged
  `mlp/dataset=<data set>` and, for a partition, `mlp/partition=<data set>/<partition>` (the run queue's
  per-partition limit is on that tag, so two data sets' batches of the same period never wait for each other).

A run belongs to one data set: `dataset_of_run` reads it from the run's tag, its job name or its assets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import dagster as dg

DATASET_TAG = "mlp/dataset"
PARTITION_TAG = "mlp/partition"
SEP = "__"  # job, sensor and schedule names: <data set>__<name>


@dataclass(frozen=True)
class Namespace:
    """One data set's names: `ns.key("raw_records")` -> AssetKey(["car_loan", "raw_records"])."""

    name: str

    def key(self, asset: str | dg.AssetKey) -> dg.AssetKey:
        if isinstance(asset, dg.AssetKey):
            return asset if len(asset.path) > 1 else dg.AssetKey([self.name, *asset.path])
        return dg.AssetKey([self.name, asset])

    def keys(self, *assets: str) -> list[dg.AssetKey]:
        return [self.key(a) for a in assets]

    def key_str(self, asset: str) -> str:
        """`car_loan/raw_records`: the key as the CLI (`--select`) and the UI spell it."""
        return self.key(asset).to_user_string()

    def selection(self, assets: Iterable[str]) -> str:
        """A `dagster asset materialize --select` string for bare asset names."""
        return ",".join(self.key_str(a) for a in assets)

    def ins(self, *assets: str) -> dict[str, dg.AssetIn]:
        """Inputs by parameter name, read from this data set's assets of the same name."""
        return {a: dg.AssetIn(key=self.key(a)) for a in assets}

    def job(self, name: str) -> str:
        return f"{self.name}{SEP}{name}"

    sensor = job
    schedule = job

    def group(self, stage: str) -> str:
        return f"{self.name}_{stage}"

    @property
    def tags(self) -> dict[str, str]:
        return {DATASET_TAG: self.name}

    def partition_tags(self, partition: str) -> dict[str, str]:
        return {DATASET_TAG: self.name, PARTITION_TAG: f"{self.name}/{partition}"}

    def owns(self, key: dg.AssetKey) -> bool:
        return len(key.path) > 1 and key.path[0] == self.name


def ns(spec) -> Namespace:
    """The namespace of a spec (anything with `.name`) or of a data-set name."""
    return Namespace(spec if isinstance(spec, str) else spec.name)


def local_name(key: dg.AssetKey) -> str:
    """The asset's own name, without its data set: `car_loan/raw_records` -> `raw_records`."""
    return key.path[-1]


def dataset_of_key(key: dg.AssetKey) -> str | None:
    return key.path[0] if len(key.path) > 1 else None


def dataset_of_run(run: dg.DagsterRun | None) -> str | None:
    """The data set a run belongs to: its `mlp/dataset` tag, else its job's prefix, else its assets' (None: a
    run of no data set, e.g. another code location's)."""
    if run is None:
        return None
    if run.tags.get(DATASET_TAG):
        return run.tags[DATASET_TAG]
    if SEP in (run.job_name or "") and not run.job_name.startswith("__"):
        return run.job_name.split(SEP, 1)[0]
    found = {dataset_of_key(k) for k in (run.asset_selection or ())} - {None}
    found |= {dataset_of_key(k.asset_key) for k in (run.asset_check_selection or ())} - {None}
    return found.pop() if len(found) == 1 else None


def partitioned_job_config(namespace: Namespace, partitions_def: dg.PartitionsDefinition) -> dg.PartitionedConfig:
    """A partitioned job's config that tags each run with its data set and `mlp/partition=<data set>/<key>`,
    however the run is launched (sensor, backfill, the UI's launchpad)."""
    return dg.PartitionedConfig(partitions_def=partitions_def, run_config_for_partition_key_fn=lambda _key: {},
                                tags_for_partition_key_fn=namespace.partition_tags)


__all__ = ["DATASET_TAG", "PARTITION_TAG", "Namespace", "ns", "local_name", "dataset_of_key", "dataset_of_run",
           "partitioned_job_config"]
