"""Progress for management commands on stderr: a tqdm bar on a terminal; when
stderr is not one (a log file, a pipe, CI), a plain line at most every
PLAIN_INTERVAL_S seconds and one at the end, never carriage-return redraws."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from tqdm import tqdm

PLAIN_INTERVAL_S = 5.0


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class _PlainProgress:
    """done/total lines for a stream that is not a terminal, throttled."""

    def __init__(self, description: str, unit: str, stream, interval: float):
        self.description, self.unit, self.stream, self.interval = description, unit, stream, interval
        self.state: tuple[int, int, str] | None = None
        self.printed: tuple[int, int, str] | None = None
        self.last_print = 0.0

    def update(self, done: int, total: int, message: str = "") -> None:
        self.state = (done, total, message)
        now = time.monotonic()
        if self.printed is None or now - self.last_print >= self.interval:
            self._print(now)

    def _print(self, now: float) -> None:
        assert self.state is not None
        done, total, message = self.state
        percent = f" ({100 * done / total:.0f} %)" if total else ""
        line = f"{self.description}: {done}/{total} {self.unit}{percent}"
        self.stream.write(line + (f" {message[-80:]}" if message else "") + "\n")
        self.stream.flush()
        self.printed, self.last_print = self.state, now

    def close(self) -> None:
        if self.state is not None and self.state != self.printed:
            self._print(time.monotonic())


@contextmanager
def progress_bar(description: str, *, unit: str = "img", disable: bool = False):
    """Yields a progress(done, total, message) callback: a tqdm bar on a terminal,
    throttled plain lines otherwise (see the module's docstring)."""
    stream = sys.stderr
    if disable:
        yield lambda done, total, message="": None
        return
    if not _is_terminal(stream):
        plain = _PlainProgress(description, unit, stream, PLAIN_INTERVAL_S)
        try:
            yield plain.update
        finally:
            plain.close()
        return
    bar = tqdm(desc=description, unit=unit, file=stream, dynamic_ncols=True)

    def update(done: int, total: int, message: str = "") -> None:
        if bar.total != total:
            bar.total = total
        bar.n = done
        bar.set_postfix_str(message[-40:], refresh=False)
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()


def wait_for_job(job, *, stdout=None, disable: bool = False, poll: float = 0.5):
    """Follow a job's row with a progress bar until it finishes; returns the job."""
    from search.jobs import job_status

    with progress_bar(f"job #{job.pk} ({job.kind})", unit="item", disable=disable) as update:
        while True:
            status = job_status(job)
            update(status["done"], max(status["total"], status["done"]), status["message"] or status["status"])
            if status["finished"]:
                break
            time.sleep(poll)
    job.refresh_from_db()
    return job
