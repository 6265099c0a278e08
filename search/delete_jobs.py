"""The "delete" job kind: delete a dataset, or many images, batch by batch
on a worker, with progress; search keeps answering meanwhile (each batch is its
own short transaction, see search/deletion.py). Registered in
SearchConfig.ready() as an *exclusive* kind: it starts only when no job works
on its dataset, and no job starts on that dataset until it ends.

Small deletes (at most CBIR_DELETE_IN_REQUEST_MAX images) are done within the
request by `delete_or_start`, under the same rule."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from django.conf import settings
from django.db import transaction

from search import deletion, jobs, runner
from search.models import Dataset, Image, Job

KIND = "delete"


@dataclass
class Outcome:
    """What `delete_or_start` did: deleted `deleted` images now, or started `job`."""

    deleted: int = 0
    job: Job | None = None


@transaction.atomic
def start_delete_job(*, dataset: Dataset | None = None, image_ids: Iterable[int] = (), user=None,
                     check: bool = True) -> Job:
    """Delete a dataset (with its images) or the given images as a job.

    Raises JobError (DeleteRefused for images) naming the job when a job works
    on the dataset or on the images' datasets ("cancel job #N first"), and
    JobsUnavailable (with `check`) when no worker serves the queue; then
    nothing is created."""
    if check:
        jobs.check_workers_for(KIND)
    if dataset is not None:
        total = dataset.images.count()
        return jobs.create(KIND, dataset=dataset, user=user,
                           params={"dataset_id": dataset.pk, "dataset_name": dataset.name, "total": total},
                           progress_total=total, log=f"queued: delete dataset {dataset.name} ({total:,} images)")
    ids = sorted({int(pk) for pk in image_ids})
    if not ids:
        raise jobs.JobError("no images to delete")
    dataset_ids = set(Image.objects.filter(pk__in=ids).values_list("dataset_id", flat=True))
    deletion.check_free(what=f"{len(ids):,} image(s)", datasets=dataset_ids)
    return jobs.create(KIND, user=user, params={"image_ids": ids, "total": len(ids)}, progress_total=len(ids),
                       log=f"queued: delete {len(ids):,} image(s)")


def delete_or_start(*, dataset: Dataset | None = None, image_ids: Iterable[int] = (), user=None) -> Outcome:
    """Delete at most CBIR_DELETE_IN_REQUEST_MAX images now (one transaction),
    or start a delete job for more. Raises JobError / DeleteRefused (nothing
    deleted) as start_delete_job and deletion.delete_now do."""
    ids = [] if dataset is not None else list(image_ids)
    count = dataset.images.count() if dataset is not None else len(ids)
    if count <= settings.CBIR_DELETE_IN_REQUEST_MAX:
        return Outcome(deleted=deletion.delete_now(dataset=dataset, image_ids=ids))
    return Outcome(job=start_delete_job(dataset=dataset, image_ids=ids, user=user))


def requeue(job: Job) -> None:
    """Run again (after a cancel or a failure): what is left, if no other job
    has started on the dataset meanwhile (JobError otherwise)."""
    dataset_id = job.params.get("dataset_id")
    if dataset_id:
        for other in jobs.working_on(datasets=[dataset_id], exclude=job.pk):
            raise jobs.JobError(f"{jobs.describe(other)} is working on this dataset; "
                                f"wait for it to end or cancel job #{other.pk} first")
    jobs.send(job)


def run_delete_job(job_id: int) -> str:
    """Run a delete job (the run_delete task; the benchmark calls it directly)."""
    return runner.execute(job_id, _delete)


def _delete(run: runner.Run) -> None:
    params = run.job.params
    total = int(params.get("total") or 0)

    throttle = settings.CBIR_EMBED_THROTTLE_SECONDS  # fault injection: slows batches down for tests and demos

    def progress(done: int, seen_total: int) -> None:
        run.progress(done, seen_total, f"deleted {done:,} of {seen_total:,} image(s)")
        if throttle:
            time.sleep(throttle)

    dataset_id = params.get("dataset_id")
    name = params.get("dataset_name", "")
    if dataset_id:
        dataset = Dataset.objects.filter(pk=dataset_id).first()
        if dataset is None:
            run.succeed(result={"deleted": 0}, message=f"dataset {name} was already deleted")
            return
        done, whole = deletion.delete_dataset(dataset, progress=progress, should_stop=run.should_stop)
    else:
        done = deletion.delete_images(params.get("image_ids") or [], progress=progress, should_stop=run.should_stop)
        whole = True
    if not whole or run.should_stop():
        kept = f"; dataset {name} and its other images are kept" if dataset_id else "; the others are kept"
        raise runner.JobStopped(f"cancelled after deleting {done:,} of {total:,} image(s){kept} "
                                "(Run again deletes the rest)")
    message = f"deleted {done:,} image(s)" + (f" and dataset {name}" if dataset_id else "")
    run.progress(done, done, message, force=True)
    run.succeed(result={"deleted": done, "dataset": name or None}, message=message)
    run.log(message)
