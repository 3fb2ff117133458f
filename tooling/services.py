"""Start, health-check and stop the project's own local services: a lakeFS server and an MLflow UI.

With MLP_ENV=prod (the prod profile on one machine), `up` also starts a Postgres server (tooling/postgres.py)
unless MLP_PG_HOST names one, and puts everything on it: lakeFS's KV store (`database.type: postgres`),
MLflow's backend store, the audit trail and Dagster's storage (platform/dagster.prod.yaml).

Used by the Makefile (`python -m tooling.services up|down|status`) and by the test fixtures.
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
    from mlplatform.spec import state_dir

    return state_dir()


def env_file() -> Path:
    # Not `.env`: Dagster loads a `.env` from the working directory OVER the process environment, which
    # would shadow a LAKEFS_ENDPOINT the caller exported. Ours is loaded under it (`python -m tooling.env`).
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
    tmp.unlink(missing_ok=True)  # a leftover of a crashed writer: O_EXCL below must create a new file
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask cannot widen it, and an older file's mode is not inherited
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def tighten(path: Path) -> None:
    """A secret file left group/world-readable by an older version of this project becomes 0600."""
    try:
        if path.exists() and path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
    except OSError:
        pass


def make_private_dir(path: Path) -> Path:
    """A directory only its owner can enter (0700), created so from the start."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's: certainly not ours
        return True
    return True


def _proc_cmdline(pid: int) -> list[str] | None:
    """The command line of `pid` (Linux /proc, else `ps`), or None when it cannot be read."""
    proc = Path(f"/proc/{pid}/cmdline")
    if Path("/proc/self").exists():
        try:
            return [a for a in proc.read_bytes().decode(errors="replace").split("\0") if a]
        except OSError:
            return None
    try:
        out = subprocess.run(["ps", "-p", str(pid), "-o", "command="], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.split() or None


def _proc_environ(pid: int) -> dict[str, str] | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return None
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def _listening_socket_inodes(port: int) -> set[str]:
    """Inodes of the TCP sockets listening on `port` in this network namespace (Linux)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def _socket_inodes_of(pid: int) -> set[str]:
    out = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return out
    for fd in fds:
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(link[len("socket:["):-1])
    return out


def _listens_on(pid: int, port: int) -> bool | None:
    """Whether `pid` holds the socket listening on `port`; None when this cannot be determined here."""
    if Path("/proc/net/tcp").exists():
        return bool(_listening_socket_inodes(port) & _socket_inodes_of(pid))
    if shutil.which("lsof"):
        out = subprocess.run(["lsof", "-nP", "-a", "-p", str(pid), f"-iTCP:{port}", "-sTCP:LISTEN", "-t"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() == str(pid)
    return None


def _random_key(prefix: str, length: int, alphabet: str) -> str:
    return prefix + "".join(secrets.choice(alphabet) for _ in range(length - len(prefix)))


@dataclass
class LakeFSServer:
    """A lakeFS server on loopback with its blockstore under `data_dir`, and its KV store there too (local) or,
    given `kv_url` (postgres://user:password@host:port/db?sslmode=disable), in that Postgres database."""

    data_dir: Path
    port: int = 8000
    kv_url: str = ""

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).absolute()

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

    def _pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _is_our_binary(self, pid: int) -> bool:
        cmd = _proc_cmdline(pid)
        if not cmd:
            return False
        exe = Path(os.path.realpath(cmd[0]))
        return exe.parent == Path(os.path.realpath(BIN_DIR)) and exe.name.startswith("lakefs-") \
            and "run" in cmd[1:]

    def ownership_problem(self) -> str | None:
        """None when the server answering on our port is provably the one we started from `data_dir`; otherwise
        why not. Proof: the pid in our pid file is alive, runs our lakeFS binary, was started with our listen
        address and metadata folder, and holds the socket listening on the port."""
        pid = self._pid()
        if pid is None:
            return f"no readable pid file {self.pid_file}, so this project did not start it"
        if not _pid_alive(pid):
            return f"pid {pid} from {self.pid_file} is not running"
        if not self._is_our_binary(pid):
            return f"pid {pid} from {self.pid_file} is not our lakeFS binary in {BIN_DIR}"
        environ = _proc_environ(pid)
        if environ is not None:  # Linux: the environment it was started with is readable by its owner
            if environ.get("LAKEFS_LISTEN_ADDRESS") != f"127.0.0.1:{self.port}":
                return (f"pid {pid} was started with LAKEFS_LISTEN_ADDRESS="
                        f"{environ.get('LAKEFS_LISTEN_ADDRESS')!r}, not '127.0.0.1:{self.port}'")
            meta = environ.get("LAKEFS_DATABASE_LOCAL_PATH", "")
            if not meta or os.path.realpath(meta) != os.path.realpath(self.data_dir / "metadata"):
                return f"pid {pid} keeps its metadata in {meta!r}, not in {self.data_dir / 'metadata'}"
        listens = _listens_on(pid, self.port)
        if listens is None:
            return f"cannot tell which process listens on port {self.port} (no /proc, no lsof)"
        if not listens:
            return f"pid {pid} (our lakeFS) does not hold the socket listening on port {self.port}"
        return None

    def require_ours(self) -> None:
        """Refuse (ServiceError, nothing sent) unless the server on our port is provably ours."""
        problem = self.ownership_problem()
        if problem:
            raise self._refusal(problem)

    def _refusal(self, problem: str) -> ServiceError:
        return ServiceError(
            f"a server answers as lakeFS at {self.endpoint} (port {self.port}) but it is not the one this project "
            f"started from {self.data_dir}: {problem}. No keys were sent to it. Stop that server, or use another "
            f"port for ours: MLP_LAKEFS_PORT=<free port> make up (or export LAKEFS_ENDPOINT and its keys to use it "
            f"deliberately)."
        )

    def _server_secret(self) -> str:
        # The KV store's secrets are encrypted with this key: it must survive restarts.
        path = self.data_dir / "encrypt.key"
        if not path.exists():
            write_private(path, secrets.token_hex(32))
        return path.read_text().strip()

    def start(self, wait: float = 60.0) -> "LakeFSServer":
        if self.healthy():
            self.require_ours()  # before anything, above all before keys, is sent to it
            self._ensure_credentials()
            return self
        if port_in_use(self.port):
            raise ServiceError(f"port {self.port} on 127.0.0.1 is taken by a program that does not answer as "
                               f"lakeFS: stop it, or choose another port with MLP_LAKEFS_PORT=<free port>")
        binary = build_lakefs()
        make_private_dir(self.data_dir)  # KV store, blockstore, keys: only their owner may read them
        for secret_file in (self.credentials_file, self.data_dir / "encrypt.key"):
            tighten(secret_file)
        env = {
            **os.environ,
            "LAKEFS_LISTEN_ADDRESS": f"127.0.0.1:{self.port}",
            "LAKEFS_DATABASE_TYPE": "postgres" if self.kv_url else "local",
            "LAKEFS_DATABASE_LOCAL_PATH": str(self.data_dir / "metadata"),  # also proves which server is ours
            "LAKEFS_BLOCKSTORE_TYPE": "local",
            "LAKEFS_BLOCKSTORE_LOCAL_PATH": str(self.data_dir / "data"),
            "LAKEFS_AUTH_ENCRYPT_SECRET_KEY": self._server_secret(),
            "LAKEFS_STATS_ENABLED": "false",  # no usage telemetry
            "LAKEFS_LOGGING_LEVEL": "WARN",
            "LAKEFS_GATEWAYS_S3_DOMAIN_NAME": "s3.local.lakefs.io",
        }
        if self.kv_url:  # database.postgres.connection_string; the password stays out of files and logs
            env["LAKEFS_DATABASE_POSTGRES_CONNECTION_STRING"] = self.kv_url
            env["LAKEFS_DATABASE_POSTGRES_MAX_OPEN_CONNECTIONS"] = "20"
        for k in ("LAKEFS_ENDPOINT", "LAKEFS_ACCESS_KEY_ID", "LAKEFS_SECRET_ACCESS_KEY"):  # client settings
            env.pop(k, None)
        log = open(self.data_dir / "lakefs.log", "ab")
        proc = subprocess.Popen(
            [str(binary), "run", "--local-settings"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        self.pid_file.write_text(str(proc.pid))
        deadline = time.time() + wait
        while time.time() < deadline:
            if proc.poll() is not None:
                raise ServiceError(
                    f"lakeFS exited with code {proc.returncode} at start on port {self.port}; see "
                    f"{self.data_dir / 'lakefs.log'} (another program on the port? choose one with MLP_LAKEFS_PORT)"
                )
            if self.healthy():
                problem = self.ownership_problem()
                if problem is None:
                    break
                # Something else answered on the port (before ours could bind it, or ours cannot be proven to
                # be the one answering): stop ours, send nothing, say why.
                self.stop()
                raise self._refusal(problem)
            time.sleep(0.2)
        else:
            self.stop()
            raise ServiceError(f"lakeFS did not answer at {self.endpoint} within {wait:.0f}s; see "
                               f"{self.data_dir / 'lakefs.log'}")
        self._ensure_credentials()
        return self

    def _ensure_credentials(self) -> dict:
        """Create the admin user with freshly generated keys on first start (never the quickstart keys)."""
        if self.credentials_file.exists():
            return json.loads(self.credentials_file.read_text())
        self.require_ours()  # freshly generated admin keys go only to the server we started
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
        """Stop the server we started (never another process that happens to reuse a stale pid)."""
        pid = self._pid()
        if pid is None:
            return
        if _pid_alive(pid) and self._is_our_binary(pid):
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
    if not pid_file.exists():
        return
    try:
        pid = int(pid_file.read_text().strip())
    except ValueError:
        pid = None
    cmd = _proc_cmdline(pid) if pid and _pid_alive(pid) else None
    if pid and cmd and "mlflow" in " ".join(cmd):  # never a process that reused a stale pid
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    pid_file.unlink(missing_ok=True)


def prod() -> bool:
    return os.environ.get("MLP_ENV", "").strip() == "prod"


def local_lakefs(kv_url: str = "") -> LakeFSServer:
    # Each profile its own folder: the prod profile's keys and encryption secret belong to its Postgres KV.
    return LakeFSServer(state() / ("lakefs-prod" if prod() else "lakefs"),
                        port=int(os.environ.get("MLP_LAKEFS_PORT", "8000")),
                        kv_url=kv_url or os.environ.get("MLP_LAKEFS_KV_URL", ""))


def prod_postgres_env() -> tuple[dict[str, str], str]:
    """The prod profile's Postgres settings: the caller's (MLP_PG_HOST and the rest exported), else those of a
    server started here (tooling/postgres.py); and a line saying which."""
    if os.environ.get("MLP_PG_HOST"):
        return {}, f"Postgres:   {os.environ['MLP_PG_HOST']} from MLP_PG_HOST (nothing started)"
    from tooling.postgres import local_postgres

    server = local_postgres().start()
    return server.env(), f"Postgres:   127.0.0.1:{server.port}  (data {server.pgdata}, log {server.log_file})"


def install_dagster_yaml(home: Path, profile_file: Path) -> None:
    """DAGSTER_HOME/dagster.yaml for the profile: seeded when missing, replaced when it is the other profile's."""
    target = home / "dagster.yaml"
    home.mkdir(parents=True, exist_ok=True)
    if not target.exists() or (("storage:\n  postgres:" in target.read_text())
                               != ("storage:\n  postgres:" in profile_file.read_text())):
        shutil.copyfile(profile_file, target)


def read_env_file() -> dict[str, str]:
    if not env_file().exists():
        return {}
    tighten(env_file())
    out = {}
    for line in env_file().read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def dagster_home() -> Path:
    return Path(os.environ.get("DAGSTER_HOME") or state() / "dagster_home")


def up(with_ui: bool = False) -> None:
    """Start what is not given from outside, record the local settings in .state/mlp.env (0600), and print
    where everything is. Works from nothing: no .state/, no lakeFS data, no MLflow store, no Dagster home."""
    from mlplatform.redact import redact_uri

    root = state()
    if not root.exists():
        make_private_dir(root)
    env = read_env_file()
    if not prod():  # switching back from the prod profile: its stores are not this profile's
        for k in [k for k in env if k.startswith("MLP_PG_")] + ["MLP_AUDIT_URL", "MLP_LAKEFS_KV_URL"]:
            env.pop(k, None)
        if env.get("MLFLOW_TRACKING_URI", "").startswith("postgresql://"):
            env.pop("MLFLOW_TRACKING_URI")
    lines = [f"state:      {root}  (all local runtime state; `make clean` removes it)"]
    if os.environ.get("LAKEFS_ENDPOINT"):
        # The caller's own server: start nothing, and make sure mlp.env cannot shadow it.
        for k in ("LAKEFS_ENDPOINT", "LAKEFS_ACCESS_KEY_ID", "LAKEFS_SECRET_ACCESS_KEY"):
            env.pop(k, None)
        lines.append(f"lakeFS:     {redact_uri(os.environ['LAKEFS_ENDPOINT'])} from LAKEFS_ENDPOINT (nothing started)")
    else:
        kv_url = ""
        if prod():
            pg_env, line = prod_postgres_env()
            env.update(pg_env)
            lines.append(line)
            kv_url = pg_env.get("MLP_LAKEFS_KV_URL") or os.environ.get("MLP_LAKEFS_KV_URL", "")
            # What MLP_ENV=prod requires and this one machine can give (exported values win, as always).
            for k, v in {"LAKEFS_REPOSITORY": "mlplatform", "LAKEFS_STORAGE_NAMESPACE": "local://mlplatform",
                         "MLFLOW_UI_URL": "http://127.0.0.1:5000"}.items():
                env.setdefault(k, v)
            if not kv_url:
                raise ServiceError("MLP_ENV=prod starts lakeFS on Postgres KV: set MLP_LAKEFS_KV_URL "
                                   "(postgres://user:password@host:port/db?sslmode=disable) with MLP_PG_HOST")
        server = local_lakefs(kv_url).start()
        env.update(server.env())
        lines += [f"lakeFS:     {server.endpoint}  (UI and API; port from MLP_LAKEFS_PORT, default 8000)",
                  f"  data:     {server.data_dir}  (log {server.data_dir / 'lakefs.log'})",
                  f"  keys:     generated, in {env_file()} and {server.credentials_file} (both 0600)"]
    if os.environ.get("MLFLOW_TRACKING_URI"):
        env.pop("MLFLOW_TRACKING_URI", None)
        lines.append(f"MLflow:     {redact_uri(os.environ['MLFLOW_TRACKING_URI'])} from MLFLOW_TRACKING_URI")
    elif env.get("MLFLOW_TRACKING_URI", "").startswith("postgresql://"):
        lines.append(f"MLflow:     {redact_uri(env['MLFLOW_TRACKING_URI'])}  (artifacts in {root / 'mlflow' / 'artifacts'})")
        if env.get("MLP_AUDIT_URL"):
            lines.append(f"audit:      {redact_uri(env['MLP_AUDIT_URL'])}")
    else:
        (root / "mlflow").mkdir(parents=True, exist_ok=True)
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
        lines.append(f"MLflow:     {env['MLFLOW_TRACKING_URI']}  (artifacts in {root / 'mlflow' / 'artifacts'})")
    home = dagster_home()
    # What the Makefile's rule does, for `python -m tooling.services up`; the prod profile's storage is Postgres.
    install_dagster_yaml(home, ROOT / "platform" / ("dagster.prod.yaml" if prod() else "dagster.yaml"))
    lines.append(f"Dagster:    DAGSTER_HOME={home}" + ("  (storage on Postgres)" if prod() else ""))
    lines.append(f"settings:   {env_file()}  (loaded by `python -m tooling.env CMD`, under what you export)")
    write_private(env_file(), "".join(f"{k}={v}\n" for k, v in sorted(env.items())))
    if with_ui:
        lines.append(f"MLflow UI:  {start_mlflow_ui()}")
    print("\n".join(lines), flush=True)


def load_env_file() -> None:
    """Put .env's values into os.environ without overriding what the caller set."""
    for k, v in read_env_file().items():
        os.environ.setdefault(k, v)


def down() -> None:
    local_lakefs().stop()
    stop_mlflow_ui()
    if prod():  # the profile's own Postgres, if `up` started one (its folder says so; another is never touched)
        from tooling.postgres import local_postgres

        local_postgres().stop()
    print("stopped lakeFS and the MLflow UI" + (" and Postgres" if prod() else ""))


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
            if not server.healthy():
                print(f"lakeFS {server.endpoint}: down")
            else:
                problem = server.ownership_problem()
                print(f"lakeFS {server.endpoint}: up" + (f", NOT ours ({problem})" if problem else ""))
        else:
            print(f"unknown command {cmd!r}: use build|up|down|status", file=sys.stderr)
            return 2
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
