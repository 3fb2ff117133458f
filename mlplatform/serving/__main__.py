"""`python -m mlplatform.serving [--host 127.0.0.1] [--port 8080]`: serve the data set's models (make serve)."""

from __future__ import annotations

import argparse
import os


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from mlplatform.serving.app import create_app
    from mlplatform.serving.settings import load_serving_settings
    from mlplatform.spec import dataset_name, dataset_spec
    from mlplatform.tracking import Tracking

    ap = argparse.ArgumentParser(prog="python -m mlplatform.serving")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    ap.add_argument("--port", type=int, default=int(os.environ.get("MLP_SERVE_PORT", "8080")))
    ap.add_argument("--routing-file", default=None, help="routing YAML, polled (overrides serving.routing)")
    ap.add_argument("--log-level", default="warning")
    args = ap.parse_args(argv)
    spec = dataset_spec()
    settings = load_serving_settings(spec)
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise SystemExit("MLFLOW_TRACKING_URI is not set: run `make up` first (it writes .state/mlp.env)")
    tracking = Tracking(uri, experiment=dataset_name(), model_name=settings.model_name or f"{dataset_name()}-model")
    import sys

    # The interpreter lock is handed over after 1 ms instead of 5 ms: a background thread (the prediction log,
    # the shadow's sender) then never holds a request for long.
    sys.setswitchinterval(0.001)
    app = create_app(spec, tracking, settings, routing_file=args.routing_file)
    print(f"serving {tracking.model_name} on http://{args.host}:{args.port}  (docs: /docs, metrics: /metrics)",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                http="httptools", loop="uvloop")


if __name__ == "__main__":
    main()
