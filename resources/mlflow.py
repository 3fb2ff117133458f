"""MLflow tracking and registry as a Dagster resource: a local SQLite store by default, MLFLOW_TRACKING_URI
overrides it. The behaviour (retries, redaction, fail-closed alias reads) is the library's `Tracking`.

One store serves every data set: `scoped(spec)` gives a data set's experiment (`<data set>`) and registered model
(`<data set>-model`); every asset, op and sensor of a data set uses its scoped resource."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import dagster as dg
from pydantic import PrivateAttr

from mlplatform.tracking import MLflowUnavailable, Tracking

T = TypeVar("T")


class MLflowResource(dg.ConfigurableResource):
    """Where runs are tracked and models registered; `model_name` is the registered model."""

    tracking_uri: str
    artifact_root: str = ""  # for a local store: where artifacts go (default: next to the SQLite file)
    experiment: str = "mlplatform"
    model_name: str = "mlplatform-model"
    ui_url: str = "http://127.0.0.1:5000"
    retries: int = 3
    timeout_seconds: float = 5.0

    _tracking: Tracking | None = PrivateAttr(default=None)

    def scoped(self, spec) -> "MLflowResource":
        """The same store for one data set (a spec or its name): experiment `<data set>`, registered model
        `<data set>-model`. One MLflow resource serves every data set; each asset and sensor of a data set
        scopes it to its own model, so no two data sets ever share a model or an experiment."""
        name = spec if isinstance(spec, str) else spec.name
        if (self.experiment, self.model_name) == (name, f"{name}-model"):
            return self
        return MLflowResource(tracking_uri=self.tracking_uri, artifact_root=self.artifact_root, experiment=name,
                              model_name=f"{name}-model", ui_url=self.ui_url, retries=self.retries,
                              timeout_seconds=self.timeout_seconds)

    def tracking(self) -> Tracking:
        if self._tracking is None:
            self._tracking = Tracking(self.tracking_uri, self.artifact_root, self.experiment, self.model_name,
                                      self.ui_url, self.retries, self.timeout_seconds)
        return self._tracking

    @property
    def display_uri(self) -> str:
        return self.tracking().display_uri

    def redacting(self):
        return self.tracking().redacting()

    def setup(self) -> str:
        return self.tracking().setup()

    def with_retries(self, fn: Callable[[], T]) -> T:
        return self.tracking().with_retries(fn)

    def client(self):
        return self.tracking().client()

    def run_url(self, run_id: str) -> str:
        return self.tracking().run_url(run_id)

    def model_version_url(self, version: str | int) -> str:
        return self.tracking().model_version_url(version)

    def alias_version(self, alias: str) -> Any | None:
        return self.tracking().alias_version(alias)


__all__ = ["MLflowResource", "MLflowUnavailable"]
