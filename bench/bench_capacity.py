"""Capacity of the prod profile on one machine: what Postgres, Dagster's storage on it and lakeFS on its KV can take.

Against a private Postgres server (tooling/postgres.py, durable: fsync on) in a temp folder:

  postgres    single-row INSERT + COMMIT into a table shaped like Dagster's event_logs (what each run event
              costs), one connection; and the same with 4 connections
  dagster     a 4-asset job materialized N times in process (one run worker) on platform/dagster.prod.yaml:
              seconds per run and event-log rows per run: the orchestration and storage cost of a run, without
              the work of its steps
  lakefs      on Postgres KV: the publish cycle of one run (branch from main, upload an object, commit, merge
              into main, delete the branch), from 1 worker and from 4 concurrent workers (merges into main
              serialise)
  recorded    with --runs-from-dagster-db URL: the wall time of real runs (job name -> median seconds) recorded
              in a Dagster database on Postgres (e.g. the daemon end-to-end scenario's on the prod profile)

    .venv/bin/python bench/bench_capacity.py [--runs 20] [--cycles 20] [--runs-from-dagster-db postgresql://...]

Prints one table and writes bench/results/capacity.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

from common import QUIET, RESULTS, ROOT, log


def bench_postgres(server, seconds: float = 5.0) -> dict:
    con = server.connect("dagster")
    with con.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS bench_events; CREATE TABLE bench_events (id BIGSERIAL PRIMARY KEY, "
                    "run_id VARCHAR(255), event TEXT NOT NULL, dagster_event_type TEXT, timestamp TIMESTAMP, "
                    "step_key TEXT, asset_key TEXT, partition TEXT)")
    con.close()
    payload = json.dumps({"message": "x" * 600})  # a run event's serialized size, roughly

    def insert(n_out: list, stop: float) -> None:
        c = server.connect("dagster")
        c.autocommit = False
        n = 0
        with c.cursor() as cur:
            while time.time() < stop:
                cur.execute("INSERT INTO bench_events (run_id, event, dagster_event_type, timestamp, step_key) "
                            "VALUES (%s, %s, 'STEP_OUTPUT', now(), 'a')", (uuid.uuid4().hex, payload))
                c.commit()
                n += 1
        c.close()
        n_out.append(n)

    out = {}
    for workers in (1, 4):
        counts: list[int] = []
        stop = time.time() + seconds
        threads = [threading.Thread(target=insert, args=(counts, stop)) for _ in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out[f"inserts_per_s_{workers}_conn"] = round(sum(counts) / seconds)
    return out


def bench_dagster(server, home: Path, runs: int) -> dict:
    import dagster as dg

    shutil.copy(ROOT / "platform" / "dagster.prod.yaml", home / "dagster.yaml")

    @dg.asset
    def a() -> int:
        return 1

    @dg.asset
    def b(a: int) -> int:
        return a + 1

    @dg.asset
    def c(b: int) -> int:
        return b + 1

    @dg.asset
    def d(c: int) -> int:
        return c + 1

    times = []
    with dg.DagsterInstance.from_config(str(home)) as instance:
        dg.materialize([a, b, c, d], instance=instance, run_config=QUIET)  # warm-up: schema, imports
        for _ in range(runs):
            t0 = time.perf_counter()
            dg.materialize([a, b, c, d], instance=instance, run_config=QUIET)
            times.append(time.perf_counter() - t0)
    con = server.connect("dagster")
    with con.cursor() as cur:
        cur.execute("SELECT count(*)::float / count(DISTINCT run_id) FROM event_logs WHERE run_id <> ''")
        events_per_run = cur.fetchone()[0]
    con.close()
    med = statistics.median(times)
    return {"seconds_per_trivial_run": round(med, 3), "event_rows_per_trivial_run": round(events_per_run, 1),
            "trivial_runs_per_hour_one_worker": round(3600 / med)}


def bench_lakefs(server_pg, tmp: Path, cycles: int) -> dict:
    from resources.lakefs import LakeFSResource
    from tooling.services import LakeFSServer, free_port

    lfs = LakeFSServer(tmp / "lakefs", port=free_port(), kv_url=server_pg.url("lakefs", "postgres")
                       + "?sslmode=disable").start()
    try:
        creds = lfs.credentials
        res = LakeFSResource(endpoint=lfs.endpoint, access_key_id=creds["access_key_id"],
                             secret_access_key=creds["secret_access_key"], repository="bench-capacity")
        res.ensure_repository()

        def cycle(i: int) -> None:
            import lakefs

            branch = f"run-{uuid.uuid4().hex[:12]}"
            res.ensure_branch(branch)
            res.put(branch, f"data/{branch}/part.parquet", b"x" * 4096)
            res.commit(branch, f"run {i}")
            repo = res.repo()
            for attempt in range(20):  # another worker's merge may move main under ours: retry, as publish does
                try:
                    repo.branch(branch).merge_into(repo.branch("main"))
                    break
                except lakefs.exceptions.LakeFSException:
                    time.sleep(0.05 * (attempt + 1))
            res.delete_branch(branch)

        out = {}
        cycle(-1)
        t0 = time.perf_counter()
        for i in range(cycles):
            cycle(i)
        out["publish_cycles_per_s_1_worker"] = round(cycles / (time.perf_counter() - t0), 2)
        errors: list[BaseException] = []

        def worker(k: int) -> None:
            try:
                for i in range(cycles // 4 or 1):
                    cycle(k * 1000 + i)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done = 4 * (cycles // 4 or 1)
        out["publish_cycles_per_s_4_workers"] = round(done / (time.perf_counter() - t0), 2)
        if errors:
            out["errors_4_workers"] = [str(e)[:200] for e in errors]
        return out
    finally:
        lfs.stop()


def recorded_runs(url: str) -> dict:
    import psycopg2

    con = psycopg2.connect(url)
    with con.cursor() as cur:
        cur.execute("SELECT pipeline_name, end_time - start_time FROM runs WHERE status = 'SUCCESS' "
                    "AND end_time IS NOT NULL AND start_time IS NOT NULL")
        rows = cur.fetchall()
    con.close()
    by_job: dict[str, list[float]] = {}
    for job, secs in rows:
        by_job.setdefault(job, []).append(float(secs))
    return {job: {"runs": len(v), "median_seconds": round(statistics.median(v), 1)} for job, v in sorted(by_job.items())}


def main() -> None:
    from tooling.postgres import PostgresServer

    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--runs-from-dagster-db", default="")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mlp-bench-capacity-"))
    pg_folder = Path(tempfile.mkdtemp(prefix="mlp-bench-pg-"))  # its own: as root, handed to the postgres user
    server = PostgresServer(pg_folder, durable=True)
    results: dict = {}
    try:
        server.start()
        env = server.env()
        import os

        os.environ.update({k: v for k, v in env.items() if k.startswith("MLP_PG_")})
        (tmp / "home").mkdir()
        log("postgres inserts")
        results["postgres"] = bench_postgres(server)
        log("dagster runs on postgres storage")
        results["dagster"] = bench_dagster(server, tmp / "home", args.runs)
        log("lakeFS publish cycles on postgres KV")
        results["lakefs"] = bench_lakefs(server, tmp, args.cycles)
        if args.runs_from_dagster_db:
            results["recorded_runs"] = recorded_runs(args.runs_from_dagster_db)
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(pg_folder, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "capacity.json").write_text(json.dumps(results, indent=1))
    print("| measure | value |\n| --- | --- |")
    for section, values in results.items():
        for k, v in values.items():
            print(f"| {section}: {k} | {v} |")


if __name__ == "__main__":
    main()
