"""Alerts: what the platform tells a team, delivered to webhooks (generic JSON or Slack-compatible).

The library part (no Dagster): an `Alert` names its event kind, a de-duplication key and its links (the
Dagster run, the lakeFS commit, the MLflow model version or run); `Outbox` keeps every alert in a small SQLite
file under the state folder, so that
- the same key is delivered once, however many times it is submitted (sensor re-ticks, restarts);
- each event kind is rate-limited (at most `rate_limit` alerts of a kind per `rate_window`; the rest are
  recorded as suppressed and counted in the next delivered alert of that kind);
- a delivery that fails (webhook down, HTTP error) is logged and retried later with a growing delay, up to
  `retry_for`; it never raises into the caller, so an alert never fails a platform run.

Webhooks come from the spec's `alerts.webhooks` and from MLP_ALERT_WEBHOOKS (a JSON list of
{"url": ..., "format": "json"|"slack"}, or a comma list of `URL` / `slack=URL` / `json=URL`). The state file
stores a digest of each webhook's URL, never the URL (a Slack webhook URL is a secret).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import sqlite3
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from mlplatform.redact import redact, redact_uri
from mlplatform.spec import SettingError, state_dir

log = logging.getLogger("mlplatform.alerts")

# Event kinds, each rate-limited on its own.
KINDS = ("run_failure", "check_failure", "freshness", "drift", "estimate", "retrain", "promotion", "rollback")
FORMATS = ("json", "slack")
SEVERITY_ICON = {"error": ":red_circle:", "warning": ":large_yellow_circle:", "info": ":large_blue_circle:"}
ENV_WEBHOOKS = "MLP_ALERT_WEBHOOKS"
ENV_DAGSTER_URL = "MLP_DAGSTER_URL"


@dataclass(frozen=True)
class Alert:
    kind: str                     # one of KINDS
    key: str                      # de-duplication key: an event is delivered once
    title: str
    text: str
    severity: str = "error"       # error | warning | info
    dataset: str = ""
    dagster_run_url: str | None = None
    lakefs_commit_url: str | None = None
    mlflow_url: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    at: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown alert kind {self.kind!r}; one of {list(KINDS)}")
        if self.severity not in SEVERITY_ICON:
            raise ValueError(f"unknown alert severity {self.severity!r}; one of {list(SEVERITY_ICON)}")
        if not self.at:
            object.__setattr__(self, "at", dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))

    @property
    def links(self) -> dict[str, str]:
        named = {"dagster_run": self.dagster_run_url, "lakefs_commit": self.lakefs_commit_url,
                 "mlflow": self.mlflow_url}
        return {k: v for k, v in named.items() if v}

    @classmethod
    def from_dict(cls, d: dict) -> Alert:
        return cls(**d)


@dataclass(frozen=True)
class Webhook:
    url: str
    format: str = "json"  # json | slack

    def __post_init__(self):
        if self.format not in FORMATS:
            raise SettingError(f"alert webhook {redact_uri(self.url)}: format must be one of {list(FORMATS)}, "
                               f"got {self.format!r}")
        if not self.url.startswith(("http://", "https://")):
            raise SettingError(f"alert webhook {redact_uri(self.url)!r}: the URL must start with http:// or https://")

    @property
    def id(self) -> str:
        return hashlib.sha256(f"{self.format}|{self.url}".encode()).hexdigest()[:16]

    @property
    def secrets(self) -> list[str]:
        """The URL and its path (a Slack webhook's token is its path): never in a log or an error."""
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        return [s for s in (self.url, parts.path + (f"?{parts.query}" if parts.query else ""), parts.path)
                if len(s) > 1]

    @property
    def shown(self) -> str:
        """For logs: scheme, host and the path's start; a token in the path is never printed whole."""
        from urllib.parse import urlsplit

        parts = urlsplit(redact_uri(self.url))
        path = parts.path if len(parts.path) <= 12 else parts.path[:12] + "..."
        return f"{self.format}:{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{path}"


# --- configuration -------------------------------------------------------------------------------------------------
def parse_webhooks(value: str, source: str = ENV_WEBHOOKS) -> list[Webhook]:
    """A JSON list of {"url", "format"} or a comma list of `URL`, `json=URL`, `slack=URL`."""
    value = (value or "").strip()
    if not value:
        return []
    if value.startswith("["):
        try:
            items = json.loads(value)
        except ValueError as exc:
            raise SettingError(f"setting {source}: not valid JSON ({exc.msg} at {exc.pos})") from None
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("url"), str):
                raise SettingError(f"setting {source}[{i}]: expected {{\"url\": ..., \"format\": \"json\"|\"slack\"}}")
            unknown = set(item) - {"url", "format"}
            if unknown:
                raise SettingError(f"setting {source}[{i}]: unknown keys {sorted(unknown)}; known: url, format")
            out.append(Webhook(item["url"], item.get("format", "json")))
        return out
    out = []
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        fmt, sep, url = part.partition("=")
        if sep and fmt in FORMATS:
            out.append(Webhook(url.strip(), fmt))
        elif sep and "://" not in fmt:
            raise SettingError(f"setting {source}: {fmt!r} is not a webhook format; one of {list(FORMATS)}")
        else:
            out.append(Webhook(part, "json"))
    return out


@dataclass(frozen=True)
class AlertSettings:
    enabled: bool = True
    webhooks: tuple[Webhook, ...] = ()
    kinds: tuple[str, ...] = KINDS
    rate_limit: int = 10
    rate_window_seconds: float = 3600.0
    retry_for_seconds: float = 86400.0
    dagster_url: str = "http://127.0.0.1:3000"
    timeout_seconds: float = 5.0

    @classmethod
    def from_spec(cls, spec, environ: dict[str, str] | None = None) -> AlertSettings:
        """The spec's `alerts:` section plus MLP_ALERT_WEBHOOKS and MLP_DAGSTER_URL from the environment."""
        env = os.environ if environ is None else environ
        section = spec.alerts
        hooks = [Webhook(h.url, h.format) for h in section.webhooks] + parse_webhooks(env.get(ENV_WEBHOOKS, ""))
        unique = list({h.id: h for h in hooks}.values())
        return cls(enabled=section.enabled, webhooks=tuple(unique), kinds=tuple(section.events),
                   rate_limit=section.rate_limit, rate_window_seconds=section.rate_window.total_seconds(),
                   retry_for_seconds=section.retry_for.total_seconds(),
                   dagster_url=env.get(ENV_DAGSTER_URL) or section.dagster_url)

    def run_url(self, run_id: str) -> str:
        return f"{self.dagster_url.rstrip('/')}/runs/{run_id}"

    def asset_url(self, asset: str) -> str:
        return f"{self.dagster_url.rstrip('/')}/assets/{asset}"


# --- payloads ------------------------------------------------------------------------------------------------------
def json_payload(alert: Alert, suppressed: int = 0) -> dict:
    """The generic payload: every field of the alert, links by name."""
    body = {"source": "mlplatform", "kind": alert.kind, "key": alert.key, "severity": alert.severity,
            "title": alert.title, "text": alert.text, "dataset": alert.dataset, "at": alert.at,
            "links": alert.links, "fields": alert.fields}
    if suppressed:
        body["suppressed_since_last"] = suppressed
    return body


def _mrkdwn(text: Any) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


LINK_LABELS = {"dagster_run": "Dagster run", "lakefs_commit": "lakeFS commit", "mlflow": "MLflow"}


def slack_payload(alert: Alert, suppressed: int = 0) -> dict:
    """Slack incoming-webhook payload: `text` (the notification line) and Block Kit `blocks`."""
    icon = SEVERITY_ICON[alert.severity]
    headline = f"{icon} [{alert.dataset or 'mlplatform'}] {alert.title}"
    blocks: list[dict] = [
        {"type": "header", "text": {"type": "plain_text", "text": f"{alert.title}"[:150], "emoji": True}},
        {"type": "section", "text": {"type": "mrkdwn", "text": _mrkdwn(alert.text)[:3000]}},
    ]
    if alert.fields:
        blocks.append({"type": "section", "fields": [
            {"type": "mrkdwn", "text": f"*{_mrkdwn(k)}*\n{_mrkdwn(v)}"[:2000]}
            for k, v in list(alert.fields.items())[:10]]})
    if alert.links:
        blocks.append({"type": "context", "elements": [
            {"type": "mrkdwn", "text": "  |  ".join(f"<{url}|{LINK_LABELS[name]}>" for name, url in alert.links.items())}]})
    notes = [f"kind `{alert.kind}`", f"severity {alert.severity}", alert.at]
    if suppressed:
        notes.append(f"{suppressed} more `{alert.kind}` alert(s) suppressed by the rate limit since the last one")
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": " · ".join(notes)}]})
    return {"text": f"{headline}: {alert.text}"[:3000], "blocks": blocks}


def payload(alert: Alert, fmt: str, suppressed: int = 0) -> dict:
    return slack_payload(alert, suppressed) if fmt == "slack" else json_payload(alert, suppressed)


def post_json(url: str, body: dict, timeout: float) -> None:
    """POST `body`; raises on a connection error or a non-2xx answer."""
    import requests

    resp = requests.post(url, json=body, timeout=timeout)
    if not 200 <= resp.status_code < 300:
        raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:200]}")


# --- the outbox: de-duplication, rate limit, delivery with retries -----------------------------------------------------
SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    key TEXT PRIMARY KEY, kind TEXT NOT NULL, created REAL NOT NULL,
    status TEXT NOT NULL,               -- queued | suppressed | disabled
    suppressed_before INTEGER NOT NULL DEFAULT 0, alert TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    key TEXT NOT NULL, webhook TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_try REAL NOT NULL,
    delivered REAL, gave_up REAL, last_error TEXT, PRIMARY KEY (key, webhook)
);
CREATE INDEX IF NOT EXISTS alerts_kind ON alerts (kind, created);
"""


@dataclass
class Delivery:
    key: str
    webhook: str       # Webhook.shown
    ok: bool
    error: str = ""
    attempts: int = 0


def default_path() -> Path:
    return state_dir() / "alerts" / "outbox.db"


class Outbox:
    def __init__(self, settings: AlertSettings, path: Path | None = None,
                 post: Callable[[str, dict, float], None] = post_json, clock: Callable[[], float] = time.time):
        self.settings, self.post, self.clock = settings, post, clock
        self.path = Path(path or default_path())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._conn() as con:
            con.executescript(SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30, isolation_level=None)

    def submit(self, alert: Alert) -> str:
        """Record an alert: 'queued' (to deliver), 'duplicate' (its key was seen), 'suppressed' (rate limit),
        'disabled' (alerts off, or its kind not in `alerts.events`), 'no_webhook' (nowhere to send it)."""
        s, now = self.settings, self.clock()
        # A failure message can quote a credential (a URI with a password, a key from the environment).
        alert = replace(alert, title=redact(alert.title), text=redact(alert.text),
                        fields={k: redact(v) if isinstance(v, str) else v for k, v in alert.fields.items()})
        if not s.enabled or alert.kind not in s.kinds:
            status = "disabled"
        elif not s.webhooks:
            status = "no_webhook"
        else:
            status = "queued"
        con = self._conn()
        try:
            con.execute("BEGIN IMMEDIATE")
            if con.execute("SELECT 1 FROM alerts WHERE key = ?", (alert.key,)).fetchone():
                con.execute("COMMIT")
                return "duplicate"
            suppressed_before = 0
            if status == "queued":
                recent = con.execute("SELECT count(*) FROM alerts WHERE kind = ? AND status = 'queued' AND created > ?",
                                     (alert.kind, now - s.rate_window_seconds)).fetchone()[0]
                if recent >= s.rate_limit:
                    status = "suppressed"
                else:
                    last = con.execute("SELECT max(created) FROM alerts WHERE kind = ? AND status = 'queued'",
                                       (alert.kind,)).fetchone()[0] or 0.0
                    suppressed_before = con.execute(
                        "SELECT count(*) FROM alerts WHERE kind = ? AND status = 'suppressed' AND created >= ?",
                        (alert.kind, last)).fetchone()[0]
            con.execute("INSERT INTO alerts (key, kind, created, status, suppressed_before, alert) VALUES (?,?,?,?,?,?)",
                        (alert.key, alert.kind, now, status, suppressed_before, json.dumps(asdict(alert), default=str)))
            if status == "queued":
                con.executemany("INSERT INTO deliveries (key, webhook, next_try) VALUES (?, ?, ?)",
                                [(alert.key, h.id, now) for h in s.webhooks])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        finally:
            con.close()
        if status == "suppressed":
            log.warning(f"alert {alert.key} ({alert.kind}) suppressed: more than {s.rate_limit} {alert.kind} alerts "
                        f"in {s.rate_window_seconds / 60:.0f} min (alerts.rate_limit)")
        return status

    def deliver(self) -> list[Delivery]:
        """Send what is due (new alerts and retries). Failures are logged and retried later; nothing raises."""
        s, now = self.settings, self.clock()
        hooks = {h.id: h for h in s.webhooks}
        with self._conn() as con:
            due = con.execute(
                "SELECT d.key, d.webhook, d.attempts, a.alert, a.suppressed_before, a.created FROM deliveries d "
                "JOIN alerts a ON a.key = d.key WHERE d.delivered IS NULL AND d.gave_up IS NULL AND d.next_try <= ? "
                "ORDER BY a.created", (now,)).fetchall()
        out = []
        for key, hook_id, attempts, raw, suppressed, created in due:
            hook = hooks.get(hook_id)
            if hook is None:  # the webhook was removed from the settings since: nothing to send it to
                self._update(key, hook_id, "gave_up = ?, last_error = ?", (now, "webhook no longer configured"))
                continue
            alert = Alert.from_dict(json.loads(raw))
            try:
                self.post(hook.url, payload(alert, hook.format, suppressed), s.timeout_seconds)
            except Exception as exc:  # noqa: BLE001 - a webhook's failure is logged and retried, never raised
                error = redact(f"{type(exc).__name__}: {exc}", extra=hook.secrets)[:500]
                attempts += 1
                if now - created >= s.retry_for_seconds:
                    self._update(key, hook_id, "attempts = ?, gave_up = ?, last_error = ?", (attempts, now, error))
                    log.error(f"alert {key} to {hook.shown}: giving up after {attempts} attempts "
                              f"(alerts.retry_for): {error}")
                else:
                    delay = min(30 * 2 ** (attempts - 1), 3600)
                    self._update(key, hook_id, "attempts = ?, next_try = ?, last_error = ?",
                                 (attempts, now + delay, error))
                    log.warning(f"alert {key} to {hook.shown} failed (attempt {attempts}), retried in {delay}s: "
                                f"{error}")
                out.append(Delivery(key, hook.shown, False, error, attempts))
                continue
            self._update(key, hook_id, "attempts = ?, delivered = ?, last_error = NULL", (attempts + 1, now))
            out.append(Delivery(key, hook.shown, True, "", attempts + 1))
        return out

    def _update(self, key: str, hook_id: str, assignments: str, values: tuple) -> None:
        with self._conn() as con:
            con.execute(f"UPDATE deliveries SET {assignments} WHERE key = ? AND webhook = ?", (*values, key, hook_id))

    def send(self, alerts: Iterable[Alert]) -> tuple[dict[str, str], list[Delivery]]:
        """Submit each alert, then deliver what is due: ({key: submit status}, deliveries)."""
        statuses = {a.key: self.submit(a) for a in alerts}
        return statuses, self.deliver()

    def pending(self) -> int:
        with self._conn() as con:
            return con.execute("SELECT count(*) FROM deliveries WHERE delivered IS NULL AND gave_up IS NULL"
                               ).fetchone()[0]

    def seen(self, key: str) -> bool:
        with self._conn() as con:
            return con.execute("SELECT 1 FROM alerts WHERE key = ?", (key,)).fetchone() is not None
