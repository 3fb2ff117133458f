"""The server against a real MLflow store, over HTTP on a free loopback port: predictions equal
Booster.predict, refusals name the field, the compiled model is stored beside the Booster, and moving the
`champion` alias under a bounded load fails no request."""

import datetime as dt
import threading
import time

import numpy as np
import polars as pl
import pytest
import requests

from mlplatform import modeling, registry
from mlplatform.serving import models as serving_models
from mlplatform.serving.settings import LogSettings, RoutingSettings, ServingSettings
from mlplatform.tracking import Tracking
from tooling.services import free_port

from .helpers import car_loan, quick_training_set

pytestmark = pytest.mark.services


@pytest.fixture(scope="module")
def spec():
    return car_loan()


@pytest.fixture(scope="module")
def ts(spec):
    return quick_training_set(spec, n=6000)


def register(tracking: Tracking, spec, ts, seed: int, rounds: int = 80) -> str:
    import mlflow

    trained = modeling.train(ts, spec, modeling.lgb_params(spec, {"num_leaves": 15}, seed), rounds, 20)
    tracking.setup()
    with mlflow.start_run():
        mlflow.lightgbm.log_model(trained.booster, name="model")
        run_id = mlflow.active_run().info.run_id
    mv = mlflow.register_model(f"runs:/{run_id}/model", tracking.model_name)
    return str(mv.version)


def request_rows(spec, df: pl.DataFrame) -> list[dict]:
    out = []
    for r in df.select(spec.id_column, spec.time_column, *spec.feature_names).to_dicts():
        r[spec.time_column] = r[spec.time_column].isoformat()
        out.append(r)
    return out


def orjson_bytes(body) -> bytes:
    import json

    return json.dumps(body).encode()  # big ints and Infinity as a client may send them


class Served:
    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        end = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < end, "server did not start"
            time.sleep(0.05)

    def stop(self):
        """Graceful shutdown: the app's lifespan drains the shadow queue and flushes the prediction log."""
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive(), "the server did not shut down"


@pytest.fixture
def tracking(spec, mlflow_uri):
    return Tracking(mlflow_uri, experiment=spec.name, model_name=f"{spec.name}-model")


def test_served_champion_equals_booster_predict_and_refusals_name_the_field(spec, ts, tracking, state):
    from mlplatform.serving.app import create_app

    v1 = register(tracking, spec, ts, seed=1)
    registry.promote(tracking, v1)
    # promotion-time compilation, stored beside the model; the server then downloads it
    assert serving_models.compile_version(tracking, v1) == "compiled"
    run_id = tracking.client().get_model_version(tracking.model_name, v1).run_id
    stored = [a.path for a in tracking.client().list_artifacts(run_id, "compiled")]
    assert stored == [f"compiled/{serving_models.artifact_name()}"]

    settings = ServingSettings(reload_seconds=0.5, log=LogSettings(batch_rows=50, flush_seconds=0.2))
    app = create_app(spec, tracking, settings)
    served = Served(app)
    try:
        assert app.state.server.state.models["champion"].compiled_from == "artifact"
        test = ts.filter(pl.col("split") == "test")
        booster = registry.load_booster(tracking, v1)
        want = booster.predict(modeling.feature_matrix(test, spec))
        rows = request_rows(spec, test)
        s = requests.Session()
        got = []
        for i in range(0, len(rows), 100):
            r = s.post(f"{served.url}/v1/models/{tracking.model_name}/predict", json={"rows": rows[i:i + 100]})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["variant"] == "champion" and body["model_version"] == v1
            got += body["predictions"]
        assert len(got) == test.height >= 1000
        assert np.max(np.abs(np.array(got) - want)) <= 1e-6
        one = s.post(f"{served.url}/v1/models/{spec.name}/predict", json=rows[0]).json()  # one bare row
        assert abs(one["predictions"][0] - want[0]) <= 1e-6

        # Open Inference Protocol v2
        cols = {k: [r[k] for r in rows[:5]] for k in spec.feature_names}
        types = {"numeric": "FP64", "categorical": "BYTES", "boolean": "BOOL"}
        oip = {"id": "req-1", "inputs": [{"name": f.name, "shape": [5], "datatype": types[f.type],
                                          "data": cols[f.name]} for f in spec.features]}
        r = s.post(f"{served.url}/v2/models/{tracking.model_name}/infer", json=oip)
        assert r.status_code == 200, r.text
        assert np.max(np.abs(np.array(r.json()["outputs"][0]["data"]) - want[:5])) <= 1e-6
        assert r.json()["model_version"] == v1 and r.json()["parameters"]["variant"] == "champion"
        assert s.get(f"{served.url}/v2/models/{tracking.model_name}/ready").status_code == 200
        meta = s.get(f"{served.url}/v2/models/{tracking.model_name}").json()
        assert [i["name"] for i in meta["inputs"]] == spec.feature_names and meta["runtimes"] == {"champion": "lleaves"}

        # refusals: 4xx naming the field, never 5xx
        bad = dict(rows[0], debt_to_income_ratio=7.5)
        r = s.post(f"{served.url}/v1/models/{tracking.model_name}/predict", json={"rows": [rows[1], bad]})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "rows", 1, "debt_to_income_ratio"]
        r = s.post(f"{served.url}/v1/models/{tracking.model_name}/predict", json={"rows": [dict(rows[0], car_value="x")]})
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == "car_value"
        r = s.post(f"{served.url}/v1/models/{tracking.model_name}/predict", data=b"{not json",
                   headers={"content-type": "application/json"})
        assert r.status_code == 400 and "JSON" in r.json()["detail"][0]["msg"]
        r = s.post(f"{served.url}/v1/models/nope/predict", json=rows[0])
        assert r.status_code == 404 and "nope" in r.json()["detail"][0]["msg"]
        r = s.post(f"{served.url}/v2/models/{tracking.model_name}/infer", json={"inputs": [{"name": "car_value",
                                                                                          "data": ["a"]}]})
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == "car_value"

        metrics = s.get(f"{served.url}/metrics").text
        assert 'mlp_serving_requests_total{endpoint="v1_predict",status="200",variant="champion"}' in metrics
        assert 'mlp_serving_errors_total{endpoint="v1_predict",kind="refused",variant="none"} 4.0' in metrics
        assert "mlp_serving_request_seconds_bucket" in metrics

        schema = s.get(f"{served.url}/openapi.json").json()
        body_schema = schema["paths"]["/v1/models/{name}/predict"]["post"]["requestBody"]["content"][
            "application/json"]["schema"]["oneOf"][1]
        assert body_schema["properties"]["car_value"]["anyOf"][0] == {"type": "number", "minimum": 0,
                                                                      "maximum": 1000000}

        # malformed bodies of every kind: a 4xx (or 200), never a 5xx
        from .test_serving import mutations

        statuses = set()
        fuzz = [orjson_bytes(b) for b in mutations(spec, seed=3, n=300)]
        fuzz += [b"", b"[]", b"null", b'{"rows": 5}', b'{"rows": [], "x": 1}', b"\xff\xfe", b'{"rows": [{"car_value": 1e999}]}',
                 b'{"rows": [{"car_value": 123456789012345678901234567890}]}']
        for i, raw in enumerate(fuzz):
            for path in ("/v1/models/car_loan-model/predict", "/v2/models/car_loan-model/infer"):
                r = s.post(f"{served.url}{path}", data=raw, headers={"content-type": "application/json",
                                                                     "x-request-id": f"fuzz-{i}"})
                statuses.add(r.status_code)
                assert r.status_code < 500, (path, raw[:200], r.text)
                if r.status_code >= 400:
                    assert r.json()["detail"][0]["msg"]
        assert {200, 400, 422} <= statuses
    finally:
        s.close()
        served.stop()
    # every scored row is in the log, with its variant, version and features
    logged = pl.read_parquet(state / "online_predictions" / spec.name / "*" / "*.parquet")
    logged = logged.filter(~pl.col("request_id").str.starts_with("fuzz-"))
    assert logged.height == test.height + 1 + 5
    assert set(logged["model_version"]) == {v1} and set(logged["variant"]) == {"champion"}
    assert logged.filter(pl.col("entity_id") == str(rows[0][spec.id_column]))["prediction"][0] == \
        pytest.approx(want[0], abs=1e-6)


def test_an_alias_swap_under_load_fails_no_request_and_switches_version(spec, ts, tracking, state):
    from mlplatform.serving.app import create_app

    v1 = register(tracking, spec, ts, seed=1)
    v2 = register(tracking, spec, ts, seed=2, rounds=60)
    registry.promote(tracking, v1)
    for v in (v1, v2):
        serving_models.compile_version(tracking, v)
    reload_s = 0.5
    app = create_app(spec, tracking, ServingSettings(reload_seconds=reload_s,
                                                     routing=RoutingSettings(shadow=True)))
    served = Served(app)
    rows = request_rows(spec, ts.filter(pl.col("split") == "test").head(50))
    results: list[tuple[float, int, str]] = []
    lock = threading.Lock()
    swapped_at = [None]

    def client(k: int):
        s = requests.Session()
        for i in range(150):
            try:
                r = s.post(f"{served.url}/v1/models/{tracking.model_name}/predict", json=rows[(k + i) % len(rows)],
                           timeout=30)
                out = (time.monotonic(), r.status_code, r.json().get("model_version", "") if r.ok else r.text)
            except requests.RequestException as exc:
                out = (time.monotonic(), 0, str(exc))
            with lock:
                results.append(out)
            time.sleep(0.01)

    try:
        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        registry.promote(tracking, v2)   # champion -> v2, previous -> v1
        registry.set_alias(tracking, "challenger", v1)
        swapped_at[0] = time.monotonic()
        for t in threads:
            t.join(120)
    finally:
        served.stop()
    failed = [r for r in results if r[1] != 200]
    assert len(results) == 600 and failed == []
    versions = [v for _, _, v in sorted(results)]
    assert versions[0] == v1 and versions[-1] == v2
    first_v2 = min(t for t, _, v in results if v == v2)
    # within one reload interval (plus the poll's own MLflow reads and the download of the stored object)
    assert first_v2 - swapped_at[0] <= reload_s + 2.0, first_v2 - swapped_at[0]
    assert all(v == v2 for t, _, v in results if t > first_v2 + 0.5)


def test_routing_from_a_file_and_mlflow_tags_is_hot_reloaded_canary_kill_switch_and_shadow(spec, ts, tracking,
                                                                                           state, tmp_path):
    from mlplatform.serving.app import create_app
    from mlplatform.serving.routing import Router

    v1 = register(tracking, spec, ts, seed=1, rounds=30)
    v2 = register(tracking, spec, ts, seed=2, rounds=30)
    registry.promote(tracking, v1)
    registry.set_alias(tracking, "challenger", v2)
    routing_file = tmp_path / "routing.yaml"
    routing_file.write_text("mode: champion\n")
    app = create_app(spec, tracking, ServingSettings(reload_seconds=0.3, compile=False,
                                                     log=LogSettings(batch_rows=20, flush_seconds=0.2)),
                     routing_file=routing_file)
    served = Served(app)
    row = request_rows(spec, ts.head(1))[0]
    s = requests.Session()

    def variants(ids) -> dict:
        out = {}
        for i in ids:
            r = s.post(f"{served.url}/v1/models/{tracking.model_name}/predict", json=dict(row, id=i))
            assert r.status_code == 200, r.text
            b = r.json()
            assert r.headers["x-variant"] == b["variant"] and b["model_version"] == {"champion": v1,
                                                                                      "challenger": v2}[b["variant"]]
            out[i] = b["variant"]
        return out

    def until(predicate, what: str, timeout: float = 10.0):
        end = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < end, f"not reloaded within {timeout}s: {what}"
            time.sleep(0.1)

    try:
        ids = range(5000, 5400)
        assert set(variants(ids).values()) == {"champion"}
        routing_file.write_text("mode: canary\ncanary_percent: 30\n")
        until(lambda: app.state.server.state.router.routing.canary_percent == 30, "canary 30%")
        got = variants(ids)
        router = Router(app.state.server.state.router.routing, {"champion", "challenger"})
        assert got == {i: router.decide(i).variant for i in ids}  # sticky, by the hash of the id
        assert 0.2 < list(got.values()).count("challenger") / len(got) < 0.4
        assert variants(ids) == got
        # the kill switch as an MLflow tag on the registered model: everything back to the champion
        tracking.client().set_registered_model_tag(tracking.model_name, "serving.kill_switch", "true")
        until(lambda: app.state.server.state.router.mode == "kill_switch", "kill switch")
        assert set(variants(ids).values()) == {"champion"}
        tracking.client().delete_registered_model_tag(tracking.model_name, "serving.kill_switch")
        routing_file.write_text("mode: champion\nshadow: true\n")
        until(lambda: app.state.server.state.router.routing.shadow and
              app.state.server.state.router.mode == "champion", "shadow")
        assert set(variants(range(9000, 9050)).values()) == {"champion"}
        # an invalid routing file keeps the last good routing, and says why on /readyz
        routing_file.write_text("mode: canary\ncanary_percent: 250\n")
        until(lambda: "canary_percent" in app.state.server.last_error, "bad file reported")
        assert s.get(f"{served.url}/readyz").json()["error"].startswith("SettingError")
        assert set(variants(range(9000, 9010)).values()) == {"champion"}
    finally:
        s.close()
        served.stop()
    logged = pl.read_parquet(state / "online_predictions" / spec.name / "*" / "*.parquet")
    shadow = logged.filter(pl.col("shadow"))
    assert shadow.height == 60 and set(shadow["model_version"]) == {v2} and set(shadow["variant"]) == {"challenger"}
    assert set(shadow["entity_id"]) == {str(i) for i in range(9000, 9050)} | {str(i) for i in range(9000, 9010)}


def test_a_server_started_before_any_champion_says_why_and_serves_once_one_is_promoted(spec, ts, tracking, state):
    from mlplatform.serving.app import create_app

    app = create_app(spec, tracking, ServingSettings(reload_seconds=0.3, compile=False))
    served = Served(app)
    s = requests.Session()
    row = request_rows(spec, ts.head(1))[0]
    url = f"{served.url}/v1/models/{tracking.model_name}/predict"
    try:
        assert s.get(f"{served.url}/healthz").status_code == 200
        r = s.get(f"{served.url}/readyz")
        assert r.status_code == 503 and r.json()["aliases"] == {}
        r = s.post(url, json=row)
        assert r.status_code == 503 and "no champion" in r.json()["detail"][0]["msg"]
        assert s.get(f"{served.url}/v2/models/{tracking.model_name}/ready").status_code == 503
        v1 = register(tracking, spec, ts, seed=1, rounds=20)
        registry.promote(tracking, v1)
        end = time.monotonic() + 20
        while s.get(f"{served.url}/readyz").status_code != 200:
            assert time.monotonic() < end, "champion not picked up"
            time.sleep(0.1)
        r = s.post(url, json=row)
        assert r.status_code == 200 and r.json()["model_version"] == v1
    finally:
        s.close()
        served.stop()


def test_the_shadow_scores_in_its_own_process_and_a_killed_shadow_process_is_replaced_without_failed_requests(
        spec, ts, tracking, state):
    import os
    import signal

    from mlplatform.serving.app import create_app

    v1 = register(tracking, spec, ts, seed=1, rounds=30)
    v2 = register(tracking, spec, ts, seed=2, rounds=30)
    registry.promote(tracking, v1)
    registry.set_alias(tracking, "challenger", v2)
    app = create_app(spec, tracking, ServingSettings(reload_seconds=0.3, compile=False,
                                                     routing=RoutingSettings(shadow=True),
                                                     log=LogSettings(batch_rows=10, flush_seconds=0.2)))
    served = Served(app)
    row = request_rows(spec, ts.head(1))[0]
    s = requests.Session()
    url = f"{served.url}/v1/models/{tracking.model_name}/predict"
    shadow = app.state.shadow
    spool = state / "online_predictions" / spec.name

    def shadow_ids() -> set:
        files = list(spool.glob("*/*.parquet"))
        if not files:
            return set()
        logged = pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")
        return set(logged.filter(pl.col("shadow"))["entity_id"])

    def post(ids) -> None:
        for i in ids:
            r = s.post(url, json=dict(row, id=i))
            assert r.status_code == 200 and r.json()["variant"] == "champion", r.text

    def until(predicate, what: str, timeout: float = 90.0):
        end = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < end, f"not within {timeout}s: {what}"
            time.sleep(0.2)

    try:
        assert shadow.pid is None  # no shadow process until a request is shadowed
        post(range(100, 120))
        until(lambda: {str(i) for i in range(100, 120)} <= shadow_ids(), "first shadow rows logged")
        first = shadow.pid
        assert first is not None and first != os.getpid()
        os.kill(first, signal.SIGKILL)
        # Requests go on answering meanwhile; shadow rows of requests in the gap may be skipped (counted), and a
        # new shadow process takes over by itself.
        k = 200

        def recovered() -> bool:
            nonlocal k
            post([k])
            k += 1
            return any(int(i) >= 200 for i in shadow_ids())

        until(recovered, "a new shadow process logs shadow rows")
        assert shadow.pid not in (None, first) and shadow.restarts == 1
    finally:
        s.close()
        served.stop()
    assert shadow.scored >= 1 and shadow.failed == 0
