"""schemathesis against the server's generated OpenAPI schema, in process (ASGI, no socket): valid and
invalid requests for every operation, with a champion loaded from a real MLflow store, and not one answer is
a server error (5xx). Bounded: a fixed number of examples per operation and mode."""

import time

import pytest

from mlplatform import registry
from mlplatform.serving.settings import LogSettings, ServingSettings
from mlplatform.tracking import Tracking

from .helpers import car_loan, quick_training_set
from .test_serving_http import register

pytestmark = pytest.mark.services
EXAMPLES = 60  # per operation and generation mode


def test_generated_requests_get_no_server_error(mlflow_uri, state):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    from mlplatform.serving.app import create_app

    spec = car_loan()
    tracking = Tracking(mlflow_uri, experiment=spec.name, model_name=f"{spec.name}-model")
    registry.promote(tracking, register(tracking, spec, quick_training_set(spec, n=2000), seed=1, rounds=10))
    app = create_app(spec, tracking, ServingSettings(reload_seconds=60, compile=False,
                                                     log=LogSettings(batch_rows=50, flush_seconds=0.2)))
    try:
        end = time.monotonic() + 60
        while app.state.server.state is None or "champion" not in app.state.server.state.models:
            assert time.monotonic() < end, f"champion not loaded: {app.state.server.last_error}"
            time.sleep(0.1)
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        operations = [r.ok() for r in schema.get_all_operations()]
        assert {f"{o.method.upper()} {o.path}" for o in operations} >= {
            "POST /v1/models/{name}/predict", "POST /v2/models/{name}/infer", "GET /v2/models/{name}/ready",
            "GET /v2/models/{name}", "GET /healthz", "GET /readyz", "GET /metrics"}
        calls = {"n": 0, "2xx": 0, "4xx": 0}
        negated_none = []

        for op in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                @given(case=op.as_strategy(generation_mode=mode))
                @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                          suppress_health_check=list(HealthCheck))
                def run(case):
                    # the served model's name in half the cases, so bodies reach the scoring path
                    if "name" in (case.path_parameters or {}) and calls["n"] % 2 == 0:
                        case.path_parameters["name"] = tracking.model_name
                    response = case.call()
                    calls["n"] += 1
                    calls["2xx" if response.status_code < 300 else "4xx"] += response.status_code < 500
                    case.validate_response(response, checks=[not_a_server_error])

                try:
                    run()
                except Unsatisfiable:  # a GET with no body, at most a free string in its path: nothing invalid
                    assert mode == GenerationMode.NEGATIVE and op.method.upper() == "GET", op.path
                    negated_none.append(f"{op.method.upper()} {op.path}")
        # the test reached both accepted and refused answers, not only one kind
        assert calls["2xx"] > 0 and calls["4xx"] > 0 and calls["n"] >= len(operations) * 2
        assert "POST /v1/models/{name}/predict" not in negated_none and "POST /v2/models/{name}/infer" not in negated_none
    finally:
        app.state.server.stop()
        if app.state.plog is not None:
            app.state.plog.close()
