"""Arrivals: complete files in the landing zone become ingestion runs of their partition (records or labels).

What the sensor promises (it only returns run requests and its cursor; it writes nothing):
- A partition is requested for its complete data files (marker or settled; see mlplatform/batches.py)
  that are not ingested yet; files still being written are waited for on their own and taken by a later
  request. Folders that are not partition keys, subfolders of a partition, unknown entries under the
  landing root and files with an mtime in the future (clock skew) are reported with a warning.
- Labels of a partition are held until raw_records of that partition has a materialization from a
  successful run AND the partition's records have settled: no records file still being written, none
  complete but not yet ingested by a successful run, and no ingest_batch run of the partition queued or
  running (`records_waiting`). Labels requested beside records still arriving would carry ids the
  records do not have yet. They are requested on the first tick after the records are published.
- A labels run that HELD a file (raw_labels metadata `files_held`: ids not yet in the records while more
  records were arriving) did not ingest it, even if it succeeded: the labels stay requestable, and the
  next publication of the records (a new `arrival/records_run`) gives them a fresh run key.
- Truth is the run history, not the cursor. A partition's files are "ingested" once a SUCCESS run of its
  job (or its Dagster retry) was handed a set of files containing every current file with the same
  (name, size, mtime): a file quarantined by a later run leaves a set that is still ingested, a new or
  rewritten file makes a set that is not.
  A successful materialization of raw_<kind> made without this sensor (`make demo`, the UI) counts too
  when its metadata `files` shows it read the current files (see `materialized_from`).
- Not ingested, and no run of the job for the partition queued, running or about to be retried by Dagster:
  request it. The run key is `<kind>/<partition>/<files stamp>/attempt-<N>`, N the number of finished
  failed (or canceled) attempts on that stamp, so the same files give the same key on every tick (Dagster
  makes one run of it) and a failed attempt gives a new key. Attempts are bounded
  (`max_ingest_attempts`) and spaced by a doubling backoff (`retry_backoff_seconds`).
- The cursor only remembers stamps already ingested by a successful run (a cache): it never moves past
  work that no run has done, so a lost request is made again on the next tick.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

import dagster as dg

from mlplatform.batches import KINDS, LandedFile, Landing
from resources.partitions import contiguous_groups, partitions_def, range_tags, run_partitions
from resources.landing import LandingZoneResource
from resources.naming import Namespace, ns, partitioned_job_config
from mlplatform.spec import DatasetSpec

# Bare asset and job names: each data set's are `ns(spec).key(name)` / `ns(spec).job(name)` (resources/naming.py).
# A batch's dbt models are built from that partition alone: records bring its staging and features, labels its
# staged labels (features do not depend on labels). The data-quality report needs nothing but the raw records, so
# it is made in the same run (one run less per batch).
INGEST_ASSETS = ["raw_records", "stg_records", "features", "data_quality_report"]
LABEL_ASSETS = ["raw_labels", "stg_labels"]
FEATURE_ASSETS = ["stg_records", "stg_labels", "features"]
# Scoring and monitoring of one batch, in one run: requested by the publish sensor as soon as the batch's
# records run is on main (sensors/publish.py), so they read published data and never wait for a tick.
SCORE_ASSETS = ["batch_predictions", "drift_report", "performance_estimate"]
QUALITY_ASSET = "data_quality_report"  # in the records run; in a scoring run when the records came another way
JOBS = {"records": "ingest_batch", "labels": "ingest_labels", "score": "score_batch"}

PARTITION_TAG = "dagster/partition"
STAMP_TAG, FILES_TAG, ATTEMPT_TAG, KIND_TAG = "arrival/stamp", "arrival/files", "arrival/attempt", "arrival/kind"
RECORDS_RUN_TAG = "arrival/records_run"  # labels: the records run whose data they were requested after
# A burst: records of several consecutive partitions landed and not yet ingested are requested as ONE ranged run
# (Dagster's range tags; the assets loop over the partitions) with each partition's files stamp in this tag.
RANGE_STAMPS_TAG = "arrival/range_stamps"
MAX_RANGE = 31  # partitions per ranged run
MAX_FILES_TAG_CHARS = 8000
MAX_BACKOFF_SECONDS = 3600.0
RUN_HISTORY_LIMIT = 200

IN_PROGRESS = {dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
               dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING, dg.DagsterRunStatus.MANAGED}
FAILED = {dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


def stamp_of(files: list[LandedFile]) -> str:
    """Deterministic id of a set of file deliveries (names, sizes, mtimes)."""
    return hashlib.sha256("\n".join(sorted(f.entry for f in files)).encode()).hexdigest()[:16]


@dataclass
class Attempts:
    """What the run history of one job + partition says about the current files."""

    ingested_by: str | None = None          # run id of a successful run that had all current files
    in_progress: list[str] = field(default_factory=list)
    failed: list[tuple[str, float]] = field(default_factory=list)   # (run id, end time) on this stamp
    held: list[tuple[str, float]] = field(default_factory=list)     # labels: successful runs that held a file

    @property
    def attempts(self) -> list[tuple[str, float]]:
        """Finished runs on these files that did not ingest them (failed, or held them)."""
        return self.failed + self.held


def run_history(instance: dg.DagsterInstance, job: str, partition: str, stamp: str, entries: set[str],
                generation: str | None = None, held_asset: dg.AssetKey | None = None) -> Attempts:
    """Group the job's runs for the partition by root run (a run and its Dagster retries are one attempt).
    `job` is the data set's job name (`car_loan__ingest_batch`): another data set's runs are never counted.

    `held_asset` (labels: the data set's raw_labels): a successful run whose materialization of it lists one of the
    current files in `files_held` did not ingest them; it counts as an attempt in `held`."""
    names = {e.split("|", 1)[0] for e in entries}
    held_by_run: dict[str, set[str]] | None = None
    records = instance.get_run_records(dg.RunsFilter(job_name=job, tags={PARTITION_TAG: partition}),
                                       limit=RUN_HISTORY_LIMIT)
    groups: dict[str, list] = {}
    for rec in records:  # newest first
        groups.setdefault(rec.dagster_run.tags.get("dagster/root_run_id", rec.dagster_run.run_id), []).append(rec)
    out = Attempts()
    for members in groups.values():
        newest = members[0]
        run = newest.dagster_run
        if any(m.dagster_run.status in IN_PROGRESS for m in members) or (
                run.status == dg.DagsterRunStatus.FAILURE and run.tags.get("dagster/will_retry") == "true"):
            out.in_progress.append(run.run_id)  # queued, running, or failed with a Dagster retry coming
            continue
        if run.status == dg.DagsterRunStatus.SUCCESS:
            if run.tags.get(STAMP_TAG) == stamp or entries <= _files_of(run):
                if held_asset is not None:
                    if held_by_run is None:
                        held_by_run = files_held(instance, held_asset, partition)
                    held = next((held_by_run[m.dagster_run.run_id] for m in members
                                 if m.dagster_run.run_id in held_by_run), set())
                    if held & names:
                        if generation is None or run.tags.get(RECORDS_RUN_TAG) == generation:
                            out.held.append((run.run_id, newest.end_time or newest.update_timestamp.timestamp()))
                        continue
                out.ingested_by = out.ingested_by or run.run_id
            continue
        if run.status in FAILED and run.tags.get(STAMP_TAG) == stamp and (
                generation is None or run.tags.get(RECORDS_RUN_TAG) == generation):
            out.failed.append((run.run_id, newest.end_time or newest.update_timestamp.timestamp()))
    return out


def _files_of(run: dg.DagsterRun) -> set[str]:
    try:
        value = json.loads(run.tags.get(FILES_TAG, "[]"))
    except ValueError:  # a tag from an older sensor version
        return set()
    return set(value) if isinstance(value, list) else set()


def files_held(instance: dg.DagsterInstance, asset: dg.AssetKey, partition: str) -> dict[str, set[str]]:
    """Run id -> the landing files its materialization of `asset` held (metadata `files_held`)."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset, asset_partitions=[partition]), limit=RUN_HISTORY_LIMIT
    ).records
    out: dict[str, set[str]] = {}
    for rec in records:
        meta = rec.asset_materialization.metadata if rec.asset_materialization else {}
        value = meta.get("files_held")
        value = getattr(value, "value", getattr(value, "data", value))
        out.setdefault(rec.run_id, {str(x) for x in value} if isinstance(value, list) else set())
    return out


def records_waiting(plan: "Plan", instance: dg.DagsterInstance, partition: str,
                    records: list[LandedFile] | None, dataset: Namespace | str) -> str | None:
    """Why the records of a partition are not settled (so its labels must wait), or None if they are.

    Not settled: a records file still being written, complete files not yet ingested by a successful run,
    or an ingest_batch run of the partition queued, running or about to be retried."""
    if records is None:
        return f"records/{partition} could not be listed"
    writing = [f for f in records if not f.complete]
    if writing:
        return f"records/{partition}: {', '.join(f.name for f in writing)} still being written"
    n = ns(dataset)
    stamp = stamp_of(records) if records else ""
    job = n.job(JOBS["records"])
    history = run_history(instance, job, partition, stamp, {f.entry for f in records})
    if partition in plan.ranged_active:
        history.in_progress.append(plan.ranged_active[partition])
    if history.in_progress:
        return (f"{job} for {partition} is queued or running "
                f"({', '.join(history.in_progress[:3])})")
    if not records or plan.done.get(f"records/{partition}") == stamp or history.ingested_by \
            or materialized_from(instance, "records", partition, records, n):
        return None
    return (f"records/{partition}: {', '.join(f.name for f in records)} not yet ingested by a successful "
            f"{job} run")


def records_published(instance: dg.DagsterInstance, partition: str, dataset: Namespace | str) -> str | None:
    """Run id of the newest raw_records materialization of the partition from a successful run, if any."""
    from resources.io import latest_checked_materialization

    found = latest_checked_materialization(instance, ns(dataset).key("raw_records"), partition)
    return found[2] if found else None


def materialized_from(instance: dg.DagsterInstance, kind: str, partition: str,
                      files: list[LandedFile], dataset: Namespace | str) -> str | None:
    """Run id of the latest checked raw_<kind> materialization of the partition if it read every current
    file as it is now (for runs not made by this sensor: `mlp`/`make demo` materializations, the UI).

    Its metadata `files` lists what it read: entries `name|size|mtime_ns` prove it directly; bare names
    prove it when every current file was last modified before that run started."""
    from resources.io import latest_checked_materialization

    key = ns(dataset).key(f"raw_{kind}")
    found = latest_checked_materialization(instance, key, partition)
    if found is None:
        return None
    run_id = found[2]
    records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]),
                                              limit=50).records
    rec = next((r for r in records if r.run_id == run_id), None)
    meta = rec.asset_materialization.metadata if rec and rec.asset_materialization else {}
    listed = meta.get("files")
    listed = getattr(listed, "value", getattr(listed, "data", listed))
    if not isinstance(listed, list) or not listed:
        return None
    listed = {str(x) for x in listed}
    if {f.entry for f in files} <= listed:
        return run_id
    if not {f.name for f in files} <= listed:
        return None
    (run,) = instance.get_run_records(dg.RunsFilter(run_ids=[run_id]), limit=1) or [None]
    started = run.start_time if run else None
    if started is not None and max(f.mtime_ns for f in files) / 1e9 < started:
        return run_id
    return None


@dataclass
class Plan:
    requests: list[dg.RunRequest] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    done: dict[str, str] = field(default_factory=dict)
    # Ranged records runs (bursts): partition -> id of a queued or running one covering it; partition -> the
    # stamps a finished one already tried (such a partition is requested on its own again, never in a range).
    ranged_active: dict[str, str] = field(default_factory=dict)
    ranged_tried: dict[str, set] = field(default_factory=dict)

    def skip_reason(self) -> str:
        parts = self.waiting + self.warnings
        if not parts:
            return "no new complete files in the landing zone"
        text = "; ".join(parts)
        return text if len(text) <= 1500 else text[:1500] + f" ... ({len(parts)} notes, see the tick log)"

    def cursor(self) -> str:
        return json.dumps({"done": dict(sorted(self.done.items()))}, separators=(",", ":"))


def plan_arrivals(instance: dg.DagsterInstance, zone: Landing, partition_keys: list[str], cursor: str | None,
                  max_attempts: int = 5, backoff_seconds: float = 60.0, now: float | None = None, *,
                  dataset: Namespace | str) -> Plan:
    """The run requests for one data set's landing zone as it is now, given the run history of that data set's
    jobs. No side effects."""
    n = ns(dataset)
    now = time.time() if now is None else now
    try:
        done = dict(json.loads(cursor).get("done", {})) if cursor else {}
    except (ValueError, AttributeError):
        done = {}  # a cursor of an older sensor version: the run history is the truth anyway
    plan = Plan(done=done)
    try:
        ranged_runs(plan, instance, n.job(JOBS["records"]), partition_keys)
    except Exception as exc:  # noqa: BLE001 - without it, every partition is requested on its own
        plan.warnings.append(f"could not read the ranged {n.job(JOBS['records'])} runs: {exc}")
        plan.ranged_tried = {k: {"*"} for k in partition_keys}
    try:
        plan.warnings += [f"skipped {s}" for s in zone.root_strays()]
    except OSError as exc:
        plan.warnings.append(f"cannot list {zone.root}: {exc}")
    records: dict[str, list[LandedFile]] | None = None  # records files by partition (the labels' gate)
    for kind in KINDS:
        try:
            scan = zone.scan(kind, partition_keys, now)
        except OSError as exc:
            plan.warnings.append(f"cannot list {zone.root / kind}: {exc}")
            continue
        if kind == "records":
            records = scan.partitions
        plan.warnings += [f"skipped {s}" for s in scan.strays]
        for partition, files in scan.partitions.items():
            try:
                _plan_partition(plan, instance, n, kind, partition, files, max_attempts, backoff_seconds, now,
                                None if records is None else records.get(partition, []))
            except Exception as exc:  # noqa: BLE001 - one partition never blocks the others
                plan.warnings.append(f"{kind}/{partition}: skipped this tick ({type(exc).__name__}: {exc})")
    group_records(plan, n, partition_keys)
    try:
        split_failed_ranged_scoring(plan, instance, n, partition_keys)
    except Exception as exc:  # noqa: BLE001 - retried next tick; ingestion is not held up by it
        plan.warnings.append(f"could not read the failed ranged {n.job(JOBS['score'])} runs: {exc}")
    return plan


def ranged_runs(plan: Plan, instance: dg.DagsterInstance, job: str, partition_keys: list[str]) -> None:
    """Note on the plan which partitions a ranged records run covers now (queued or running) or tried before."""
    records = instance.get_run_records(dg.RunsFilter(job_name=job), limit=RUN_HISTORY_LIMIT)
    # A run Dagster retried (its failure marked `dagster/will_retry`, for good) is judged by its retry, not by itself:
    # otherwise it would hold its partitions "in progress" long after the retry ended.
    retried = {rec.dagster_run.tags.get("dagster/parent_run_id") for rec in records} - {None}
    for rec in records:
        run = rec.dagster_run
        if run.tags.get(PARTITION_TAG) or not run.tags.get(RANGE_STAMPS_TAG) or run.run_id in retried:
            continue
        covered = run_partitions(run, partition_keys)
        if run.status in IN_PROGRESS or (run.status == dg.DagsterRunStatus.FAILURE
                                         and run.tags.get("dagster/will_retry") == "true"):
            for p in covered:
                plan.ranged_active.setdefault(p, run.run_id)
            continue
        try:
            stamps = json.loads(run.tags[RANGE_STAMPS_TAG])
        except ValueError:
            stamps = {}
        for p in covered:
            plan.ranged_tried.setdefault(p, set()).add(stamps.get(p, "*"))


SPLIT_FROM_TAG = "arrival/split_from"  # a scoring run of one partition, requested after the ranged run that failed


def split_failed_ranged_scoring(plan: Plan, instance: dg.DagsterInstance, n: Namespace,
                                partition_keys: list[str]) -> None:
    """A ranged scoring run that failed for good (no Dagster retry coming) is split: each partition of its range is
    scored by a run of its own (once: the run key names the failed run), so one bad partition fails alone, visibly,
    and the others publish, as they would have without the burst."""
    job = n.job(JOBS["score"])
    records = instance.get_run_records(dg.RunsFilter(job_name=job, statuses=[dg.DagsterRunStatus.FAILURE]),
                                       limit=RUN_HISTORY_LIMIT)
    for rec in records:
        run = rec.dagster_run
        if run.tags.get(PARTITION_TAG) or run.tags.get("dagster/will_retry") == "true":
            continue  # a single-partition run, or Dagster retries it (the retry is judged instead)
        covered = run_partitions(run, partition_keys)
        if not covered or instance.get_runs(dg.RunsFilter(tags={SPLIT_FROM_TAG: run.run_id}), limit=1):
            continue  # split already
        selection = list(run.asset_selection) if run.asset_selection else None
        for p in covered:
            plan.requests.append(dg.RunRequest(
                run_key=f"score/{p}/split-{run.run_id}", job_name=job, partition_key=p, asset_selection=selection,
                tags={**n.partition_tags(p), SPLIT_FROM_TAG: run.run_id}))


def group_records(plan: Plan, n: Namespace, partition_keys: list[str]) -> None:
    """Records requests of consecutive partitions, each a first attempt on its files and never tried in a range
    before, become one ranged run per group (a burst pays a run's fixed costs once). A lone partition keeps its
    own run (the one-batch path, unchanged); a partition a ranged run already tried (it failed, or withheld the
    partition) is requested on its own, so it fails or publishes by itself."""
    job = n.job(JOBS["records"])
    candidates = {r.partition_key: r for r in plan.requests
                  if r.job_name == job and r.tags.get(KIND_TAG) == "records" and r.tags.get(ATTEMPT_TAG) == "0"
                  and r.partition_key and not plan.ranged_tried.get(r.partition_key, set())
                  & {r.tags.get(STAMP_TAG), "*"}}
    grouped = [g for g in contiguous_groups(list(candidates), partition_keys, MAX_RANGE) if len(g) > 1]
    if not grouped:
        return
    taken = {p for g in grouped for p in g}
    requests = [r for r in plan.requests if not (r.job_name == job and r.partition_key in taken
                                                and r.tags.get(KIND_TAG) == "records")]
    for g in grouped:
        stamps = {p: candidates[p].tags[STAMP_TAG] for p in g}
        digest = hashlib.sha256(json.dumps(stamps, sort_keys=True).encode()).hexdigest()[:16]
        tags = {**n.tags, KIND_TAG: "records", ATTEMPT_TAG: "0", **range_tags(g[0], g[-1]),
                RANGE_STAMPS_TAG: json.dumps(stamps, separators=(",", ":"))}
        requests.append(dg.RunRequest(run_key=f"records/{g[0]}...{g[-1]}/{digest}", job_name=job, tags=tags))
    plan.requests = requests


def _plan_partition(plan: Plan, instance: dg.DagsterInstance, n: Namespace, kind: str, partition: str,
                    files: list[LandedFile], max_attempts: int, backoff_seconds: float, now: float,
                    records: list[LandedFile] | None = None) -> None:
    key = f"{kind}/{partition}"
    # Files still settling are waited for on their own: the complete ones are requested now (a run reads
    # only complete files) and a settling one, once complete, changes the stamp and makes a later request.
    writing = [f for f in files if not f.complete]
    if writing:
        plan.waiting.append(f"{key}: waiting for {', '.join(f'{f.name} ({f.why})' for f in writing)}")
    files = [f for f in files if f.complete]
    if not files:
        return
    stamp = stamp_of(files)
    if plan.done.get(key) == stamp:
        return
    job = n.job(JOBS[kind])
    entries = {f.entry for f in files}
    # Labels: which records publication they follow; failed attempts count per publication, so new
    # records (which may hold the ids the labels were missing) give the same labels a fresh set of attempts.
    generation = records_published(instance, partition, n) if kind == "labels" else None
    history = run_history(instance, job, partition, stamp, entries, generation,
                          n.key("raw_labels") if kind == "labels" else None)
    if history.ingested_by:
        plan.done[key] = stamp
        return
    if kind == "records" and partition in plan.ranged_active:
        history.in_progress.append(plan.ranged_active[partition])
    if history.in_progress:
        plan.waiting.append(f"{key}: a run of {job} for this partition is queued or running "
                            f"({', '.join(history.in_progress[:3])}); waiting for it")
        return
    if materialized_from(instance, kind, partition, files, n):
        plan.done[key] = stamp  # ingested by a run this sensor did not make
        return
    if kind == "labels":
        why = records_waiting(plan, instance, partition, records, n)
        if why:
            plan.waiting.append(f"{key}: labels held until the records of {partition} settle ({why}); a label "
                                f"for an id in a records file still arriving would otherwise be rejected")
            return
    if kind == "labels" and generation is None:
        plan.waiting.append(f"{key}: labels held until raw_records [{partition}] is published "
                            f"(no successful run has materialized it yet)")
        return
    attempts = history.attempts  # failed runs, and labels runs that held the files
    tries = len(attempts)
    if tries >= max_attempts:
        what = f"{tries} failed {job} run(s)" if not history.held else \
            f"{tries} {job} run(s) that failed ({len(history.failed)}) or held the files ({len(history.held)})"
        plan.warnings.append(
            f"{key}: gave up after {what} on the same files "
            f"({', '.join(r for r, _ in attempts[:3])}); fix or re-deliver the files (a changed file "
            f"is a new delivery) or launch {job} for {partition} by hand")
        return
    if tries:
        last_end = max(t for _, t in attempts)
        wait = min(backoff_seconds * 2 ** (tries - 1), MAX_BACKOFF_SECONDS)
        if now < last_end + wait:
            plan.waiting.append(f"{key}: {tries} failed attempt(s); retry {tries + 1} of {max_attempts} in "
                                f"{last_end + wait - now:.0f}s (backoff)")
            return
    names = sorted(f.entry for f in files)
    listing = json.dumps(names, separators=(",", ":"))
    tags = {**n.partition_tags(partition), KIND_TAG: kind, STAMP_TAG: stamp, ATTEMPT_TAG: str(tries)}
    if len(listing) <= MAX_FILES_TAG_CHARS:
        tags[FILES_TAG] = listing
    run_key = f"{key}/{stamp}/attempt-{tries}"
    if generation is not None:
        tags[RECORDS_RUN_TAG] = generation
        run_key = f"{key}/{stamp}/records-{generation[:8]}/attempt-{tries}"
    plan.requests.append(dg.RunRequest(run_key=run_key, partition_key=partition, job_name=job, tags=tags))


def build_arrivals(spec: DatasetSpec) -> dict:
    parts = partitions_def(spec)
    partition_keys = list(parts.get_partition_keys())
    n = ns(spec)

    def job(name: str, assets: list[str], description: str) -> dg.UnresolvedAssetJobDefinition:
        """A partitioned job of this data set: its runs tagged with the data set and `mlp/partition`."""
        return dg.define_asset_job(n.job(name), selection=n.keys(*assets), partitions_def=parts,
                                   config=partitioned_job_config(n, parts), tags=n.tags, description=description)

    ingest_job = job(JOBS["records"], INGEST_ASSETS,
                     f"A landed batch of {spec.name}: raw records of the partition, then the dbt models.")
    labels_job = job(JOBS["labels"], LABEL_ASSETS, f"Delayed labels of a {spec.name} partition, then the dbt models.")
    # The full rebuild, on demand: a backfill of this job over all partitions (e.g. after a feature definition
    # changed, which marks the partitions stale) rebuilds every batch's models from its raw files.
    score_job = job(JOBS["score"], [*SCORE_ASSETS, QUALITY_ASSET],
                    f"A published batch of {spec.name}: champion scores (challenger in shadow), drift report and "
                    f"label-free performance estimate of the partition.")
    rebuild_job = job("rebuild_features", FEATURE_ASSETS,
                      f"Rebuild one {spec.name} batch's dbt models (staging, features) from its raw partition; "
                      f"backfill all partitions for a full rebuild.")

    @dg.sensor(name=n.sensor("landing_arrivals"), jobs=[ingest_job, labels_job, score_job], minimum_interval_seconds=5,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Complete files in the landing zone -> ingest their partition (records, then labels); "
                           "failed ingestions are retried with backoff; a failed ranged scoring run is split into "
                           "one run per partition.")
    def landing_arrivals(context: dg.SensorEvaluationContext, landing: LandingZoneResource):
        plan = plan_arrivals(context.instance, landing.zone(spec), partition_keys, context.cursor,
                             max_attempts=landing.max_ingest_attempts,
                             backoff_seconds=landing.retry_backoff_seconds, dataset=n)
        for message in plan.warnings:
            context.log.warning(message)
        for message in plan.waiting:  # also the skip reason when nothing is requested
            context.log.debug(message)
        for req in plan.requests:
            where = req.partition_key or "{}...{}".format(*(req.partition_key_range or ("?", "?")))
            context.log.info(f"requesting {req.job_name} [{where}] as {req.run_key}")
        if plan.requests:
            return dg.SensorResult(run_requests=plan.requests, cursor=plan.cursor())
        return dg.SensorResult(skip_reason=plan.skip_reason(), cursor=plan.cursor())

    return {"jobs": [ingest_job, labels_job, score_job, rebuild_job], "sensors": [landing_arrivals]}
