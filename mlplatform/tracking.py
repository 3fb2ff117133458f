"""MLflow as the library sees it: one tracking store and registered model, with bounded retries, fast failure on an
unreachable store and credentials never shown. No Dagster here: `resources.mlflow.MLflowResource` configures one."""



from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from mlplatform.lazy import lazy_import
requests = lazy_import("requests")

from mlplatform.redact import install_log_filter, redact, redact_exception, redact_uri, redacting, uri_secrets

T = TypeVar("T")


class MLflowUnavailable(RuntimeError):
    """The MLflow tracking store cannot be reached; the message names the URI (its credentials redacted)."""


class _RedactingClient:
    """An MlflowClient whose exceptions never carry the tracking URI's credentials (same types, same codes)."""

    def __init__(self, client, secrets: tuple[str, ...]):
        self._client, self._secrets = client, secrets

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            except Exception as exc:
                raise redact_exception(exc, self._secrets)

        call.__name__ = getattr(attr, "__name__", name)
        call.__doc__ = getattr(attr, "__doc__", None)
        return call


class Tracking:
    """Where runs are tracked and models registered; `model_name` is the registered model."""

    def __init__(self, tracking_uri: str, artifact_root: str = "", experiment: str = "mlplatform",
                 model_name: str = "mlplatform-model", ui_url: str = "http://127.0.0.1:5000", retries: int = 3,
                 timeout_seconds: float = 5.0):
        self.tracking_uri, self.artifact_root, self.experiment = tracking_uri, artifact_root, experiment
        self.model_name, self.ui_url, self.retries, self.timeout_seconds = model_name, ui_url, retries, timeout_seconds
        self._ready = False
        self._experiment_id = ""

    @property
    def display_uri(self) -> str:
        """The tracking URI with its credentials replaced by ***: the only form to print, log or record."""
        return redact_uri(self.tracking_uri)

    def _secrets(self) -> tuple[str, ...]:
        return tuple(uri_secrets(self.tracking_uri))

    def redacting(self):
        """`with mlflow.redacting(): mlflow_lib.start_run(...)`: MLflow errors leaving the block (the fluent API
        quotes the full tracking URI) have the URI's credentials and known secrets replaced by ***."""
        return redacting(self._secrets())

    def _check(self) -> None:
        uri = self.tracking_uri
        shown = self.display_uri
        if uri.startswith(("http://", "https://")):
            last = None
            for attempt in range(self.retries):
                try:
                    if requests.get(f"{uri.rstrip('/')}/health", timeout=self.timeout_seconds).ok:
                        return
                    last = "unhealthy"
                except requests.RequestException as exc:
                    last = type(exc).__name__
                time.sleep(min(2 ** attempt * 0.5, 4))
            raise MLflowUnavailable(f"MLflow tracking server {shown} is unreachable after {self.retries} "
                                    f"attempts ({last}); check MLFLOW_TRACKING_URI")
        if uri.startswith("sqlite:///"):
            db = Path(uri[len("sqlite:///"):])
            try:
                db.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise MLflowUnavailable(f"MLflow store {shown}: cannot create {db.parent}: {exc}") from None

    def setup(self) -> str:
        """Point mlflow at the store, make sure the experiment exists; returns the experiment id."""
        if self._ready:
            return self._experiment_id
        with redacting(self._secrets()):  # MLflow's own errors quote the full URI, credentials included
            return self._setup()

    def _setup(self) -> str:
        install_log_filter()  # MLflow's and SQLAlchemy's own log lines never show the URI's credentials
        # MLflow's HTTP client retries a dead server for minutes by default (7 retries, 120 s timeouts): bound
        # it, so an outage fails the step in seconds and Dagster's run retry takes over. The caller's own
        # settings win.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        self._check()  # before importing mlflow (seconds on a busy machine): an unreachable store fails fast
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        exp = self.with_retries(lambda: mlflow.get_experiment_by_name(self.experiment))
        if exp is None:
            artifact = self.artifact_root or (
                (Path(self.tracking_uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
                if self.tracking_uri.startswith("sqlite:///") else None)
            exp_id = self.with_retries(lambda: mlflow.create_experiment(self.experiment, artifact_location=artifact))
        else:
            exp_id = exp.experiment_id
        mlflow.set_experiment(experiment_id=exp_id)
        self._experiment_id = exp_id
        self._ready = True
        return exp_id

    def with_retries(self, fn: Callable[[], T]) -> T:
        """Call fn, retrying a bounded number of times on connection errors, naming the URI at the end."""
        last: Exception | None = None
        for attempt in range(self.retries):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - MLflow raises many types for a dead store
                msg = str(exc)
                transient = any(s in msg for s in ("Connection", "timed out", "Max retries", "database is locked"))
                if not transient:
                    raise redact_exception(exc, self._secrets())
                last = exc
                time.sleep(min(2 ** attempt * 0.5, 4))
        raise MLflowUnavailable(f"MLflow at {self.display_uri} failed {self.retries} times: "
                                f"{redact(last, self._secrets())}") from None

    def client(self):
        from mlflow.tracking import MlflowClient

        self.setup()
        return _RedactingClient(MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri),
                                self._secrets())

    def run_url(self, run_id: str) -> str:
        return redact_uri(f"{self.ui_url.rstrip('/')}/#/experiments/{self._experiment_id or '0'}/runs/{run_id}")

    def model_version_url(self, version: str | int) -> str:
        return redact_uri(f"{self.ui_url.rstrip('/')}/#/models/{self.model_name}/versions/{version}")

    def alias_version(self, alias: str) -> Any | None:
        """The ModelVersion behind an alias, or None when the alias is not set."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client().get_model_version_by_alias(self.model_name, alias)
        except MlflowException as exc:
            # Fail closed: only "not set / no such model" means None; a store error is an error.
            if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise MLflowUnavailable(f"MLflow at {self.display_uri}: cannot read alias {alias!r} of "
                                    f"{self.model_name}: {redact(str(exc), self._secrets())[:300]}") from None
