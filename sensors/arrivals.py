"""Arrivals: new files in the landing zone become ingestion runs of their partition (records or labels)."""

import json

import dagster as dg

from mlplatform.batches import partitions_def
from resources.landing import LandingZoneResource
from resources.settings import DatasetSpec

INGEST_ASSETS = ["raw_records", "stg_records", "stg_labels", "features"]
LABEL_ASSETS = ["raw_labels", "stg_records", "stg_labels", "features"]


def build_arrivals(spec: DatasetSpec) -> dict:
    parts = partitions_def(spec)
    ingest_job = dg.define_asset_job("ingest_batch", selection=INGEST_ASSETS, partitions_def=parts,
                                     description="A landed batch: raw records of the partition, then the dbt models.")
    labels_job = dg.define_asset_job("ingest_labels", selection=LABEL_ASSETS, partitions_def=parts,
                                     description="Delayed labels of a partition, then the dbt models.")

    @dg.sensor(jobs=[ingest_job, labels_job], minimum_interval_seconds=15,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="New files in the landing zone -> ingest their partition (records or labels).")
    def landing_arrivals(context: dg.SensorEvaluationContext, landing: LandingZoneResource):
        zone = landing.zone()
        seen = json.loads(context.cursor) if context.cursor else {}
        requests = []
        for kind, job in (("records", "ingest_batch"), ("labels", "ingest_labels")):
            for partition in zone.partitions_with_files(kind):
                files = zone.files(kind, partition)
                stamp = ",".join(f"{p.name}:{int(p.stat().st_mtime)}" for p in files)
                key = f"{kind}/{partition}"
                if not files or seen.get(key) == stamp:
                    continue
                seen[key] = stamp
                requests.append(dg.RunRequest(run_key=f"{key}/{stamp}", partition_key=partition, job_name=job,
                                              tags={"arrival/kind": kind, "arrival/files": stamp[:200]}))
        return dg.SensorResult(run_requests=requests, cursor=json.dumps(seen))

    return {"jobs": [ingest_job, labels_job], "sensors": [landing_arrivals]}
