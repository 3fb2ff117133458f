"""The batch lifecycle under a real dagster-daemon: landing -> published predictions, drift report and estimate.

Issue 11, "What it must show":
- one batch, landing to published predictions, drift report and estimate: median <= 60 s;
- 12 batches landing at once: all published within 3x the single-batch latency;
- a daily cadence over a year: batch 300 costs at most 1.2x batch 10 (end to end here; bench_incremental.py
  measures the feature build alone).

Set-up (not timed): a private lakeFS server and MLflow store (bench/common.py), a temporary DAGSTER_HOME seeded
from platform/dagster.yaml (its run queue and concurrency limits as shipped), the car_loan spec switched to a
daily cadence with the retrain/rollback triggers off (this measures the batch path, not training), a champion
trained on the reference period, and the history of batches 1..7 written to lakeFS main directly (raw records
and their id index, as ingestion writes them). Then `dagster-daemon run -w workspace.yaml` starts and nothing
else is done by hand: the simulator lands batch files (records only), the arrivals sensor ingests them, the
publish sensor publishes each run and requests the batch's scoring run (predictions, drift, estimate), which
is published in turn; declarative automation then makes the batch's health report. Batches landing together
(the burst) are ingested by ONE ranged run over their consecutive partitions and scored by ONE ranged scoring
run (sensors/arrivals.py, sensors/publish.py): the runs' fixed costs are paid once per burst, not per batch.

Timed, from the landing file's mtime to the moment the last of batch_predictions, drift_report and
performance_estimate of the partition is materialized by a run whose data is on lakeFS main (polled each
0.5 s):
Each measurement starts on an idle platform: no run queued or in flight (a batch's follow-up runs, such as its
health report, have ended), as for daily batches in production.
1. batches 8, 9, 10 landed one after another (each waits for the previous one): the single-batch latency;
2. batches 11..22 landed at once: the time until all 12 are published;
3. the history of batches 23..299 written to main directly (not timed), then batches 300, 301, 302 one after
   another: the single-batch latency with a year of history.
For each batch a breakdown is printed from the run records: the arrival sensor's wait, queue and launch, the
ingestion run, publication + automation wait, the scoring run and its publication.

    .venv/bin/python bench/bench_lifecycle.py [--late 300] [--at-once 12] [--scale 1]   (--at-once 0: no burst;
                                                                                     --late 0: no late batches)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402  (sets up sys.path and telemetry first)

FOLLOW = ("batch_predictions", "drift_report", "performance_estimate")
TIMEOUT_S = 1800


DATASET = "car_loan"  # the bench's data set: car_loan's spec switched to daily batches (its asset keys: car_loan/...)


def bench_spec(tmp: Path) -> Path:
    text = (ROOT / "platform" / "datasets" / "car_loan.yaml").read_text()
    for before, after in (("cadence: monthly", "cadence: daily"),
                          ("volume:      {enabled: true", "volume:      {enabled: false"),
                          ("drift:       {enabled: true", "drift:       {enabled: false"),
                          ("performance: {enabled: true", "performance: {enabled: false"),
                          ("rollback:    {enabled: true", "rollback:    {enabled: false")):
        assert before in text, before
        text = text.replace(before, after)
    path = tmp / "car_loan.yaml"
    path.write_text(text)
    return path


def write_history(lakefs, spec, production, keys: list[str]) -> None:
    """Batches' raw records and id index on main in one commit, as ingestion would have left them."""
    import dagster as dg
    import polars as pl

    from assets.ingestion import write_id_index
    from mlplatform import contracts
    from mlplatform.batches import window
    from resources.io import asset_path

    dtypes = contracts.expected_dtypes(spec)
    branch = f"bench-history-{keys[0]}"
    lakefs.ensure_branch(branch)
    for key in keys:
        start, end = window(spec, key)
        day = production.filter((pl.col("_t") >= start) & (pl.col("_t") < end))
        frame = day.select([pl.col("_t").alias(c).cast(t) if c == spec.time_column else pl.col(c).cast(t)
                            for c, t in dtypes.items()]).with_columns(
            pl.lit(f"batch-{key}.parquet").alias(contracts.SOURCE_FILE))
        buf = io.BytesIO()
        frame.write_parquet(buf, compression="zstd")
        lakefs.put(branch, asset_path(dg.AssetKey([spec.name, "raw_records"]), key, "parquet"), buf.getvalue())
        write_id_index(lakefs, branch, spec, key, frame)
    lakefs.commit(branch, f"raw_records of {len(keys)} daily batches (bench history)")
    lakefs.merge(branch, "main", "bench history")


class Watcher:
    """Polls the instance: when is each partition's scoring published (all FOLLOW assets, data on main)?"""

    def __init__(self, instance):
        self.instance = instance
        self._published: dict[str, float] = {}  # run id -> first seen published

    def _published_at(self, run_id: str) -> float | None:
        from resources.publish import PUBLISHED_TAG

        if run_id not in self._published:
            run = self.instance.get_run_by_id(run_id)
            if run is None or PUBLISHED_TAG not in run.tags:
                return None
            self._published[run_id] = time.time()
        return self._published[run_id]

    def done_at(self, partition: str) -> float | None:
        import dagster as dg

        times = []
        for key in FOLLOW:
            recs = self.instance.fetch_materializations(dg.AssetRecordsFilter(
                asset_key=dg.AssetKey([DATASET, key]), asset_partitions=[partition]), limit=1).records
            if not recs:
                return None
            at = self._published_at(recs[0].run_id)
            if at is None:
                return None
            times.append(at)
        return max(times)

    def wait(self, partitions: list[str], daemon: subprocess.Popen, log: Path) -> dict[str, float]:
        done: dict[str, float] = {}
        deadline = time.time() + TIMEOUT_S
        while len(done) < len(partitions):
            if daemon.poll() is not None:
                raise SystemExit(f"dagster-daemon exited ({daemon.returncode}):\n{log.read_text()[-3000:]}")
            if time.time() > deadline:
                raise SystemExit(f"not published within {TIMEOUT_S} s: {sorted(set(partitions) - set(done))}; "
                                 f"runs: {self.summary()}")
            for p in partitions:
                if p not in done:
                    at = self.done_at(p)
                    if at is not None:
                        done[p] = at
            time.sleep(0.5)
        return done

    def summary(self) -> list:
        return [(r.job_name, r.status.value, r.tags.get("dagster/partition")) for r in self.instance.get_runs(limit=40)]

    def breakdown(self, partition: str, landed: float, done: float) -> dict:
        """Where one batch's time went, from its run records (seconds from landing)."""
        import dagster as dg

        recs = list(self.instance.get_run_records(dg.RunsFilter(tags={"dagster/partition": partition})))
        recs += [r for r in self.instance.get_run_records(dg.RunsFilter(tags={"mlp/dataset": DATASET}), limit=200)
                 if not r.dagster_run.tags.get("dagster/partition")  # ranged runs (a burst) covering it
                 and r.dagster_run.tags.get("dagster/asset_partition_range_start", "~") <= partition
                 <= r.dagster_run.tags.get("dagster/asset_partition_range_end", "")]
        out: dict = {"total": round(done - landed, 1)}
        for rec in sorted(recs, key=lambda r: r.create_timestamp.timestamp()):
            name = "ingest" if rec.dagster_run.job_name == f"{DATASET}__ingest_batch" else "score"
            if name in out:
                name = f"{name}_{rec.dagster_run.run_id[:6]}"
            published = self._published.get(rec.dagster_run.run_id)
            out[name] = {"queued": round(rec.create_timestamp.timestamp() - landed, 1),
                         "started": round((rec.start_time or 0) - landed, 1) if rec.start_time else None,
                         "ended": round((rec.end_time or 0) - landed, 1) if rec.end_time else None,
                         "published": round(published - landed, 1) if published else None,
                         "status": rec.dagster_run.status.value}
        return out


def drain(instance, timeout: float = 900.0) -> float:
    """Wait until no run is queued or in flight (a batch's follow-up runs, e.g. its health report, end before
    the next measurement starts: each measurement begins on an idle platform); returns the seconds waited."""
    import dagster as dg

    busy = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
            dg.DagsterRunStatus.STARTED]
    t0 = time.time()
    while instance.get_runs_count(dg.RunsFilter(statuses=busy)):
        if time.time() - t0 > timeout:
            raise RuntimeError(f"runs still in flight after {timeout:.0f} s")
        time.sleep(1.0)
    time.sleep(6.0)  # one automation-sensor interval more: a follow-up requested just now is waited for too
    if instance.get_runs_count(dg.RunsFilter(statuses=busy)):
        return time.time() - t0 + drain(instance, timeout)
    return time.time() - t0


def land(sim, keys: list[str]) -> dict[str, float]:
    """Land each batch's records file (one file per batch, with its completion marker); their mtimes."""
    from mlplatform.batches import Landing  # noqa: F401  (the simulator writes through the landing zone)

    landed = {}
    for key in keys:
        sim.release(1, start=key)
        f = sim.landing.records_dir(key) / f"batch-{key}.parquet"
        landed[key] = f.stat().st_mtime
    return landed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--late", type=int, default=300, help="the late batch (a year of daily history before it)")
    ap.add_argument("--at-once", type=int, default=12)
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, instance)")
    args = ap.parse_args()

    import signal
    import tempfile

    # A SIGTERM (kill, a CI timeout) unwinds like Ctrl-C: the daemon, lakeFS and the temporary folder are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp_root = Path(tempfile.mkdtemp(prefix="bench-life-"))
    try:
        run(args, tmp_root)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


def run(args, tmp_root: Path) -> None:
    import tempfile

    spec_path = bench_spec(tmp_root)
    os.environ["MLP_DATASET"] = str(spec_path)

    import dagster as dg

    from assets.evaluation import build_evaluation
    from assets.features import build_features
    from assets.ingestion import build_ingestion
    from assets.training import build_training
    from mlplatform.batches import Landing
    from mlplatform.spec import load_spec
    from resources.publish import publish_run
    from tooling.simulator import Simulator

    class RecordsOnly(Simulator):  # labels would add label runs competing for the same slots
        def _due_labels(self, state):
            return []

    spec = load_spec(spec_path)
    results: dict = {"scale": args.scale, "at_once": args.at_once, "late": args.late}
    with common.private_platform("bench-life-", spec=spec, tmp_root=tmp_root) as platform:
        home = platform.dagster_home
        shutil.copy(ROOT / "platform" / "dagster.yaml", home / "dagster.yaml")
        os.environ["DAGSTER_HOME"] = str(home)
        os.environ["MLP_STATE_DIR"] = str(platform.state)
        os.environ["MLP_DATASET"] = str(spec_path)  # the settings name the data set; the daily copy is meant
        instance = dg.DagsterInstance.get()
        res, lakefs = platform.resources, platform.lakefs

        t = time.time()
        assets = [*build_ingestion(spec), *build_features(spec), *build_training(spec), *build_evaluation(spec)]
        for selection in (["reference_data"], ["stg_reference_records", "stg_reference_labels",
                                               "reference_features", "labelled_examples", "training_set",
                                               "candidate_model", "evaluation_report", "model_card"]):
            r = dg.materialize(assets, selection=[dg.AssetKey([spec.name, a]) for a in selection], instance=instance,
                               resources=res, run_config=common.QUIET)
            publish_run(instance, lakefs, r.run_id)
        sim = RecordsOnly(spec, Landing(platform.state / "landing" / spec.name), scale=args.scale)
        keys = sim.batches()
        need = max(args.late + 2, 10 + args.at_once)
        if len(keys) < need:
            raise SystemExit(f"only {len(keys)} daily batches with production rows; --late {args.late} needs {need}")
        write_history(lakefs, spec, sim.production(), keys[:7])
        common.log(f"set-up (champion, history of 7 batches) in {time.time() - t:.0f} s")

        log = platform.tmp / "daemon.log"
        daemon = subprocess.Popen([str(ROOT / ".venv" / "bin" / "dagster-daemon"), "run", "-w", "workspace.yaml"],
                                  cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=open(log, "w"),
                                  stderr=subprocess.STDOUT, start_new_session=True)
        watcher = Watcher(instance)
        try:
            time.sleep(5)
            per_batch = {}

            def one_by_one(batch_keys: list[str], label: str) -> list[float]:
                lat = []
                for key in batch_keys:
                    drain(instance)
                    landed = land(sim, [key])
                    done = watcher.wait([key], daemon, log)
                    per_batch[key] = watcher.breakdown(key, landed[key], done[key])
                    lat.append(done[key] - landed[key])
                    common.log(f"{label} {key}: {lat[-1]:.1f} s  {json.dumps(per_batch[key])}")
                return lat

            early = one_by_one(keys[7:10], "single")
            burst_keys = keys[10:10 + args.at_once]
            burst = float("nan")
            if burst_keys:  # --at-once 0: singles and the late batches only
                drain(instance)
                landed = land(sim, burst_keys)
                done = watcher.wait(burst_keys, daemon, log)
                burst = max(done.values()) - min(landed.values())
                for key in burst_keys:
                    per_batch[key] = watcher.breakdown(key, landed[key], done[key])
                common.log(f"{args.at_once} at once: all published in {burst:.1f} s")

            late = []
            if args.late:  # --late 0: no year of history, no late batches
                history = keys[10 + args.at_once:args.late - 1]
                t = time.time()
                write_history(lakefs, spec, sim.production(), history)
                common.log(f"history of {len(history)} more batches written in {time.time() - t:.0f} s")
                late = one_by_one(keys[args.late - 1:args.late + 2], "late")
        finally:
            os.killpg(daemon.pid, 15)
            daemon.wait(60)
            if args.keep:
                shutil.copy(log, Path(tempfile.gettempdir()) / "bench-lifecycle-daemon.log")

    single = statistics.median(early)
    results.update({
        "single_batch_seconds": [round(x, 1) for x in early], "single_batch_median_s": round(single, 1),
        "target_single_batch_s": 60,
        "at_once_all_published_s": round(burst, 1), "at_once_over_single": round(burst / single, 2),
        "target_at_once_over_single": 3.0,
        "late_batch_seconds": [round(x, 1) for x in late],
        "late_over_early": round(statistics.median(late) / single, 2) if late else None,
        "target_late_over_early": 1.2,
        "batches": {"early": keys[7:10], "at_once": burst_keys, "late": keys[args.late - 1:args.late + 2] if late else []},
        "breakdown": per_batch,
    })
    print(json.dumps({k: v for k, v in results.items() if k != "breakdown"}, indent=1))
    common.RESULTS.mkdir(exist_ok=True)
    (common.RESULTS / "lifecycle.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
