"""dbt in this process: `dbt build` through dbt-core's programmatic API (dbtRunner), with the project's manifest
parsed once per process and reused.

Why: one `dbt build` process per step paid dbt's import (~3 s) and a full parse of the project every time (the
per-run --vars defeat partial parsing). Here dbt is imported once, the project is parsed once per process for a
data set's parse-time vars (the spec's columns; the per-run table locations are only read when a model compiles),
and each build gets that parsed manifest.

Isolation: dbt reads its profile (the run's own DuckDB file, the lakeFS gateway and keys) from environment
variables when an invocation starts, and its adapter and flags are process-global. So one invocation runs at a
time in a process (a lock), with the run's variables put into os.environ for that invocation only and the
previous values restored after it; dbt-duckdb's database handle is closed when the invocation ends, so nothing of
one run's database stays open for the next. Separate processes (Dagster's multiprocess executor) share nothing.
The keys still travel only in the environment: no file is written with them.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

_LOCK = threading.Lock()  # dbt's adapter, flags and invocation context are process-global
_MANIFESTS: dict[tuple, object] = {}  # (project, parse vars, database name, project files) -> dbt Manifest
DATABASE_ENV = "MLP_DUCKDB_PATH"  # the profile's DuckDB file (dbt_project/profiles.yml)


@dataclass
class DbtOutcome:
    """What a `dbt build` did: `success` as dbt's exit code would say it; `results` the node results
    (unique_id -> {"status", "message", "failures"}), None when dbt stopped before running any node; `output` the
    tail of dbt's log lines (info and above) and the exception, for error messages."""

    success: bool
    results: dict[str, dict] | None
    output: str = ""
    log_lines: list[str] = field(default_factory=list)

    @property
    def returncode(self) -> int:
        return 0 if self.success else 1


def _project_signature(project_dir: Path) -> tuple:
    """Names, sizes and modification times of the project's files: a changed model, macro or yml re-parses."""
    files = sorted(p for p in project_dir.rglob("*")
                   if p.suffix in (".sql", ".yml", ".yaml") and "target" not in p.relative_to(project_dir).parts)
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


class _Env:
    """os.environ updated with `values` for the block's duration, the previous values restored after it. Only
    used under _LOCK."""

    def __init__(self, values: Mapping[str, str]):
        self.values = {k: str(v) for k, v in values.items() if os.environ.get(k) != str(v)}
        self.saved: dict[str, str | None] = {}

    def __enter__(self):
        for k, v in self.values.items():
            self.saved[k] = os.environ.get(k)
            os.environ[k] = v
        return self

    def __exit__(self, *exc):
        for k, old in self.saved.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old


def _close_duckdb_handles() -> None:
    """dbt-duckdb keeps its DuckDB environment in a class attribute until another profile needs it: close it now,
    so the run's database file is released (and not reused) once the invocation ends."""
    try:
        from dbt.adapters.duckdb.connections import DuckDBConnectionManager
    except ImportError:  # another adapter
        return
    with DuckDBConnectionManager._LOCK:
        env = DuckDBConnectionManager._ENV
        DuckDBConnectionManager._ENV = None
        if env is not None:
            env.close()


def _common_args(project_dir: Path, vars_: dict, target: Path) -> list[str]:
    return ["--project-dir", str(project_dir), "--profiles-dir", str(project_dir), "--vars", json.dumps(vars_),
            "--target-path", str(target), "--log-path", str(target), "--no-send-anonymous-usage-stats",
            "--log-level", "none", "--no-use-colors", "--no-use-colors-file"]


def _manifest(project_dir: Path, parse_vars: dict, env: Mapping[str, str], scratch: Path):
    """The project parsed for `parse_vars`, once per process (re-parsed when a project file changes). Called under
    _LOCK with the invocation's environment set.

    dbt-duckdb names the database after its file's stem (`batch_models` for `.../batch_models.duckdb`) and the
    manifest records that name in every node: a manifest is reused only for databases of the same name."""
    from dbt.cli.main import dbtRunner

    key = (str(project_dir), hashlib.sha256(json.dumps(parse_vars, sort_keys=True).encode()).hexdigest(),
           Path(env.get(DATABASE_ENV, "")).stem, _project_signature(project_dir))
    if key not in _MANIFESTS:
        lines: collections.deque[str] = collections.deque(maxlen=60)
        res = dbtRunner(callbacks=[_collector(lines)]).invoke(
            ["parse", *_common_args(project_dir, parse_vars, scratch), "--no-partial-parse", "--no-write-json"])
        if not res.success or res.result is None:
            raise RuntimeError(f"`dbt parse` of {project_dir} failed: {res.exception or ''}\n" + "\n".join(lines))
        for stale in [k for k in _MANIFESTS if k[:3] == key[:3]]:
            del _MANIFESTS[stale]
        _MANIFESTS[key] = res.result
    return _MANIFESTS[key]


def _collector(lines: collections.deque):
    def collect(event) -> None:
        if event.info.level in ("info", "warn", "error") and event.info.msg:
            lines.append(str(event.info.msg))
    return collect


def dbt_build(project_dir: Path, select: list[str], vars_: dict, parse_vars: dict, env: Mapping[str, str],
              target: Path) -> DbtOutcome:
    """`dbt build --select <select> --vars <vars_>` in this process, the profile's environment variables taken from
    `env` (only for this invocation), dbt's log under `target`. The project is parsed for `parse_vars` (vars that
    may shape the manifest: column names in tests); `vars_` may differ from them only in what models read when
    they compile (e.g. table locations)."""
    from dbt.cli.main import dbtRunner

    target.mkdir(parents=True, exist_ok=True)
    lines: collections.deque[str] = collections.deque(maxlen=60)
    with _LOCK, _Env(env):
        try:
            manifest = _manifest(project_dir, parse_vars, env, target)
            res = dbtRunner(manifest=manifest, callbacks=[_collector(lines)]).invoke(
                ["build", *_common_args(project_dir, vars_, target), "--no-write-json", "--select", *select])
        finally:
            _close_duckdb_handles()
    run = res.result
    results = None
    if run is not None and hasattr(run, "results"):
        results = {}
        for r in run.results:
            status = getattr(r.status, "value", r.status)
            results[r.node.unique_id] = {"status": str(status), "message": r.message, "failures": r.failures}
    output = "\n".join(lines) + (f"\n{type(res.exception).__name__}: {res.exception}" if res.exception else "")
    return DbtOutcome(success=bool(res.success), results=results, output=output[-5000:], log_lines=list(lines))
