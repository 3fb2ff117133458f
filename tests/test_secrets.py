"""Secrets: credentials never reach messages or output, secret files are private from creation, and the
local lakeFS is given keys only once it has proven it is the server we started."""

from __future__ import annotations

import http.server
import json
import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mlplatform.redact import redact, redact_exception, redact_uri, redacting
from tooling.services import LakeFSServer, ServiceError, free_port, write_private

ROOT = Path(__file__).resolve().parent.parent


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- redaction (no services) --------------------------------------------------------------------------------

@pytest.mark.parametrize("uri, secret, kept", [
    ("postgresql://mlflow:pa55word@db.example.com:5432/mlflow", "pa55word", "db.example.com:5432/mlflow"),
    ("https://alice:ghp_T0kenT0ken@mlflow.example.com/", "ghp_T0kenT0ken", "mlflow.example.com/"),
    ("https://ghp_T0kenOnly@mlflow.example.com", "ghp_T0kenOnly", "mlflow.example.com"),
    ("https://mlflow.example.com/?token=abcd1234&x=1", "abcd1234", "x=1"),
])
def test_redact_uri_hides_userinfo_and_secret_query_keeps_host(uri, secret, kept):
    out = redact_uri(uri)
    assert secret not in out
    assert kept in out
    assert "***" in out


def test_redact_hides_known_secret_values_anywhere_in_text(monkeypatch):
    monkeypatch.setenv("LAKEFS_SECRET_ACCESS_KEY", "Zx9SecretKeyValue0123")
    # a password with characters a URI should have encoded still disappears, because it is known from the setting
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://bob:p@ss/w0rd@db.internal/mlflow")
    text = ("auth failed with Zx9SecretKeyValue0123; FATAL: password 'p@ss/w0rd' rejected "
            "for postgresql://bob:p@ss/w0rd@db.internal/mlflow")
    out = redact(text)
    assert "Zx9SecretKeyValue0123" not in out
    assert "p@ss/w0rd" not in out
    assert "db.internal/mlflow" in out


def test_redact_exception_keeps_type_and_code_and_scrubs_its_causes(monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    monkeypatch.setenv("LAKEFS_SECRET_ACCESS_KEY", "Zx9SecretKeyValue0123")
    try:
        try:
            raise OSError("cannot reach https://u:tok3nValue@host with Zx9SecretKeyValue0123")
        except OSError as cause:
            raise MlflowException("API request to https://u:tok3nValue@host/api failed",
                                  error_code=RESOURCE_DOES_NOT_EXIST) from cause
    except MlflowException as exc:
        redact_exception(exc)
        assert isinstance(exc, MlflowException) and exc.error_code == "RESOURCE_DOES_NOT_EXIST"
        assert "tok3nValue" not in str(exc) and "tok3nValue" not in exc.message
        assert "tok3nValue" not in str(exc.__cause__) and "Zx9SecretKeyValue0123" not in str(exc.__cause__)


def test_redacting_block_scrubs_what_leaves_it():
    with pytest.raises(ValueError) as info:
        with redacting():
            raise ValueError("store postgresql://u:hunter22@db/x is down")
    assert "hunter22" not in str(info.value)


def test_mlflow_log_lines_are_scrubbed_once_the_filter_is_installed():
    import logging

    from mlplatform.redact import install_log_filter

    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append(self.format(record))

    handler = Collect()
    logger = logging.getLogger("mlflow")
    logger.addHandler(handler)
    try:
        install_log_filter()
        logging.getLogger("mlflow.store.db.utils").warning("engine for %s failed", "postgresql://u:hunter22@db/m")
    finally:
        logger.removeHandler(handler)
    assert seen and "hunter22" not in seen[0] and "db/m" in seen[0]


class _FakeMLflow(http.server.BaseHTTPRequestHandler):
    """Answers MLflow's health check and experiment lookup, then drops every other request (a dying server)."""

    def do_GET(self):
        if self.path.startswith("/health"):
            self._send(200, b"OK")
        elif self.path.startswith("/api/2.0/mlflow/experiments/get-by-name") and self.server.lookup_ok:
            self._send(200, json.dumps({"experiment": {"experiment_id": "1", "name": "e", "lifecycle_stage": "active",
                                                       "artifact_location": "/tmp/x"}}).encode())
        else:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    do_POST = do_GET

    def _send(self, code, body):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_mlflow(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeMLflow)
    srv.lookup_ok = False
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_mlflow_unreachable_error_names_host_but_not_credentials():
    from resources.mlflow import MLflowResource, MLflowUnavailable

    port = free_port()
    m = MLflowResource(tracking_uri=f"https://alice:S3cr3tT0ken@127.0.0.1:{port}", retries=1, timeout_seconds=0.5)
    with pytest.raises(MLflowUnavailable) as info:
        m.setup()
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "S3cr3tT0ken" not in str(info.value)
    assert "S3cr3tT0ken" not in m.display_uri


def test_mlflow_failure_after_health_check_hides_credentials(fake_mlflow):
    """MLflow's own error for a dropped request quotes the full URI with its token; ours must not."""
    from mlflow.tracking import MlflowClient

    from resources.mlflow import MLflowResource, MLflowUnavailable

    uri = f"http://alice:S3cr3tT0ken@127.0.0.1:{fake_mlflow.server_address[1]}"
    with pytest.raises(Exception) as raw:  # the library alone: proves the leak this guards against is real
        MlflowClient(tracking_uri=uri, registry_uri=uri).get_registered_model("m")
    assert "S3cr3tT0ken" in str(raw.value)

    m = MLflowResource(tracking_uri=uri, retries=2, timeout_seconds=1)
    with pytest.raises(MLflowUnavailable) as info:
        m.setup()  # experiment lookup dropped: a transient failure, retried, then reported
    assert "S3cr3tT0ken" not in str(info.value) and "127.0.0.1" in str(info.value)


def test_mlflow_client_errors_keep_their_type_without_credentials(fake_mlflow):
    from mlflow.exceptions import MlflowException

    from resources.mlflow import MLflowResource

    fake_mlflow.lookup_ok = True
    uri = f"http://alice:S3cr3tT0ken@127.0.0.1:{fake_mlflow.server_address[1]}"
    m = MLflowResource(tracking_uri=uri, experiment="e", retries=1, timeout_seconds=1)
    with pytest.raises(MlflowException) as info:
        m.client().get_registered_model("m")
    assert "S3cr3tT0ken" not in str(info.value)
    assert "S3cr3tT0ken" not in m.run_url("abc") + m.model_version_url(1)
    with pytest.raises(RuntimeError) as fluent:  # what the fluent API raises, through the resource's guard
        with m.redacting():
            raise RuntimeError(f"API request to {uri}/api/2.0/mlflow/runs/create failed")
    assert "S3cr3tT0ken" not in str(fluent.value)


# --- secret files -------------------------------------------------------------------------------------------

def test_write_private_is_0600_even_with_open_umask_and_an_older_open_file(tmp_path):
    path = tmp_path / "sub" / "mlp.env"
    path.parent.mkdir()
    path.write_text("old")
    os.chmod(path, 0o644)
    old = os.umask(0)
    try:
        write_private(path, "LAKEFS_SECRET_ACCESS_KEY=x\n")
    finally:
        os.umask(old)
    assert mode(path) == 0o600
    assert path.read_text() == "LAKEFS_SECRET_ACCESS_KEY=x\n"
    assert [p.name for p in path.parent.iterdir()] == ["mlp.env"]  # no temporary file left behind


def test_settings_file_left_readable_by_an_older_version_is_narrowed_on_first_read(tmp_path, monkeypatch):
    from tooling.services import env_file, read_env_file

    monkeypatch.setenv("MLP_STATE_DIR", str(tmp_path))
    env_file().write_text("LAKEFS_SECRET_ACCESS_KEY=old\n")
    os.chmod(env_file(), 0o644)
    assert read_env_file() == {"LAKEFS_SECRET_ACCESS_KEY": "old"}
    assert mode(env_file()) == 0o600


# --- the local lakeFS proves it is ours ---------------------------------------------------------------------

class _Impostor(http.server.BaseHTTPRequestHandler):
    """Answers lakeFS's health check like lakeFS does, and records every request it gets."""

    def _record(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode(errors="replace") if length else ""
        self.server.seen.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                 "body": body})
        if self.path.startswith("/api/v1/healthcheck"):
            self.send_response(204)
            self.end_headers()
        else:
            body = b'{"message":"ok"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = _record

    def log_message(self, *args):
        pass


@pytest.fixture
def impostor():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Impostor)
    srv.seen = []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _assert_nothing_secret_sent(seen: list[dict], secrets: tuple[str, ...] = ()):
    assert seen, "the impostor was never asked anything: the test did not exercise the adoption path"
    for req in seen:
        assert (req["method"], req["path"]) == ("GET", "/api/v1/healthcheck"), req
        assert not any(k.lower() == "authorization" for k in req["headers"]), req
        assert not req["body"]
        for s in secrets:
            assert s not in json.dumps(req)


def _assert_refusal(exc: ServiceError, port: int):
    msg = str(exc)
    assert f"port {port}" in msg and "MLP_LAKEFS_PORT" in msg and "No keys were sent" in msg


def test_foreign_server_on_the_port_is_refused_and_gets_no_keys(tmp_path, impostor):
    port = impostor.server_address[1]
    server = LakeFSServer(tmp_path / "lakefs", port=port)
    with pytest.raises(ServiceError) as info:
        server.start()
    _assert_refusal(info.value, port)
    _assert_nothing_secret_sent(impostor.seen)
    assert not server.credentials_file.exists()


def test_foreign_server_is_refused_even_when_our_keys_exist_and_pid_file_names_a_live_process(tmp_path, impostor):
    """Old keys on disk and a pid file naming a live (but unrelated) process are no proof."""
    port = impostor.server_address[1]
    server = LakeFSServer(tmp_path / "lakefs", port=port)
    server.data_dir.mkdir()
    write_private(server.credentials_file, json.dumps({"access_key_id": "AKIAMLPOLDKEY0000000",
                                                       "secret_access_key": "OldSecretValue0123456789"}))
    server.pid_file.write_text(str(os.getpid()))
    with pytest.raises(ServiceError) as info:
        server.start()
    _assert_refusal(info.value, port)
    _assert_nothing_secret_sent(impostor.seen, ("OldSecretValue0123456789",))


@pytest.mark.services
def test_our_own_lakefs_is_adopted_but_not_when_it_listens_elsewhere(tmp_path, impostor):
    ours = LakeFSServer(tmp_path / "lakefs", port=free_port()).start()
    try:
        pid = ours.pid_file.read_text()
        creds = ours.credentials
        # secret files and folder private from creation
        assert mode(ours.credentials_file) == 0o600
        assert mode(ours.data_dir / "encrypt.key") == 0o600
        assert mode(ours.data_dir) == 0o700
        # a second start (a later `make up`) adopts it: same process, same keys, nothing new generated
        again = LakeFSServer(ours.data_dir, port=ours.port).start()
        assert again.pid_file.read_text() == pid and again.credentials == creds
        # the same data folder and a live lakeFS of ours, but the port is answered by someone else: refused
        elsewhere = LakeFSServer(ours.data_dir, port=impostor.server_address[1])
        with pytest.raises(ServiceError) as info:
            elsewhere.start()
        _assert_refusal(info.value, impostor.server_address[1])
        _assert_nothing_secret_sent(impostor.seen, (creds["secret_access_key"],))
    finally:
        ours.stop()
    assert not ours.healthy()


def test_stop_never_kills_a_process_that_reused_our_pid(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        server = LakeFSServer(tmp_path / "lakefs", port=free_port())
        server.data_dir.mkdir()
        server.pid_file.write_text(str(other.pid))
        server.stop()
        assert other.poll() is None, "stop() killed a process that is not our lakeFS"
        assert not server.pid_file.exists()
    finally:
        other.kill()
        other.wait()


# --- `up` from nothing --------------------------------------------------------------------------------------

def _services(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tooling.services", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)


@pytest.mark.services
def test_up_from_nothing_starts_lakefs_writes_private_settings_and_says_where(tmp_path):
    state = tmp_path / "fresh" / ".state"  # does not exist yet
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LAKEFS_", "MLFLOW_", "DAGSTER_", "MLP_"))}
    env.update(MLP_STATE_DIR=str(state), MLP_LAKEFS_PORT=str(free_port()), DAGSTER_HOME=str(state / "dagster_home"))
    try:
        first = _services(["up"], env)
        assert first.returncode == 0, first.stderr
        settings = dict(line.split("=", 1) for line in (state / "mlp.env").read_text().splitlines())
        secret = settings["LAKEFS_SECRET_ACCESS_KEY"]
        assert mode(state / "mlp.env") == 0o600 and mode(state) == 0o700
        assert mode(state / "lakefs" / "credentials.json") == 0o600
        out = first.stdout
        for where in (str(state), settings["LAKEFS_ENDPOINT"], str(state / "mlp.env"), settings["MLFLOW_TRACKING_URI"],
                      str(state / "dagster_home")):
            assert where in out, (where, out)
        assert secret not in out + first.stderr
        assert (state / "dagster_home" / "dagster.yaml").exists()

        # again, with the operator's own MLflow (credentials in its URI): our lakeFS adopted, the URI redacted
        again = _services(["up"], {**env, "MLFLOW_TRACKING_URI": "postgresql://ops:Pg-pa55word@db.example/mlflow"})
        assert again.returncode == 0, again.stderr
        assert "postgresql://***@db.example/mlflow" in again.stdout
        assert "Pg-pa55word" not in again.stdout + again.stderr
        assert "Pg-pa55word" not in (state / "mlp.env").read_text()
        assert dict(line.split("=", 1) for line in (state / "mlp.env").read_text().splitlines()
                    )["LAKEFS_SECRET_ACCESS_KEY"] == secret
    finally:
        down = _services(["down"], env)
    assert down.returncode == 0, down.stderr
    status = _services(["status"], env)
    assert "down" in status.stdout
