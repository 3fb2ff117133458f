"""Start, health-check and stop the project's own local services: a lakeFS server and an MLflow UI.

Used by the Makefile (`python -m mlplatform.services up|down|status`) and by the test fixtures.
If LAKEFS_ENDPOINT is set in the caller's environment, that server is used and nothing is started.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
GO_MODULE = ROOT / "platform" / "lakefs"
BIN_DIR = ROOT / ".bin"


def state() -> Path:
    from resources.settings import state_dir

    return state_dir()


def env_file() -> Path:
    # Not `.env`: Dagster loads a `.env` from the working directory OVER the process environment, which
    # would shadow a LAKEFS_ENDPOINT the caller exported. Ours is loaded under it (`python -m mlplatform.env`).
    return state() / "mlp.env"


class ServiceError(RuntimeError):
    """A local service could not be built, started or reached."""


def lakefs_version() -> str:
    """The lakeFS release pinned in platform/lakefs/go.mod."""
    text = (GO_MODULE / "go.mod").read_text()
    match = re.search(r"github\.com/treeverse/lakefs\s+(v[0-9][^\s]*)", text)
    if not match:
        raise ServiceError(f"{GO_MODULE / 'go.mod'}: no `require github.com/treeverse/lakefs vX.Y.Z` line")
    return match.group(1)


def lakefs_binary() -> Path:
    return BIN_DIR / f"lakefs-{lakefs_version()}"


def build_lakefs(verbose: bool = True) -> Path:
    """Build the lakeFS server from its Go module once per pinned version; reuse it afterwards."""
    binary = lakefs_binary()
    if binary.exists():
        return binary
    if shutil.which("go") is None:
        raise ServiceError("`go` is not on PATH: it is needed once to build the lakeFS server (see README)")
    BIN_DIR.mkdir(exist_ok=True)
    tmp = binary.with_suffix(".partial")
    cmd = ["go", "build", "-trimpath", "-o", str(tmp), "github.com/treeverse/lakefs/cmd/lakefs"]
    if verbose:
        print(f"building lakeFS {lakefs_version()} from its Go module (first time only, ~10 min on 2 cores)...",
              flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=GO_MODULE, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ServiceError(f"`{' '.join(cmd)}` in {GO_MODULE} failed:\n{proc.stderr[-4000:]}")
    tmp.rename(binary)
    if verbose:
        print(f"built {binary} in {time.time() - t0:.0f}s", flush=True)
    return binary


def write_private(path: Path, text: str) -> None:
    """Write a secret file that is 0600 from the moment it exists (never world-readable, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask cannot widen it, and an older file's mode is not inherited
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _random_key(prefix: str, length: int, alphabet: str) -> str:
    return prefix + "".join(secrets.choice(alphabet) for _ in range(length - len(prefix)))


@dataclass
class LakeFSServer:
    """A lakeFS server on loopback with local KV and blockstore under `data_dir`."""

    data_dir: Path
    port: int = 8000

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "lakefs.pid"

    @property
    def credentials_file(self) -> Path:
        return self.data_dir / "credentials.json"

    def healthy(self, timeout: float = 1.0) -> bool:
        try:
            return requests.get(f"{self.endpoint}/api/v1/healthcheck", timeout=timeout).status_code == 204
        except requests.RequestException:
            return False

    def _server_secret(self) -> str:
        # The KV store's secrets are encrypted with this key: it must survive restarts.
        path = self.data_dir / "encrypt.key"
        if not path.exists():
            write_private(path, secrets.token_hex(32))
        return path.read_text().strip()

    def start(self, wait: float = 60.0) -> "LakeFSServer":
        if self.healthy():
            self._ensure_credentials()
            return self
        binary = build_lakefs()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "LAKEFS_LISTEN_ADDRESS": f"127.0.0.1:{self.port}",
            "LAKEFS_DATABASE_TYPE": "local",
            "LAKEFS_DATABASE_LOCAL_PATH": str(self.data_dir / "metadata"),
            "LAKEFS_BLOCKSTORE_TYPE": "local",
            "LAKEFS_BLOCKSTORE_LOCAL_PATH": str(self.data_dir / "data"),
            "LAKEFS_AUTH_ENCRYPT_SECRET_KEY": self._server_secret(),
            "LAKEFS_STATS_ENABLED": "false",  # no usage telemetry
            "LAKEFS_LOGGING_LEVEL": "WARN",
            "LAKEFS_GATEWAYS_S3_DOMAIN_NAME": "s3.local.lakefs.io",
        }
        log = open(self.data_dir / "lakefs.log", "ab")
        proc = subprocess.Popen(
            [str(binary), "run", "--local-settings"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.pid_file.write_text(str(proc.pid))
        deadline = time.time() + wait
        while time.time() < deadline:
            if proc.poll() is not None:
                raise ServiceError(
                    f"lakeFS exited with code {proc.returncode} at start; see {self.data_dir / 'lakefs.log'}"
                )
            if self.healthy():
                break
            time.sleep(0.2)
        else:
            self.stop()
            raise ServiceError(f"lakeFS did not answer at {self.endpoint} within {wait:.0f}s")
        self._ensure_credentials()
        return self

    def _ensure_credentials(self) -> dict:
        """Create the admin user with freshly generated keys on first start (never the quickstart keys)."""
        if self.credentials_file.exists():
            return json.loads(self.credentials_file.read_text())
        creds = {
            "access_key_id": _random_key("AKIAMLP", 20, string.ascii_uppercase + string.digits),
            "secret_access_key": _random_key("", 40, string.ascii_letters + string.digits),
        }
        resp = requests.post(
            f"{self.endpoint}/api/v1/setup_lakefs",
            json={"username": "admin", "key": creds},
            timeout=10,
        )
        if resp.status_code not in (200, 201):
            raise ServiceError(
                f"lakeFS setup at {self.endpoint} failed ({resp.status_code}): {resp.text[:300]}. "
                f"If this server was set up before, its keys are lost: remove {self.data_dir} and start again."
            )
        write_private(self.credentials_file, json.dumps(creds))
        return creds

    @property
    def credentials(self) -> dict:
        return self._ensure_credentials()

    def env(self) -> dict[str, str]:
        creds = self.credentials
        return {
            "LAKEFS_ENDPOINT": self.endpoint,
            "LAKEFS_ACCESS_KEY_ID": creds["access_key_id"],
            "LAKEFS_SECRET_ACCESS_KEY": creds["secret_access_key"],
        }

    def stop(self) -> None:
        if not self.pid_file.exists():
            return
        pid = int(self.pid_file.read_text())
        try:
            os.killpg(pid, signal.SIGTERM)
            for _ in range(50):
                os.kill(pid, 0)
                time.sleep(0.1)
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.pid_file.unlink(missing_ok=True)


def _mlflow_pid_file() -> Path:
    return state() / "mlflow" / "server.pid"


def start_mlflow_ui(port: int = 5000) -> str:
    """`mlflow server` over the local SQLite store, for its UI (the platform itself writes to the store)."""
    url = f"http://127.0.0.1:{port}"
    try:
        if requests.get(f"{url}/health", timeout=1).ok:
            return url
    except requests.RequestException:
        pass
    store = state() / "mlflow"
    store.mkdir(parents=True, exist_ok=True)
    log = open(store / "server.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--default-artifact-root", str(store / "artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    _mlflow_pid_file().write_text(str(proc.pid))
    return url


def stop_mlflow_ui() -> None:
    pid_file = _mlflow_pid_file()
    if pid_file.exists():
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGTERM)
        except ProcessLookupError:
            pass
        pid_file.unlink(missing_ok=True)


def local_lakefs() -> LakeFSServer:
    return LakeFSServer(state() / "lakefs", port=int(os.environ.get("MLP_LAKEFS_PORT", "8000")))


def read_env_file() -> dict[str, str]:
    if not env_file().exists():
        return {}
    out = {}
    for line in env_file().read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def up(with_ui: bool = False) -> None:
    """Start what is not given from outside and record the local settings in .env."""
    env = read_env_file()
    if os.environ.get("LAKEFS_ENDPOINT"):
        # The caller's own server: start nothing, and make sure .env cannot shadow it.
        for k in ("LAKEFS_ENDPOINT", "LAKEFS_ACCESS_KEY_ID", "LAKEFS_SECRET_ACCESS_KEY"):
            env.pop(k, None)
        print(f"lakeFS: using {os.environ['LAKEFS_ENDPOINT']} from LAKEFS_ENDPOINT (nothing started)")
    else:
        server = local_lakefs().start()
        env.update(server.env())
        print(f"lakeFS: {server.endpoint} (UI and API; generated keys in {env_file()}, data in {server.data_dir})")
    if os.environ.get("MLFLOW_TRACKING_URI"):
        env.pop("MLFLOW_TRACKING_URI", None)
        print(f"MLflow: using {os.environ['MLFLOW_TRACKING_URI']} from MLFLOW_TRACKING_URI")
    else:
        (state() / "mlflow").mkdir(parents=True, exist_ok=True)
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{state() / 'mlflow' / 'mlflow.db'}"
        print(f"MLflow: local store {env['MLFLOW_TRACKING_URI']}")
    write_private(env_file(), "".join(f"{k}={v}\n" for k, v in sorted(env.items())))
    if with_ui:
        print(f"MLflow UI: {start_mlflow_ui()}")


def load_env_file() -> None:
    """Put .env's values into os.environ without overriding what the caller set."""
    for k, v in read_env_file().items():
        os.environ.setdefault(k, v)


def down() -> None:
    local_lakefs().stop()
    stop_mlflow_ui()
    print("stopped lakeFS and the MLflow UI")


def main(argv: list[str] | None = None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    cmd = argv[0] if argv else "status"
    try:
        if cmd == "build":
            print(build_lakefs())
        elif cmd == "up":
            up(with_ui="--ui" in argv)
        elif cmd == "down":
            down()
        elif cmd == "status":
            server = local_lakefs()
            print(f"lakeFS {server.endpoint}: {'up' if server.healthy() else 'down'}")
        else:
            print(f"unknown command {cmd!r}: use build|up|down|status", file=sys.stderr)
            return 2
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
