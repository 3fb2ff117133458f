"""Incremental features: does building batch N's features cost more than building batch 10's?

Issue 11: "Daily cadence over a year of simulated batches: batch 300 costs at most 1.2x batch 10".

Set-up (not timed): a private lakeFS server (temp dir, free port), a temp state folder and Dagster instance,
and the car_loan spec switched to a daily cadence (2018-10-01 .. 2019-09-01: ~335 partitions). The production
rows (Simulator(scale=k): k resampled copies with fresh ids) are cut into daily batches in the raw_records
schema and written to lakeFS main as `assets/raw_records/partition=<day>/data.parquet` for every day up to
batch N, in one commit: the history that a whole-history design would have to read for every new batch.

Timed: the platform's partitioned dbt assets (`batch_models`: stg_records + features of one partition: dbt
build into a per-run DuckDB reading that partition through lakeFS's S3 gateway, export to its partition path,
commit) for batch 1, batch 10 and batch N, interleaved over --reps repetitions; each run is published after
its timing. Medians reported, and the ratios N/10 and N/1.

For context (what the old unpartitioned `features` paid): a DuckDB scan of all raw_records partitions up to
batch 10 and up to batch N through the same gateway.

    .venv/bin/python bench/bench_incremental.py [--n 300] [--scale 4] [--reps 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def daily_spec(tmp: Path) -> Path:
    text = (ROOT / "platform" / "datasets" / "car_loan.yaml").read_text()
    assert "cadence: monthly" in text
    path = tmp / "car_loan.yaml"
    path.write_text(text.replace("cadence: monthly", "cadence: daily"))
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")
    os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")

    import dagster as dg
    import polars as pl

    from tooling.services import LakeFSServer, free_port

    with tempfile.TemporaryDirectory(prefix="bench-incr-") as tmpdir:
        tmp = Path(tmpdir)
        server = LakeFSServer(tmp / "lakefs", port=free_port()).start()
        try:
            os.environ.update(server.env())
            os.environ["MLP_STATE_DIR"] = str(tmp / "state")
            os.environ["LAKEFS_REPOSITORY"] = "bench"
            spec_path = daily_spec(tmp)
            os.environ["MLP_DATASET"] = str(spec_path)

            from assets.features import build_features
            from mlplatform import contracts
            from mlplatform.batches import Landing, window
            from mlplatform.spec import load_spec
            from resources.duckdb import DuckDBResource
            from resources.io import LakeFSIOManager, asset_path
            from resources.lakefs import LakeFSResource
            from resources.publish import publish_run
            from tooling.simulator import Simulator

            spec = load_spec(spec_path)
            env = server.env()
            lakefs = LakeFSResource(endpoint=env["LAKEFS_ENDPOINT"], access_key_id=env["LAKEFS_ACCESS_KEY_ID"],
                                    secret_access_key=env["LAKEFS_SECRET_ACCESS_KEY"], repository="bench")
            state = tmp / "state"
            duckdb = DuckDBResource(database=str(state / "duckdb" / "unused.duckdb"), state_dir=str(state),
                                    lakefs_endpoint=lakefs.endpoint, lakefs_access_key_id=lakefs.access_key_id,
                                    lakefs_secret_access_key=lakefs.secret_access_key)
            res = {"lakefs": lakefs, "duckdb": duckdb, "io_manager": LakeFSIOManager(lakefs=lakefs)}

            # --- history: raw_records for every day up to batch N, in one commit on main -----------------
            t0 = time.perf_counter()
            sim = Simulator(spec, Landing(state / "landing" / spec.name), scale=args.scale)
            prod = sim.production()
            keys = sim.batches()
            if len(keys) < args.n:
                raise SystemExit(f"only {len(keys)} daily batches in the production period; --n {args.n} is too large")
            keys = keys[:args.n]
            dtypes = contracts.expected_dtypes(spec)
            lakefs.repo()  # the platform creates its repository on first use
            lakefs.ensure_branch("bulk-history")
            rows = {}
            for key in keys:
                start, end = window(spec, key)
                day = prod.filter((pl.col("_t") >= start) & (pl.col("_t") < end))
                frame = day.select([pl.col("_t").alias(c).cast(t) if c == spec.time_column else pl.col(c).cast(t)
                                    for c, t in dtypes.items()]).with_columns(
                    pl.lit(f"{key}.parquet").alias(contracts.SOURCE_FILE))
                buf = io.BytesIO()
                frame.write_parquet(buf, compression="zstd")
                lakefs.put("bulk-history", asset_path(dg.AssetKey([spec.name, "raw_records"]), key, "parquet"), buf.getvalue())
                rows[key] = frame.height
            lakefs.commit("bulk-history", f"raw_records for {len(keys)} daily batches (bench history)")
            lakefs.merge("bulk-history", "main", "bench history")
            setup_s = time.perf_counter() - t0

            measured = {"batch_1": keys[0], "batch_10": keys[9], f"batch_{args.n}": keys[-1]}
            times: dict[str, list[float]] = {name: [] for name in measured}
            (tmp / "dagster_home").mkdir()
            with dg.instance_for_test(temp_dir=str(tmp / "dagster_home")) as instance:
                assets = build_features(spec)
                for _ in range(args.reps):
                    for name, key in measured.items():
                        t = time.perf_counter()
                        r = dg.materialize(assets, selection=[dg.AssetKey([spec.name, "stg_records"]), dg.AssetKey([spec.name, "features"])], partition_key=key,
                                           instance=instance, resources=res)
                        times[name].append(time.perf_counter() - t)
                        assert r.success
                        publish_run(instance, lakefs, r.run_id)

            # --- context: a whole-history scan (what the old unpartitioned features read per batch) --------
            scans = {}
            con = duckdb.connect(in_memory=True)
            try:
                for name, upto in (("history_scan_to_10", keys[:10]), (f"history_scan_to_{args.n}", keys)):
                    uris = [lakefs.s3_uri("main", asset_path(dg.AssetKey([spec.name, "raw_records"]), k, "parquet")) for k in upto]
                    t = time.perf_counter()
                    con.execute(f"select count(*) from read_parquet({uris!r})").fetchone()
                    scans[name] = round(time.perf_counter() - t, 3)
            finally:
                con.close()
        finally:
            server.stop()

    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    n_key = f"batch_{args.n}"
    out = {
        "n": args.n, "scale": args.scale, "reps": args.reps, "partitions": {k: v for k, v in measured.items()},
        "rows_per_batch": {name: rows[key] for name, key in measured.items()},
        "history_rows": sum(rows.values()), "setup_seconds": round(setup_s, 1),
        "median_seconds": med, "all_seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "ratio_n_over_10": round(med[n_key] / med["batch_10"], 3),
        "ratio_n_over_1": round(med[n_key] / med["batch_1"], 3),
        "target_ratio_n_over_10": 1.2, **scans,
    }
    print(json.dumps(out, indent=1))
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "incremental.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
