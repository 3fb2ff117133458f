"""Closing the online loop without a person: the model server's prediction log -> `online_predictions` and its
monitoring, per partition, as soon as a partition's log has gone quiet.

The server writes complete Parquet files under <spool>/<partition>/ (mlplatform/serving/predlog.py). Each tick
this sensor looks at every partition folder. A partition whose newest complete file is at least
`QUIET_SECONDS` old (the server has moved on to later event times, or the period is over) and whose set of
files has not been ingested yet gets one `ingest_online` run: online_predictions, online_drift_report and
online_performance_estimate. The run is tagged with a stamp of the files it reads, so the same files are
never ingested twice and a new file makes a new run. A failed run is retried with backoff, up to
MAX_ATTEMPTS per set of files; then the sensor warns and waits for new files or a person.
The publish sensor publishes the run like any other; `online_experiment_report` follows by declarative
automation once the partition's labels are there too (platform/definitions.py FOLLOWERS).

State lives in the run records (tags), not in the cursor: a lost cursor or a restarted daemon repeats nothing.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from mlplatform.batches import is_data_file_name
from mlplatform.spec import DatasetSpec
from resources.naming import ns, partitioned_job_config
from resources.partitions import partitions_def

JOB = "ingest_online"  # <data set>__ingest_online
ONLINE_ASSETS = ["online_predictions", "online_drift_report", "online_performance_estimate"]
STAMP_TAG = "mlp/online_files"
PARTITION_TAG = "dagster/partition"
QUIET_SECONDS = 60.0
MAX_ATTEMPTS = 3
BACKOFF_SECONDS = 60.0
FAILED = (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)
DONE = (dg.DagsterRunStatus.SUCCESS,)


@dataclass
class OnlinePlan:
    requests: list[dg.RunRequest] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def skip_reason(self) -> str:
        return "; ".join(self.waiting[:5]) or "no new online prediction log"


def log_stamp(files: list[Path]) -> str:
    """Which files a run reads: the log's files are never rewritten (written under a temporary name, renamed)."""
    return hashlib.sha1("\n".join(sorted(f.name for f in files)).encode()).hexdigest()[:12]


def plan_online(instance: dg.DagsterInstance, root: Path, partition_keys: set[str], now: float | None = None,
                quiet_seconds: float = QUIET_SECONDS, max_attempts: int = MAX_ATTEMPTS,
                backoff_seconds: float = BACKOFF_SECONDS, job: str = JOB) -> OnlinePlan:
    now = time.time() if now is None else now
    plan = OnlinePlan()
    folders = sorted(p for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []
    for folder in folders:
        files = [f for f in folder.glob("*.parquet") if is_data_file_name(f.name)]
        if not files:
            continue
        partition = folder.name
        if partition not in partition_keys:
            plan.warnings.append(f"{folder}: not a partition of the data set; its {len(files)} file(s) are left")
            continue
        newest = max(f.stat().st_mtime for f in files)
        if now - newest < quiet_seconds:
            plan.waiting.append(f"{partition}: log still being written (newest file {now - newest:.0f}s old, "
                                f"ingested after {quiet_seconds:.0f}s of quiet)")
            continue
        stamp = log_stamp(files)
        records = instance.get_run_records(dg.RunsFilter(job_name=job, tags={PARTITION_TAG: partition,
                                                                             STAMP_TAG: stamp}))
        if any(r.dagster_run.status in DONE for r in records):
            continue
        active = [r.dagster_run.run_id for r in records if r.dagster_run.status not in (*DONE, *FAILED)]
        if active:
            plan.waiting.append(f"{partition}: {job} run {active[0]} is queued or running")
            continue
        failed = [r for r in records if r.dagster_run.status in FAILED]
        n = len(failed)
        if n >= max_attempts:
            plan.warnings.append(f"{partition}: gave up after {n} failed {job} run(s) on the same {len(files)} log "
                                 f"file(s) ({', '.join(r.dagster_run.run_id for r in failed[:3])}); a new log "
                                 f"file, or a launch of {job} [{partition}] by hand, tries again")
            continue
        if n:
            last_end = max((r.end_time or 0.0) for r in failed)
            wait = backoff_seconds * 2 ** (n - 1)
            if now < last_end + wait:
                plan.waiting.append(f"{partition}: {n} failed attempt(s); retry in {last_end + wait - now:.0f}s")
                continue
        plan.requests.append(dg.RunRequest(run_key=f"online/{partition}/{stamp}/attempt-{n}", job_name=job,
                                           partition_key=partition, tags={STAMP_TAG: stamp}))
    return plan


def build_online_sensors(spec: DatasetSpec) -> dict:
    from mlplatform.serving.predlog import spool_dir
    from mlplatform.serving.settings import load_serving_settings

    n = ns(spec)
    parts = partitions_def(spec)
    keys = set(parts.get_partition_keys())
    job = dg.define_asset_job(n.job(JOB), selection=n.keys(*ONLINE_ASSETS), partitions_def=parts,
                              config=partitioned_job_config(n, parts), tags=n.tags,
                              description=f"A partition's online prediction log of {spec.name} into lakeFS, then "
                                          f"its drift report and label-free performance estimate (requested by "
                                          f"{n.sensor('online_log_arrivals')}).")

    @dg.sensor(name=n.sensor("online_log_arrivals"), jobs=[job], minimum_interval_seconds=30,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description=f"The model server's prediction log of {spec.name} -> {n.job(JOB)} for each partition "
                           f"whose log has been quiet for {QUIET_SECONDS:.0f}s and has files not yet ingested; "
                           f"failed runs are retried with backoff ({MAX_ATTEMPTS} attempts per set of files).")
    def online_log_arrivals(context: dg.SensorEvaluationContext):
        root = spool_dir(spec, load_serving_settings(spec).log.spool_dir)
        plan = plan_online(context.instance, root, keys, job=n.job(JOB))
        for message in plan.warnings:
            context.log.warning(message)
        for req in plan.requests:
            context.log.info(f"requesting {req.job_name} [{req.partition_key}] for log files {req.tags[STAMP_TAG]}")
        if plan.requests:
            return dg.SensorResult(run_requests=plan.requests)
        return dg.SkipReason(plan.skip_reason())

    return {"jobs": [job], "sensors": [online_log_arrivals]}
