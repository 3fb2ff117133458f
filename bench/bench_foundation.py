"""Foundation benchmark: code-location load time, lakeFS commit cost, branch creation vs data size.

Measured side by side in one run, printed as a compact table and written to
bench/results/foundation.json:

1. Code-location load: median wall time of fresh subprocesses running `import dagster` (A) vs
   loading platform/definitions.py and accessing `defs` with the bundled data sets (B) and with 10 data sets
   (C: copies of the bundled specs, named <spec>_copy<i>, in a temporary folder, given by MLP_DATASETS paths),
   interleaved A,B,C,A,B,C,... so all see the same machine noise; one untimed warm-up of each first.
   Goals: B/A < 2, C/A <= 1.5 (issue 13: many data sets in one code location).
2. lakeFS commit of a small table: a ~1000-row polars DataFrame written as parquet, `put` then
   `commit`; median of upload+commit and of commit alone (one untimed warm-up first).
3. Branch creation with 10 MB and 1 GB of random (incompressible) bytes committed on main: median
   time to create a branch from main (20 branches per size). lakeFS branches are zero-copy, so this
   should not grow with the data; the blockstore size is checked before and after as well.

A private lakeFS server is started in a temporary directory on a free port and removed at the end;
the server of `make up` (port 8000) is never touched.

    .venv/bin/python bench/bench_foundation.py            # from the repository root
    .venv/bin/python bench/bench_foundation.py --quick    # smaller sizes / fewer iterations (smoke)
    .venv/bin/python bench/bench_foundation.py --load-only --load-runs 7   # only the code-location load (1.)
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, ROOT, log, settings_for

RESULTS = RESULTS / "foundation.json"

MB = 1024 * 1024
CHUNK = 1 * MB  # os.urandom chunk used to refill the reusable object buffer

# What a code-location server does at start: import the definitions file and access `defs`.
LOAD_DEFS = r"""
import importlib.util, json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, {root!r})
import dagster as dg
t1 = time.perf_counter()
spec = importlib.util.spec_from_file_location("mlp_code_location", {defs_file!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
defs = module.defs
assert isinstance(defs, dg.Definitions), type(defs)
t2 = time.perf_counter()
n_assets = len(defs.resolve_asset_graph().get_all_asset_keys())
t3 = time.perf_counter()
print(json.dumps({{"import_dagster_s": t1 - t0, "exec_definitions_s": t2 - t1,
                   "resolve_asset_graph_s": t3 - t2, "n_assets": n_assets}}))
"""
IMPORT_DAGSTER = "import dagster"


# --- helpers ---------------------------------------------------------------------------------------
def median(xs: list[float]) -> float:
    return statistics.median(xs)


def summary(xs: list[float]) -> dict:
    s = sorted(xs)
    return {
        "n": len(s),
        "median_s": median(s),
        "min_s": s[0],
        "max_s": s[-1],
        "p90_s": s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))],
        "samples_s": [round(x, 6) for x in xs],
    }


def fmt_s(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1000:.1f} ms"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(dirpath, f)).st_size
            except FileNotFoundError:
                pass
    return total


def bytecode_context() -> dict:
    """Import time depends heavily on whether .pyc caches exist; record that alongside the numbers."""
    import dagster

    pkg = Path(dagster.__file__).parent
    cached = any(pkg.glob("__pycache__/*.pyc"))
    return {
        "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE", ""),
        "dagster_has_pyc_cache": cached,
    }


# --- 1. code-location load time ------------------------------------------------------------------
def many_specs(folder: Path, count: int) -> list[Path]:
    """`count` spec files in `folder`: copies of the bundled specs in turn, each with its own name."""
    from mlplatform.spec import DATASETS_DIR, bundled_specs

    names, out = bundled_specs(), []
    for i in range(count):
        source = names[i % len(names)]
        text = (DATASETS_DIR / f"{source}.yaml").read_text()
        lines = [f"name: {source}_copy{i}" if line.startswith("name:") else line for line in text.splitlines()]
        path = folder / f"{source}_copy{i}.yaml"
        path.write_text("\n".join(lines) + "\n")
        out.append(path)
    return out


def bench_load(runs: int, many: int = 10) -> dict:
    env = dict(os.environ)
    # Any values suffice for loading: EnvVar is only resolved at run time.
    env.setdefault("LAKEFS_ENDPOINT", "http://127.0.0.1:1")
    env.setdefault("LAKEFS_ACCESS_KEY_ID", "bench")
    env.setdefault("LAKEFS_SECRET_ACCESS_KEY", "bench")
    env.setdefault("MLFLOW_TRACKING_URI", "sqlite:///:memory:")
    env.update({"DAGSTER_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true"})
    env.pop("MLP_DATASET", None)
    env.pop("MLP_DATASETS", None)  # B: the bundled specs (platform/datasets/*.yaml)
    folder = Path(tempfile.mkdtemp(prefix="bench-foundation-specs-"))
    try:
        paths = many_specs(folder, many)
        return _bench_load(runs, env, {**env, "MLP_DATASETS": ",".join(str(p) for p in paths)}, many)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _bench_load(runs: int, env: dict, env_many: dict, many: int) -> dict:
    load_code = LOAD_DEFS.format(root=str(ROOT), defs_file=str(ROOT / "platform" / "definitions.py"))
    variants = {"import_dagster": IMPORT_DAGSTER, "load_definitions": load_code, "load_definitions_many": load_code}
    envs = {"load_definitions_many": env_many}

    def run(code: str, name: str = "") -> tuple[float, str]:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=envs.get(name, env), capture_output=True,
                              text=True)
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"subprocess failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return elapsed, proc.stdout

    for name, code in variants.items():  # untimed warm-up: page cache, first-touch effects, dbt manifests
        run(code, name)
    times: dict[str, list[float]] = {k: [] for k in variants}
    inner: dict[str, list[dict]] = {"load_definitions": [], "load_definitions_many": []}
    for i in range(runs):
        for name, code in variants.items():  # interleaved A,B,C,A,B,C,...
            elapsed, out = run(code, name)
            times[name].append(elapsed)
            if name in inner:
                inner[name].append(json.loads(out.strip().splitlines()[-1]))
        log(f"load run {i + 1}/{runs}: import dagster {times['import_dagster'][-1]:.2f}s, "
            f"definitions {times['load_definitions'][-1]:.2f}s, {many} data sets "
            f"{times['load_definitions_many'][-1]:.2f}s")
    a, b = median(times["import_dagster"]), median(times["load_definitions"])
    c = median(times["load_definitions_many"])
    return {
        "runs": runs,
        "interleaved": True,
        "import_dagster": summary(times["import_dagster"]),
        "load_definitions": summary(times["load_definitions"]),
        "ratio": b / a,
        "goal_ratio_below": 2.0,
        "meets_goal": b / a < 2.0,
        "load_definitions_breakdown_median_s": {
            k: median([d[k] for d in inner["load_definitions"]]) for k in ("import_dagster_s", "exec_definitions_s",
                                                                            "resolve_asset_graph_s")
        },
        "n_assets": inner["load_definitions"][-1]["n_assets"],
        "many": {
            "data_sets": many,
            "load_definitions": summary(times["load_definitions_many"]),
            "ratio": c / a,
            "goal_ratio_at_most": 1.5,
            "meets_goal": c / a <= 1.5,
            "n_assets": inner["load_definitions_many"][-1]["n_assets"],
            "breakdown_median_s": {
                k: median([d[k] for d in inner["load_definitions_many"]])
                for k in ("import_dagster_s", "exec_definitions_s", "resolve_asset_graph_s")},
        },
        **bytecode_context(),
    }


# --- 2. lakeFS commit of a small table --------------------------------------------------------------
def small_table(i: int, rows: int) -> bytes:
    import numpy as np
    import polars as pl

    rng = np.random.default_rng(i)
    df = pl.DataFrame({
        "id": np.arange(rows, dtype=np.int64) + i * rows,
        "ts": pl.datetime_range(dt.datetime(2024, 1, 1), dt.datetime(2024, 1, 1) + dt.timedelta(minutes=rows - 1),
                                interval="1m", eager=True),
        "x1": rng.normal(size=rows),
        "x2": rng.uniform(size=rows),
        "cat": rng.choice(["a", "b", "c", "d"], size=rows),
        "label": rng.integers(0, 2, size=rows),
    })
    buf = io.BytesIO()
    df.write_parquet(buf)
    return buf.getvalue()


def bench_commit(res, iterations: int, rows: int) -> dict:
    res.ensure_repository()
    branch = "bench-commits"
    res.ensure_branch(branch)
    path = "tables/small_table/data.parquet"
    put_t, commit_t, total_t, sizes = [], [], [], []
    for i in range(iterations + 1):  # iteration 0 is an untimed warm-up
        data = small_table(i, rows)  # serialisation is not part of the timing
        t0 = time.perf_counter()
        res.put(branch, path, data)
        t1 = time.perf_counter()
        res.commit(branch, f"bench commit {i}", {"iteration": i, "rows": rows})
        t2 = time.perf_counter()
        if i == 0:
            continue
        put_t.append(t1 - t0)
        commit_t.append(t2 - t1)
        total_t.append(t2 - t0)
        sizes.append(len(data))
    return {
        "iterations": iterations,
        "rows": rows,
        "parquet_bytes_median": median(sizes),
        "upload_plus_commit": summary(total_t),
        "commit_only": summary(commit_t),
        "upload_only": summary(put_t),
    }


# --- 3. branch creation vs committed data size ---------------------------------------------------------
def fill_main(res, n_objects: int, object_size: int) -> dict:
    """Write n_objects of random bytes to main and commit; one buffer reused for every object."""
    buf = bytearray(object_size)
    view = memoryview(buf)
    t_gen = t_put = 0.0
    for k in range(n_objects):
        t0 = time.perf_counter()
        for off in range(0, object_size, CHUNK):
            n = min(CHUNK, object_size - off)
            view[off:off + n] = os.urandom(n)
        t1 = time.perf_counter()
        res.put(res.main_branch, f"data/part-{k:04d}.bin", buf)
        t_put += time.perf_counter() - t1
        t_gen += t1 - t0
    t0 = time.perf_counter()
    commit_id = res.commit(res.main_branch, f"bench: {n_objects} x {fmt_bytes(object_size)} random bytes")
    t_commit = time.perf_counter() - t0
    return {"generate_s": t_gen, "upload_s": t_put, "commit_s": t_commit, "commit_id": commit_id,
            "upload_MBps": n_objects * object_size / MB / t_put if t_put else None}


def bench_branches(res, blockstore: Path, label: str, n_objects: int, object_size: int, n_branches: int) -> dict:
    res.ensure_repository()
    fill = fill_main(res, n_objects, object_size)
    main_head = res.head(res.main_branch)
    repo = res.repo()
    store_before = tree_bytes(blockstore)
    create_t, ensure_t, names = [], [], []
    for i in range(n_branches):
        # Bare API call (one request) and the platform's own path (what each run does).
        name = f"bench-{label.lower()}-create-{i:02d}"
        t0 = time.perf_counter()
        repo.branch(name).create(source_reference=res.main_branch)
        create_t.append(time.perf_counter() - t0)
        name2 = f"bench-{label.lower()}-ensure-{i:02d}"
        t0 = time.perf_counter()
        head = res.ensure_branch(name2)
        ensure_t.append(time.perf_counter() - t0)
        if head != main_head:
            raise RuntimeError(f"branch {name2} head {head} != main head {main_head}")
        names += [name, name2]
    store_after = tree_bytes(blockstore)
    visible = len(res.list_paths(names[-1], "data/"))
    if visible != n_objects:
        raise RuntimeError(f"branch {names[-1]} sees {visible} objects, expected {n_objects}")
    for name in names:
        res.delete_branch(name)
    return {
        "label": label,
        "objects": n_objects,
        "object_bytes": object_size,
        "total_bytes": n_objects * object_size,
        "fill_main": fill,
        "branches": n_branches,
        "create": summary(create_t),
        "ensure_branch": summary(ensure_t),
        "blockstore_bytes_before": store_before,
        "blockstore_bytes_after": store_after,
        "blockstore_growth_bytes": store_after - store_before,
        "objects_visible_on_branch": visible,
    }


def bench_lakefs(args) -> tuple[dict, dict, str]:
    from resources.environment import build_resources
    from resources.lakefs import LakeFSResource
    from tooling.services import LakeFSServer, free_port, lakefs_version

    tmp = Path(tempfile.mkdtemp(prefix="bench-foundation-lakefs-"))
    server = LakeFSServer(tmp, port=free_port())
    try:
        t0 = time.perf_counter()
        server.start()
        log(f"lakeFS {lakefs_version()} at {server.endpoint} (data in {tmp}), up in {time.perf_counter() - t0:.1f}s")

        def resource(repo: str) -> LakeFSResource:
            return build_resources(settings_for(server, tmp / "state", mlflow=False, repository=repo))["lakefs"]

        log(f"commit: {args.commit_iters} x (put ~{args.rows}-row parquet + commit)")
        commit = bench_commit(resource("bench-commit"), args.commit_iters, args.rows)
        sizes = []
        for label, n_obj, obj_size in args.sizes:
            log(f"branches: {label} on main ({n_obj} x {fmt_bytes(obj_size)}), then {args.branches} branches")
            r = bench_branches(resource(f"bench-branch-{label.lower()}"), tmp / "data", label, n_obj, obj_size,
                               args.branches)
            log(f"  upload {fmt_s(r['fill_main']['upload_s'])}, create median {fmt_s(r['create']['median_s'])}")
            sizes.append(r)
        first, last = sizes[0], sizes[-1]
        branches = {
            "sizes": sizes,
            "growth_ratio_create": last["create"]["median_s"] / first["create"]["median_s"],
            "growth_ratio_ensure_branch": last["ensure_branch"]["median_s"] / first["ensure_branch"]["median_s"],
            "compared": [first["label"], last["label"]],
        }
        return commit, branches, lakefs_version()
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


# --- report ----------------------------------------------------------------------------------------------
def load_rows(L: dict) -> list[tuple[str, str, str]]:
    M = L["many"]
    return [
        ("1 load: python -c 'import dagster'", fmt_s(L["import_dagster"]["median_s"]),
         f"median of {L['runs']}, interleaved"),
        ("1 load: platform/definitions.py defs", fmt_s(L["load_definitions"]["median_s"]),
         f"median of {L['runs']}, {L['n_assets']} assets (bundled specs)"),
        ("1 load: ratio definitions / dagster", f"{L['ratio']:.2f}x", f"goal < 2x: {'OK' if L['meets_goal'] else 'MISSED'}"),
        (f"1 load: {M['data_sets']} data sets defs", fmt_s(M["load_definitions"]["median_s"]),
         f"median of {L['runs']}, {M['n_assets']} assets (MLP_DATASETS: {M['data_sets']} spec copies)"),
        (f"1 load: ratio {M['data_sets']} data sets / dagster", f"{M['ratio']:.2f}x",
         f"goal <= 1.5x: {'OK' if M['meets_goal'] else 'MISSED'}"),
    ]


def print_rows(rows: list[tuple[str, str, str]]) -> None:
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    line = "-" * (w0 + w1 + 40)
    print(line)
    print(f"{'measure':<{w0}}  {'value':>{w1}}  note")
    print(line)
    for a, b, c in rows:
        print(f"{a:<{w0}}  {b:>{w1}}  {c}")
    print(line)


def print_table(result: dict) -> None:
    L, C, B = result["code_location_load"], result["lakefs_commit"], result["branch_creation"]
    rows: list[tuple[str, str, str]] = load_rows(L)
    rows.append((f"2 commit: put + commit ({C['rows']} rows)", fmt_s(C["upload_plus_commit"]["median_s"]),
                 f"median of {C['iterations']}, parquet {fmt_bytes(C['parquet_bytes_median'])}"))
    rows.append(("2 commit: commit alone", fmt_s(C["commit_only"]["median_s"]),
                 f"p90 {fmt_s(C['commit_only']['p90_s'])}"))
    for s in B["sizes"]:
        rows.append((f"3 branch: create, {s['label']} on main", fmt_s(s["create"]["median_s"]),
                     f"median of {s['branches']}; ensure_branch {fmt_s(s['ensure_branch']['median_s'])}"))
    rows.append((f"3 branch: growth {B['compared'][1]} / {B['compared'][0]}", f"{B['growth_ratio_create']:.2f}x",
                 f"ensure_branch {B['growth_ratio_ensure_branch']:.2f}x; blockstore +"
                 f"{fmt_bytes(max(s['blockstore_growth_bytes'] for s in B['sizes']))} while branching"))
    print_rows(rows)
    ctx = result["meta"]
    print(f"python {ctx['python']} | lakeFS {ctx['lakefs_version']} | {ctx['cpus']} CPUs | "
          f"PYTHONDONTWRITEBYTECODE={L['PYTHONDONTWRITEBYTECODE'] or '-'} | dagster .pyc cache: "
          f"{'yes' if L['dagster_has_pyc_cache'] else 'no'} | total {ctx['total_s']:.0f}s")


def parse_size(text: str) -> tuple[str, int, int]:
    """'LABEL:NxSIZE' e.g. '10MB:10x1MB' or '1GB:100x10MB'."""
    label, spec = text.split(":")
    n, size = spec.lower().split("x")
    mult = {"kb": 1024, "mb": MB, "gb": 1024 * MB}
    unit = size[-2:]
    return label, int(n), int(float(size[:-2]) * mult[unit])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load-runs", type=int, default=5)
    p.add_argument("--commit-iters", type=int, default=30)
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--branches", type=int, default=20)
    p.add_argument("--sizes", nargs="+", type=parse_size, default=None,
                   help="LABEL:NxSIZE ... (default: 10MB:10x1MB 1GB:100x10MB)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 load runs, 5 commits, 1GB -> 100MB")
    p.add_argument("--load-only", action="store_true", help="only the code-location load (1.), printed; "
                                                            "writes bench/results/foundation_load.json")
    p.add_argument("--many", type=int, default=10, help="data sets in the many-data-set load (default 10)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.sizes is None:
        args.sizes = [parse_size("10MB:10x1MB"), parse_size("100MB:10x10MB" if args.quick else "1GB:100x10MB")]
    if args.quick:
        args.load_runs, args.commit_iters, args.branches = 2, 5, 5

    started = time.perf_counter()
    log(f"code-location load: {args.load_runs} interleaved runs of each (+1 warm-up)")
    load = bench_load(args.load_runs, args.many)
    if args.load_only:
        out = args.out.with_name("foundation_load.json") if args.out == RESULTS else args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": {"timestamp": dt.datetime.now(dt.timezone.utc).isoformat(
            timespec="seconds"), "python": sys.version.split()[0], "cpus": os.cpu_count(),
            "total_s": time.perf_counter() - started}, "code_location_load": load}, indent=2) + "\n")
        print_rows(load_rows(load))
        print(f"PYTHONDONTWRITEBYTECODE={load['PYTHONDONTWRITEBYTECODE'] or '-'} | dagster .pyc cache: "
              f"{'yes' if load['dagster_has_pyc_cache'] else 'no'} | wrote {out}")
        return 0
    commit, branches, version = bench_lakefs(args)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    result = {
        "meta": {
            "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "git_head": git.stdout.strip() or None,
            "python": sys.version.split()[0],
            "executable": sys.executable,
            "cpus": os.cpu_count(),
            "lakefs_version": version,
            "args": {k: v for k, v in vars(args).items() if k != "out"} | {"out": str(args.out)},
            "total_s": time.perf_counter() - started,
        },
        "code_location_load": load,
        "lakefs_commit": commit,
        "branch_creation": branches,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print_table(result)
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
