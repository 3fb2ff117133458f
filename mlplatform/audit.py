"""Append-only audit trail of model decisions: registration, gate decisions, promotion, approval, rollback.

A table with triggers that abort any UPDATE or DELETE, and a hash chain over the entries so that a
change made behind the platform's back is detected by `verify()`. The platform offers only `record`
and `history`; nothing in it edits or deletes an entry.

Two stores, one behaviour: a SQLite file (the local profile: MLP_AUDIT_DB, else <state>/audit/audit.db), or a
Postgres database (the prod profile: MLP_AUDIT_URL=postgresql://...), whose triggers also reject TRUNCATE.
`AuditTrail(location)` picks the store from the location: a postgresql:// URL, else a file path.
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
from contextlib import contextmanager
import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from mlplatform.redact import redact, redact_uri, uri_secrets
from mlplatform.spec import state_dir

# Decisions (gate_decision, retrain_triggered), facts (registered, reproduced), and alias moves written as an
# intent before the move and an outcome after it (the outcome's evidence names its intent's `intent_seq`).
INTENT_OUTCOME = {"promotion_intent": "promoted", "hold_intent": "awaiting_approval", "approval_intent": "approved",
                  "rollback_intent": "rolled_back"}
ACTIONS = {"registered", "gate_decision", "rejected", "retrain_triggered", "reproduced",
           *INTENT_OUTCOME, *INTENT_OUTCOME.values()}

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL, model TEXT NOT NULL,
    version TEXT, reason TEXT NOT NULL, evidence TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit_events
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only: entries cannot be changed'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit_events
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only: entries cannot be deleted'); END;
"""


class AuditError(RuntimeError):
    pass


@dataclass(frozen=True)
class AuditEvent:
    seq: int
    at: str
    actor: str
    action: str
    model: str
    version: str | None
    reason: str
    evidence: dict[str, Any]


def default_path() -> Path:
    return Path(os.environ.get("MLP_AUDIT_DB", str(state_dir() / "audit" / "audit.db")))


def default_location() -> Path | str:
    """Where `AuditTrail()` keeps the trail: MLP_AUDIT_URL (a Postgres database) if set, else the SQLite file."""
    return os.environ.get("MLP_AUDIT_URL", "").strip() or default_path()


def is_database_url(location: Any) -> bool:
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def default_actor() -> str:
    return os.environ.get("MLP_ACTOR") or f"user:{getpass.getuser()}"


PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_events (
    seq BIGSERIAL PRIMARY KEY,
    at TEXT NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL, model TEXT NOT NULL,
    version TEXT, reason TEXT NOT NULL, evidence TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_events_model ON audit_events (model);
CREATE OR REPLACE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit trail is append-only: entries cannot be %',
        CASE TG_OP WHEN 'UPDATE' THEN 'changed' ELSE 'deleted' END;
END $$;
CREATE OR REPLACE TRIGGER audit_no_update BEFORE UPDATE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
CREATE OR REPLACE TRIGGER audit_no_delete BEFORE DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
CREATE OR REPLACE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();
"""
PG_TRIGGERS = ("audit_no_update", "audit_no_delete", "audit_no_truncate")
_COLUMNS = "seq, at, actor, action, model, version, reason, evidence"


def _event(row) -> "AuditEvent":
    return AuditEvent(row[0], row[1], row[2], row[3], row[4], row[5], row[6], json.loads(row[7]))


class AuditTrail:
    """The trail in a SQLite file (`path`), or, given a postgresql:// URL, a `PostgresAuditTrail`."""

    _P = "?"  # the store's parameter placeholder
    _ONCE = "json_extract(evidence, '$.once')"

    def __new__(cls, location: Path | str | None = None):
        if cls is AuditTrail and is_database_url(default_location() if location is None else location):
            return super().__new__(PostgresAuditTrail)
        return super().__new__(cls)

    def __init__(self, path: Path | None = None):
        self.path = Path(path or default_path())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._conn() as con:
            con.executescript(SCHEMA)

    @property
    def location(self) -> str:
        """Where the trail is, safe to print."""
        return str(self.path)

    def _conn(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        return con

    @contextmanager
    def _writing(self) -> Iterator[Callable[..., Any]]:
        """One write transaction that excludes every other writer (so the hash chain stays linear); yields a
        function running one statement in it and returning its cursor."""
        con = self._conn()
        try:
            con.execute("BEGIN IMMEDIATE")
            yield lambda sql, args=(): con.execute(sql, args)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        finally:
            con.close()

    def _read(self, sql: str, args: tuple | list = ()) -> list[tuple]:
        with self._conn() as con:
            return con.execute(sql, args).fetchall()

    def _insert(self, run: Callable[..., Any], values: tuple) -> int:
        cur = run("INSERT INTO audit_events (at, actor, action, model, version, reason, evidence, prev_hash, hash) "
                  "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", values)
        return cur.lastrowid

    @staticmethod
    def _digest(prev: str, at: str, actor: str, action: str, model: str, version: str | None, reason: str,
                evidence: str) -> str:
        payload = json.dumps([prev, at, actor, action, model, version, reason, evidence])
        return hashlib.sha256(payload.encode()).hexdigest()

    def record(self, action: str, model: str, version: str | int | None, reason: str,
               evidence: dict[str, Any] | None = None, actor: str | None = None, once: str | None = None) -> AuditEvent:
        """Append an entry. With `once`, an entry of `model` already carrying that key is returned instead
        (checked in the same write transaction, so two writers racing append it once)."""
        if action not in ACTIONS:
            raise AuditError(f"unknown audit action {action!r}; one of {sorted(ACTIONS)}")
        at = dt.datetime.now(dt.timezone.utc).isoformat()
        actor = actor or default_actor()
        ver = None if version is None else str(version)
        if once is not None:
            evidence = {**(evidence or {}), "once": once}
        ev = json.dumps(evidence or {}, default=str, sort_keys=True)
        p = self._P
        with self._writing() as run:
            if once is not None:
                hit = run(f"SELECT {_COLUMNS} FROM audit_events WHERE model = {p} AND {self._ONCE} = {p} "
                          f"ORDER BY seq LIMIT 1", (model, once)).fetchone()
                if hit:
                    return _event(hit)
            row = run("SELECT hash FROM audit_events ORDER BY seq DESC LIMIT 1").fetchone()
            prev = row[0] if row else "genesis"
            digest = self._digest(prev, at, actor, action, model, ver, reason, ev)
            seq = self._insert(run, (at, actor, action, model, ver, reason, ev, prev, digest))
        return AuditEvent(seq, at, actor, action, model, ver, reason, evidence or {})

    def history(self, model: str | None = None, version: str | None = None) -> list[AuditEvent]:
        q, args = f"SELECT {_COLUMNS} FROM audit_events", []
        conds = []
        if model:
            conds.append(f"model = {self._P}")
            args.append(model)
        if version is not None:
            conds.append(f"version = {self._P}")
            args.append(str(version))
        if conds:
            q += " WHERE " + " AND ".join(conds)
        return [_event(r) for r in self._read(q + " ORDER BY seq", args)]

    def verify(self) -> list[int]:
        """Sequence numbers whose hash does not match the chain (empty when the trail is intact)."""
        bad, prev = [], "genesis"
        rows = self._read("SELECT seq, at, actor, action, model, version, reason, evidence, prev_hash, hash "
                          "FROM audit_events ORDER BY seq")
        for r in rows:
            if r[8] != prev or self._digest(prev, *r[1:8]) != r[9]:
                bad.append(r[0])
            prev = r[9]
        return bad


class PostgresAuditTrail(AuditTrail):
    """The trail in a Postgres database (`url`: postgresql://user:password@host:port/db). Its triggers reject
    UPDATE, DELETE and TRUNCATE; a writer locks the table against other writers (readers go on) for the
    length of its append, so the hash chain stays linear across processes and machines."""

    _P = "%s"
    _ONCE = "(evidence::jsonb ->> 'once')"

    def __init__(self, url: str | None = None):
        url = url or default_location()
        if not is_database_url(url):
            raise AuditError(f"the audit trail URL must be postgresql://..., got {redact_uri(str(url))!r} "
                             f"(setting MLP_AUDIT_URL)")
        self.url, self.path = str(url), None
        self._ensure_schema()

    @property
    def location(self) -> str:
        return redact_uri(self.url)

    def _fail(self, exc: Exception) -> AuditError:
        return AuditError(f"the audit trail at {self.location} (setting MLP_AUDIT_URL): {type(exc).__name__}: "
                          f"{redact(str(exc).strip(), uri_secrets(self.url))}")

    def _conn(self):
        import psycopg2

        try:
            return psycopg2.connect(self.url, connect_timeout=10)
        except psycopg2.Error as exc:
            raise self._fail(exc) from None

    def _ensure_schema(self) -> None:
        """Create the table and its triggers once (under an advisory lock: processes may start together)."""
        con = self._conn()
        try:
            with con, con.cursor() as cur:
                cur.execute("SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                            "WHERE c.relname = 'audit_events' AND t.tgname = ANY(%s)", (list(PG_TRIGGERS),))
                if cur.fetchone()[0] == len(PG_TRIGGERS):
                    return
                cur.execute("SELECT pg_advisory_xact_lock(hashtext('mlplatform.audit_events'))")
                cur.execute(PG_SCHEMA)
        finally:
            con.close()

    @contextmanager
    def _writing(self) -> Iterator[Callable[..., Any]]:
        import psycopg2

        con = self._conn()
        try:
            with con, con.cursor() as cur:  # one transaction: committed on leaving, rolled back on an error
                cur.execute("LOCK TABLE audit_events IN SHARE ROW EXCLUSIVE MODE")

                def run(sql, args=()):
                    cur.execute(sql, args)
                    return cur

                yield run
        except psycopg2.OperationalError as exc:  # the server went away mid-write: nothing was appended
            raise self._fail(exc) from None
        finally:
            con.close()

    def _read(self, sql: str, args: tuple | list = ()) -> list[tuple]:
        import psycopg2

        con = self._conn()
        try:
            with con, con.cursor() as cur:
                cur.execute(sql, args)
                return cur.fetchall()
        except psycopg2.OperationalError as exc:
            raise self._fail(exc) from None
        finally:
            con.close()

    def _insert(self, run: Callable[..., Any], values: tuple) -> int:
        cur = run("INSERT INTO audit_events (at, actor, action, model, version, reason, evidence, prev_hash, hash) "
                  "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING seq", values)
        return cur.fetchone()[0]
