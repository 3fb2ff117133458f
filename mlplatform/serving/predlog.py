"""The prediction log: every online prediction (and every shadow score) as a row, written in batches as
Parquet files by a background thread, never on the response path.

Layout: <spool>/<partition>/part-<utc time>-<uuid>.parquet, <partition> being the batch period of the
row's event time (the request's time column, else the time of the prediction), so the `online_predictions`
asset ingests one partition's files into lakeFS like any other batch. Files are written under a hidden
name and renamed, so a reader never sees half a file. If the queue is full (the disk cannot keep up), rows
are dropped and counted (`dropped`), the response is never delayed.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from mlplatform.spec import DatasetSpec, state_dir

log = logging.getLogger(__name__)


def take_all(queue: collections.deque) -> list:
    """Everything in `queue` now, oldest first, while other threads may still append (popleft is atomic)."""
    out = []
    while queue:
        try:
            out.append(queue.popleft())
        except IndexError:
            break
    return out


def spool_dir(spec: DatasetSpec, configured: str = "") -> Path:
    return Path(configured) if configured else state_dir() / "online_predictions" / spec.name


def partition_key(spec: DatasetSpec, t: dt.datetime) -> str:
    from mlplatform.batches import KEY_FORMAT, _floor

    return _floor(spec.cadence, t).strftime(KEY_FORMAT[spec.cadence])


class PredictionLog:
    def __init__(self, spec: DatasetSpec, root: Path, batch_rows: int = 500, flush_seconds: float = 2.0,
                 queue_rows: int = 100_000):
        self.spec, self.root = spec, Path(root)
        self.batch_rows, self.flush_seconds, self.queue_rows = batch_rows, flush_seconds, queue_rows
        self._rows: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.dropped = 0
        self.written = 0
        self.files: list[Path] = []
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    # called on the request path: O(1), no I/O
    def add(self, rows: list[dict[str, Any]]) -> None:
        if len(self._rows) + len(rows) > self.queue_rows:
            self.dropped += len(rows)
            return
        self._rows.extend(rows)
        if len(self._rows) >= self.batch_rows:
            self._wake.set()

    def _take(self) -> list[dict]:
        return take_all(self._rows)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            self.flush()
        self.flush()

    def flush(self) -> None:
        rows = self._take()
        if not rows:
            return
        try:
            self._write(rows)
        except Exception:  # noqa: BLE001 - a failed write is logged with its cause; serving continues
            log.exception("prediction log: could not write %d row(s) under %s", len(rows), self.root)
            self.dropped += len(rows)

    def _write(self, rows: list[dict]) -> None:
        import polars as pl

        by_part: dict[str, list[dict]] = collections.defaultdict(list)
        for r in rows:
            by_part[partition_key(self.spec, r["event_time"] or r["predicted_at"])].append(r)
        schema = self.schema()
        for part, part_rows in by_part.items():
            d = self.root / part
            d.mkdir(parents=True, exist_ok=True)
            stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
            name = f"part-{stamp}-{uuid.uuid4().hex[:8]}.parquet"
            tmp = d / f".{name}.tmp"
            # Column by column: each Series is built in one short call holding the interpreter lock (~0.3 ms
            # for 500 rows), where one frame from row dicts holds it for the whole batch (~1 ms and more),
            # delaying any request that arrives meanwhile.
            df = pl.DataFrame([pl.Series(k, [r.get(k) for r in part_rows], dtype=t) for k, t in schema.items()])
            df.write_parquet(tmp)
            os.replace(tmp, d / name)
            self.files.append(d / name)
            self.written += len(part_rows)

    def schema(self) -> dict:
        import polars as pl

        types = {"numeric": pl.Float64, "categorical": pl.String, "boolean": pl.Boolean}
        s = {"request_id": pl.String, "row_index": pl.Int32, "entity_id": pl.String, "predicted_at": pl.Datetime("us"),
             "event_time": pl.Datetime("us"), "variant": pl.String, "model_version": pl.String,
             "shadow": pl.Boolean, "routing_mode": pl.String}
        s.update({f.name: types[f.type] for f in self.spec.features})
        s.update({f.name: pl.Float64 for f in self.spec.engineered_features})
        s.update({"prediction": pl.Float64, "policy_flags": pl.String, "latency_ms": pl.Float64})
        return s

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)


def rows_for_log(prepared, predictions, request_id: str, variant: str, version: str, shadow: bool,
                 mode: str, latency_ms: float, spec: DatasetSpec, now: dt.datetime) -> list[dict]:
    eng = [f.name for f in spec.engineered_features]
    out = []
    for i, raw in enumerate(prepared.raw):
        row = {"request_id": request_id, "row_index": i, "entity_id": None if prepared.entity_ids[i] is None
               else str(prepared.entity_ids[i]), "predicted_at": now, "event_time": prepared.event_times[i],
               "variant": variant, "model_version": version, "shadow": shadow, "routing_mode": mode,
               "prediction": float(predictions[i]),
               "policy_flags": json.dumps(prepared.flags[i], sort_keys=True) if prepared.flags[i] else "{}",
               "latency_ms": latency_ms}
        row.update(raw)
        row.update(zip(eng, prepared.engineered[i]))
        out.append(row)
    return out


LOG_KEY = ("request_id", "row_index", "shadow")


def read_spool(spec: DatasetSpec, root: Path, partition: str):
    """The logged rows of one partition (complete files only), one row per (request, row, shadow)."""
    import polars as pl

    from mlplatform.batches import is_data_file_name

    d = Path(root) / partition
    files = sorted(p for p in d.glob("*.parquet") if is_data_file_name(p.name)) if d.is_dir() else []
    if not files:
        return None, []
    df = pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")
    return df.unique(subset=list(LOG_KEY), keep="first", maintain_order=True), files


def wait_written(plog: PredictionLog, rows: int, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        plog._wake.set()
        if plog.written >= rows:
            return True
        time.sleep(0.05)
    return plog.written >= rows
