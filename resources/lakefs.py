"""lakeFS: the repository every data asset is versioned in, with a branch per run (write-audit-publish)."""


import json
from dataclasses import dataclass
from typing import Any

import dagster as dg
import requests
from pydantic import PrivateAttr


class LakeFSError(RuntimeError):
    """lakeFS could not do what was asked; the message names the endpoint, repository and ref."""


class LakeFSUnavailable(LakeFSError):
    """The lakeFS endpoint is unreachable or rejects the credentials."""


class MergeConflict(LakeFSError):
    """Two runs wrote the same paths; `main` keeps the one merged first."""


def run_branch(run_id: str) -> str:
    return f"run-{run_id}"


@dataclass(frozen=True)
class BranchInfo:
    name: str
    commit_id: str
    run_id: str | None


class LakeFSResource(dg.ConfigurableResource):
    """A lakeFS repository reached through the `lakefs` SDK; `main` holds only checked data."""

    endpoint: str
    access_key_id: str
    secret_access_key: str
    repository: str = "mlplatform"
    main_branch: str = "main"
    storage_namespace: str = ""  # default: local://<repository> (the server's local blockstore)
    timeout_seconds: float = 5.0

    _client: Any = PrivateAttr(default=None)
    _checked: bool = PrivateAttr(default=False)
    _repo_ready: bool = PrivateAttr(default=False)

    # --- connection -------------------------------------------------------------------------
    def check(self) -> None:
        """Fail fast, naming the endpoint, if lakeFS is down or the keys are wrong (never hang)."""
        if self._checked:
            return
        url = self.endpoint.rstrip("/")
        try:
            resp = requests.get(f"{url}/api/v1/user", auth=(self.access_key_id, self.secret_access_key),
                                timeout=self.timeout_seconds)
        except requests.RequestException as exc:
            raise LakeFSUnavailable(
                f"lakeFS at {url} is unreachable ({type(exc).__name__}): start it with `make up`, "
                f"or set LAKEFS_ENDPOINT to a running server"
            ) from None
        if resp.status_code in (401, 403):
            raise LakeFSUnavailable(
                f"lakeFS at {url} rejected the credentials of LAKEFS_ACCESS_KEY_ID={self.access_key_id!r} "
                f"(HTTP {resp.status_code})"
            )
        if resp.status_code != 200:
            raise LakeFSUnavailable(f"lakeFS at {url} answered HTTP {resp.status_code}: {resp.text[:200]}")
        self._checked = True

    @property
    def client(self):
        if self._client is None:
            import lakefs

            self.check()
            self._client = lakefs.Client(host=self.endpoint, username=self.access_key_id,
                                         password=self.secret_access_key)
            self._client.config.retries = 2  # bounded: never an endless wait on a dead server
        return self._client

    def repo(self):
        """The repository, created on first use: a fresh lakeFS (no repository yet) just works."""
        import lakefs

        repo = lakefs.Repository(self.repository, client=self.client)
        if not self._repo_ready:
            self.ensure_repository(repo)
        return repo

    def ensure_repository(self, repo=None) -> None:
        import lakefs

        repo = repo or lakefs.Repository(self.repository, client=self.client)
        namespace = self.storage_namespace or f"local://{self.repository}"
        repo.create(storage_namespace=namespace, default_branch=self.main_branch, exist_ok=True)
        self._repo_ready = True

    # --- links ---------------------------------------------------------------------------------
    def uri(self, ref: str, path: str) -> str:
        return f"lakefs://{self.repository}/{ref}/{path}"

    def s3_uri(self, ref: str, path: str) -> str:
        """The same object through lakeFS's S3 gateway (bucket = repository, key = ref/path)."""
        return f"s3://{self.repository}/{ref}/{path}"

    def commit_url(self, commit_id: str) -> str:
        return f"{self.endpoint.rstrip('/')}/repositories/{self.repository}/commits/{commit_id}"

    def object_url(self, ref: str, path: str) -> str:
        return f"{self.endpoint.rstrip('/')}/repositories/{self.repository}/objects?ref={ref}&path={path}"

    # --- branches --------------------------------------------------------------------------------
    def head(self, ref: str | None = None) -> str:
        return self.repo().ref(ref or self.main_branch).get_commit().id

    def ensure_branch(self, name: str, source: str | None = None) -> str:
        """Create `name` from `source` (default main) if missing; zero-copy. Returns its head commit."""
        self.ensure_repository()
        branch = self.repo().branch(name)
        branch.create(source_reference=source or self.main_branch, exist_ok=True)
        return branch.get_commit().id

    def branch_exists(self, name: str) -> bool:
        from lakefs.exceptions import NotFoundException

        try:
            self.repo().branch(name).get_commit()
            return True
        except NotFoundException:
            return False

    def branches(self, prefix: str = "run-") -> list[BranchInfo]:
        out = []
        for b in self.repo().branches(prefix=prefix):
            out.append(BranchInfo(b.id, b.get_commit().id, b.id[len("run-"):] if b.id.startswith("run-") else None))
        return out

    def delete_branch(self, name: str) -> None:
        if name == self.main_branch:
            raise LakeFSError(f"refusing to delete {self.main_branch!r} of {self.repository}")
        self.repo().branch(name).delete()

    # --- objects ---------------------------------------------------------------------------------
    def put(self, branch: str, path: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self.repo().branch(branch).object(path).upload(data=data, mode="wb", content_type=content_type)

    def get(self, ref: str, path: str) -> bytes:
        from lakefs.exceptions import NotFoundException

        try:
            with self.repo().ref(ref).object(path).reader(mode="rb") as fh:
                return fh.read()
        except NotFoundException:
            raise LakeFSError(f"{self.uri(ref, path)} does not exist (lakeFS at {self.endpoint})") from None

    def exists(self, ref: str, path: str) -> bool:
        return self.repo().ref(ref).object(path).exists()

    def list_paths(self, ref: str, prefix: str) -> "list[str]":
        return [o.path for o in self.repo().ref(ref).objects(prefix=prefix)]

    def commit(self, branch: str, message: str, metadata: dict[str, Any] | None = None) -> str:
        """Commit what is staged on `branch`; metadata values are stored as strings."""
        meta = {k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in (metadata or {}).items()}
        ref = self.repo().branch(branch).commit(message=message, metadata=meta, allow_empty=True)
        return ref.get_commit().id

    def commit_of_object(self, ref: str, path: str) -> str | None:
        """The last commit at `ref` that changed `path`."""
        for c in self.repo().ref(ref).log(max_amount=1, objects=[path]):
            return c.id
        return None

    def commit_metadata(self, ref: str) -> dict[str, str]:
        return dict(self.repo().ref(ref).get_commit().metadata or {})

    def changed_paths(self, base: str, ref: str) -> list[str]:
        return [d.path for d in self.repo().ref(ref).diff(base, type="three_dot")]

    def merge(self, source: str, destination: str | None = None, message: str = "",
              metadata: dict[str, Any] | None = None) -> str:
        """Merge `source` into `destination` (main); a conflict raises MergeConflict naming the paths."""
        from lakefs.exceptions import BadRequestException, ConflictException

        dest = destination or self.main_branch
        meta = {k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in (metadata or {}).items()}
        try:
            return self.repo().ref(source).merge_into(dest, message=message or f"publish {source}", metadata=meta)
        except BadRequestException as exc:
            if "no changes" in str(exc):  # the run wrote exactly what main already holds
                return self.head(dest)
            raise
        except ConflictException:
            mine = set(self.changed_paths(dest, source))
            theirs = set(self.changed_paths(source, dest))
            both = sorted(mine & theirs) or sorted(mine)
            raise MergeConflict(
                f"cannot publish {source!r} into {dest!r} of lakeFS repository {self.repository!r}: "
                f"{len(both)} path(s) were also changed on {dest!r} since {source!r} was branched, "
                f"e.g. {both[:5]}. {dest!r} keeps the version merged first ({self.head(dest)[:12]}); "
                f"the branch {source!r} is kept for inspection."
            ) from None

    def tag(self, name: str, ref: str) -> None:
        self.repo().tag(name).create(ref, exist_ok=True)
