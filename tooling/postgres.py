"""A real Postgres server for the prod profile on one machine and for its tests: Debian's `postgresql` package
(installed by `make postgres`), started on a loopback port with its data, socket and log in one folder.

    server = PostgresServer(folder, port=free_port()).start()   # initdb on first start, then pg_ctl start
    server.url("mlflow")      # postgresql://mlp:<password>@127.0.0.1:<port>/mlflow
    server.stop()

Only 127.0.0.1 is listened on, the Unix socket lives in the folder (never /var/run/postgresql), and the
superuser `mlp` has a password generated at initdb (scram-sha-256 for every connection, no trust). The
databases of DATABASES (Dagster, MLflow, the audit trail, lakeFS) are created on start when missing.

Postgres refuses to run as root: when this process is root, initdb and pg_ctl run as the `postgres` system user
(created by the Debian package) through `runuser`, and the folder is owned by it. Used by `python -m
tooling.postgres up|down|status` (the prod profile's `make up`) and by the prod-profile test fixture.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tooling.services import ServiceError, free_port, port_in_use, write_private

DATABASES = ("dagster", "mlflow", "audit", "lakefs")
SUPERUSER = "mlp"
OS_USER = "postgres"  # who runs the server when we are root


def pg_bin_dir() -> Path:
    """The folder of initdb/pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<newest version>/bin."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                        key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    if not candidates:
        raise ServiceError("no Postgres server found (initdb/pg_ctl not on PATH nor under /usr/lib/postgresql/*/bin): "
                           "run `make postgres` (installs Debian's 'postgresql' package)")
    return Path(candidates[-1]).parent


def _as_root() -> bool:
    return os.geteuid() == 0


@dataclass
class PostgresServer:
    """A Postgres cluster in `folder` (pgdata/, socket/, postgres.log, password), listening on 127.0.0.1:`port`."""

    folder: Path
    port: int = 0
    durable: bool = True  # False (tests): no fsync, for speed on a busy machine; never for real data

    def __post_init__(self) -> None:
        self.folder = Path(self.folder).absolute()
        if not self.port:
            self.port = free_port()

    @property
    def pgdata(self) -> Path:
        return self.folder / "pgdata"

    @property
    def socket_dir(self) -> Path:
        return self.folder / "socket"

    @property
    def log_file(self) -> Path:
        return self.folder / "postgres.log"

    @property
    def password_file(self) -> Path:
        return self.folder / "password"

    @property
    def password(self) -> str:
        return self.password_file.read_text().strip()

    def url(self, database: str = "postgres", scheme: str = "postgresql") -> str:
        return f"{scheme}://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def env(self, suffix: str = "") -> dict[str, str]:
        """The settings of the prod profile for this server (read by platform/dagster.prod.yaml, Settings and
        tooling/services.py); with `suffix`, for the databases named <name><suffix> (see `fresh_databases`)."""
        return {"MLP_PG_HOST": "127.0.0.1", "MLP_PG_PORT": str(self.port), "MLP_PG_USER": SUPERUSER,
                "MLP_PG_PASSWORD": self.password, "MLP_PG_DAGSTER_DB": f"dagster{suffix}",
                "MLFLOW_TRACKING_URI": self.url(f"mlflow{suffix}"), "MLP_AUDIT_URL": self.url(f"audit{suffix}"),
                "MLP_LAKEFS_KV_URL": self.url(f"lakefs{suffix}", scheme="postgres") + "?sslmode=disable"}

    def fresh_databases(self) -> dict[str, str]:
        """A new, empty set of the platform's databases on this server (e.g. one per test); their settings."""
        suffix = "_" + secrets.token_hex(4)
        self.create_databases(tuple(f"{name}{suffix}" for name in DATABASES))
        return self.env(suffix)

    # -- running the server's programs -------------------------------------------------------------------------
    def _run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [str(pg_bin_dir() / args[0]), *args[1:]]
        if _as_root():
            cmd = ["runuser", "-u", OS_USER, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/")
        if check and proc.returncode != 0:
            raise ServiceError(f"`{' '.join(args[:2])}` for the Postgres in {self.folder} failed "
                               f"({proc.returncode}): {(proc.stderr or proc.stdout)[-2000:]}; log: {self.log_file}")
        return proc

    def _own(self, path: Path) -> None:
        if _as_root():
            pw = pwd.getpwnam(OS_USER)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def _prepare_folder(self) -> None:
        if _as_root():
            try:
                pwd.getpwnam(OS_USER)
            except KeyError:
                raise ServiceError(f"running as root, Postgres needs the unprivileged '{OS_USER}' user (made by "
                                   f"Debian's postgresql package): run `make postgres`") from None
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.folder, 0o700)
        self._own(self.folder)
        for sub in (self.socket_dir,):
            sub.mkdir(exist_ok=True, mode=0o700)
            self._own(sub)
        if _as_root():  # the postgres user must be able to reach its folder
            probe = subprocess.run(["runuser", "-u", OS_USER, "--", "test", "-w", str(self.folder)])
            if probe.returncode != 0:
                raise ServiceError(f"the '{OS_USER}' user cannot write {self.folder} (a parent folder is private "
                                   f"to root): put the Postgres folder where it can, e.g. under /tmp or /var/lib")

    def initialized(self) -> bool:
        return (self.pgdata / "PG_VERSION").exists() and self.password_file.exists()

    def _initdb(self) -> None:
        password = secrets.token_urlsafe(24)
        pwfile = self.folder / ".initdb-password"
        write_private(pwfile, password + "\n")
        self._own(pwfile)
        try:
            self._run("initdb", "-D", str(self.pgdata), "-U", SUPERUSER, f"--pwfile={pwfile}",
                      "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-instructions")
        finally:
            pwfile.unlink(missing_ok=True)
        write_private(self.password_file, password + "\n")

    def running(self) -> bool:
        if not (self.pgdata / "postmaster.pid").exists():
            return False
        return self._run("pg_ctl", "status", "-D", str(self.pgdata), check=False).returncode == 0

    def start(self, wait: float = 60.0) -> "PostgresServer":
        """Start the server (initdb on first start) and create the platform's databases; idempotent."""
        self._prepare_folder()
        if not self.initialized():
            if self.pgdata.exists():
                shutil.rmtree(self.pgdata)  # a half-made cluster of an interrupted first start
            self._initdb()
        if not self.running():
            if port_in_use(self.port):
                raise ServiceError(f"port {self.port} on 127.0.0.1 is taken: choose another for Postgres "
                                   f"(MLP_PG_PORT)")
            opts = [f"-h 127.0.0.1 -p {self.port} -k {self.socket_dir}", "-c max_connections=300",
                    "-c shared_buffers=64MB"]
            if not self.durable:
                opts += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
            if not self.log_file.exists():
                self.log_file.touch(mode=0o600)
                self._own(self.log_file)
            self._run("pg_ctl", "start", "-D", str(self.pgdata), "-l", str(self.log_file), "-w",
                      "-t", str(int(wait)), "-o", " ".join(opts), timeout=wait + 30)
        self.create_databases()
        return self

    def connect(self, database: str = "postgres"):
        import psycopg2

        deadline = time.time() + 30
        while True:
            try:
                con = psycopg2.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, password=self.password,
                                       dbname=database, connect_timeout=5)
                con.autocommit = True
                return con
            except psycopg2.OperationalError as exc:
                if time.time() > deadline:
                    raise ServiceError(f"Postgres at 127.0.0.1:{self.port} (database {database!r}) refuses "
                                       f"connections: {str(exc).strip()}; log: {self.log_file}") from None
                time.sleep(0.3)

    def create_databases(self, names: tuple[str, ...] = DATABASES) -> None:
        con = self.connect()
        try:
            with con.cursor() as cur:
                for name in names:
                    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                    if cur.fetchone() is None:
                        cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            con.close()

    def stop(self) -> None:
        """Stop the server (fast shutdown: open sessions are ended, committed data is kept)."""
        if self.pgdata.exists() and (self.pgdata / "postmaster.pid").exists():
            self._run("pg_ctl", "stop", "-D", str(self.pgdata), "-m", "fast", "-w", check=False)


def local_postgres() -> PostgresServer:
    """The prod profile's Postgres on this machine: <state>/postgres (or MLP_PG_DIR), port MLP_PG_PORT or 5432's
    neighbour 55432."""
    from tooling.services import state

    folder = Path(os.environ.get("MLP_PG_DIR") or state() / "postgres")
    if not os.environ.get("MLP_PG_DIR") and _as_root():  # the postgres user cannot enter root's private state
        import hashlib
        import tempfile

        tag = hashlib.sha1(str(state()).encode()).hexdigest()[:10]
        folder = Path(tempfile.gettempdir()) / f"mlp-postgres-{tag}"
    return PostgresServer(folder, port=int(os.environ.get("MLP_PG_PORT") or 55432))


def main(argv: list[str] | None = None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    cmd = argv[0] if argv else "status"
    server = local_postgres()
    try:
        if cmd == "up":
            server.start()
            print(f"Postgres:   127.0.0.1:{server.port}  (data {server.pgdata}, log {server.log_file})")
        elif cmd == "down":
            server.stop()
            print("stopped Postgres")
        elif cmd == "status":
            print(f"Postgres 127.0.0.1:{server.port}: {'up' if server.running() else 'down'}")
        else:
            print(f"unknown command {cmd!r}: use up|down|status", file=sys.stderr)
            return 2
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
