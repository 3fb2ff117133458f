"""Scoring benchmark: batch_predictions throughput vs a bare Booster.predict on the same rows.

Issue: "scoring throughput of batch_predictions against a bare Booster.predict on the same rows,
goal >= 0.7 of it, reading and writing included".

Setup (untimed): a private lakeFS server in a temp dir, a temp MLflow sqlite store, a temp Dagster
instance. One model is trained and registered the platform's way (assets.training.train_and_register
on quick_training_set(spec, 50000)) and given the `champion` alias; no challenger (shadow scoring off).
The production rows (50k, resampled k times with fresh ids for the larger sizes, as the Simulator
does) go through the platform's feature SQL (mlplatform.features.online_features, the SQL of dbt's
`features` model), get origin='production' and their event times mapped into one batch period
(2018-11-01), so that one partition of batch_predictions holds all N rows. This features table is
materialized once as the asset `features` (written + committed to lakeFS by the I/O manager).

Per size, R repetitions interleaved A1,A2,B:
  A1 platform path (functions): lakefs.get(features parquet at its commit) + read_parquet + the
     batch filter + score_batch(champion, challenger=None) + serialize to parquet + put + commit.
  A2 the batch_predictions asset itself: dg.materialize(partition 2018-11-01), i.e. A1 plus the
     Dagster run, the MLflow alias lookup and champion load, the output metadata.
  B  bare: booster.predict(numpy float64 matrix, num_iteration=best_iteration), the matrix built
     from the same rows with modeling.feature_matrix outside the timer.
Rows/s = N / median seconds; ratio = platform rows/s / bare rows/s (goal >= 0.7).

    .venv/bin/python bench/bench_scoring.py [--sizes 50000 500000] [--reps 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform as _platform
import statistics
import subprocess
import time
from pathlib import Path

from common import QUIET, RESULTS, ROOT, car_loan, log, private_platform, quick_training_set

RESULTS = RESULTS / "bench_scoring.json"
PARTITION = "2018-11-01"


def production_features(spec, n_rows: int):
    """n_rows production feature rows (resampled copies with fresh ids), all inside batch PARTITION."""
    import polars as pl

    from mlplatform.batches import window
    from mlplatform.features import online_features

    _, production, _ = spec.load_source()
    df = pl.from_pandas(production)
    t = spec.time_column
    if df.schema[t] == pl.String:
        df = df.with_columns(pl.col(t).str.to_datetime(time_unit="us"))
    df = df.select(spec.raw_columns)
    n = df.height
    copies = -(-n_rows // n)
    df = pl.concat([df.with_columns(pl.col(spec.id_column) + i * 10 * n) for i in range(copies)]).head(n_rows)
    start, end = window(spec, PARTITION)
    tmin, tmax = df[t].min(), df[t].max()
    span = (tmax - tmin).total_seconds() or 1.0
    width = (end - start).total_seconds() - 1
    df = df.with_columns((pl.lit(start) + pl.duration(
        seconds=((pl.col(t) - pl.lit(tmin)).dt.total_seconds() * (width / span)).floor().cast(pl.Int64)
    )).cast(pl.Datetime("us")).alias(t))
    feats = online_features(df, spec).with_columns(pl.lit("production").alias("origin"))
    return feats.sort(t, spec.id_column)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[50000, 500000])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    t_start = time.perf_counter()

    import dagster as dg
    import polars as pl

    from assets.serving import build_serving, score_batch
    from assets.training import TrainConfig, train_and_register
    from mlplatform import modeling, registry
    from mlplatform.batches import window
    from tooling.services import lakefs_version
    from resources.io import serialize

    spec = car_loan()
    results = []
    with private_platform("bench_scoring_") as bench:
        resources, lakefs, mlflow = bench.resources, bench.lakefs, bench.mlflow

        log("training + registering the champion (untimed)")
        ts = quick_training_set(spec, n=50000)
        reg = train_and_register(spec, ts, TrainConfig(), mlflow, lakefs, "unknown", "bench-scoring", "bench",
                                 audit=resources["audit"])
        registry.set_alias(mlflow, registry.CHAMPION, reg["version"])
        champion = registry.load_booster(mlflow, reg["version"])
        best_it = champion.best_iteration or None
        log(f"champion v{reg['version']}: best_iteration {reg['best_iteration']} (loaded booster: "
            f"{champion.num_trees()} trees, best_iteration {champion.best_iteration})")
        start, end = window(spec, PARTITION)
        out_branch = "bench-scoring-out"
        lakefs.ensure_branch(out_branch)

        with dg.instance_for_test(temp_dir=str(bench.dagster_home)) as instance:
            for n_rows in args.sizes:
                feats = production_features(spec, n_rows)
                x = modeling.feature_matrix(feats, spec).to_numpy()

                @dg.asset(name="features", key_prefix=[spec.name])
                def features_stub():
                    return feats

                assets = [features_stub, *build_serving(spec)]
                r = dg.materialize(assets, selection=[dg.AssetKey([spec.name, "features"])], instance=instance, resources=resources,
                                   run_config=QUIET)
                assert r.success
                md = r.asset_materializations_for_node(f"{spec.name}__features")[0].metadata
                fcommit = md["lakefs_commit"].value
                fpath = f"assets/{spec.name}/features/data.parquet"
                fbytes = md["bytes"].value
                log(f"{n_rows} rows: features materialized ({fbytes / 1e6:.1f} MB parquet, commit {fcommit[:12]})")

                def platform_fn() -> dict:
                    t0 = time.perf_counter()
                    df = pl.read_parquet(io.BytesIO(lakefs.get(fcommit, fpath)))
                    t1 = time.perf_counter()
                    batch = df.filter((pl.col(spec.time_column) >= start) & (pl.col(spec.time_column) < end)
                                      & (pl.col("origin") == "production"))
                    out = score_batch(batch, spec, champion, reg["version"], None, None, fcommit)
                    t2 = time.perf_counter()
                    data, _, ctype = serialize(out)
                    lakefs.put(out_branch, f"assets/{spec.name}/batch_predictions/partition={PARTITION}/data.parquet", data,
                               ctype)
                    lakefs.commit(out_branch, f"batch_predictions [{PARTITION}] (bench)")
                    t3 = time.perf_counter()
                    assert out.height == n_rows, out.height
                    return {"s": t3 - t0, "read_s": t1 - t0, "score_batch_s": t2 - t1, "write_commit_s": t3 - t2,
                            "mean_prediction": float(out["prediction"].mean())}

                def asset_fn() -> dict:
                    t0 = time.perf_counter()
                    res = dg.materialize(assets, selection=[dg.AssetKey([spec.name, "batch_predictions"])], partition_key=PARTITION,
                                         instance=instance, resources=resources, run_config=QUIET)
                    s = time.perf_counter() - t0
                    assert res.success
                    m = res.asset_materializations_for_node(f"{spec.name}__batch_predictions")[0].metadata
                    assert m["rows"].value == n_rows
                    return {"s": s, "mean_prediction": m["mean_prediction"].value}

                def bare_fn() -> dict:
                    t0 = time.perf_counter()
                    p = champion.predict(x, num_iteration=best_it)
                    return {"s": time.perf_counter() - t0, "mean_prediction": float(p.mean())}

                log("warm-up (untimed)")
                platform_fn(), asset_fn(), bare_fn()
                samples = {"platform_functions": [], "batch_predictions_asset": [], "bare_predict": []}
                for i in range(args.reps):
                    samples["platform_functions"].append(platform_fn())
                    samples["batch_predictions_asset"].append(asset_fn())
                    samples["bare_predict"].append(bare_fn())
                    log(f"{n_rows} rows rep {i + 1}: " + ", ".join(f"{k} {v[-1]['s']:.2f}s"
                                                                   for k, v in samples.items()))
                med = {k: statistics.median(x["s"] for x in v) for k, v in samples.items()}
                parts = {k: statistics.median(x[k] for x in samples["platform_functions"])
                         for k in ("read_s", "score_batch_s", "write_commit_s")}
                means = {k: v[0]["mean_prediction"] for k, v in samples.items()}
                same = max(means.values()) - min(means.values()) < 1e-9
                results.append({
                    "rows": n_rows, "features_parquet_bytes": fbytes, "median_s": med,
                    "rows_per_s": {k: n_rows / v for k, v in med.items()},
                    "ratio_platform_functions_vs_bare": med["bare_predict"] / med["platform_functions"],
                    "ratio_asset_vs_bare": med["bare_predict"] / med["batch_predictions_asset"],
                    "platform_functions_breakdown_median_s": parts,
                    "same_predictions": same, "mean_prediction": means, "samples": samples,
                })

    goal = 0.7
    result = {
        "meta": {"timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                 "git_head": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True).stdout.strip(),
                 "python": _platform.python_version(), "cpus": os.cpu_count(), "lakefs_version": lakefs_version(),
                 "args": vars(args), "total_s": time.perf_counter() - t_start},
        "model": {"version": reg["version"], "best_iteration": reg["best_iteration"],
                  "trees_in_loaded_booster": champion.num_trees(), "num_threads": reg["params"]["num_threads"]},
        "goal_ratio": goal,
        "sizes": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))

    print(f"\nScoring throughput (median of {args.reps}, interleaved; champion only, best_iteration "
          f"{reg['best_iteration']}, num_threads {reg['params']['num_threads']}); goal: platform >= {goal} x bare")
    hdr = f"  {'rows':>8}  {'path':<44}{'median':>9}{'rows/s':>12}{'vs bare':>9}"
    print(hdr)
    labels = {"bare_predict": "bare Booster.predict(numpy)",
              "platform_functions": "platform: lakeFS read+score_batch+write+commit",
              "batch_predictions_asset": "batch_predictions asset (dg.materialize)"}
    for r in results:
        for k in ("bare_predict", "platform_functions", "batch_predictions_asset"):
            ratio = r["median_s"]["bare_predict"] / r["median_s"][k]
            flag = "" if k == "bare_predict" else ("  MET" if ratio >= goal else "  NOT MET")
            print(f"  {r['rows']:>8}  {labels[k]:<44}{r['median_s'][k]:>8.2f}s{r['rows_per_s'][k]:>12,.0f}"
                  f"{ratio:>9.2f}{flag}")
        p = r["platform_functions_breakdown_median_s"]
        print(f"  {'':>8}    breakdown: read {p['read_s']:.2f}s, score_batch {p['score_batch_s']:.2f}s, "
              f"write+commit {p['write_commit_s']:.2f}s; same predictions: {r['same_predictions']}")
    print(f"  written to {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
