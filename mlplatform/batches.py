"""Batch periods of a data set: its partitions and the landing-zone layout."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import stat
import time
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


# --- the landing zone -------------------------------------------------------------------------------
#
# Layout: <root>/records/<partition>/<file> and <root>/labels/<partition>/<file>, where <partition> is a
# batch period's key (e.g. 2018-11-01). A file is *complete*, and only then read or requested, when
#   - a marker `<file>.done` sits next to it and is not older than the file (written after it), or
#   - a `_SUCCESS` file in its folder is not older than it (the Hadoop/Spark convention), or
#   - its size and mtime have not changed for `settle_seconds` (every write moves the mtime, so a file
#     whose mtime is at least `settle_seconds` old has had a stable size and mtime for that long).
# Never taken: hidden names (`.x`), metadata names (`_x`, such as `_SUCCESS`), temporary names (`*.tmp`,
# `*.temp`, `*.partial`, `*.part`, `*.crdownload`, `*.swp`, `*~`), the `.done` markers, and folders.
# Writers should write under a temporary or hidden name and rename, then (optionally) drop the marker.

SETTLE_SECONDS = 10.0
DONE_SUFFIX = ".done"
FOLDER_MARKER = "_SUCCESS"
TEMP_SUFFIXES = (".tmp", ".temp", ".partial", ".part", ".crdownload", ".swp", "~")
KINDS = ("records", "labels")


def is_data_file_name(name: str) -> bool:
    """A name the landing zone takes as data (markers, hidden and temporary names are not)."""
    return not (name.startswith((".", "_")) or name.endswith(TEMP_SUFFIXES) or name.endswith(DONE_SUFFIX))


@dataclass(frozen=True)
class LandedFile:
    """One data file in a partition folder, with whether it is complete and why (or why not)."""

    path: Path
    size: int
    mtime_ns: int
    complete: bool
    why: str

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def entry(self) -> str:
        """Identity of this delivery of the file: a rewrite changes size or mtime, so it is a new entry."""
        return f"{self.path.name}|{self.size}|{self.mtime_ns}"


@dataclass(frozen=True)
class Stray:
    """Something under records/ or labels/ that is not a partition folder: skipped, never read."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class Scan:
    kind: str
    partitions: dict[str, list[LandedFile]]   # partition key -> its data files (complete or not)
    strays: list[Stray]


@dataclass
class Landing:
    """The landing zone: where batches and labels arrive (a folder locally, an object-store prefix at scale)."""

    root: Path
    settle_seconds: float = SETTLE_SECONDS

    def records_dir(self, partition: str) -> Path:
        return self.root / "records" / partition

    def labels_dir(self, partition: str) -> Path:
        return self.root / "labels" / partition

    def quarantine_dir(self, kind: str, partition: str) -> Path:
        return self.root / "quarantine" / kind / partition

    # --- what has landed ----------------------------------------------------------------------------
    def landed(self, kind: str, partition: str, now: float | None = None) -> list[LandedFile]:
        """Every data file of a partition folder, complete or not, sorted by name."""
        d = self.root / kind / partition
        if not d.is_dir():
            return []
        now = time.time() if now is None else now
        entries = {}
        for p in d.iterdir():
            try:
                st = p.stat()
            except FileNotFoundError:  # renamed or moved away while listing
                continue
            if stat.S_ISREG(st.st_mode):
                entries[p.name] = (p, st)
        folder_marker = entries.get(FOLDER_MARKER)
        out = []
        for name in sorted(entries):
            if not is_data_file_name(name):
                continue
            p, st = entries[name]
            marker = entries.get(name + DONE_SUFFIX)
            age = now - st.st_mtime
            if marker is not None and marker[1].st_mtime_ns >= st.st_mtime_ns:
                complete, why = True, f"marker {name + DONE_SUFFIX}"
            elif folder_marker is not None and folder_marker[1].st_mtime_ns >= st.st_mtime_ns:
                complete, why = True, f"marker {FOLDER_MARKER}"
            elif age >= self.settle_seconds:
                complete, why = True, f"unchanged for {age:.0f}s"
            else:
                complete, why = False, (f"still being written? modified {max(age, 0):.1f}s ago; taken once "
                                        f"unchanged for {self.settle_seconds:g}s (settle_seconds) or when "
                                        f"{name + DONE_SUFFIX} or {FOLDER_MARKER} appears")
            out.append(LandedFile(p, st.st_size, st.st_mtime_ns, complete, why))
        return out

    def files(self, kind: str, partition: str) -> list[Path]:
        """The complete data files of a partition (what an ingestion run reads), sorted by name."""
        return [f.path for f in self.landed(kind, partition) if f.complete]

    def partitions_with_files(self, kind: str) -> list[str]:
        """Folders under `kind` holding at least one data file (complete or not); no check of their names."""
        d = self.root / kind
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if p.is_dir() and any(
            c.is_file() and is_data_file_name(c.name) for c in p.iterdir()))

    def scan(self, kind: str, partition_keys: list[str], now: float | None = None) -> Scan:
        """The partition folders of `kind` with their files, and everything else under it as strays.

        Never raises on a bad name: a folder that is not a partition key (`tmp`, a wrong date, a period
        outside the batch periods) or a file directly under `kind/` is reported as a stray and skipped."""
        d = self.root / kind
        now = time.time() if now is None else now
        valid = set(partition_keys)
        partitions: dict[str, list[LandedFile]] = {}
        strays: list[Stray] = []
        if not d.is_dir():
            return Scan(kind, partitions, strays)
        for p in sorted(d.iterdir(), key=lambda x: x.name):
            if p.name.startswith("."):
                continue  # hidden: a writer's scratch space, never ours to read or to warn about
            if not p.is_dir():
                strays.append(Stray(p, f"a file directly under {kind}/; files go in {kind}/<partition>/ "
                                       f"(e.g. {kind}/{partition_keys[0] if partition_keys else '<key>'}/)"))
                continue
            if p.name not in valid:
                strays.append(Stray(p, _not_a_partition(p.name, partition_keys)))
                continue
            try:
                files = self.landed(kind, p.name, now)
            except OSError as exc:  # unreadable folder: reported, the others are still taken
                strays.append(Stray(p, f"cannot be read ({exc})"))
                continue
            if files:
                partitions[p.name] = files
        return Scan(kind, partitions, strays)

    # --- quarantine ---------------------------------------------------------------------------------
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
        marker = path.with_name(path.name + DONE_SUFFIX)
        if marker.exists():  # a stale marker would vouch for a later file of the same name
            shutil.copy2(marker, qdir / marker.name)
            marker.unlink()
        return target


def _not_a_partition(name: str, keys: list[str]) -> str:
    span = f"{keys[0]}..{keys[-1]}" if keys else "(none)"
    try:
        day = dt.date.fromisoformat(name)
    except ValueError:
        return f"'{name}' is not a partition key (a batch period start such as {keys[0] if keys else '?'})"
    if keys and (day.isoformat() < keys[0] or day.isoformat() > keys[-1]):
        return (f"'{name}' is outside the batch periods {span} (batch.start..batch.end of the data-set spec)")
    return f"'{name}' is not the start of a batch period (periods start at {', '.join(keys[:3])}, ...)"
