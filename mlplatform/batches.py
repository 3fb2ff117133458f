"""Batch periods of a data set: its partitions and the landing-zone layout."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import stat
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from mlplatform.spec import DatasetSpec


# --- batch periods ----------------------------------------------------------------------------------
#
# A spec's cadence cuts time into whole periods from the first period boundary at or after `batch.start`
# up to `batch.end` (exclusive): the same partitions Dagster's time-window partitions give for the cron
# schedule below (resources/partitions.py builds those from these constants; a unit test holds them equal).

CRON = {"hourly": "0 * * * *", "daily": "0 0 * * *", "weekly": "0 0 * * 0", "monthly": "0 0 1 * *",
        "yearly": "0 0 1 1 *"}
KEY_FORMAT = {"hourly": "%Y-%m-%d-%H:%M", "daily": "%Y-%m-%d", "weekly": "%Y-%m-%d", "monthly": "%Y-%m-%d",
              "yearly": "%Y"}
CADENCES = tuple(CRON)


def _parse_bound(value: str) -> dt.datetime:
    for fmt in ("%Y-%m-%d-%H:%M", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d", "%Y"):
        try:
            return dt.datetime.strptime(str(value), fmt)
        except ValueError:
            continue
    return dt.datetime.fromisoformat(str(value)).replace(tzinfo=None)


def _floor(cadence: str, t: dt.datetime) -> dt.datetime:
    """The start of the period holding t."""
    if cadence == "hourly":
        return t.replace(minute=0, second=0, microsecond=0)
    day = t.replace(hour=0, minute=0, second=0, microsecond=0)
    if cadence == "daily":
        return day
    if cadence == "weekly":  # weeks start on Sunday, as cron's day 0
        return day - dt.timedelta(days=(day.weekday() + 1) % 7)
    if cadence == "monthly":
        return day.replace(day=1)
    return day.replace(month=1, day=1)


def _next(cadence: str, start: dt.datetime) -> dt.datetime:
    """The start of the period after the one starting at `start`."""
    if cadence == "hourly":
        return start + dt.timedelta(hours=1)
    if cadence == "daily":
        return start + dt.timedelta(days=1)
    if cadence == "weekly":
        return start + dt.timedelta(days=7)
    if cadence == "monthly":
        return start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
    return start.replace(year=start.year + 1)


def _first(cadence: str, t: dt.datetime) -> dt.datetime:
    f = _floor(cadence, t)
    return f if f == t else _next(cadence, f)


def partition_keys(spec: DatasetSpec) -> list[str]:
    """Every batch period's key, oldest first."""
    cadence, fmt = spec.cadence, KEY_FORMAT[spec.cadence]
    start, end = _first(cadence, _parse_bound(spec.batch_start)), _parse_bound(spec.batch_end)
    keys = []
    while _next(cadence, start) <= end:
        keys.append(start.strftime(fmt))
        start = _next(cadence, start)
    return keys


def window(spec: DatasetSpec, partition: str) -> tuple[dt.datetime, dt.datetime]:
    """[start, end) of a partition, as naive datetimes (the data's event times are naive)."""
    try:
        start = dt.datetime.strptime(partition, KEY_FORMAT[spec.cadence])
    except ValueError:
        raise ValueError(f"{partition!r} is not a {spec.cadence} batch key of {spec.name} "
                         f"(format {KEY_FORMAT[spec.cadence]})") from None
    if _floor(spec.cadence, start) != start:
        raise ValueError(f"{partition!r} does not start a {spec.cadence} batch period of {spec.name}")
    return start, _next(spec.cadence, start)


def partition_of(spec: DatasetSpec, ts: dt.datetime) -> str:
    key = _floor(spec.cadence, ts).strftime(KEY_FORMAT[spec.cadence])
    if key not in set(partition_keys(spec)):
        raise ValueError(f"{ts} is outside the batch periods {spec.batch_start}..{spec.batch_end} of {spec.name}")
    return key


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
QUARANTINE = "quarantine"
FUTURE_TOLERANCE_SECONDS = 60.0  # an mtime further ahead of this clock than this is clock skew, reported
NAME_MAX_BYTES = 255             # the file-name limit of common file systems (ext4, xfs, APFS, NTFS)
REASON_SUFFIX = ".reason.json"
# A quarantined file's name, its reason file and its marker must all fit in NAME_MAX_BYTES.
QUARANTINE_NAME_BYTES = NAME_MAX_BYTES - max(len(REASON_SUFFIX), len(DONE_SUFFIX)) - 8


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
            elif age < -FUTURE_TOLERANCE_SECONDS:
                complete, why = False, (f"mtime in the future: modified {-age:.0f}s after this clock's now "
                                        f"(clock skew between the writer and this machine?); taken once this "
                                        f"clock passes it by {self.settle_seconds:g}s (settle_seconds) or when "
                                        f"{name + DONE_SUFFIX} or {FOLDER_MARKER} appears")
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
            strays += [Stray(f.path, f.why) for f in files
                       if not f.complete and f.why.startswith("mtime in the future")]
            try:
                strays += [Stray(c, f"a folder inside the partition folder {kind}/{p.name}/: files in subfolders "
                                    f"are never read; put them directly in {kind}/{p.name}/")
                           for c in sorted(p.iterdir(), key=lambda x: x.name)
                           if not c.name.startswith((".", "_")) and c.is_dir()]
            except OSError as exc:
                strays.append(Stray(p, f"cannot be read ({exc})"))
            if files:
                partitions[p.name] = files
        return Scan(kind, partitions, strays)

    def root_strays(self) -> list[Stray]:
        """Entries directly under the landing root other than records/, labels/ and quarantine/: never read."""
        if not self.root.is_dir():
            return []
        known = (*KINDS, QUARANTINE)
        return [Stray(p, f"not a landing-zone entry: only {', '.join(k + '/' for k in known)} are read "
                         f"under {self.root}; records go in records/<partition>/, labels in labels/<partition>/")
                for p in sorted(self.root.iterdir(), key=lambda x: x.name)
                if p.name not in known and not p.name.startswith(".")]

    # --- quarantine ---------------------------------------------------------------------------------
    def quarantine(self, kind: str, partition: str, path: Path, reason: str, run_id: str) -> Path:
        """Move a rejected file into quarantine/<kind>/<partition>/ next to a reason file; never deleted.

        The entry keeps the file's name when that name is free and fits the file-name limit with the reason
        suffix; otherwise (a second file of the same name, or a long name) it is `<id>-<name shortened>`, with
        <id> unique, so nothing quarantined earlier is overwritten. The reason JSON records the original name.
        Each piece is written under a temporary name and renamed, and the landing file is removed only after
        its copy and reason are in place: on any OSError the partial entry is removed, the landing file is
        left where it was, and the error is raised (the caller reports the file as rejected, not moved)."""
        qdir = self.quarantine_dir(kind, partition)
        qdir.mkdir(parents=True, exist_ok=True)
        marker = path.with_name(path.name + DONE_SUFFIX)
        name = _quarantine_name(qdir, path.name, run_id)
        target, reason_file, qmarker = qdir / name, qdir / (name + REASON_SUFFIX), qdir / (name + DONE_SUFFIX)
        tmp = qdir / f".{uuid.uuid4().hex}.tmp"
        placed: list[Path] = []
        try:
            shutil.copy2(path, tmp)
            os.replace(tmp, target)
            placed.append(target)
            tmp.write_text(json.dumps({
                "file": str(path), "original_name": path.name, "quarantined_as": name, "partition": partition,
                "kind": kind, "reason": reason, "dagster_run_id": run_id,
                "quarantined_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            }, indent=1))
            os.replace(tmp, reason_file)
            placed.append(reason_file)
            path.unlink()  # only after the copy and its reason are on disk
        except BaseException:
            for p in (tmp, *placed):
                p.unlink(missing_ok=True)
            raise
        if marker.exists():  # a stale marker would vouch for a later file of the same name
            try:
                shutil.copy2(marker, tmp)
                os.replace(tmp, qmarker)
                marker.unlink()
            except OSError:  # the file itself is quarantined; a marker left behind is older than any rewrite
                tmp.unlink(missing_ok=True)
        return target


def _fits(name: str) -> bool:
    return len(name.encode()) <= QUARANTINE_NAME_BYTES


def _shorten(name: str, limit: int) -> str:
    """`name` cut to at most `limit` UTF-8 bytes, keeping its extension when that is short."""
    raw = name.encode()
    if len(raw) <= limit:
        return name
    dot = name.rfind(".")
    ext = name[dot:] if 0 < dot and len(name[dot:].encode()) <= 16 else ""
    stem = name[: len(name) - len(ext)].encode()[: limit - len(ext.encode())].decode(errors="ignore")
    return stem + ext


def _quarantine_name(qdir: Path, name: str, run_id: str) -> str:
    """A name for a quarantine entry that is free in `qdir` (with its reason and marker) and fits the limit."""
    def free(n: str) -> bool:
        return not any((qdir / x).exists() for x in (n, n + REASON_SUFFIX, n + DONE_SUFFIX))

    if _fits(name) and free(name):
        return name
    while True:
        uid = hashlib.sha256(f"{run_id}|{name}|{time.time_ns()}|{uuid.uuid4().hex}".encode()).hexdigest()[:16]
        candidate = f"{uid}-{_shorten(name, QUARANTINE_NAME_BYTES - len(uid) - 1)}"
        if free(candidate):
            return candidate


def _not_a_partition(name: str, keys: list[str]) -> str:
    span = f"{keys[0]}..{keys[-1]}" if keys else "(none)"
    try:
        day = dt.date.fromisoformat(name)
    except ValueError:
        return f"'{name}' is not a partition key (a batch period start such as {keys[0] if keys else '?'})"
    if keys and (day.isoformat() < keys[0] or day.isoformat() > keys[-1]):
        return (f"'{name}' is outside the batch periods {span} (batch.start..batch.end of the data-set spec)")
    return f"'{name}' is not the start of a batch period (periods start at {', '.join(keys[:3])}, ...)"
