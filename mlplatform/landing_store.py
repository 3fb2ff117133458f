"""The landing zone as an object-store prefix: the same interface as the local folder (`batches.Landing`).

Producers write objects under `<prefix>records/<partition>/<file>` and `<prefix>labels/<partition>/<file>` of a
store (here a lakeFS branch, through the lakefs SDK; written there directly or through lakeFS's S3 gateway as
s3://<repository>/<branch>/<prefix>...). `ObjectStoreLanding` is a `Landing` whose folder is a local mirror of that
prefix: before it lists, it copies every new or changed data object into the folder (written under a hidden
name and renamed, with the object's mtime, and a `.done` marker: an object is complete the moment it is visible,
so no settle time applies) and removes the copies of objects that are gone. Readers therefore get local paths,
exactly as with the folder. A quarantined file is copied with its reason to `<prefix>quarantine/...` in the
store, and its object is deleted from the landing prefix (then, as locally, moved in the mirror): never lost.

The library view: no Dagster here. `resources/landing_store.py` configures one from `MLP_LANDING_URL`
(lakefs://<repository>/<branch>/<prefix>).
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol

from mlplatform.batches import DONE_SUFFIX, KINDS, REASON_SUFFIX, Landing, is_data_file_name


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    mtime: float  # seconds
    checksum: str


class ObjectStore(Protocol):
    def list(self, prefix: str) -> Iterable[StoredObject]: ...

    def get(self, key: str) -> bytes: ...

    def put(self, key: str, data: bytes) -> None: ...

    def delete(self, key: str) -> None: ...


def parse_landing_url(url: str) -> tuple[str, str, str]:
    """(repository, branch, prefix ending in '/' or empty) of lakefs://<repository>/<branch>/<prefix>."""
    if not url.startswith("lakefs://"):
        raise ValueError(f"setting MLP_LANDING_URL must be lakefs://<repository>/<branch>/<prefix>, got {url!r}")
    parts = url[len("lakefs://"):].split("/", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ValueError(f"setting MLP_LANDING_URL {url!r} names no repository and branch "
                         f"(lakefs://<repository>/<branch>/<prefix>)")
    prefix = parts[2].strip("/") if len(parts) == 3 else ""
    return parts[0], parts[1], f"{prefix}/" if prefix else ""


class LakeFSPrefixStore:
    """Objects on a lakeFS branch, staged or committed, through the lakefs SDK (`client`: a lakefs.Client)."""

    def __init__(self, client: Any, repository: str, branch: str):
        import lakefs

        self.repository, self.branch_name = repository, branch
        self.branch = lakefs.Repository(repository, client=client).branch(branch)

    def list(self, prefix: str) -> Iterable[StoredObject]:
        for o in self.branch.objects(prefix=prefix):
            if hasattr(o, "checksum"):  # not a common prefix
                yield StoredObject(o.path, int(o.size_bytes or 0), float(o.mtime), o.checksum)

    def get(self, key: str) -> bytes:
        with self.branch.object(key).reader("rb") as r:
            return r.read()

    def put(self, key: str, data: bytes) -> None:
        self.branch.object(key).upload(data, mode="wb")

    def delete(self, key: str) -> None:
        self.branch.object(key).delete()


def _mirror_mtime_ns(obj: StoredObject) -> int:
    """The object's mtime (whole seconds in lakeFS) with a sub-second part from its checksum: a rewrite of the same
    size within the same second is still a new delivery (the arrival sensor keys entries on name, size, mtime)."""
    frac = int(hashlib.sha256(obj.checksum.encode()).hexdigest()[:8], 16) % 10**9
    return int(obj.mtime) * 10**9 + frac


@dataclass
class ObjectStoreLanding(Landing):
    """The landing zone at `prefix` of `store`, mirrored into the local folder `root` (see the module's doc)."""

    store: Any = None  # an ObjectStore
    prefix: str = ""
    min_sync_seconds: float = 1.0  # one listing serves the many reads of one sensor tick or one run
    _synced_at: float = field(default=-1e9, init=False, repr=False)

    def sync(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._synced_at < self.min_sync_seconds:
            return
        seen: set[str] = set()
        for kind in KINDS:
            for obj in self.store.list(f"{self.prefix}{kind}/"):
                rel = obj.key[len(self.prefix):]
                if not is_data_file_name(rel.rsplit("/", 1)[-1]) or any(p in ("", ".", "..") for p in rel.split("/")):
                    continue  # markers, temporary names: an object is complete once visible
                seen.add(rel)
                local, ns = self.root / rel, _mirror_mtime_ns(obj)
                try:
                    st = local.stat()
                    if st.st_size == obj.size and st.st_mtime_ns == ns:
                        continue
                except FileNotFoundError:
                    pass
                local.parent.mkdir(parents=True, exist_ok=True)
                tmp = local.with_name(f".{uuid.uuid4().hex}.tmp")
                try:
                    tmp.write_bytes(self.store.get(obj.key))
                    os.utime(tmp, ns=(ns, ns))
                    os.replace(tmp, local)
                finally:
                    tmp.unlink(missing_ok=True)
                marker = local.with_name(local.name + DONE_SUFFIX)
                marker.touch()
                os.utime(marker, ns=(ns, ns))
        for kind in KINDS:  # copies of objects that are gone (withdrawn by their producer, or quarantined)
            base = self.root / kind
            if not base.is_dir():
                continue
            for path in base.rglob("*"):
                rel = path.relative_to(self.root).as_posix()
                if path.is_file() and is_data_file_name(path.name) and rel not in seen:
                    path.unlink(missing_ok=True)
                    path.with_name(path.name + DONE_SUFFIX).unlink(missing_ok=True)
        self._synced_at = time.monotonic()

    # Everything that lists the zone sees the store's objects first.
    def landed(self, kind: str, partition: str, now: float | None = None):
        self.sync()
        return super().landed(kind, partition, now)

    def partitions_with_files(self, kind: str) -> list[str]:
        self.sync()
        return super().partitions_with_files(kind)

    def scan(self, kind: str, partition_keys: list[str], now: float | None = None):
        self.sync()
        return super().scan(kind, partition_keys, now)

    def root_strays(self):
        self.sync()
        return super().root_strays()

    def quarantine(self, kind: str, partition: str, path: Path, reason: str, run_id: str) -> Path:
        """As the folder's, and in the store: the file and its reason under <prefix>quarantine/, its object
        removed from the landing prefix (after the copies are written)."""
        key = self.prefix + Path(path).relative_to(self.root).as_posix()
        target = super().quarantine(kind, partition, path, reason, run_id)
        qkey = self.prefix + target.relative_to(self.root).as_posix()
        self.store.put(qkey, target.read_bytes())
        self.store.put(qkey + REASON_SUFFIX, target.with_name(target.name + REASON_SUFFIX).read_bytes())
        self.store.delete(key)
        self._synced_at = -1e9
        return target


__all__ = ["ObjectStore", "StoredObject", "LakeFSPrefixStore", "ObjectStoreLanding", "parse_landing_url"]
