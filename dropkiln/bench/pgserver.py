"""A throwaway PostgreSQL server for the tests and benchmarks, from the distribution's own
programs (never a system service: nothing outside its temporary folder is touched).

initdb makes a data folder in a temporary directory, pg_ctl starts the server on a free
loopback port with its socket in that folder, and `stop` kills it and removes the folder.
The server refuses to run as root, so under root (CI runs as root) the programs run as the
`postgres` user that the distribution's package creates. Nothing listens beyond 127.0.0.1.

pytest-postgresql drives pg_ctl the same way but has no answer for root, which is how CI
runs; this is the part of it the suite needs.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

SUPERUSER = "dropkiln"
SERVER_USER = "postgres"  # made by Debian's postgresql-common; the server never runs as root
INSTALL_HINT = "bash scripts/install-postgres"


class NoPostgres(RuntimeError):
    """PostgreSQL's server programs are not installed here."""


def find_bindir() -> Path:
    """The folder with initdb and pg_ctl: Debian's newest version, else pg_config's, else PATH."""
    debian = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda p: int(Path(p).parts[4]) if Path(p).parts[4].isdigit() else 0,
    )
    if debian:
        return Path(debian[-1]).parent
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        bindir = Path(out.stdout.strip())
        if (bindir / "pg_ctl").exists():
            return bindir
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl and shutil.which("initdb"):
        return Path(pg_ctl).resolve().parent
    raise NoPostgres(f"PostgreSQL's server is not installed: {INSTALL_HINT}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class PostgresServer:
    bindir: Path
    datadir: Path
    port: int
    run_as: str | None

    @classmethod
    def start(cls, *, durable: bool = False) -> PostgresServer:
        """Start a server; unless ``durable`` (benchmarks), one that never fsyncs (tests)."""
        bindir = find_bindir()
        run_as = None
        base = Path(tempfile.mkdtemp(prefix="dropkiln-pg-"))
        datadir = base / "data"
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam(SERVER_USER)
            except KeyError:
                raise NoPostgres(
                    f"running as root and there is no {SERVER_USER!r} user to run the server as: "
                    f"{INSTALL_HINT}"
                ) from None
            run_as = SERVER_USER
            os.chmod(base, 0o755)
            os.chown(base, account.pw_uid, account.pw_gid)
        server = cls(bindir, datadir, _free_port(), run_as)
        server._run(
            "initdb", "-D", str(datadir), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
            "--no-sync", "--no-instructions",
        )  # fmt: skip
        options = (
            f"-c listen_addresses=127.0.0.1 -p {server.port} -c unix_socket_directories={datadir} "
            "-c max_connections=200"
        )
        if not durable:  # a test server: nothing on it must survive a power cut
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        server._run("pg_ctl", "-D", str(datadir), "-o", options, "-l", str(base / "log"), "-w",
                    "start")  # fmt: skip
        return server

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bindir / program), *args]
        if self.run_as is not None:
            # runuser lives in /usr/sbin, which a non-login root shell may not have on PATH
            runuser = shutil.which("runuser", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
            command = [runuser or "runuser", "-u", self.run_as, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            log = self.datadir.parent / "log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{program} failed: {done.stderr.strip()}\n{tail}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _sql(self, database_url: str, statement: str) -> None:
        """Run one statement with the server's own psql (no database driver needed here)."""
        done = subprocess.run(
            [str(self.bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", database_url,
             "-c", statement],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr.strip()}")

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        self._sql(self.url(), f"CREATE DATABASE {name}")
        return self.url(name)

    def create_schema(self, database_url: str) -> str:
        """A new empty schema in the database at ``database_url``; returns a URL whose
        connections use it (search_path). Far cheaper than a database per test."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        self._sql(database_url, f"CREATE SCHEMA {name}")
        return f"{database_url}?options=-csearch_path%3D{name}"

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.datadir.parent, ignore_errors=True)
