"""Side by side: the current drift engine vs an earlier copy of it, same data, same process.

    .venv/bin/python bench/bench_drift_before_after.py --before /tmp/drift_before [--repeats 5] [--only SUBSTRING]

``--before`` is a directory holding the earlier engine as an importable package named ``drift_before``
(e.g. ``git show <rev>:drift/engine.py`` saved as ``<dir>/drift_before/engine.py`` with an
``__init__.py``; the copy is not part of the repository). Every workload is fit + calculate on the
car-loan data of ``bench_drift.py`` (analysis resampled to N rows, chunks of 5000). Old and new runs are
interleaved, alternating which goes first, and each is repeated; the table shows the median seconds and
the ratio new/old, and checks that both engines return the same result table (and the same reference
result). Exits non-zero if they differ.
"""

from __future__ import annotations

import common  # noqa: F401 - first: the project on sys.path, telemetry off

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

import polars as pl

from common import ROOT  # noqa: E402

from bench_drift import CATEGORICAL, CONTINUOUS, ENGINE_METHODS, SPEC, load, resample_index, to_polars  # noqa: E402


def workloads(ref_pl: pl.DataFrame, ana_pl: pl.DataFrame) -> list[tuple[str, pl.DataFrame, object, dict, object]]:
    """(name, reference, analysis, engine options, chunk spec) for the main uses of the engine."""
    prod_100k = ana_pl[resample_index(100_000, ana_pl.height)]
    prod_1m = ana_pl[resample_index(1_000_000, ana_pl.height)]
    return [
        ("eager 100k rows, 20 chunks", ref_pl, prod_100k, {}, SPEC),
        ("eager 1M rows, 200 chunks", ref_pl, prod_1m, {}, SPEC),
        ("lazy 1M rows (streaming)", ref_pl, prod_1m.lazy(), {}, SPEC),
        ("eager 1M, ks_p_value=asymptotic", ref_pl, prod_1m, {"ks_p_value": "asymptotic"}, SPEC),
        ("exact-KS path: ref 9000, 50k rows", ref_pl.head(9000), prod_100k.head(50_000), {}, SPEC),
        ("period 1mo chunks, 1M rows", ref_pl, prod_1m, {}, "period"),
    ]


def run(module, ref, ana, options: dict, spec):
    eng = module.DriftEngine(continuous=CONTINUOUS, categorical=CATEGORICAL, methods=ENGINE_METHODS, **options)
    if spec == "period":
        spec = module.ChunkSpec(kind="period", period="1mo", timestamp_column="timestamp")
    else:
        spec = module.ChunkSpec(kind=spec.kind, size=spec.size, timestamp_column=spec.timestamp_column)
    t0 = time.perf_counter()
    eng.fit(ref, spec)
    result = eng.calculate(ana, spec)
    return time.perf_counter() - t0, result, eng.reference_result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True, help="directory containing the package drift_before")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", default="", help="run only the workloads whose name contains this")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(args.before).resolve()))
    old = importlib.import_module("drift_before.engine")
    new = importlib.import_module("mlplatform.drift.engine")

    ref_pd, ana_pd = load()
    ref_pl, ana_pl = to_polars(ref_pd), to_polars(ana_pd)
    rows, all_same = [], True
    for name, ref, ana, options, spec in workloads(ref_pl, ana_pl):
        if args.only not in name:
            continue
        times = {"old": [], "new": []}
        same = True
        run(new, ref, ana, options, spec)  # warm-up (imports, polars thread pool)
        for i in range(args.repeats):
            if i % 2 == 0:  # alternate which engine goes first, so that neither always runs on a warmer cache
                t_old, r_old, ref_old = run(old, ref, ana, options, spec)
                t_new, r_new, ref_new = run(new, ref, ana, options, spec)
            else:
                t_new, r_new, ref_new = run(new, ref, ana, options, spec)
                t_old, r_old, ref_old = run(old, ref, ana, options, spec)
            times["old"].append(t_old)
            times["new"].append(t_new)
            same = same and r_old.equals(r_new) and ref_old.equals(ref_new)
        all_same = all_same and same
        t_old, t_new = statistics.median(times["old"]), statistics.median(times["new"])
        rows.append((name, t_old, t_new, t_new / t_old, same, r_new.height))
        print(f"  {name}: old {t_old:.3f}s new {t_new:.3f}s ratio {t_new / t_old:.3f} identical={same}", flush=True)
    print()
    print(f"{'workload':<38} {'old s':>7} {'new s':>7} {'new/old':>8} {'identical':>9} {'rows out':>9}")
    for name, t_old, t_new, ratio, same, n in rows:
        print(f"{name:<38} {t_old:>7.3f} {t_new:>7.3f} {ratio:>8.3f} {str(same):>9} {n:>9}")
    print(f"median of {args.repeats} interleaved runs each, alternating order (fit on the reference + calculate); "
          "identical = result and reference_result tables equal (DataFrame.equals)")
    if not all_same:
        raise SystemExit("the engines disagree on at least one workload")


if __name__ == "__main__":
    main()
