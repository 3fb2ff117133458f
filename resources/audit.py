"""The audit trail as a Dagster resource: where the append-only trail of model decisions lives.

Set by the resource factory (resources/environment.py): a Postgres database when `url` is given (MLP_AUDIT_URL,
the prod profile), else the SQLite file at `path` (`<state dir>/audit/audit.db`, or MLP_AUDIT_DB). Assets,
sensors and jobs take the trail from this resource instead of opening one themselves."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from pydantic import PrivateAttr

from mlplatform.audit import AuditError, AuditTrail, PostgresAuditTrail


class AuditResource(dg.ConfigurableResource):
    """The audit trail in the Postgres database `url` if set, else at `path` (a SQLite file; created with its
    folder on first use)."""

    path: str
    url: str = ""

    _trail: AuditTrail | None = PrivateAttr(default=None)

    def trail(self) -> AuditTrail:
        if self._trail is None:
            if self.url:
                self._trail = PostgresAuditTrail(self.url)  # its errors name the URL, credentials redacted
                return self._trail
            import sqlite3

            try:
                self._trail = AuditTrail(Path(self.path))
            except (OSError, sqlite3.Error) as exc:
                raise AuditError(f"the audit trail {self.path} cannot be opened ({type(exc).__name__}: {exc}); "
                                 f"its path comes from MLP_AUDIT_DB, else <MLP_STATE_DIR>/audit/audit.db") from exc
        return self._trail


__all__ = ["AuditResource", "AuditTrail"]
