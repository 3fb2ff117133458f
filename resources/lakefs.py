"""lakeFS: the repository every data asset is versioned in, with a branch per run (write-audit-publish).

Every call has a timeout (a dead or hung server never hangs a run) and is retried a bounded number of
times with exponential backoff on transient errors (connection refused/reset, timeouts, HTTP 429/5xx).
A call that still fails raises LakeFSUnavailable naming the endpoint, repository, ref and operation.
Non-idempotent calls (commit) check whether the first attempt took effect before trying again.
"""




import json
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import dagster as dg
from mlplatform.lazy import lazy_import
requests = lazy_import("requests")
from pydantic import PrivateAttr

T = TypeVar("T")

# Commit metadata key that makes a retried commit idempotent (see `commit`).
WRITE_ID_KEY = "mlp_write_id"


class LakeFSError(RuntimeError):
    """lakeFS could not do what was asked; the message names the endpoint, repository and ref."""


class LakeFSUnavailable(LakeFSError):
    """The lakeFS endpoint is unreachable, times out, answers 5xx, or rejects the credentials."""


class MergeConflict(LakeFSError):
    """Two runs wrote the same paths; `main` keeps the one merged first."""


def run_branch(run_id: str) -> str:
    return f"run-{run_id}"


def is_transient(exc: BaseException) -> bool:
    """Connection refused/reset, timeouts, HTTP 429/5xx: worth another attempt after a pause."""
    import urllib3
    from lakefs.exceptions import ServerException

    try:
        import lakefs_sdk
        api_exc: tuple = (lakefs_sdk.ApiException,)
    except ImportError:  # pragma: no cover
        api_exc = ()
    if isinstance(exc, LakeFSError):  # already retried (a nested call) or not a server fault
        return False
    if isinstance(exc, (urllib3.exceptions.HTTPError, requests.ConnectionError, requests.Timeout,
                        ConnectionError, TimeoutError)):
        return not isinstance(exc, urllib3.exceptions.SSLError)
    if isinstance(exc, ServerException) or (api_exc and isinstance(exc, api_exc)):
        status = getattr(exc, "status_code", None) or getattr(exc, "status", None)
        return status in (429, 500, 502, 503, 504)
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and is_transient(cause)


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
    # Per request: time to connect, and the longest wait for the server between two bytes of an answer.
    connect_timeout_seconds: float = 5.0
    timeout_seconds: float = 30.0
    # Transient errors: up to `retries` more attempts, pausing backoff_seconds * 2^n (capped, jittered),
    # all within `retry_deadline_seconds`; then LakeFSUnavailable.
    retries: int = 3
    backoff_seconds: float = 0.4
    max_backoff_seconds: float = 8.0
    retry_deadline_seconds: float = 60.0

    _client: Any = PrivateAttr(default=None)
    _checked: bool = PrivateAttr(default=False)
    _repo_ready: bool = PrivateAttr(default=False)

    # --- calls ----------------------------------------------------------------------------------
    def where(self, ref: str | None = None) -> str:
        return (f"lakeFS at {self.endpoint.rstrip('/')}, repository {self.repository!r}"
                + (f", ref {ref!r}" if ref else ""))

    def call(self, op: str, fn: Callable[[], T], ref: str | None = None,
             already_done: Callable[[], T | None] | None = None) -> T:
        """Run one lakeFS operation with bounded, backed-off retries on transient errors.

        `already_done` (for non-idempotent operations) is asked before each retry whether the previous
        attempt took effect after all (e.g. the answer was lost); its non-None result is returned."""
        start = time.monotonic()
        attempt = 0
        while True:
            try:
                if attempt and already_done is not None:
                    done = already_done()
                    if done is not None:
                        return done
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified below
                if not is_transient(exc):
                    exc.add_note(f"during {op} on {self.where(ref)}")
                    raise
                elapsed = time.monotonic() - start
                pause = min(self.backoff_seconds * 2 ** attempt, self.max_backoff_seconds)
                pause *= 0.75 + random.random() / 2
                if attempt >= self.retries or elapsed + pause > self.retry_deadline_seconds:
                    raise LakeFSUnavailable(
                        f"{self.where(ref)}: {op} failed after {attempt + 1} attempt(s) over {elapsed:.1f}s "
                        f"({type(exc).__name__}: {str(exc)[:300]}). Is the server running (`make up`), "
                        f"and LAKEFS_ENDPOINT right?"
                    ) from exc
                attempt += 1
                time.sleep(pause)

    # --- connection -------------------------------------------------------------------------
    def check(self) -> None:
        """Fail fast, naming the endpoint, if lakeFS is down or the keys are wrong (never hang)."""
        if self._checked:
            return
        url = self.endpoint.rstrip("/")

        def probe():
            return requests.get(f"{url}/api/v1/user", auth=(self.access_key_id, self.secret_access_key),
                                timeout=(self.connect_timeout_seconds, self.timeout_seconds))

        resp = self.call("connect", probe)
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
            client = lakefs.Client(host=self.endpoint, username=self.access_key_id,
                                   password=self.secret_access_key)
            self._bound_requests(client)
            self._client = client
        return self._client

    def _bound_requests(self, client) -> None:
        """Give every HTTP request of the SDK a timeout and leave retrying to `call`.

        The SDK passes `timeout=None` (no limit at all) unless each call is given `_request_timeout`, and its
        urllib3 pool retries immediately, without backoff; the pool manager's `urlopen` is wrapped instead."""
        import urllib3

        pool = client.sdk_client._api.rest_client.pool_manager
        timeout = urllib3.Timeout(connect=self.connect_timeout_seconds, read=self.timeout_seconds)
        # One quick reconnect (a pooled connection closed by a restarted server); the rest is `call`'s job.
        retry = urllib3.Retry(total=2, connect=1, read=0, status=0, other=0, redirect=2)
        urlopen = pool.urlopen

        def bounded_urlopen(method, url, redirect=True, **kw):
            if kw.get("timeout") is None:
                kw["timeout"] = timeout
            if kw.get("retries") is None:
                kw["retries"] = retry
            return urlopen(method, url, redirect=redirect, **kw)

        pool.urlopen = bounded_urlopen

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
        self.call("create repository", lambda: repo.create(storage_namespace=namespace,
                                                           default_branch=self.main_branch, exist_ok=True))
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
        ref = ref or self.main_branch
        return self.call("read head commit", lambda: self.repo().ref(ref).get_commit().id, ref)

    def ensure_branch(self, name: str, source: str | None = None) -> str:
        """Create `name` from `source` (default main) if missing; zero-copy. Returns its head commit."""
        self.ensure_repository()
        source = source or self.main_branch

        def create():
            branch = self.repo().branch(name)
            branch.create(source_reference=source, exist_ok=True)
            return branch.get_commit().id

        return self.call(f"create branch from {source!r}", create, name)

    def branch_exists(self, name: str) -> bool:
        from lakefs.exceptions import NotFoundException

        def probe():
            try:
                self.repo().branch(name).get_commit()
                return True
            except NotFoundException:
                return False

        return self.call("read branch", probe, name)

    def branches(self, prefix: str = "run-") -> list[BranchInfo]:
        def listing():
            out = []
            for b in self.repo().branches(prefix=prefix):
                out.append(BranchInfo(b.id, b.get_commit().id,
                                      b.id[len("run-"):] if b.id.startswith("run-") else None))
            return out

        return self.call(f"list branches {prefix}*", listing)

    def delete_branch(self, name: str) -> None:
        from lakefs.exceptions import NotFoundException

        if name == self.main_branch:
            raise LakeFSError(f"refusing to delete {self.main_branch!r} of {self.repository}")

        def delete():
            try:
                self.repo().branch(name).delete()
            except NotFoundException:  # a retry after a lost answer: already gone
                pass

        self.call("delete branch", delete, name)

    # --- objects ---------------------------------------------------------------------------------
    def put(self, branch: str, path: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        # Idempotent: the same path is overwritten, so a retried upload leaves exactly one version staged.
        self.call(f"upload {path}",
                  lambda: self.repo().branch(branch).object(path).upload(data=data, mode="wb",
                                                                         content_type=content_type), branch)

    def get(self, ref: str, path: str) -> bytes:
        from lakefs.exceptions import NotFoundException

        def read():
            with self.repo().ref(ref).object(path).reader(mode="rb") as fh:
                return fh.read()

        try:
            return self.call(f"read {path}", read, ref)
        except NotFoundException:
            raise LakeFSError(f"{self.uri(ref, path)} does not exist (lakeFS at {self.endpoint})") from None

    def exists(self, ref: str, path: str) -> bool:
        return self.call(f"stat {path}", lambda: self.repo().ref(ref).object(path).exists(), ref)

    def list_paths(self, ref: str, prefix: str) -> "list[str]":
        return self.call(f"list {prefix}*", lambda: [o.path for o in self.repo().ref(ref).objects(prefix=prefix)],
                         ref)

    def commit(self, branch: str, message: str, metadata: dict[str, Any] | None = None) -> str:
        """Commit what is staged on `branch`; metadata values are stored as strings.

        Idempotent under retries: the commit carries a write id, and a retry first looks whether the branch
        head already is that commit (the server committed but its answer was lost)."""
        meta = {k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in (metadata or {}).items()}
        meta.setdefault(WRITE_ID_KEY, uuid.uuid4().hex)

        def landed() -> str | None:
            head = self.repo().branch(branch).get_commit()
            return head.id if (head.metadata or {}).get(WRITE_ID_KEY) == meta[WRITE_ID_KEY] else None

        def commit():
            ref = self.repo().branch(branch).commit(message=message, metadata=meta, allow_empty=True)
            return ref.get_commit().id

        return self.call("commit", commit, branch, already_done=landed)

    def commit_of_object(self, ref: str, path: str) -> str | None:
        """The last commit at `ref` that changed `path`."""
        def last():
            for c in self.repo().ref(ref).log(max_amount=1, objects=[path]):
                return c.id
            return None

        return self.call(f"log {path}", last, ref)

    def commit_metadata(self, ref: str) -> dict[str, str]:
        return self.call("read commit", lambda: dict(self.repo().ref(ref).get_commit().metadata or {}), ref)

    def changed_paths(self, base: str, ref: str) -> list[str]:
        return self.call(f"diff against {base!r}",
                         lambda: [d.path for d in self.repo().ref(ref).diff(base, type="three_dot")], ref)

    def merge(self, source: str, destination: str | None = None, message: str = "",
              metadata: dict[str, Any] | None = None) -> str:
        """Merge `source` into `destination` (main); a conflict raises MergeConflict naming the paths.

        Safe to retry: a merge that took effect before its answer was lost leaves "no changes" to merge."""
        from lakefs.exceptions import BadRequestException, ConflictException

        dest = destination or self.main_branch
        meta = {k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in (metadata or {}).items()}
        try:
            return self.call(f"merge into {dest!r}",
                             lambda: self.repo().ref(source).merge_into(dest, message=message or f"publish {source}",
                                                                        metadata=meta), source)
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
        self.call(f"tag {name!r}", lambda: self.repo().tag(name).create(ref, exist_ok=True), ref)
