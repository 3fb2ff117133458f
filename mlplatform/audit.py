"""Append-only audit trail of model decisions: registration, gate decisions, promotion, approval, rollback.

SQLite with triggers that abort any UPDATE or DELETE, and a hash chain over the entries so that a
change made behind the platform's back is detected by `verify()`. The platform offers only `record`
and `history`; nothing in it edits or deletes an entry.
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def default_actor() -> str:
    return os.environ.get("MLP_ACTOR") or f"user:{getpass.getuser()}"


class AuditTrail:
    def __init__(self, path: Path | None = None):
        self.path = Path(path or default_path())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._conn() as con:
            con.executescript(SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        return con

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
        con = self._conn()
        try:
            con.execute("BEGIN IMMEDIATE")  # serialise writers so the hash chain stays linear
            if once is not None:
                hit = con.execute("SELECT seq, at, actor, action, model, version, reason, evidence FROM audit_events "
                                  "WHERE model = ? AND json_extract(evidence, '$.once') = ? ORDER BY seq LIMIT 1",
                                  (model, once)).fetchone()
                if hit:
                    con.execute("COMMIT")
                    return AuditEvent(hit[0], hit[1], hit[2], hit[3], hit[4], hit[5], hit[6], json.loads(hit[7]))
            row = con.execute("SELECT hash FROM audit_events ORDER BY seq DESC LIMIT 1").fetchone()
            prev = row[0] if row else "genesis"
            digest = self._digest(prev, at, actor, action, model, ver, reason, ev)
            cur = con.execute(
                "INSERT INTO audit_events (at, actor, action, model, version, reason, evidence, prev_hash, hash) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (at, actor, action, model, ver, reason, ev, prev, digest))
            con.execute("COMMIT")
            return AuditEvent(cur.lastrowid, at, actor, action, model, ver, reason, evidence or {})
        except BaseException:
            con.execute("ROLLBACK")
            raise
        finally:
            con.close()

    def history(self, model: str | None = None, version: str | None = None) -> list[AuditEvent]:
        q, args = "SELECT seq, at, actor, action, model, version, reason, evidence FROM audit_events", []
        conds = []
        if model:
            conds.append("model = ?")
            args.append(model)
        if version is not None:
            conds.append("version = ?")
            args.append(str(version))
        if conds:
            q += " WHERE " + " AND ".join(conds)
        with self._conn() as con:
            rows = con.execute(q + " ORDER BY seq", args).fetchall()
        return [AuditEvent(r[0], r[1], r[2], r[3], r[4], r[5], r[6], json.loads(r[7])) for r in rows]

    def verify(self) -> list[int]:
        """Sequence numbers whose hash does not match the chain (empty when the trail is intact)."""
        bad, prev = [], "genesis"
        with self._conn() as con:
            rows = con.execute("SELECT seq, at, actor, action, model, version, reason, evidence, prev_hash, hash "
                               "FROM audit_events ORDER BY seq").fetchall()
        for r in rows:
            if r[8] != prev or self._digest(prev, *r[1:8]) != r[9]:
                bad.append(r[0])
            prev = r[9]
        return bad
