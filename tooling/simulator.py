"""Production simulator: replays the production period into the landing zone, batch by batch,
and delivers each batch's labels once its label delay has passed. Deterministic, idempotent, resettable."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from mlplatform.batches import DONE_SUFFIX, Landing, partition_keys, window
from mlplatform.sources import format_times, has_production, parse_times, source_name
from mlplatform.spec import DatasetSpec, SettingError


@dataclass
class Release:
    records: list[str]
    labels: list[str]
    clock: str | None


class Simulator:
    def __init__(self, spec: DatasetSpec, landing: Landing, scale: int = 1):
        self.spec = spec
        self.landing = landing
        self.scale = scale
        self.state_file = landing.root / "simulator.json"
        self._production: pl.DataFrame | None = None

    # --- state ------------------------------------------------------------------------------------
    def state(self) -> dict:
        if self.state_file.exists():
            return json.loads(self.state_file.read_text())
        return {"released": [], "labels_released": []}

    def _save(self, state: dict) -> None:
        self.landing.root.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.state_file)

    # --- data -------------------------------------------------------------------------------------
    def production(self) -> pl.DataFrame:
        """Production rows with their labels, sorted by event time (labels are held back until due)."""
        if self._production is None:
            if not has_production(self.spec):
                raise SettingError(
                    f"{self.spec.path}: data set {self.spec.name} has no production source (setting "
                    f"'source.production' is not set), so the simulator has nothing to release: land batch files "
                    f"in {self.landing.root}/records/<batch>/ (and labels in {self.landing.root}/labels/<batch>/) "
                    f"yourself, or set source.production to replay files")
            _, production, labels = self.spec.load_source()
            if production.empty:
                raise SettingError(f"{self.spec.path}: the production source of {self.spec.name} "
                                   f"({source_name(self.spec, 'production')}) has no rows: nothing to release")
            df = pl.from_pandas(production)
            lab = pl.from_pandas(labels).select(self.spec.id_column, self.spec.target)
            df = df.join(lab, on=self.spec.id_column, how="left")
            t = self.spec.time_column
            df = df.with_columns(parse_times(df[t], self.spec.time_type, self.spec.timezone).alias("_t"))
            if self.scale > 1:  # a larger copy for benchmarks: resampled rows with fresh ids
                n = df.height
                df = pl.concat([df.with_columns((pl.col(self.spec.id_column) + (i * 10 * n)))
                                for i in range(self.scale)])
            self._production = df.sort("_t")
        return self._production

    def batches(self) -> list[str]:
        """Partitions that hold production rows, in time order."""
        df = self.production()
        tmin, tmax = df["_t"].min(), df["_t"].max()
        keys = []
        for key in partition_keys(self.spec):
            start, end = window(self.spec, key)
            if end > tmin and start <= tmax:
                keys.append(key)
        return keys

    # --- commands ---------------------------------------------------------------------------------
    def release(self, n: int = 1, start: str | None = None) -> Release:
        """Release the next `n` batches (from `start` on, if given: a drill can jump ahead in time)."""
        state = self.state()
        pending = [b for b in self.batches() if b not in state["released"] and (start is None or b >= start)][:n]
        df = self.production()
        features = [self.spec.id_column, self.spec.time_column, *self.spec.feature_names]
        for key in pending:
            start, end = window(self.spec, key)
            rows = df.filter((pl.col("_t") >= start) & (pl.col("_t") < end)).select(features)
            if self.spec.time_type != "datetime":  # landed as the producer stores it (time_column.type)
                t = self.spec.time_column
                rows = rows.with_columns(format_times(rows[t], self.spec.time_type, self.spec.timezone).alias(t))
            self._write(self.landing.records_dir(key) / f"batch-{key}.parquet", rows)
            state["released"].append(key)
        labels = self._due_labels(state)
        for key in labels:
            start, end = window(self.spec, key)
            rows = df.filter((pl.col("_t") >= start) & (pl.col("_t") < end)).select(
                self.spec.id_column, self.spec.target).drop_nulls(self.spec.target)
            if rows.height:  # a source without labels (no labels file, no target column) delivers none
                self._write(self.landing.labels_dir(key) / f"labels-{key}.parquet", rows)
            state["labels_released"].append(key)
        self._save(state)
        return Release(pending, labels, self.clock(state))

    def clock(self, state: dict | None = None) -> str | None:
        """Simulated now: the end of the last released batch period."""
        state = state or self.state()
        if not state["released"]:
            return None
        return window(self.spec, state["released"][-1])[1].isoformat()

    def _due_labels(self, state: dict) -> list[str]:
        if not state["released"]:
            return []
        now = window(self.spec, state["released"][-1])[1]
        delay = dt.timedelta(days=self.spec.label_delay_days)
        return [k for k in state["released"]
                if k not in state["labels_released"] and window(self.spec, k)[1] + delay <= now]

    def _write(self, path: Path, df: pl.DataFrame) -> None:
        """Write atomically (a hidden temporary name, then rename), then drop the `<name>.done` marker
        that tells the landing zone the file is complete, so it is taken without waiting to settle."""
        marker = path.with_name(path.name + DONE_SUFFIX)
        if not path.exists():  # idempotent: a released file is never rewritten
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f".{path.name}.tmp"
            df.write_parquet(tmp)
            tmp.replace(path)  # atomic: a sensor never sees half a file
        if not marker.exists():  # also after a crash between the rename and the marker
            marker.touch()

    def reset(self) -> None:
        for sub in ("records", "labels", "quarantine"):
            shutil.rmtree(self.landing.root / sub, ignore_errors=True)
        self.state_file.unlink(missing_ok=True)
