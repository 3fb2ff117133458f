"""The ASGI app: FastAPI with orjson bodies, models from MLflow by alias, hot-reloaded routing.

Endpoints
  POST /v1/models/{name}/predict      {"rows": [{...}, ...]} or one row {...}; -> predictions, variant, version
  POST /v2/models/{name}/infer        Open Inference Protocol v2: one named input tensor per feature
  GET  /v2/models/{name}/ready        200 once the champion is loaded
  GET  /v2/models/{name}              OIP metadata (inputs from the spec)
  GET  /healthz  /readyz  /metrics    liveness, readiness, Prometheus
The request schema in /openapi.json is generated from the data-set spec (types, ranges, categories).
A refused request is a 4xx naming the field, never a 5xx.
"""

import contextlib
import datetime as dt
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlplatform.serving.models import ServedModel, load_version
from mlplatform.serving.predlog import PredictionLog, rows_for_log, spool_dir
from mlplatform.serving.routing import (CHAMPION, Router, effective_routing, read_routing_file,
                                        routing_from_tags)
from mlplatform.serving.settings import ServingSettings, load_serving_settings
from mlplatform.serving.shadow import ShadowProcess
from mlplatform.serving.validation import RequestError, RowValidator
from mlplatform.spec import DatasetSpec
from mlplatform.tracking import Tracking

log = logging.getLogger("mlplatform.serving")


@dataclass(frozen=True)
class State:
    """What serves right now; swapped as a whole by the reloader (a request reads it once)."""
    models: dict[str, ServedModel]          # alias -> model
    aliases: dict[str, str]                 # alias -> version
    router: Router
    loaded_at: float = field(default_factory=time.time)


class ModelServer:
    """Loads the aliased versions, polls MLflow and the routing file, swaps the state atomically."""

    def __init__(self, spec: DatasetSpec, tracking: Tracking, settings: ServingSettings,
                 routing_file: str | Path | None = None):
        self.spec, self.tracking, self.settings = spec, tracking, settings
        path = routing_file or settings.routing_file
        if path and not Path(path).is_absolute():
            path = Path(spec.path).parent / path
        self.routing_file = Path(path) if path else None
        self.state: State | None = None
        self.cache: dict[str, ServedModel] = {}
        self.last_error = ""
        self.reloads = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_reload = None

    def refresh(self) -> State | None:
        from mlplatform import registry

        aliases = registry.aliases(self.tracking)
        tags = {}
        try:
            rm = self.tracking.client().get_registered_model(self.tracking.model_name)
            tags = dict(rm.tags or {})
        except Exception:  # noqa: BLE001 - not registered yet: aliases() already said {}
            pass
        file_values = read_routing_file(self.routing_file) if self.routing_file and self.routing_file.exists() else {}
        routing = effective_routing(self.settings.routing, file_values, routing_from_tags(tags))
        need = Router(routing, set(aliases)).aliases_needed()
        models = {}
        for alias in sorted(need):
            version = aliases.get(alias)
            if version is None:
                continue
            if version not in self.cache:
                self.cache[version] = load_version(self.tracking, version, compile=self.settings.compile)
            models[alias] = self.cache[version]
        router = Router(routing, set(models))
        old = self.state
        if old is None or old.aliases != {a: m.version for a, m in models.items()} or old.router.routing != routing:
            self.state = State(models, {a: m.version for a, m in models.items()}, router)
            self.reloads += 1
            live = {m.version for m in models.values()}
            for v in [v for v in self.cache if v not in live]:
                del self.cache[v]  # in-flight requests keep their own reference
            if self.on_reload:
                self.on_reload(self.state)
        return self.state

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.reload_seconds):
            try:
                self.refresh()
                self.last_error = ""
            except Exception as exc:  # noqa: BLE001 - keep serving the last good state, say why
                self.last_error = f"{type(exc).__name__}: {exc}"[:500]
                log.warning("reload failed, still serving %s: %s",
                            self.state.aliases if self.state else "nothing", self.last_error)

    def start(self) -> None:
        try:
            self.refresh()
        except Exception as exc:  # noqa: BLE001 - not ready yet (/readyz says why); the poller retries
            self.last_error = f"{type(exc).__name__}: {exc}"[:500]
            log.warning("initial load failed: %s", self.last_error)
        self._thread = threading.Thread(target=self._loop, name="model-reloader", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.latency = Histogram("mlp_serving_request_seconds", "Request latency (server side)",
                                 ["endpoint", "variant"], registry=self.registry,
                                 buckets=(.0005, .001, .002, .003, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.requests = Counter("mlp_serving_requests", "Requests by endpoint, variant and status",
                                ["endpoint", "variant", "status"], registry=self.registry)
        self.errors = Counter("mlp_serving_errors", "Refused or failed requests by endpoint, variant and kind",
                              ["endpoint", "variant", "kind"], registry=self.registry)
        self.rows = Counter("mlp_serving_rows", "Rows scored by variant", ["variant"], registry=self.registry)
        self.shadow = Gauge("mlp_serving_shadow_rows", "Rows scored in shadow since start, by status", ["status"],
                            registry=self.registry)
        self.version = Gauge("mlp_serving_model_version", "Version served per alias", ["alias"],
                             registry=self.registry)
        self.log_dropped = Gauge("mlp_serving_log_dropped_rows", "Prediction-log rows dropped (queue full)",
                                 registry=self.registry)
        self.reloads = Gauge("mlp_serving_reloads", "Routing/model state swaps", registry=self.registry)


def request_schema(spec: DatasetSpec, settings: ServingSettings) -> dict:
    """JSON schema of one request row, from the spec (types, ranges, categories, required features)."""
    props: dict[str, Any] = {spec.id_column: {"type": ["integer", "string"], "description": "entity id: sticky "
                                              "routing key, logged"},
                             spec.time_column: {"type": "string", "format": "date-time",
                                                "description": "event time: the batch period of the log row"}}
    required = []
    for f in spec.features:
        pol = settings.policy_for(f.name)
        if f.type == "numeric":
            p: dict[str, Any] = {"type": "number"}
            if f.min is not None:
                p["minimum"] = f.min
            if f.max is not None:
                p["maximum"] = f.max
        elif f.type == "boolean":
            p = {"type": "boolean"}
        else:
            p = {"type": "string", "enum": list(f.categories or ())} if settings.unknown_category == "reject" \
                else {"type": "string", "examples": list(f.categories or ()),
                      "description": f"one of {list(f.categories or ())}; other values: "
                                     f"{settings.unknown_category}"}
        if pol.policy == "reject":
            required.append(f.name)
        else:
            p = {"anyOf": [p, {"type": "null"}], "description": f"missing -> {pol.policy}"
                 + (f" ({pol.default!r})" if pol.policy == "default" else "")}
        props[f.name] = p
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def create_app(spec: DatasetSpec, tracking: Tracking, settings: ServingSettings | None = None,
               routing_file: str | Path | None = None, start: bool = True, log_dir: Path | None = None):
    import orjson
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    settings = settings or load_serving_settings(spec)
    validator = RowValidator(spec, settings)
    server = ModelServer(spec, tracking, settings, routing_file)
    metrics = Metrics()
    log_dir = log_dir or spool_dir(spec, settings.log.spool_dir)
    plog = PredictionLog(spec, log_dir, settings.log.batch_rows, settings.log.flush_seconds,
                         settings.log.queue_rows) if settings.log.enabled else None
    # The challenger's shadow scores in a child process started on the first shadowed request, writing to the same
    # spool: the server's process only hands each shadowed request over (mlplatform/serving/shadow.py).
    shadow = ShadowProcess(spec, tracking, settings, log_dir)
    names = {tracking.model_name, spec.name}

    def on_reload(state: State):
        metrics.reloads.set(server.reloads)
        for alias, m in state.models.items():
            metrics.version.labels(alias).set(float(m.version))

    server.on_reload = on_reload

    row_schema = request_schema(spec, settings)
    predict_body = {"content": {"application/json": {"schema": {"oneOf": [
        {"type": "object", "properties": {"rows": {"type": "array", "items": row_schema, "minItems": 1,
                                                   "maxItems": settings.max_rows}},
         "required": ["rows"], "additionalProperties": False},
        row_schema]}}}, "required": True}
    oip_types = {"numeric": "FP64", "categorical": "BYTES", "boolean": "BOOL"}
    infer_body = {"content": {"application/json": {"schema": {
        "type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string"},
            "inputs": {"type": "array", "items": {"type": "object", "required": ["name", "shape", "datatype", "data"],
                       "properties": {"name": {"type": "string", "enum": [spec.id_column, *spec.feature_names]},
                                      "shape": {"type": "array", "items": {"type": "integer"}},
                                      "datatype": {"type": "string"},
                                      "data": {"type": "array"}}}}}}}}, "required": True}

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        server.stop()
        shadow.close()
        if plog is not None:
            plog.close()

    app = FastAPI(lifespan=lifespan, title=f"mlplatform serving: {spec.name}", version="1",
                  description=f"Online predictions of the registered model {tracking.model_name} "
                              f"({spec.description}). Request rows follow the data-set spec {spec.path}.")
    app.state.server, app.state.metrics, app.state.plog, app.state.validator = server, metrics, plog, validator
    app.state.shadow = shadow

    def err(status: int, loc: list, msg: str, endpoint: str, kind: str, variant: str = "none"):
        metrics.errors.labels(endpoint, variant, kind).inc()
        metrics.requests.labels(endpoint, variant, str(status)).inc()
        return JSONResponse({"detail": [{"loc": ["body", *loc] if loc and loc[0] != "path" else loc, "msg": msg,
                                         "field": str(loc[-1]) if loc else ""}]}, status_code=status)

    def score(rows: list, key_header: str | None, endpoint: str, request_id: str):
        """(predictions, decision, model, state) or raises RequestError."""
        state = server.state
        if state is None or CHAMPION not in state.models:
            raise RequestError(["path", "name"], f"no champion of {tracking.model_name} is loaded yet"
                               + (f" ({server.last_error})" if server.last_error else ""), status=503)
        t0 = time.perf_counter()
        prepared = validator.prepare(rows)
        key = key_header or (prepared.entity_ids[0] if prepared.entity_ids[0] is not None else request_id)
        decision = state.router.decide(key)
        model = state.models[decision.variant]
        preds = model.predict(prepared.matrix)
        latency = (time.perf_counter() - t0) * 1000
        now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
        mode = state.router.mode
        if plog is not None:
            plog.add(rows_for_log(prepared, preds, request_id, decision.variant, model.version, False, mode,
                                  latency, spec, now))
            metrics.log_dropped.set(plog.dropped)
        if decision.shadow and decision.shadow in state.models:
            shadow.submit(state.models[decision.shadow], prepared, request_id, decision.shadow, mode, now)
        metrics.rows.labels(decision.variant).inc(len(rows))
        return preds, decision, model

    def check_name(name: str):
        if name not in names:
            raise RequestError(["path", "name"], f"unknown model {name!r}; this server serves "
                                                 f"{sorted(names)}", status=404)

    async def read_json(request: Request):
        body = await request.body()
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise RequestError([], f"the body is not valid JSON: {exc}", status=400) from None

    async def answer(endpoint: str, name: str, request: Request, rows_of, request_id_of, output_of):
        """One scoring request: parse, score, count, answer; a refused request gets a 4xx naming the field."""
        t0 = time.perf_counter()
        variant = "none"
        try:
            check_name(name)
            body = await read_json(request)
            request_id = request_id_of(body)
            rows = rows_of(body)
            preds, decision, model = score(rows, request.headers.get(settings.routing.sticky_header), endpoint,
                                           request_id)
            variant = decision.variant
        except RequestError as exc:
            return err(exc.status, exc.loc, exc.message, endpoint, "refused" if exc.status < 500 else "unavailable")
        except Exception as exc:  # noqa: BLE001
            log.exception("%s failed", endpoint)
            return err(500, [], f"{type(exc).__name__}: {exc}", endpoint, "failed", variant)
        out = output_of(model, variant, request_id, preds)
        metrics.latency.labels(endpoint, variant).observe(time.perf_counter() - t0)
        metrics.requests.labels(endpoint, variant, "200").inc()
        return Response(orjson.dumps(out), media_type="application/json",
                        headers={"x-model-version": model.version, "x-variant": variant})

    def v1_rows(body: Any) -> list:
        if isinstance(body, dict) and "rows" in body:
            extra = [k for k in body if k != "rows"]
            if extra:
                raise RequestError([extra[0]], f"unknown field {extra[0]!r:.60}; send {{'rows': [...]}} or one row")
            return body["rows"]
        if isinstance(body, dict):
            return [body]
        raise RequestError([], "the body must be an object: {'rows': [...]} or one row")

    @app.post("/v1/models/{name}/predict", openapi_extra={"requestBody": predict_body},
              summary="Predict one row or many", responses={422: {"description": "a field is refused: detail "
                                                                                 "names it"}})
    async def predict(name: str, request: Request):
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        return await answer(
            "v1_predict", name, request, v1_rows, lambda body: request_id,
            lambda model, variant, rid, preds: {"model_name": tracking.model_name, "model_version": model.version,
                                                "variant": variant, "request_id": rid,
                                                "predictions": preds.tolist()})

    @app.post("/v2/models/{name}/infer", openapi_extra={"requestBody": infer_body},
              summary="Open Inference Protocol v2 inference")
    async def infer(name: str, request: Request):
        def request_id_of(body: Any) -> str:
            given = body.get("id") if isinstance(body, dict) else None
            if isinstance(given, str) and given:
                return given
            return request.headers.get("x-request-id") or uuid.uuid4().hex

        return await answer(
            "v2_infer", name, request, oip_rows, request_id_of,
            lambda model, variant, rid, preds: {
                "model_name": tracking.model_name, "model_version": model.version, "id": rid,
                "parameters": {"variant": variant},
                "outputs": [{"name": "prediction", "shape": [len(preds)], "datatype": "FP64",
                             "data": preds.tolist()}]})


    def oip_rows(body: Any) -> list[dict]:
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or not body["inputs"]:
            raise RequestError(["inputs"], "expected {'inputs': [{'name', 'shape', 'datatype', 'data'}, ...]}")
        columns: dict[str, list] = {}
        n = None
        allowed = {spec.id_column, spec.time_column, *spec.feature_names}
        for i, t in enumerate(body["inputs"]):
            if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not isinstance(t.get("data"), list):
                raise RequestError(["inputs", i], "each input needs a 'name' and a 'data' list")
            if t["name"] not in allowed:
                raise RequestError(["inputs", i, "name"], f"unknown input {t['name']!r:.60}; inputs are "
                                                          f"{sorted(allowed)}")
            data = t["data"]
            if data and isinstance(data[0], list):  # shape [n, 1]
                data = [d[0] if isinstance(d, list) and len(d) == 1 else d for d in data]
            if n is not None and len(data) != n:
                raise RequestError(["inputs", i, "data"], f"input {t['name']!r} has {len(data)} values, "
                                                          f"the first input has {n}")
            n = len(data)
            columns[t["name"]] = data
        return [{k: v[j] for k, v in columns.items()} for j in range(n or 0)]

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str):
        if name not in names:
            return JSONResponse({"error": f"unknown model {name!r}"}, status_code=404)
        st = server.state
        ok = st is not None and CHAMPION in st.models
        return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2/models/{name}")
    async def model_metadata(name: str):
        if name not in names:
            return JSONResponse({"error": f"unknown model {name!r}"}, status_code=404)
        st = server.state
        return JSONResponse({
            "name": tracking.model_name, "platform": "lightgbm",
            "versions": sorted({m.version for m in st.models.values()}) if st else [],
            "aliases": st.aliases if st else {},
            "runtimes": {a: m.runtime for a, m in st.models.items()} if st else {},
            "routing": st.router.routing.model_dump() if st else None,
            "inputs": [{"name": f.name, "datatype": oip_types[f.type], "shape": [-1]} for f in spec.features],
            "outputs": [{"name": "prediction", "datatype": "FP64", "shape": [-1]}]})

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        st = server.state
        ok = st is not None and CHAMPION in st.models
        return JSONResponse({"ready": ok, "aliases": st.aliases if st else {}, "error": server.last_error},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prom():
        for status, value in (("ok", shadow.scored), ("error", shadow.failed), ("skipped", shadow.skipped)):
            metrics.shadow.labels(status).set(value)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if start:
        server.start()
    return app
