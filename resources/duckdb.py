"""DuckDB: the local SQL engine, reading lakeFS refs through its S3 gateway with the pinned httpfs."""


import os
from pathlib import Path
from urllib.parse import urlparse

import dagster as dg

from resources.lakefs import LakeFSResource


def httpfs_package_file() -> Path:
    import duckdb
    import duckdb_extension_httpfs

    path = Path(duckdb_extension_httpfs.__file__).parent / "extensions" / f"v{duckdb.__version__}" \
        / "httpfs.duckdb_extension"
    if not path.exists():
        raise RuntimeError(f"duckdb-extension-httpfs has no build for DuckDB {duckdb.__version__} ({path}): "
                           f"pin duckdb-extension-httpfs to the same version as duckdb")
    return path


def extension_dir(state: Path) -> Path:
    """A project-local extension directory with httpfs installed from the pinned PyPI package."""
    import duckdb

    ext_dir = state / "duckdb" / "extensions"
    marker = ext_dir / f"httpfs-{duckdb.__version__}.installed"
    if not marker.exists():
        ext_dir.mkdir(parents=True, exist_ok=True)
        con = duckdb.connect()
        con.execute(f"SET extension_directory='{ext_dir}'")
        con.execute(f"INSTALL '{httpfs_package_file()}'")  # from a local file: no download
        con.close()
        marker.touch()
    return ext_dir


def s3_settings(endpoint: str, key: str, secret: str) -> dict[str, str]:
    parsed = urlparse(endpoint)
    return {
        "s3_endpoint": parsed.netloc,
        "s3_access_key_id": key,
        "s3_secret_access_key": secret,
        "s3_use_ssl": "true" if parsed.scheme == "https" else "false",
        "s3_url_style": "path",
        "s3_region": "us-east-1",
    }


class DuckDBResource(dg.ConfigurableResource):
    """A DuckDB database file whose connections can read and write lakeFS objects as s3://repo/ref/path,
    through the S3 gateway of the `lakefs` resource it depends on (its endpoint and keys, never a copy)."""

    database: str
    state_dir: str
    lakefs: dg.ResourceDependency[LakeFSResource]

    def connect(self, read_only: bool = False, in_memory: bool = False):
        import duckdb

        ext_dir = extension_dir(Path(self.state_dir))
        if not in_memory:
            Path(self.database).parent.mkdir(parents=True, exist_ok=True)
        con = duckdb.connect(":memory:" if in_memory else self.database, read_only=read_only, config={
            "autoinstall_known_extensions": "false",  # nothing is downloaded at run time
            "extension_directory": str(ext_dir),
        })
        con.execute("LOAD httpfs")
        from mlplatform.redact import redacting

        with redacting((self.lakefs.secret_access_key,)):  # an error quoting the statement hides the key
            for k, v in self._s3().items():
                con.execute(f"SET {k} = '{v}'")
        return con

    def _s3(self) -> dict[str, str]:
        return s3_settings(self.lakefs.endpoint, self.lakefs.access_key_id, self.lakefs.secret_access_key)

    def dbt_env(self) -> dict[str, str]:
        """Environment for dbt's profiles.yml (same database, same extension directory, same gateway). The lakeFS
        keys travel only in this environment: nothing here writes them to a file."""
        env = {"MLP_DUCKDB_PATH": self.database,
               "MLP_DUCKDB_EXT_DIR": str(extension_dir(Path(self.state_dir)))}
        env.update({f"MLP_{k.upper()}": v for k, v in self._s3().items()})
        return {**os.environ, **env}
