"""The demo's compute as one plain script: no Dagster, no dbt, no lakeFS, no MLflow.

Issue 11: "`make demo`: at most 5x a plain script doing the same compute, shipped as bench/bare_pipeline.py
and run side by side". This is that plain script. It does what `make demo` computes for the same data (the
car_loan spec, the first `--batches` production batches the simulator releases, their due labels):

  ingest     the reference and each batch conformed and checked against the data contract (mlplatform.contracts)
  features   the feature SQL of the dbt model (mlplatform.features.feature_sql) in DuckDB, history and batches;
             the labels staged with their availability time (event time + label delay), as stg_*labels do
  training   point-in-time examples, the time split, LightGBM with the platform's parameters, test metrics and
             slice metrics (what evaluation_report computes)
  per batch  scoring, the drift engine + NannyML's multivariate drift (drift_report), NannyML CBPE
             (performance_estimate), data quality, and the realized metric where labels are in

It prints its own wall time (imports included) as JSON. `--compare` runs `make demo` twice on a private state
folder and lakeFS port (cold: services start on a new state; then warm, which the ratio uses), then this script,
in one go, and prints the ratio of the warm demo to this script.

    .venv/bin/python bench/bare_pipeline.py [--batches 4]
    .venv/bin/python bench/bare_pipeline.py --compare [--batches 4]
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")


def bare(batches: int) -> dict:
    import datetime as dt

    import duckdb
    import numpy as np
    import polars as pl

    from mlplatform import contracts, modeling
    from mlplatform.batches import window
    from mlplatform.drift.engine import ChunkSpec, DriftEngine
    from mlplatform.features import feature_sql
    from mlplatform.spec import load_spec

    stages: dict[str, float] = {}
    t = time.perf_counter()
    stages["imports"] = t - T0
    spec = load_spec(ROOT / "platform" / "datasets" / "car_loan.yaml")

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        stages[name] = stages.get(name, 0.0) + now - t
        t = now

    # --- ingest: the reference and the released batches, conformed and checked ----------------------------
    reference, production, labels = spec.load_source()
    ref = contracts.conform(pl.from_pandas(reference), spec, "reference", with_target=True)
    problems = contracts.check_records(ref.drop(spec.target), spec, None)
    prod = contracts.conform(pl.from_pandas(production), spec, "production")
    lab = pl.from_pandas(labels).select(spec.id_column, spec.target)
    keys = [k for k in _batches_with_rows(spec, prod)][:batches]
    released = {}
    for key in keys:
        start, end = window(spec, key)
        df = prod.filter((pl.col(spec.time_column) >= start) & (pl.col(spec.time_column) < end))
        problems += contracts.check_records(df, spec, (start, end))
        released[key] = df
    last_end = window(spec, keys[-1])[1]
    due = [k for k in keys if window(spec, k)[1] + dt.timedelta(days=spec.label_delay_days) <= last_end]
    lap("ingest")

    # --- features (the dbt models' SQL) and staged labels --------------------------------------------------
    con = duckdb.connect()
    con.register("ref", ref.to_arrow())
    ref_features = con.execute(feature_sql(spec, "ref")).pl()
    batch_features = {}
    for key, df in released.items():
        con.register("batch", df.to_arrow())
        batch_features[key] = con.execute(feature_sql(spec, "batch")).pl()
    con.close()
    delay = pl.duration(days=spec.label_delay_days)
    ref_labels = ref.select(spec.id_column, pl.col(spec.target).alias("label"),
                            (pl.col(spec.time_column) + delay).alias("label_available_at"))
    batch_labels = {}
    for key in due:
        df = released[key].join(lab, on=spec.id_column, how="inner")
        batch_labels[key] = df.select(spec.id_column, pl.col(spec.target).cast(pl.Float64).alias("label"),
                                      (pl.col(spec.time_column) + delay).alias("label_available_at"))
    lap("features")

    # --- training and evaluation ---------------------------------------------------------------------------
    features = pl.concat([ref_features, *[batch_features[k] for k in due]], how="diagonal_relaxed")
    all_labels = pl.concat([ref_labels, *batch_labels.values()], how="diagonal_relaxed")
    cutoff = max(features[spec.time_column].max(), *[f[spec.time_column].max() for f in batch_features.values()])
    examples = modeling.point_in_time_examples(features, all_labels, spec, cutoff)
    ts = modeling.time_split(examples, spec)
    params = modeling.lgb_params(spec, {"learning_rate": 0.05, "num_leaves": 31}, 42)
    trained = modeling.train(ts, spec, params, 400, 30)
    test = ts.filter(pl.col("split") == "test")
    p_test = modeling.predict(trained.booster, test, spec)
    test_metrics = modeling.metrics(test[spec.target].to_numpy(), p_test, spec)
    slices = modeling.slice_metrics(test, p_test, spec)
    lap("training")

    # --- per batch: scoring, drift, estimate, quality, realized --------------------------------------------
    import nannyml as nml

    cont = [f.name for f in spec.features if f.type == "numeric"] + [f.name for f in spec.engineered_features]
    cat = [f.name for f in spec.features if f.type in ("categorical", "boolean")]
    mon = spec.monitoring
    engine = DriftEngine(continuous=cont, categorical=cat, methods=mon.drift_methods, psi_bins=mon.psi_bins,
                         min_chunk_rows=mon.min_chunk_rows, threshold="std", std_multiplier=mon.std_multiplier)
    engine.fit(ref_features, ChunkSpec(kind="size", size=max(mon.reference_chunk_rows, engine.min_chunk_rows)))
    reference_scored = test.select(spec.time_column, spec.target).with_columns(pl.Series("prediction", p_test))
    out_batches = {}
    for key, feats in batch_features.items():
        pred = modeling.predict(trained.booster, feats, spec)
        drift = engine.summary(engine.calculate(feats, ChunkSpec(kind="count", count=1)))
        cols = [f.name for f in spec.features]
        r = ref_features.select(spec.time_column, *cols).to_pandas()
        a = feats.select(spec.time_column, *cols).to_pandas()
        for c in cat:
            r[c], a[c] = r[c].astype(str), a[c].astype(str)
        mv = nml.DataReconstructionDriftCalculator(column_names=cols, timestamp_column_name=spec.time_column,
                                                   chunk_size=max(len(a), 2))
        mv.fit(r)
        mv_err = float(mv.calculate(a).filter(period="analysis").to_df()["reconstruction_error"]["value"].mean())
        rr = reference_scored.to_pandas()
        rr["y_pred"] = (rr["prediction"] >= 0.5).astype(int)
        aa = feats.select(spec.time_column).with_columns(pl.Series("prediction", pred)).to_pandas()
        aa["y_pred"] = (aa["prediction"] >= 0.5).astype(int)
        est = nml.CBPE(y_pred_proba="prediction", y_pred="y_pred", y_true=spec.target,
                       timestamp_column_name=spec.time_column, metrics=[spec.estimated_metric],
                       chunk_size=max(len(aa), 2), problem_type="classification_binary")
        est.fit(rr)
        estimated = float(est.estimate(aa).filter(period="analysis").to_df()[spec.estimated_metric]["value"].iloc[0])
        missing = {c: int(feats[c].null_count()) for c in cols}
        realized = None
        if key in batch_labels:
            joined = feats.select(spec.id_column).with_columns(pl.Series("prediction", pred)).join(
                batch_labels[key], on=spec.id_column)
            realized = modeling.metrics(joined["label"].to_numpy(), joined["prediction"].to_numpy(), spec)
        out_batches[key] = {"rows": feats.height, "mean_prediction": float(np.mean(pred)),
                            "drift_alerts": drift.get("alerting_features"), "multivariate_error": mv_err,
                            "estimated": estimated, "realized": realized and realized[spec.estimated_metric],
                            "missing": sum(missing.values())}
    lap("per_batch")
    return {"seconds": round(time.perf_counter() - T0, 2), "stages": {k: round(v, 2) for k, v in stages.items()},
            "batches": list(released), "labelled": due, "contract_problems": len(problems),
            "test_metrics": test_metrics, "slices": len(slices), "best_iteration": trained.best_iteration,
            "per_batch": out_batches}


def _batches_with_rows(spec, prod):
    import polars as pl

    from mlplatform.batches import partition_keys, window

    tmin, tmax = prod[spec.time_column].min(), prod[spec.time_column].max()
    for key in partition_keys(spec):
        start, end = window(spec, key)
        if end > tmin and start <= tmax and prod.filter(
                (pl.col(spec.time_column) >= start) & (pl.col(spec.time_column) < end)).height:
            yield key


def compare(batches: int) -> dict:
    """`make demo` on a private state folder and lakeFS port (cold, as a new user runs it), then this script."""
    sys.path.insert(0, str(ROOT / "bench"))
    from common import log
    from tooling.services import free_port

    state = Path(tempfile.mkdtemp(prefix="bench-demo-"))
    env = {**os.environ, "MLP_STATE_DIR": str(state / "state"), "MLP_LAKEFS_PORT": str(free_port())}
    if batches != 4:
        raise SystemExit("make demo releases 4 batches; compare with --batches 4")
    try:
        times = []
        for attempt in ("cold", "warm"):  # cold: services start and the state is new; warm: run again, as issue 11 did
            t = time.perf_counter()
            proc = subprocess.run(["make", "demo"], cwd=ROOT, env=env, capture_output=True, text=True)
            times.append(time.perf_counter() - t)
            if proc.returncode != 0:
                raise SystemExit(f"make demo failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            log(f"make demo ({attempt}): {times[-1]:.0f} s")
        cold_s, demo_s = times
        steps = [line.strip() for line in proc.stdout.splitlines() if line.strip().startswith(("ok in", "$"))]
    finally:
        subprocess.run(["make", "stop"], cwd=ROOT, env=env, capture_output=True)
        subprocess.run(["rm", "-rf", str(state)])
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--batches", str(batches)], cwd=ROOT, capture_output=True,
                          text=True)
    bare_s = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"bare pipeline failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout)
    log(f"bare pipeline: {bare_s:.0f} s")
    return {"make_demo_cold_s": round(cold_s, 1), "make_demo_s": round(demo_s, 1), "bare_pipeline_s": round(bare_s, 1),
            "ratio": round(demo_s / bare_s, 2), "target_ratio": 5.0, "bare_stages": result["stages"],
            "demo_steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--compare", action="store_true")
    args = ap.parse_args()
    if args.compare:
        out = compare(args.batches)
        results = ROOT / "bench" / "results"
        results.mkdir(exist_ok=True)
        (results / "demo_vs_bare.json").write_text(json.dumps(out, indent=1))
    else:
        out = bare(args.batches)
    print(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
