"""Pipeline benchmark: ingest + dbt + training set at scale 1 (the default data) and at scale 10.

Issue: "ingest + dbt + training set for the default data (100k rows), and for a 10x larger copy made
by resampling: time should grow at most linearly; record peak memory too".

Each scale runs in its own subprocess (this file with --child) against its own lakeFS server (temp
dir, free port), its own state folder (landing zone, DuckDB file) and its own temp Dagster instance:

  release     Simulator(spec, Landing, scale=k).release(all): every production batch, and every label
              file that is due (not a platform stage; reported for completeness)
  reference   materialize reference_data, publish the run into main
  ingest      per production batch: materialize raw_records (+ raw_labels where labels landed), publish
  dbt         materialize the history's dbt models, then each batch's partition of the batch models (dbt
              build on a per-run DuckDB reading lakeFS via the S3 gateway, then each model exported to
              lakeFS and committed), publishing each run
  training    materialize labelled_examples + training_set, publish

Scaling: production is scaled by the Simulator (scale=k: k resampled copies, fresh ids). The
reference (50k rows) is scaled too, by replacing DatasetSpec.load_source in the child process so
that it returns k copies of the reference with fresh ids (id + i*10*n, the Simulator's scheme; the
production and the labels are returned unchanged, the Simulator scales those). So scale 10 ingests
exactly 10x the rows of scale 1 (100k -> 1M). --no-scale-reference keeps the reference at 50k.

Memory: the child reports its own peak RSS (RUSAGE_SELF, after each stage) and the peak RSS of its
waited-for children (RUSAGE_CHILDREN: the dbt subprocess, which runs DuckDB); the parent reports
RUSAGE_CHILDREN over the whole child tree and the lakeFS server's VmHWM (peak RSS) per scale.

Repetitions are interleaved (1, 10, 1, 10, ...); medians reported.

    .venv/bin/python bench/bench_pipeline.py [--scales 1 10] [--reps 1]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform as _platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import QUIET, RESULTS, ROOT, car_loan, log, private_platform

RESULTS = RESULTS / "bench_pipeline.json"

STAGES = ("release", "reference", "ingest", "dbt", "training")


def maxrss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0  # Linux: KiB


# --- child: one scale ---------------------------------------------------------------------------------
def scale_reference(k: int) -> None:
    """Make DatasetSpec.load_source return k resampled copies of the reference (fresh ids)."""
    import pandas as pd

    from mlplatform.spec import DatasetSpec

    original = DatasetSpec.load_source

    def load_source(self):
        reference, production, labels = original(self)
        n = len(reference)
        copies = []
        for i in range(k):
            c = reference.copy()
            c[self.id_column] = c[self.id_column] + i * 10 * n
            copies.append(c)
        return pd.concat(copies, ignore_index=True), production, labels

    DatasetSpec.load_source = load_source


def child(args) -> None:
    import dagster as dg

    from assets.features import build_features
    from assets.ingestion import build_ingestion
    from assets.training import build_training
    from resources.environment import LAKEFS, Settings, build_resources
    from resources.publish import publish_run
    from tooling.simulator import Simulator

    # The parent's settings (its lakeFS server, repository and state folder), passed in the environment.
    settings = Settings.from_env().require(*LAKEFS)
    state = settings.state_dir
    if args.scale > 1 and args.scale_reference:
        scale_reference(args.scale)
    spec = car_loan()
    resources = build_resources(settings)
    lakefs = resources["lakefs"]
    ingestion = build_ingestion(spec)
    features = build_features(spec)
    training = build_training(spec)[:2]
    out = {"scale": args.scale, "stages": {}, "rows": {}}
    home = state / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)

    def stage(name: str, t0: float, **extra) -> None:
        out["stages"][name] = {"s": time.perf_counter() - t0, "self_peak_rss_mb": maxrss_mb(resource.RUSAGE_SELF),
                               "children_peak_rss_mb": maxrss_mb(resource.RUSAGE_CHILDREN), **extra}
        log(f"scale {args.scale}: {name} {out['stages'][name]['s']:.1f}s "
            f"(self peak {out['stages'][name]['self_peak_rss_mb']:.0f} MB)")

    def run(assets, selection, partition=None):
        r = dg.materialize(assets, selection=[dg.AssetKey([spec.name, a]) for a in selection], partition_key=partition,
                           instance=instance, resources=resources, raise_on_error=False, run_config=QUIET)
        if not r.success:
            failed = [f"{e.check_name}: {e.description}" for e in r.get_asset_check_evaluations() if not e.passed]
            raise RuntimeError(f"run {selection} [{partition}] failed: {failed or 'see log'}")
        pub = publish_run(instance, lakefs, r.run_id)
        if pub.status != "published":
            raise RuntimeError(f"publish of {selection} [{partition}]: {pub.status} {pub.detail}")
        return r

    with dg.instance_for_test(temp_dir=str(home)) as instance:
        t0 = time.perf_counter()
        sim = Simulator(spec, resources["landing"].zone(spec), scale=args.scale)
        rel = sim.release(10_000)
        stage("release", t0, batches=len(rel.records), label_batches=len(rel.labels))
        prod_rows = sim.production().height

        t0 = time.perf_counter()
        r = run(ingestion, ["reference_data"])
        ref_rows = r.asset_materializations_for_node(f"{spec.name}__reference_data")[0].metadata["rows"].value
        stage("reference", t0, rows=ref_rows)

        t0 = time.perf_counter()
        rec_rows = lab_rows = 0
        for key in rel.records:
            sel = ["raw_records", "raw_labels"] if key in rel.labels else ["raw_records"]
            r = run(ingestion, sel, key)
            rec_rows += r.asset_materializations_for_node(f"{spec.name}__raw_records")[0].metadata["rows"].value
            if key in rel.labels:
                lab_rows += r.asset_materializations_for_node(f"{spec.name}__raw_labels")[0].metadata["rows"].value
        stage("ingest", t0, rows=rec_rows, label_rows=lab_rows, runs=len(rel.records))

        t0 = time.perf_counter()
        # The history's models once, then each batch's models from its own partition (as the arrivals jobs do).
        dbt_rows: dict[str, int] = {}
        runs = [(["stg_reference_records", "stg_reference_labels", "reference_features"], None)]
        runs += [(["stg_records", "features"] + (["stg_labels"] if key in rel.labels else []), key)
                 for key in rel.records]
        for sel, key in runs:
            r = run(features, sel, key)
            for m in r.get_asset_materialization_events():
                name = m.asset_key.path[-1].replace("reference_", "")
                dbt_rows[name] = dbt_rows.get(name, 0) + m.materialization.metadata["dagster/row_count"].value
        stage("dbt", t0, rows=dbt_rows, runs=len(runs))

        t0 = time.perf_counter()
        r = run(training, ["labelled_examples", "training_set"])
        ts_md = r.asset_materializations_for_node(f"{spec.name}__training_set")[0].metadata
        ex_rows = r.asset_materializations_for_node(f"{spec.name}__labelled_examples")[0].metadata["rows"].value
        stage("training", t0, labelled_examples=ex_rows,
              training_set={s: ts_md[f"rows_{s}"].value for s in ("train", "validation", "test")})

    out["rows"] = {"reference": ref_rows, "production": prod_rows, "ingested_records": rec_rows,
                   "ingested_labels": lab_rows, "input_total": ref_rows + rec_rows, "features": dbt_rows.get("features"),
                   "labelled_examples": ex_rows}
    out["platform_s"] = sum(v["s"] for k, v in out["stages"].items() if k != "release")
    out["self_peak_rss_mb"] = maxrss_mb(resource.RUSAGE_SELF)
    out["children_peak_rss_mb"] = maxrss_mb(resource.RUSAGE_CHILDREN)
    Path(args.child_out).write_text(json.dumps(out, indent=1, default=str))


# --- parent -----------------------------------------------------------------------------------------------
def vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def run_scale(scale: int, scale_ref: bool, tmp_root: Path) -> dict:
    with private_platform(f"scale{scale}_", mlflow=False, export=False, tmp_root=tmp_root) as bench:
        (bench.tmp / "dbt-logs").mkdir()
        env = {**os.environ, **bench.env(), "DBT_LOG_PATH": str(bench.tmp / "dbt-logs"), "PYTHONPATH": str(ROOT)}
        child_out = bench.tmp / "child.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--scale", str(scale), "--child-out",
               str(child_out)] + ([] if scale_ref else ["--no-scale-reference"])
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-6000:])
            raise RuntimeError(f"scale {scale} child failed (exit {proc.returncode})")
        for line in proc.stderr.splitlines():
            if line.startswith("[") and "scale" in line:
                print(line, file=sys.stderr, flush=True)
        out = json.loads(child_out.read_text())
        out["subprocess_wall_s"] = wall
        # ru_maxrss of RUSAGE_CHILDREN is a max over every waited-for descendant so far (monotonic).
        out["parent_children_maxrss_mb_after"] = after.ru_maxrss / 1024.0
        out["child_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        server = bench.server
        pid = int(server.pid_file.read_text()) if server.pid_file.exists() else None
        out["lakefs_peak_rss_mb"] = vm_hwm_mb(pid) if pid else None
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--no-scale-reference", dest="scale_reference", action="store_false")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--scale", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    t_start = time.perf_counter()
    from tooling.services import build_lakefs, lakefs_version

    build_lakefs()
    tmp_root = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    samples: dict[int, list[dict]] = {s: [] for s in args.scales}
    try:
        for rep in range(args.reps):
            for s in args.scales:
                log(f"rep {rep + 1}: scale {s} ...")
                samples[s].append(run_scale(s, args.scale_reference, tmp_root))
                log(f"rep {rep + 1}: scale {s}: platform stages {samples[s][-1]['platform_s']:.1f}s")
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)

    med = statistics.median
    summary = {}
    for s, runs in samples.items():
        summary[s] = {
            "stages_median_s": {st: med(r["stages"][st]["s"] for r in runs) for st in STAGES},
            "platform_median_s": med(r["platform_s"] for r in runs),
            "rows": runs[0]["rows"],
            "peak_rss_mb": {"pipeline_process": max(r["self_peak_rss_mb"] for r in runs),
                            "dbt_subprocess": max(r["children_peak_rss_mb"] for r in runs),
                            "lakefs_server": max((r["lakefs_peak_rss_mb"] or 0) for r in runs)},
            "self_peak_rss_after_stage_mb": {st: runs[0]["stages"][st]["self_peak_rss_mb"] for st in STAGES},
        }
    base = min(args.scales)
    ratios = {}
    for s in args.scales:
        if s == base:
            continue
        b, x = summary[base], summary[s]
        ratios[f"{s}/{base}"] = {
            "row_ratio": x["rows"]["input_total"] / b["rows"]["input_total"],
            "time_ratio_platform": x["platform_median_s"] / b["platform_median_s"],
            "time_ratio_by_stage": {st: x["stages_median_s"][st] / b["stages_median_s"][st] for st in STAGES},
            "memory_ratio": {k: (x["peak_rss_mb"][k] / b["peak_rss_mb"][k]) if b["peak_rss_mb"][k] else None
                             for k in x["peak_rss_mb"]},
        }
        ratios[f"{s}/{base}"]["at_most_linear"] = \
            ratios[f"{s}/{base}"]["time_ratio_platform"] <= ratios[f"{s}/{base}"]["row_ratio"]
    result = {
        "meta": {"timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                 "git_head": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True).stdout.strip(),
                 "python": _platform.python_version(), "cpus": os.cpu_count(), "lakefs_version": lakefs_version(),
                 "args": {k: v for k, v in vars(args).items() if not k.startswith("child") and k != "scale"},
                 "total_s": time.perf_counter() - t_start,
                 "scaling": ("production via Simulator(scale=k); reference via a patched DatasetSpec.load_source "
                             "returning k copies with fresh ids" if args.scale_reference else
                             "production via Simulator(scale=k); reference unscaled (50k)")},
        "summary": {str(k): v for k, v in summary.items()}, "ratios": ratios,
        "samples": {str(k): v for k, v in samples.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))

    print(f"\nPipeline: ingest + dbt + training set, per scale (median of {args.reps}; {result['meta']['scaling']})")
    cols = [str(s) for s in args.scales]
    print(f"  {'stage':<34}" + "".join(f"{'scale ' + c:>12}" for c in cols) +
          "".join(f"{'ratio ' + k:>12}" for k in ratios))
    for st in STAGES:
        print(f"  {st + ' (s)':<34}" + "".join(f"{summary[s]['stages_median_s'][st]:>12.1f}" for s in args.scales)
              + "".join(f"{r['time_ratio_by_stage'][st]:>12.2f}" for r in ratios.values()))
    print(f"  {'platform total, excl. release (s)':<34}" + "".join(f"{summary[s]['platform_median_s']:>12.1f}"
                                                                  for s in args.scales)
          + "".join(f"{r['time_ratio_platform']:>12.2f}" for r in ratios.values()))
    print(f"  {'input rows (reference+records)':<34}" + "".join(f"{summary[s]['rows']['input_total']:>12,}"
                                                               for s in args.scales)
          + "".join(f"{r['row_ratio']:>12.2f}" for r in ratios.values()))
    print(f"  {'labelled examples':<34}" + "".join(f"{summary[s]['rows']['labelled_examples']:>12,}"
                                                  for s in args.scales))
    for k, label in (("pipeline_process", "peak RSS pipeline process (MB)"), ("dbt_subprocess", "peak RSS dbt subprocess (MB)"),
                     ("lakefs_server", "peak RSS lakeFS server (MB)")):
        print(f"  {label:<34}" + "".join(f"{summary[s]['peak_rss_mb'][k]:>12.0f}" for s in args.scales)
              + "".join(f"{(r['memory_ratio'][k] or 0):>12.2f}" for r in ratios.values()))
    for k, r in ratios.items():
        print(f"  scale {k}: time x{r['time_ratio_platform']:.2f} for rows x{r['row_ratio']:.2f} -> "
              f"{'at most linear' if r['at_most_linear'] else 'SUPER-LINEAR'}")
    print(f"  written to {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
