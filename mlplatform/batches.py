"""Batch periods of a data set: its partitions and the landing-zone layout."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from resources.settings import DatasetSpec


def partitions_def(spec: DatasetSpec) -> dg.TimeWindowPartitionsDefinition:
    start, end = spec.batch_start, spec.batch_end
    if spec.cadence == "daily":
        return dg.DailyPartitionsDefinition(start_date=start, end_date=end)
    if spec.cadence == "weekly":
        return dg.WeeklyPartitionsDefinition(start_date=start, end_date=end)
    return dg.MonthlyPartitionsDefinition(start_date=start, end_date=end)


def window(spec: DatasetSpec, partition: str) -> tuple[dt.datetime, dt.datetime]:
    """[start, end) of a partition, as naive datetimes (the data's event times are naive)."""
    tw = partitions_def(spec).time_window_for_partition_key(partition)
    return tw.start.replace(tzinfo=None), tw.end.replace(tzinfo=None)


def partition_of(spec: DatasetSpec, ts: dt.datetime) -> str:
    pdef = partitions_def(spec)
    for key in pdef.get_partition_keys():
        start, end = window(spec, key)
        if start <= ts < end:
            return key
    raise ValueError(f"{ts} is outside the batch periods {spec.batch_start}..{spec.batch_end} of {spec.name}")


@dataclass
class Landing:
    """The landing zone: where batches and labels arrive (a folder locally, an object-store prefix at scale)."""

    root: Path

    def records_dir(self, partition: str) -> Path:
        return self.root / "records" / partition

    def labels_dir(self, partition: str) -> Path:
        return self.root / "labels" / partition

    def quarantine_dir(self, kind: str, partition: str) -> Path:
        return self.root / "quarantine" / kind / partition

    def files(self, kind: str, partition: str) -> list[Path]:
        d = self.root / kind / partition
        return sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")) if d.exists() else []

    def partitions_with_files(self, kind: str) -> list[str]:
        d = self.root / kind
        return sorted(p.name for p in d.iterdir() if p.is_dir() and any(p.iterdir())) if d.exists() else []

    def quarantine(self, kind: str, partition: str, path: Path, reason: str, run_id: str) -> Path:
        """Move a rejected file next to a reason file; the file itself is kept, never deleted."""
        qdir = self.quarantine_dir(kind, partition)
        qdir.mkdir(parents=True, exist_ok=True)
        target = qdir / path.name
        shutil.copy2(path, target)
        (qdir / f"{path.name}.reason.json").write_text(json.dumps({
            "file": str(path), "partition": partition, "kind": kind, "reason": reason, "dagster_run_id": run_id,
            "quarantined_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        }, indent=1))
        path.unlink()  # only after the copy and its reason are on disk
        return target
