"""A terminal progress bar for management commands (tqdm on stderr)."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from tqdm import tqdm


@contextmanager
def progress_bar(description: str, *, unit: str = "img", disable: bool = False):
    """Yields a progress(done, total, message) callback that drives a tqdm bar."""
    bar = tqdm(desc=description, unit=unit, file=sys.stderr, disable=disable, dynamic_ncols=True)

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
    import time

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
