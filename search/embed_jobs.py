"""The "embed" job kind: embed what a model version is missing, in chunks that
run in parallel on every worker, then, as a step of its own, finish its index
(search.indexing.finish_index) and, when asked, switch search to it.
Registered in SearchConfig.ready()."""

from __future__ import annotations

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from search import jobs, runner
from search.hnsw import IndexBuildError
from search.indexing import embed_images, finish_index, missing_image_ids
from search.models import Dataset, Image, Job, JobChunk
from training.core.inference import compile_for
from training.models import ModelVersion

KIND = "embed"
S = jobs.S


def _chunks(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def queue_chunks(job: Job) -> int:
    """(Re)plan a job's chunks from what its version is still missing and queue
    them; with nothing to embed, queue the finishing task. Returns the image count."""
    job.chunks.all().delete()
    dataset = job.dataset if job.params.get("dataset_id") else None
    if job.model_version is None:
        raise jobs.JobError("the job's model version was deleted")
    ids = missing_image_ids(dataset, job.model_version)
    size = int(job.params.get("chunk_size") or settings.CBIR_CHUNK_SIZE)
    queued_at = timezone.now()
    chunks = JobChunk.objects.bulk_create(
        [JobChunk(job=job, index=i, image_ids=part, heartbeat=queued_at)  # queued since (jobs.resend_lost)
         for i, part in enumerate(_chunks(ids, size))])
    job.params["compile"] = compile_for(len(ids))
    Job.objects.filter(pk=job.pk).update(progress_done=0, progress_total=len(ids), params=job.params)
    for chunk in chunks:
        chunk.job = job
        jobs.send_chunk(chunk)
    if not chunks:
        jobs.send(job)
    return len(ids)


@transaction.atomic
def start_embed_job(version: ModelVersion, dataset: Dataset | None = None, *, activate: bool = False,
                    user=None, chunk_size: int | None = None, check: bool = True) -> Job:
    """Embed what `version` is missing (for one dataset, or all when None) as
    chunks that run in parallel on every worker; when all are done the HNSW
    index is built and, with activate=True, search switches to `version`.
    Raises JobError when the same work is already queued, JobsUnavailable
    (with `check`) when no worker serves the queue."""
    if check:
        jobs.check_workers_for(KIND)
    running = jobs.active_job(KIND, model_version=version, dataset=dataset)
    if running:
        raise jobs.JobError(f"job #{running.pk} is already embedding this; wait for it or cancel it")
    target = dataset.name if dataset else "every dataset"
    job = jobs.create(KIND, dataset=dataset, model_version=version, user=user,
                      params={"dataset_id": dataset.pk if dataset else None, "activate": activate,
                              "chunk_size": chunk_size or settings.CBIR_CHUNK_SIZE},
                      log=f"queued: embed {target} with {version.name}{' then activate it' if activate else ''}")
    n = queue_chunks(job)
    jobs.add_log(job.pk, f"{n} image(s) to embed" + (" (the network compiled with torch.compile in each worker, "
                                                     "from CBIR_COMPILE_MIN_IMAGES)" if job.params["compile"] else ""))
    job.refresh_from_db()
    return job


def start_activation(version: ModelVersion, *, user=None, check: bool = True) -> Job:
    """Activate a version: embed every dataset with it first; search keeps using
    the current version until then, and switches in one transaction."""
    if version.is_active:
        raise jobs.JobError(f"{version} is already the active version")
    return start_embed_job(version, None, activate=True, user=user, check=check)


def run_chunk(chunk_id: int) -> str:
    """Embed one chunk of an embedding job (the embed_chunk task)."""

    def body(chunk: JobChunk, progress, should_stop) -> tuple[int, int]:
        version = chunk.job.model_version
        if version is None:
            raise jobs.JobError("the job's model version was deleted")
        report = embed_images(version, chunk.image_ids, progress=lambda done, total, msg: progress(done, msg),
                              should_stop=should_stop, compiled=bool(chunk.job.params.get("compile")))
        # An image deleted meanwhile (its file gone with it) is not unreadable: it is no longer there.
        failed_ids = [image_id for image_id, _ in report.failed]
        live = set(Image.objects.filter(pk__in=failed_ids).values_list("pk", flat=True))
        unreadable = [(image_id, reason) for image_id, reason in report.failed if image_id in live]
        if len(unreadable) < len(report.failed):
            jobs.add_log(chunk.job_id, f"chunk {chunk.index}: {len(report.failed) - len(unreadable)} image(s) "
                                       "deleted meanwhile, skipped")
        for image_id, reason in unreadable[:20]:
            jobs.add_log(chunk.job_id, f"image {image_id} could not be embedded: {reason}")
        return report.embedded, len(unreadable)

    return runner.execute_chunk(chunk_id, body)


def finish_embed_job(job_id: int) -> str:
    """The embed job's finishing step (the finish_embed_job task), queued by the
    kernel once every chunk succeeded (search.runner.queue_finish) and run
    through search.runner.execute (claim, heartbeat, cancel, failure message)
    under its own time limit, CBIR_FINISH_TIME_LIMIT: search.indexing.finish_index
    builds the indexes (CONCURRENTLY, outside any transaction; its progress is the
    job's), calibrates, activates when asked (or when no version is active) and
    flags near-duplicates of the new images."""
    return runner.execute(job_id, _finish)


def _finish(run: runner.Run) -> str:
    job_id = run.job_id
    version = run.job.model_version
    if version is None:
        raise runner.JobFailed("the job's model version was deleted")
    if JobChunk.objects.filter(job_id=job_id).exclude(status=S.SUCCEEDED).exists():
        raise runner.JobFailed("the finishing step was sent before every chunk succeeded; Run again embeds "
                               "what is missing")
    done, failed = jobs.chunk_progress(job_id)
    images_total = run.job.progress_total
    run.progress(0, 0, "building the HNSW index", force=True)
    activate = bool(run.job.params.get("activate"))

    def near_duplicate_progress(looked_up: int, total: int) -> None:
        run.progress(looked_up, total, f"near-duplicates: {looked_up:,} of {total:,} image(s) looked up")

    image_ids = [i for ids in JobChunk.objects.filter(job_id=job_id).values_list("image_ids", flat=True) for i in ids]
    try:
        finished = finish_index(version, image_ids, activate=activate, progress=run.progress,
                                log=run.log, check_stop=lambda: run.check_stop("cancelled before the version was "
                                                                               "activated"),
                                near_duplicate_progress=near_duplicate_progress, activated_by=run.job.created_by)
    except IndexBuildError as exc:
        raise runner.JobFailed(str(exc)) from None
    result = {"embedded": done, "failed": failed, "index_created": finished.index_created,
              "activated": finished.activated}
    if finished.near_duplicates is not None:
        result["near_duplicates"] = finished.near_duplicates
    run.succeed(result=result, message=f"{done} embedded" + (f", {failed} unreadable" if failed else ""),
                progress_done=done, progress_total=images_total)
    run.log(f"done: {done} embedded, {failed} unreadable{', index built' if finished.index_created else ''}"
            f"{', now active for search' if finished.activated else ''}")
    return "done"
