"""Benchmark: DriftEngine vs NannyML 0.13.1 UnivariateDriftCalculator, plus a 10M-row lazy run.

Run with ``.venv/bin/python bench/bench_drift.py`` (add ``--quick`` to skip the 1M NannyML run).
Production data = the car-loan analysis set resampled with replacement (numpy default_rng(0), identical
rows, no jitter; sampled row ids are sorted so the data stays in time order). Results go to stdout and to
bench/results/drift.json.
"""

from __future__ import annotations

import common  # noqa: F401 - first: the project on sys.path, telemetry off

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import polars as pl

from common import ROOT  # noqa: E402
from mlplatform.drift.engine import ChunkSpec, DriftEngine  # noqa: E402

CONTINUOUS = ["car_value", "debt_to_income_ratio", "loan_length", "driver_tenure"]
CATEGORICAL = ["salary_range", "size_of_downpayment", "repaid_loan_on_prev_car"]
CONT_METHODS = ["jensen_shannon", "wasserstein", "hellinger", "ks"]
CAT_METHODS = ["jensen_shannon", "hellinger", "l_infinity", "chi2"]
ENGINE_METHODS = ("ks", "jensen_shannon", "wasserstein", "hellinger", "chi2", "l_infinity")
CHUNK_SIZE = 5000
SPEC = ChunkSpec(kind="size", size=CHUNK_SIZE, timestamp_column="timestamp")
NML_NAME = {"ks": "kolmogorov_smirnov"}


def load():
    import nannyml as nml

    reference, analysis, _ = nml.load_synthetic_car_loan_dataset()
    return reference, analysis


def to_polars(df) -> pl.DataFrame:
    return pl.from_pandas(df).with_columns(pl.col("timestamp").str.to_datetime())


def resample_index(n: int, size: int) -> np.ndarray:
    return np.sort(np.random.default_rng(0).integers(0, size, n))


def run_engine(ref_pl, prod, ks_p_value="scipy"):
    t0 = time.perf_counter()
    engine = DriftEngine(continuous=CONTINUOUS, categorical=CATEGORICAL, methods=ENGINE_METHODS, ks_p_value=ks_p_value)
    engine.fit(ref_pl, SPEC)
    result = engine.calculate(prod, SPEC)
    return time.perf_counter() - t0, engine, result


def run_nannyml(ref_pd, prod_pd, cont_methods, cat_methods):
    import nannyml as nml
    from nannyml.thresholds import StandardDeviationThreshold

    thresholds = {m: StandardDeviationThreshold(3, 3) for m in ["jensen_shannon", "wasserstein", "hellinger", "l_infinity", "kolmogorov_smirnov"]}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calc = nml.UnivariateDriftCalculator(
            column_names=CONTINUOUS + CATEGORICAL,
            treat_as_categorical=["repaid_loan_on_prev_car"],
            continuous_methods=[NML_NAME.get(m, m) for m in cont_methods],
            categorical_methods=cat_methods,
            chunk_size=CHUNK_SIZE,
            timestamp_column_name="timestamp",
            thresholds=thresholds,
        ).fit(ref_pd)
        res = calc.calculate(prod_pd)
    return time.perf_counter() - t0, res.filter(period="analysis").data


def compare(result: pl.DataFrame, nml_data, cont_methods, cat_methods) -> dict:
    out = {}
    for kind, feats, methods in (("cont", CONTINUOUS, cont_methods), ("cat", CATEGORICAL, cat_methods)):
        for m in methods:
            diffs, alert_mismatch = [], 0
            for f in feats:
                ours = result.filter(feature=f, method=m).sort("chunk_index")
                theirs = nml_data[(f, NML_NAME.get(m, m), "value")].to_numpy(dtype=float)
                diffs.append(float(np.max(np.abs(ours["value"].to_numpy() - theirs))))
                alert_mismatch += int(np.sum(ours["alert"].to_numpy() != nml_data[(f, NML_NAME.get(m, m), "alert")].to_numpy(dtype=bool)))
            out[f"{kind}:{m}"] = {"max_abs_diff": max(diffs), "alert_mismatches": alert_mismatch}
    return out


def ks_vs_scipy(result: pl.DataFrame, ref_pl: pl.DataFrame, prod: pl.DataFrame, n_chunks: int = 5) -> float:
    from scipy.stats import ks_2samp

    worst = 0.0
    for f in CONTINUOUS:
        r = ref_pl[f].to_numpy()
        ours = result.filter(feature=f, method="ks").sort("chunk_index")["value"].to_numpy()
        for i in range(n_chunks):
            worst = max(worst, abs(ours[i] - ks_2samp(r, prod[f][i * CHUNK_SIZE:(i + 1) * CHUNK_SIZE].to_numpy()).statistic))
    return worst


def lazy_child(path: str) -> None:
    """Runs in a subprocess: fit on the reference, calculate on scan_parquet(path); prints JSON."""
    ref_pd, _ = load()
    ref_pl = to_polars(ref_pd)
    del ref_pd
    t0 = time.perf_counter()
    engine = DriftEngine(continuous=CONTINUOUS, categorical=CATEGORICAL, methods=ENGINE_METHODS)
    engine.fit(ref_pl, SPEC)
    result = engine.calculate(pl.scan_parquet(path), SPEC)
    elapsed = time.perf_counter() - t0
    summary = engine.summary(result)
    print(json.dumps({
        "seconds": elapsed,
        "chunks": len(summary["chunks"]),
        "rows_out": result.height,
        "n_alerts": summary["n_alerts"],
        "problems": summary["problems"],
        "self_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="skip NannyML at 1M rows")
    ap.add_argument("--lazy-child", help=argparse.SUPPRESS)
    ap.add_argument("--big", type=int, default=10_000_000)
    args = ap.parse_args()
    if args.lazy_child:
        lazy_child(args.lazy_child)
        return

    ref_pd, ana_pd = load()
    ref_pl, ana_pl = to_polars(ref_pd), to_polars(ana_pd)
    report: dict = {"chunk_size": CHUNK_SIZE, "continuous": CONTINUOUS, "categorical": CATEGORICAL,
                    "continuous_methods": CONT_METHODS, "categorical_methods": CAT_METHODS, "runs": []}
    rows = []
    for n in (100_000, 1_000_000):
        idx = resample_index(n, ana_pd.shape[0])
        prod_pl = ana_pl[idx]
        prod_pd = ana_pd.iloc[idx].reset_index(drop=True)
        t_engine, engine, result = run_engine(ref_pl, prod_pl)
        t_engine_lazy, _, _ = run_engine(ref_pl, prod_pl.lazy())
        t_fast, _, fast = run_engine(ref_pl, prod_pl, ks_p_value="asymptotic")
        fast_diff = float((fast["value"] - result["value"]).abs().max())
        note = ""
        if n >= 1_000_000 and args.quick:
            t_nml, cmp = None, {}
            note = "NannyML skipped (--quick)"
        else:
            t_nml, nml_data = run_nannyml(ref_pd, prod_pd, CONT_METHODS, CAT_METHODS)
            cmp = compare(result, nml_data, CONT_METHODS, CAT_METHODS)
        ks_scipy = ks_vs_scipy(result, ref_pl, prod_pl)
        equal_methods = {k: v for k, v in cmp.items() if not k.endswith(":ks")}
        max_diff = max((v["max_abs_diff"] for v in equal_methods.values()), default=None)
        mism = sum(v["alert_mismatches"] for v in equal_methods.values())
        run = {
            "rows": n, "chunks": n // CHUNK_SIZE, "engine_seconds": t_engine, "engine_lazy_seconds": t_engine_lazy,
            "engine_fast_ks_p_seconds": t_fast, "speedup_fast_ks_p": (t_nml / t_fast) if t_nml else None,
            "fast_ks_p_max_value_diff": fast_diff,
            "nannyml_seconds": t_nml, "speedup": (t_nml / t_engine) if t_nml else None,
            "max_abs_diff_vs_nannyml": max_diff, "alert_mismatches_vs_nannyml": mism,
            "ks_max_abs_diff_vs_nannyml_binned_estimate": cmp.get("cont:ks", {}).get("max_abs_diff"),
            "ks_max_abs_diff_vs_scipy": ks_scipy, "per_method": cmp, "note": note,
        }
        report["runs"].append(run)
        rows.append(run)
        print(f"  done {n:,} rows: engine {t_engine:.2f}s, nannyml {t_nml if t_nml is None else round(t_nml, 2)}s", flush=True)

    # 10M rows through the lazy path, in a subprocess so that its peak RSS can be measured.
    big = args.big
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "prod.parquet")
        t0 = time.perf_counter()
        ana_pl[resample_index(big, ana_pl.height)].write_parquet(path, row_group_size=500_000)
        t_write = time.perf_counter() - t0
        size_mb = os.path.getsize(path) / 2**20
        proc = subprocess.run([sys.executable, __file__, "--lazy-child", path], capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr)
            raise SystemExit("lazy child failed")
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        child["children_maxrss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        child.update({"rows": big, "parquet_mb": size_mb, "write_seconds": t_write})
        report["lazy_10m"] = child

    print()
    print(f"{'rows':>10} {'chunks':>7} {'engine s':>9} {'lazy s':>7} {'NannyML s':>10} {'speed-up':>9} {'fastP s':>8} {'speed-up':>9} "
          f"{'max|diff|':>10} {'alert≠':>7} {'KS vs scipy':>12} {'KS vs NML*':>11}")
    for r in rows:
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"{r['rows']:>10,} {r['chunks']:>7} {r['engine_seconds']:>9.2f} {r['engine_lazy_seconds']:>7.2f} "
              f"{fmt(r['nannyml_seconds'], '10.2f'):>10} {fmt(r['speedup'], '8.1f') + 'x':>9} "
              f"{r['engine_fast_ks_p_seconds']:>8.2f} {fmt(r['speedup_fast_ks_p'], '8.1f') + 'x':>9} "
              f"{fmt(r['max_abs_diff_vs_nannyml'], '10.1e'):>10} {r['alert_mismatches_vs_nannyml']:>7} "
              f"{r['ks_max_abs_diff_vs_scipy']:>12.1e} {fmt(r['ks_max_abs_diff_vs_nannyml_binned_estimate'], '11.1e'):>11}"
              + (f"  ({r['note']})" if r["note"] else ""))
    lz = report["lazy_10m"]
    print(f"{lz['rows']:>10,} {lz['chunks']:>7} lazy scan_parquet: {lz['seconds']:.2f}s, "
          f"peak RSS {lz['children_maxrss_mb']:.0f} MB (parquet {lz['parquet_mb']:.0f} MB), "
          f"{lz['n_alerts']} alerts, problems={lz['problems']}")
    print("methods: continuous jensen_shannon, wasserstein, hellinger, ks; categorical jensen_shannon, hellinger, "
          "l_infinity, chi2; times include fit on the 50k reference.")
    print("fastP = DriftEngine(ks_p_value='asymptotic'): KS p-value from kstwobign instead of scipy's exact kstwo "
          "(the default vectorised kstwo.sf now costs about the same); all values identical.")
    print("max|diff| / alert≠: all methods except ks. *NannyML's KS is a binned estimate for references >= 10k rows; "
          "the engine's KS is exact (checked against scipy.ks_2samp on 5 chunks per feature).")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "drift.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out / 'drift.json'}")


if __name__ == "__main__":
    main()
