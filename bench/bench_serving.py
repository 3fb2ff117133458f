"""Online serving benchmark: our server (make serve) and `mlflow models serve` of the same champion, side
by side, over loopback keep-alive HTTP.

Setup (untimed): a temp state dir and MLflow SQLite store; a LightGBM model trained on car_loan's reference
data the platform's way (mlplatform.modeling on the spec's feature SQL), registered and given the
`champion` alias, compiled with lleaves (stored beside it). Both servers run as subprocesses bound to
127.0.0.1 on free ports, one worker each.

Measured: single-row and 100-row requests, with 1 and 8 concurrent clients (processes, one keep-alive
connection each, http.client), bounded request counts. Ours receives RAW rows (it validates them, applies
the missing-feature policies, computes the engineered features, routes, logs the prediction); mlflow
receives the model's ready feature matrix (dataframe_split), so ours does strictly more work per request.
Prints p50 / p99 (ms) and throughput (req/s) for each, and the ratios ours / mlflow.

    .venv/bin/python bench/bench_serving.py [--single 2000] [--batch 300]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
for k, v in {"NML_DISABLE_USAGE_LOGGING": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}.items():
    os.environ.setdefault(k, v)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(state: Path):
    import mlflow
    import polars as pl
    from mlflow.models import infer_signature

    from mlplatform import modeling, registry
    from mlplatform.features import online_features
    from mlplatform.serving.models import compile_version
    from mlplatform.spec import load_spec
    from mlplatform.tracking import Tracking

    spec = load_spec("car_loan")
    reference, production, _ = spec.load_source()
    ref = pl.from_pandas(reference)
    t = spec.time_column
    ref = ref.with_columns(pl.col(t).str.to_datetime(time_unit="us")).head(20000)
    feats = online_features(ref.select(spec.raw_columns), spec)
    ts = modeling.time_split(feats.join(ref.select(spec.id_column, spec.target), on=spec.id_column), spec)
    trained = modeling.train(ts, spec, modeling.lgb_params(spec, {}, 0), 500, 30)
    uri = f"sqlite:///{state / 'mlflow' / 'mlflow.db'}"
    tracking = Tracking(uri, experiment=spec.name, model_name=f"{spec.name}-model")
    tracking.setup()
    x = modeling.feature_matrix(ts.head(20), spec)
    with mlflow.start_run():
        mlflow.lightgbm.log_model(trained.booster, name="model", signature=infer_signature(x, trained.booster.predict(x)),
                                  input_example=x.head(2))
        run_id = mlflow.active_run().info.run_id
    version = str(mlflow.register_model(f"runs:/{run_id}/model", tracking.model_name).version)
    registry.promote(tracking, version)
    how = compile_version(tracking, version)
    prod = pl.from_pandas(production).head(2000)
    raw_rows = [{k: v for k, v in r.items()} for r in prod.select(spec.id_column, *spec.feature_names).to_dicts()]
    prod_feats = online_features(prod.select(spec.raw_columns).with_columns(pl.col(t).str.to_datetime(time_unit="us")),
                                 spec)
    matrix = modeling.feature_matrix(prod_feats, spec)
    cols = list(matrix.columns)
    mat_rows = [[None if v != v else v for v in row] for row in matrix.itertuples(index=False, name=None)]
    return spec, tracking, version, how, trained.booster.num_trees(), raw_rows, cols, mat_rows


def wait_ready(url_host: str, port: int, path: str, proc, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection(url_host, port, timeout=2)
            c.request("GET", path)
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"server on port {port} not ready after {timeout}s")


def client(args) -> list[float]:
    port, path, bodies, n = args
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"content-type": "application/json"}
    out = []
    for i in range(n):
        body = bodies[i % len(bodies)]
        t0 = time.perf_counter()
        c.request("POST", path, body=body, headers=headers)
        r = c.getresponse()
        data = r.read()
        out.append(time.perf_counter() - t0)
        if r.status != 200:
            raise RuntimeError(f"{path}: HTTP {r.status}: {data[:300]!r}")
    return out


def shadow_scored(port: int) -> float:
    """Rows the server's shadow process has scored (Prometheus gauge mlp_serving_shadow_rows{status="ok"})."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request("GET", "/metrics")
    for line in c.getresponse().read().decode().splitlines():
        if line.startswith('mlp_serving_shadow_rows{status="ok"}'):
            return float(line.split()[-1])
    return 0.0


def run_load(port: int, path: str, bodies: list[bytes], clients: int, total: int) -> dict:
    per = max(1, total // clients)
    client((port, path, bodies, 20))  # warm-up
    t0 = time.perf_counter()
    if clients == 1:
        lat = client((port, path, bodies, per))
    else:
        with mp.get_context("fork").Pool(clients) as pool:
            lat = [x for part in pool.map(client, [(port, path, bodies[k::clients] or bodies, per)
                                                   for k in range(clients)]) for x in part]
    wall = time.perf_counter() - t0
    lat.sort()
    return {"p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))],
            "rps": len(lat) / wall, "requests": len(lat)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--single", type=int, default=2000, help="requests per single-row scenario")
    ap.add_argument("--batch", type=int, default=300, help="requests per 100-row scenario")
    ap.add_argument("--shadow-pairs", type=int, default=2, help="alternating shadow off/on runs of 1-row x1")
    ap.add_argument("--only-shadow", action="store_true", help="skip the ours-vs-mlflow table")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        state = Path(tmp)
        env = {**os.environ, "MLP_STATE_DIR": str(state), "MLP_DATASET": "car_loan",
               # mlflow models serve runs `uvicorn` from PATH
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        os.environ.update({"MLP_STATE_DIR": str(state)})
        spec, tracking, version, how, trees, raw_rows, cols, mat_rows = setup(state)
        env["MLFLOW_TRACKING_URI"] = tracking.tracking_uri
        ours_port, mlflow_port = free_port(), free_port()
        routing_file = state / "routing.yaml"
        routing_file.write_text("mode: champion\nshadow: false\n")
        procs = [
            subprocess.Popen([sys.executable, "-m", "mlplatform.serving", "--host", "127.0.0.1", "--port",
                              str(ours_port), "--routing-file", str(routing_file)], cwd=ROOT, env=env),
            subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
                              f"models:/{tracking.model_name}@champion", "-h", "127.0.0.1", "-p", str(mlflow_port),
                              "-w", "1", "--env-manager", "local"], cwd=tmp, env=env,
                             stdout=(state / "mlflow-serve.log").open("w"), stderr=subprocess.STDOUT),
        ]
        try:
            wait_ready("127.0.0.1", ours_port, "/readyz", procs[0])
            try:
                wait_ready("127.0.0.1", mlflow_port, "/ping", procs[1])
            except RuntimeError:
                print((state / "mlflow-serve.log").read_text()[-3000:])
                raise
            ours_path = f"/v1/models/{tracking.model_name}/predict"
            ours_single = [json.dumps(r).encode() for r in raw_rows]
            ours_batch = [json.dumps({"rows": raw_rows[i:i + 100]}).encode() for i in range(0, 2000, 100)]
            ml_single = [json.dumps({"dataframe_split": {"columns": cols, "data": [r]}}).encode() for r in mat_rows]
            ml_batch = [json.dumps({"dataframe_split": {"columns": cols, "data": mat_rows[i:i + 100]}}).encode()
                        for i in range(0, 2000, 100)]
            print(f"model: {tracking.model_name} v{version}, {trees} trees, ours runs it with "
                  f"{'lleaves' if how != 'booster' else 'the Booster'}; loopback keep-alive, one worker each")
            print(f"{'scenario':<22}{'server':<8}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>10}{'rows/s':>10}")
            results = {}
            scenarios = {1: (ours_single, ml_single, args.single), 100: (ours_batch, ml_batch, args.batch)}
            for rows, (ob, mb, total) in ({} if args.only_shadow else scenarios).items():
                for clients in (1, 8):
                    name = f"{rows}-row x{clients} client{'s' if clients > 1 else ''}"
                    r_ours = run_load(ours_port, ours_path, ob, clients, total)
                    r_ml = run_load(mlflow_port, "/invocations", mb, clients, total)
                    results[name] = {"ours": r_ours, "mlflow": r_ml}
                    for who, r in (("ours", r_ours), ("mlflow", r_ml)):
                        print(f"{name:<22}{who:<8}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['rps']:>10.0f}"
                              f"{r['rps'] * rows:>10.0f}")
                    print(f"{'':<22}{'ratio':<8}{r_ml['p50_ms'] / r_ours['p50_ms']:>8.1f}x"
                          f"{r_ml['p99_ms'] / r_ours['p99_ms']:>8.1f}x{r_ours['rps'] / r_ml['rps']:>9.1f}x"
                          f"   (mlflow/ours latency, ours/mlflow throughput)")
            # Shadow on vs off: the challenger (here the same version under the `challenger` alias) scores
            # every request in the server's shadow process; the champion's latency should not move beyond noise.
            # Noise: the spread of the shadow-off runs themselves (alternating off/on, same load generator).
            from mlplatform import registry

            registry.set_alias(tracking, "challenger", version)
            shadow = {}
            for on in (False, True) * args.shadow_pairs:
                routing_file.write_text(f"mode: champion\nshadow: {str(on).lower()}\n")
                end = time.monotonic() + 60
                while True:
                    c = http.client.HTTPConnection("127.0.0.1", ours_port, timeout=5)
                    c.request("GET", f"/v2/models/{tracking.model_name}")
                    meta = json.loads(c.getresponse().read())
                    if meta["routing"]["shadow"] == on and (not on or "challenger" in meta["aliases"]):
                        break
                    if time.monotonic() > end:
                        raise RuntimeError("routing file not reloaded within 60 s")
                    time.sleep(0.5)
                if on and not shadow.get(True):
                    # Steady state: the shadow process starts on the first shadowed request (spawn + imports +
                    # model load); measure once it has scored, as a server that shadows all day does.
                    end = time.monotonic() + 120
                    while shadow_scored(ours_port) <= 0:
                        client((ours_port, ours_path, ours_single, 5))
                        if time.monotonic() > end:
                            raise RuntimeError("the shadow process scored nothing within 120 s")
                        time.sleep(0.5)
                shadow.setdefault(on, []).append(run_load(ours_port, ours_path, ours_single, 1, args.single))
            for on in (False, True):
                r = shadow[on]
                print(f"{'1-row x1, shadow ' + ('on' if on else 'off'):<30}"
                      f"p50 {statistics.median(x['p50_ms'] for x in r):6.2f} ms   "
                      f"p99 {statistics.median(x['p99_ms'] for x in r):6.2f} ms   (median of {len(r)} runs: "
                      f"{', '.join(format(x['p99_ms'], '.2f') for x in r)})")
            off99, on99 = ([x["p99_ms"] for x in shadow[k]] for k in (False, True))
            print(f"shadow on - off, median p99: {statistics.median(on99) - statistics.median(off99):+.2f} ms; "
                  f"noise (spread of the off runs' p99): {min(off99):.2f}..{max(off99):.2f} ms; on within it: "
                  f"{min(off99) <= statistics.median(on99) <= max(off99)}")
            results["shadow"] = {"off": shadow[False], "on": shadow[True]}
            out = ROOT / "bench" / "results" / "bench_serving.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"model_version": version, "trees": trees, "runtime": how,
                                       "results": results}, indent=2))
            print(f"written {out}")
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()


if __name__ == "__main__":
    main()
