"""Before/after, side by side: the load, drift and scoring figures of an older checkout and of this tree.

    mkdir /tmp/before && git archive c62f408 | tar -x -C /tmp/before   # or: git worktree add /tmp/before c62f408
    .venv/bin/python bench/bench_before_after.py --before /tmp/before [--rounds 3] [--quick] [--no-scoring]

Each tree runs its own code: every measurement is a fresh subprocess of this interpreter (the current
.venv) with cwd and PYTHONPATH set to that tree, so the old layout (top-level `drift/`, `mlplatform.cli`,
...) and the new one (`mlplatform/drift/`, `tooling/`) are both measured as they are. Old and new alternate
in one run, round by round (old,new then new,old, ...), so both see the same machine noise:

(a) load: `python -c "import dagster"` (baseline) and a fresh process loading the tree's
    platform/definitions.py and accessing `defs` (what a code-location server does; as
    bench/bench_foundation.py measures it); load ratio = median load / median import, per tree.
(b) drift: DriftEngine fit + calculate on the car-loan data (analysis resampled to N rows, chunks of 5000,
    as bench/bench_drift_before_after.py does), timed inside the process after an untimed warm-up; the
    engine is imported from the tree's own layout. Both trees must return the same result table.
(c) scoring: the tree's own bench/bench_scoring.py in a short mode (--sizes R --reps K; it starts a
    private lakeFS and MLflow store itself); its platform/bare ratios per tree.

Prints old vs new medians and new/old ratios; writes JSON to bench/results/before_after.json (git-ignored).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "before_after.json"

IMPORT_DAGSTER = "import dagster"

# What a code-location server does at start: import the definitions file and access `defs`.
LOAD_DEFS = r"""
import importlib.util, json, os, sys, time
t0 = time.perf_counter()
import dagster as dg
t1 = time.perf_counter()
spec = importlib.util.spec_from_file_location("mlp_code_location", "platform/definitions.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
defs = module.defs
assert isinstance(defs, dg.Definitions), type(defs)
t2 = time.perf_counter()
assert sys.modules["assets"].__file__.startswith(os.getcwd()), sys.modules["assets"].__file__  # this tree's code
print(json.dumps({"import_dagster_s": t1 - t0, "exec_definitions_s": t2 - t1,
                  "n_assets": len(defs.resolve_asset_graph().get_all_asset_keys())}))
"""

# One tree's drift engine on the car-loan data; argv: engine module, workload names (JSON), inner repeats.
DRIFT = r"""
import hashlib, importlib, json, os, statistics, sys, time, warnings
import numpy as np
import polars as pl
warnings.simplefilter("ignore")
engine = importlib.import_module(sys.argv[1])
assert engine.__file__.startswith(os.getcwd()), engine.__file__  # this tree's engine, not another copy
names, inner = json.loads(sys.argv[2]), int(sys.argv[3])
import nannyml as nml
reference, analysis, _ = nml.load_synthetic_car_loan_dataset()
def to_pl(df):
    return pl.from_pandas(df).with_columns(pl.col("timestamp").str.to_datetime())
ref, ana = to_pl(reference), to_pl(analysis)
def resample(n, frame):
    return frame[np.sort(np.random.default_rng(0).integers(0, frame.height, n))]
CONT = ["car_value", "debt_to_income_ratio", "loan_length", "driver_tenure"]
CAT = ["salary_range", "size_of_downpayment", "repaid_loan_on_prev_car"]
METHODS = ("ks", "jensen_shannon", "wasserstein", "hellinger", "chi2", "l_infinity")
size = engine.ChunkSpec(kind="size", size=5000, timestamp_column="timestamp")
workloads = {
    "eager 100k rows, 20 chunks": lambda: (ref, resample(100_000, ana), {}),
    "eager 1M rows, 200 chunks": lambda: (ref, resample(1_000_000, ana), {}),
    "eager 1M, ks_p_value=asymptotic": lambda: (ref, resample(1_000_000, ana), {"ks_p_value": "asymptotic"}),
    "exact-KS path: ref 9000, 50k rows": lambda: (ref.head(9000), resample(100_000, ana).head(50_000), {}),
}
out = {}
for name in names:
    r, a, options = workloads[name]()
    def once():
        eng = engine.DriftEngine(continuous=CONT, categorical=CAT, methods=METHODS, **options)
        t0 = time.perf_counter()
        eng.fit(r, size)
        result = eng.calculate(a, size)
        return time.perf_counter() - t0, result
    once()  # warm-up: imports, polars thread pool, page cache
    times, result = [], None
    for _ in range(inner):
        t, result = once()
        times.append(t)
    digest = hashlib.sha256(result.write_ipc(None, compression="uncompressed").getvalue()).hexdigest()[:16]
    out[name] = {"s": statistics.median(times), "samples_s": times, "rows_out": result.height, "digest": digest}
print(json.dumps(out))
"""

DRIFT_WORKLOADS = ["eager 100k rows, 20 chunks", "eager 1M rows, 200 chunks", "eager 1M, ks_p_value=asymptotic",
                   "exact-KS path: ref 9000, 50k rows"]
DRIFT_QUICK = ["eager 100k rows, 20 chunks", "exact-KS path: ref 9000, 50k rows"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Tree:
    """A checkout measured with its own code: cwd and PYTHONPATH point at it, state goes to a temp folder."""

    def __init__(self, label: str, root: Path, scratch: Path):
        self.label, self.root = label, root.resolve()
        if not (self.root / "platform" / "definitions.py").exists():
            raise SystemExit(f"{self.root}: no platform/definitions.py; is it a checkout of this repository?")
        if (self.root / "mlplatform" / "drift" / "engine.py").exists():
            self.drift_module = "mlplatform.drift.engine"  # the library layout
        elif (self.root / "drift" / "engine.py").exists():
            self.drift_module = "drift.engine"  # before the library: a top-level drift package
        else:
            raise SystemExit(f"{self.root}: neither mlplatform/drift/engine.py nor drift/engine.py")
        state = scratch / label
        (state / "dagster_home").mkdir(parents=True)
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("LAKEFS_", "MLFLOW_", "MLP_", "DAGSTER_", "PYTHON"))}
        self.env.update({
            "PYTHONPATH": str(self.root), "MLP_STATE_DIR": str(state), "DAGSTER_HOME": str(state / "dagster_home"),
            # Any values suffice for loading: EnvVar is only resolved at run time.
            "LAKEFS_ENDPOINT": "http://127.0.0.1:1", "LAKEFS_ACCESS_KEY_ID": "bench",
            "LAKEFS_SECRET_ACCESS_KEY": "bench", "MLFLOW_TRACKING_URI": f"sqlite:///{state / 'mlflow.db'}",
            "NML_DISABLE_USAGE_LOGGING": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
            "DAGSTER_DISABLE_TELEMETRY": "1"})

    def run(self, args: list[str], timeout: float = 1800) -> tuple[float, str]:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, *args], cwd=self.root, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{self.label} ({self.root}): {' '.join(args)[:200]} failed ({proc.returncode}):\n"
                               f"{proc.stderr[-3000:]}")
        return elapsed, proc.stdout

    def head(self) -> str:
        """The commit checked out, or the folder's name for an exported copy (`git archive REV | tar -x`)."""
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=self.root, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else self.root.name

    def lakefs_binary(self) -> Path | None:
        """The lakeFS server this tree's services start (its pinned version under .bin), if it is built."""
        gomod = self.root / "platform" / "lakefs" / "go.mod"
        match = re.search(r"github\.com/treeverse/lakefs (v[\d.]+)", gomod.read_text()) if gomod.exists() else None
        return self.root / ".bin" / f"lakefs-{match.group(1)}" if match else None


def share_lakefs_binary(before: Tree, after: Tree) -> str | None:
    """The older checkout has no .bin of its own: point it at this tree's, when the pinned versions agree.
    Returns why scoring cannot run, or None. Never builds lakeFS (that takes ~10 min on 2 cores)."""
    want, have = before.lakefs_binary(), after.lakefs_binary()
    if want is None or have is None:
        return "no lakeFS version pinned in platform/lakefs/go.mod"
    if want.exists():
        return None
    if want.name != have.name or not have.exists():
        return f"{want} is not built (and {have.name} here is {'another version' if have.exists() else 'missing'})"
    if (before.root / ".bin").exists() or (before.root / ".bin").is_symlink():
        return f"{want} is missing and {before.root / '.bin'} exists"
    (before.root / ".bin").symlink_to(have.parent.resolve(), target_is_directory=True)
    log(f"{before.root / '.bin'} -> {have.parent.resolve()} (the same lakeFS {have.name})")
    return None


def measure_load(tree: Tree) -> dict:
    t_import, _ = tree.run(["-c", IMPORT_DAGSTER])
    t_load, out = tree.run(["-c", LOAD_DEFS])
    inner = json.loads(out.strip().splitlines()[-1])
    return {"import_dagster_s": t_import, "load_definitions_s": t_load, **inner}


def measure_drift(tree: Tree, workloads: list[str], inner: int) -> dict:
    _, out = tree.run(["-c", DRIFT, tree.drift_module, json.dumps(workloads), str(inner)])
    return json.loads(out.strip().splitlines()[-1])


def measure_scoring(tree: Tree, rows: int, reps: int, scratch: Path) -> dict:
    out = scratch / f"scoring_{tree.label}_{time.time_ns()}.json"
    tree.run(["bench/bench_scoring.py", "--sizes", str(rows), "--reps", str(reps), "--out", str(out)])
    report = json.loads(out.read_text())
    (size,) = report["sizes"]
    return {"median_s": size["median_s"], "model": report.get("model"),
            "platform_functions_breakdown_median_s": size.get("platform_functions_breakdown_median_s"),
            "ratio_platform_functions_vs_bare": size["ratio_platform_functions_vs_bare"],
            "ratio_asset_vs_bare": size["ratio_asset_vs_bare"], "same_predictions": size.get("same_predictions")}


def med(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="an older checkout (e.g. git worktree add /tmp/before c62f408)")
    ap.add_argument("--after", default=str(ROOT), help="the newer checkout (default: this tree)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (old,new / new,old ...)")
    ap.add_argument("--quick", action="store_true", help="two small drift workloads and 20k scoring rows")
    ap.add_argument("--drift-inner", type=int, default=1, help="timed drift repeats inside each process")
    ap.add_argument("--scoring-rows", type=int, default=50000)
    ap.add_argument("--scoring-reps", type=int, default=3,
                    help="repetitions inside each bench_scoring run (1 gives single samples: ratios off by ~50%%)")
    ap.add_argument("--no-scoring", action="store_true", help="skip (c); it trains a model per tree and round")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    t_start, loadavg = time.perf_counter(), os.getloadavg()
    workloads = DRIFT_QUICK if args.quick else DRIFT_WORKLOADS
    scoring_rows = min(args.scoring_rows, 20000) if args.quick else args.scoring_rows

    scratch = Path(tempfile.mkdtemp(prefix="bench_before_after_"))
    trees = {"old": Tree("old", Path(args.before), scratch), "new": Tree("new", Path(args.after), scratch)}
    if trees["old"].root == trees["new"].root:
        raise SystemExit("--before and --after are the same tree")
    for t in trees.values():
        log(f"{t.label}: {t.root} at {t.head()}, drift engine {t.drift_module}")
    no_scoring = "switched off (--no-scoring)" if args.no_scoring else share_lakefs_binary(trees["old"], trees["new"])
    if no_scoring:
        log(f"scoring not measured: {no_scoring}")

    for t in trees.values():  # untimed warm-up of each: page cache, .pyc files, dbt manifest of the old tree
        measure_load(t)
    samples = {k: {"load": [], "drift": [], "scoring": []} for k in trees}
    for i in range(args.rounds):
        order = ["old", "new"] if i % 2 == 0 else ["new", "old"]
        for k in order:
            samples[k]["load"].append(measure_load(trees[k]))
        log(f"round {i + 1}/{args.rounds} load: " + ", ".join(
            f"{k} import {samples[k]['load'][-1]['import_dagster_s']:.2f}s "
            f"defs {samples[k]['load'][-1]['load_definitions_s']:.2f}s" for k in order))
        for k in order:
            samples[k]["drift"].append(measure_drift(trees[k], workloads, args.drift_inner))
        log(f"round {i + 1}/{args.rounds} drift: " + ", ".join(
            f"{k} " + "/".join(f"{v['s']:.2f}" for v in samples[k]["drift"][-1].values()) + "s" for k in order))
        if not no_scoring:
            for k in order:
                samples[k]["scoring"].append(measure_scoring(trees[k], scoring_rows, args.scoring_reps, scratch))
            log(f"round {i + 1}/{args.rounds} scoring: " + ", ".join(
                f"{k} platform/bare {samples[k]['scoring'][-1]['ratio_platform_functions_vs_bare']:.2f}"
                for k in order))

    summary: dict = {"load": {}, "drift": {}, "scoring": {}}
    for k in trees:
        loads = samples[k]["load"]
        imp, dfn = med([s["import_dagster_s"] for s in loads]), med([s["load_definitions_s"] for s in loads])
        summary["load"][k] = {"import_dagster_s": imp, "load_definitions_s": dfn, "load_ratio": dfn / imp,
                              "n_assets": loads[-1]["n_assets"]}
    for name in workloads:
        row = {k: med([s[name]["s"] for s in samples[k]["drift"]]) for k in trees}
        digests = {k: {s[name]["digest"] for s in samples[k]["drift"]} for k in trees}
        row["identical"] = len(digests["old"] | digests["new"]) == 1
        row["rows_out"] = samples["new"]["drift"][-1][name]["rows_out"]
        summary["drift"][name] = row
    if not no_scoring:
        for k in trees:
            sc = samples[k]["scoring"]
            summary["scoring"][k] = {
                "ratio_platform_functions_vs_bare": med([s["ratio_platform_functions_vs_bare"] for s in sc]),
                "ratio_asset_vs_bare": med([s["ratio_asset_vs_bare"] for s in sc]),
                **{f"{p}_s": med([s["median_s"][p] for s in sc])
                   for p in ("bare_predict", "platform_functions", "batch_predictions_asset")}}

    def line(name: str, old: float, new: float, unit: str = "") -> str:
        return f"  {name:<44}{old:>10.3f}{unit:<2}{new:>10.3f}{unit:<2}{new / old:>9.3f}"

    print(f"\nBefore/after: old {trees['old'].head()} ({trees['old'].root}) vs new {trees['new'].head()} "
          f"({trees['new'].root}); {args.rounds} alternating rounds, medians; load average at start "
          f"{loadavg[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"  {'figure':<44}{'old':>12}{'new':>12}{'new/old':>9}")
    L = summary["load"]
    print(line("load: import dagster", L["old"]["import_dagster_s"], L["new"]["import_dagster_s"], "s"))
    print(line("load: definitions (fresh process)", L["old"]["load_definitions_s"], L["new"]["load_definitions_s"],
               "s"))
    print(line("load ratio (definitions / import dagster)", L["old"]["load_ratio"], L["new"]["load_ratio"]))
    for name, row in summary["drift"].items():
        print(line(f"drift: {name}", row["old"], row["new"], "s")
              + ("" if row["identical"] else "   RESULTS DIFFER"))
    if summary["scoring"]:
        S = summary["scoring"]
        print(line(f"scoring {scoring_rows} rows: bare predict", S["old"]["bare_predict_s"],
                   S["new"]["bare_predict_s"], "s"))
        print(line("scoring: platform functions", S["old"]["platform_functions_s"], S["new"]["platform_functions_s"],
                   "s"))
        print(line("scoring: batch_predictions asset", S["old"]["batch_predictions_asset_s"],
                   S["new"]["batch_predictions_asset_s"], "s"))
        print(line("scoring ratio (bare / platform functions)", S["old"]["ratio_platform_functions_vs_bare"],
                   S["new"]["ratio_platform_functions_vs_bare"]))
        print(line("scoring ratio (bare / asset)", S["old"]["ratio_asset_vs_bare"], S["new"]["ratio_asset_vs_bare"]))
    else:
        print(f"  scoring not measured: {no_scoring}")

    result = {
        "meta": {"timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                 "trees": {k: {"root": str(t.root), "head": t.head(), "drift_module": t.drift_module}
                           for k, t in trees.items()},
                 "python": sys.executable, "cpus": os.cpu_count(), "loadavg_at_start": loadavg,
                 "args": vars(args), "total_s": time.perf_counter() - t_start,
                 "scoring_skipped": no_scoring},
        "summary": summary,
        "samples": samples,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"  written to {out}")
    if any(not row["identical"] for row in summary["drift"].values()):
        raise SystemExit("the old and new drift engines disagree on at least one workload")


if __name__ == "__main__":
    main()
