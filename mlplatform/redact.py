"""Keep credentials out of what people read: exception messages, Dagster metadata, MLflow tags, logs, CLI output.

`redact(text)` hides
- the userinfo of every URI (`postgresql://user:pass@host/db` -> `postgresql://***@host/db`,
  `https://user:token@host` -> `https://***@host`);
- secret-looking query parameters (`?password=...`, `&token=...`);
- the values of known secret settings found in the environment (LAKEFS_SECRET_ACCESS_KEY, ...) and the
  passwords inside MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI / LAKEFS_ENDPOINT, wherever they appear verbatim.

Plain standard library: cheap to import from anywhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterable, Iterator
from urllib.parse import unquote

MASK = "***"

# Settings whose whole value is a secret.
SECRET_ENV = (
    "LAKEFS_SECRET_ACCESS_KEY",
    "LAKEFS_AUTH_ENCRYPT_SECRET_KEY",
    "MLP_S3_SECRET_ACCESS_KEY",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "DATABRICKS_TOKEN",
)
# Settings holding a URI that may carry credentials in its userinfo.
URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "LAKEFS_ENDPOINT", "MLFLOW_UI_URL")

# scheme://userinfo@ : userinfo may hold anything but '/', whitespace and '@' (a '@' in a password must be
# percent-encoded in a valid URI; the verbatim-value pass below catches the invalid ones we know of).
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/\s@'\"<>]+)@")
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&;](?:password|passwd|pwd|pass|token|access_token|auth_token|secret|secret_key|api_key|apikey|"
    r"sig|signature|x-amz-signature|x-amz-security-token)=)(?P<value>[^&;\s'\"]+)",
    re.IGNORECASE,
)
_MIN_SECRET_LEN = 4  # shorter values are too likely to be ordinary words to be replaced everywhere


def redact_uri(uri: str) -> str:
    """The URI with its userinfo and secret query parameters replaced by ***: safe to print."""
    return _QUERY_SECRET.sub(lambda m: m.group("key") + MASK, _USERINFO.sub(lambda m: m.group("scheme") + MASK + "@",
                                                                             uri))


def uri_secrets(uri: str) -> list[str]:
    """The password (or lone token) inside a URI's userinfo, raw and percent-decoded. Tolerates the invalid URIs
    people do write, with a raw '@' or '/' in the password (userinfo = up to the last '@' holding a ':')."""
    rest = uri.split("://", 1)[1] if "://" in uri else ""
    rest = re.split(r"[?#]", rest, maxsplit=1)[0]
    if "@" not in rest:
        return []
    userinfo = rest.rsplit("@", 1)[0]
    if ":" not in userinfo:
        userinfo = rest.split("/", 1)[0].rsplit("@", 1)[0] if "@" in rest.split("/", 1)[0] else ""
        secret = userinfo  # https://token@host: the user part is the token
    else:
        secret = userinfo.split(":", 1)[1]
    return [v for v in {secret, unquote(secret)} if v]


def known_secrets(environ: dict[str, str] | None = None, extra: Iterable[str] = ()) -> list[str]:
    """The secret values present in `environ` (default os.environ), longest first."""
    environ = os.environ if environ is None else environ
    values = [environ.get(k, "") for k in SECRET_ENV]
    for k in URI_ENV:
        values += uri_secrets(environ.get(k, ""))
    values += list(extra)
    return sorted({v for v in values if v and len(v) >= _MIN_SECRET_LEN}, key=len, reverse=True)


def redact(text: object, extra: Iterable[str] = (), environ: dict[str, str] | None = None) -> str:
    """`text` (any object, via str) with URI credentials and known secret values replaced by ***."""
    out = str(text)
    for secret in known_secrets(environ, extra):  # first: a raw '@' or '/' in a password would split the regex
        out = out.replace(secret, MASK)
    return redact_uri(out)


def redact_exception(exc: BaseException, extra: Iterable[str] = ()) -> BaseException:
    """Scrub an exception's message in place (and its causes'), keeping its type and attributes, so callers
    that catch a specific type or read an error code still work. Returns the same exception."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    stack = [exc]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        try:
            cur.args = tuple(redact(a, extra) if isinstance(a, str) else a for a in cur.args)
        except (AttributeError, TypeError):
            pass
        for attr in ("message", "msg", "detail", "body", "reason"):  # MlflowException.message, HTTP errors
            val = getattr(cur, attr, None)
            if isinstance(val, str):
                with contextlib.suppress(AttributeError, TypeError):
                    setattr(cur, attr, redact(val, extra))
        stack += [cur.__cause__, cur.__context__]
    return exc


@contextlib.contextmanager
def redacting(extra: Iterable[str] = ()) -> Iterator[None]:
    """`with redacting(): ...`: any exception leaving the block has its messages scrubbed first."""
    try:
        yield
    except BaseException as exc:
        redact_exception(exc, extra)
        raise


class RedactingFilter(logging.Filter):
    """A logging filter that scrubs each record's message (formatted with its args) before it is emitted."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is left to the handler
            return True
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            redact_exception(record.exc_info[1])
            record.exc_text = None
        return True


_FILTER = RedactingFilter()


def install_log_filter(logger_names: Iterable[str] = ("", "mlflow", "dagster", "alembic", "sqlalchemy")) -> None:
    """Attach the redacting filter to these loggers and to their handlers (idempotent). Filters on a handler see
    records from child loggers too (`mlflow.store.db.utils` through the `mlflow` handler)."""
    for name in logger_names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
        for handler in logger.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
