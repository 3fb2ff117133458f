"""Set-up shared by the benchmarks: the project on sys.path, telemetry off, the car-loan spec, a quick training set,
and the platform on a private lakeFS server with its resources from the one factory (resources/environment.py).

Benchmarks import this module (`import common` / `from common import ...`, run as `python bench/bench_x.py`);
they never import the tests.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # mlplatform/, resources/, ... (platform/ is loaded as a file, never imported)

# Telemetry of every library off (as the Makefile does), before any of them is imported.
os.environ["NML_DISABLE_USAGE_LOGGING"] = "1"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DBT_SEND_ANONYMOUS_USAGE_STATS", "false")

# Dagster's console logger at WARNING: the runs' DEBUG events would drown the results tables.
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def car_loan():
    from tooling.testbed import car_loan as spec

    return spec()


def quick_training_set(spec, n: int = 6000, seed_shift: int = 0):
    from tooling.testbed import quick_training_set as build

    return build(spec, n=n, seed_shift=seed_shift)


@dataclass
class Platform:
    """The platform on a private lakeFS server: its settings, its resources and its folders."""

    tmp: Path
    state: Path
    dagster_home: Path
    server: Any  # tooling.services.LakeFSServer
    settings: Any  # resources.environment.Settings
    resources: dict

    @property
    def lakefs(self):
        return self.resources["lakefs"]

    @property
    def mlflow(self):
        return self.resources["mlflow"]

    def env(self) -> dict[str, str]:
        """The environment variables that give these settings (for a subprocess)."""
        return self.settings.to_env()


def settings_for(server, state: Path, spec=None, mlflow: bool = True, repository: str | None = None, **changes):
    """Settings for a private lakeFS server, a state folder and the data set (default car_loan)."""
    from tooling.testbed import testbed_settings

    spec = spec or car_loan()
    mlflow_uri = f"sqlite:///{state / 'mlflow' / 'mlflow.db'}" if mlflow else ""
    return testbed_settings(server.env(), repository or f"bench-{uuid.uuid4().hex[:8]}", state, spec, mlflow_uri,
                            **changes)


@contextmanager
def private_platform(prefix: str, spec=None, mlflow: bool = True, export: bool = True,
                     tmp_root: Path | None = None) -> Iterator[Platform]:
    """A temporary folder with a state folder, a Dagster home and a lakeFS server on a free port (stopped and
    removed afterwards), and the platform's resources for them; the lakeFS repository is created.

    `export` also puts the settings into os.environ, for code that reads the environment (definitions, a
    fallback publish, subprocesses)."""
    from resources.environment import build_resources
    from tooling.services import LakeFSServer, free_port

    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=tmp_root))
    server = None
    try:
        state, home = tmp / "state", tmp / "dagster_home"
        state.mkdir()
        home.mkdir()
        if mlflow:
            (state / "mlflow").mkdir()
        server = LakeFSServer(tmp / "lakefs", port=free_port()).start()
        settings = settings_for(server, state, spec, mlflow)
        if export:
            os.environ.update(settings.to_env())
        resources = build_resources(settings)
        resources["lakefs"].ensure_repository()
        yield Platform(tmp, state, home, server, settings, resources)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
