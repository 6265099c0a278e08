"""The "embed" job kind: embed what a model version is missing, in chunks that
run in parallel on every worker, then build its HNSW index and, when asked,
switch search to it. Registered in SearchConfig.ready()."""

from __future__ import annotations

import time

from django.conf import settings
from django.db import transaction

from search import jobs, runner
from search.duplicates import flag_new_near_duplicates, flags_with
from search.hnsw import IndexBuildError
from search.indexing import build_hnsw_indexes, embed_images, missing_image_ids
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
    chunks = JobChunk.objects.bulk_create(
        [JobChunk(job=job, index=i, image_ids=part) for i, part in enumerate(_chunks(ids, size))])
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

    return runner.execute_chunk(chunk_id, body, finish_embed_job)


def _all_chunks_done(job_id: int) -> Job | None:
    """The job when it is still active and every chunk succeeded, else None."""
    job = Job.objects.filter(pk=job_id).first()
    if job is None or job.status not in jobs.ACTIVE or job.chunks.exclude(status=S.SUCCEEDED).exists():
        return None
    return job


def finish_embed_job(job_id: int) -> bool:
    """Called after each chunk (and for a job with nothing to embed): when all
    chunks succeeded, build the index (CONCURRENTLY, outside any transaction,
    so embedding writes go on; its progress is the job's progress), then in one
    short transaction activate if asked and mark the job succeeded; then flag
    near-duplicates of the new images."""
    jobs.transition(job_id, S.RUNNING, expect=[S.QUEUED])
    job = _all_chunks_done(job_id)
    if job is None:
        return False
    version = job.model_version
    if version is None:
        jobs.transition(job_id, S.FAILED, expect=jobs.ACTIVE, error="the job's model version was deleted")
        return False
    done, failed = jobs.chunk_progress(job_id)
    images_total = job.progress_total
    jobs.set_progress(job_id, 0, 0, "building the HNSW index")
    try:
        builds = build_hnsw_indexes(version, progress=lambda d, t, msg: jobs.set_progress(job_id, d, t, msg),
                                    log=lambda message: jobs.add_log(job_id, message))
    except IndexBuildError as exc:
        if jobs.transition(job_id, S.FAILED, expect=jobs.ACTIVE, error=str(exc)):
            jobs.add_log(job_id, str(exc))
        return False
    for report in builds:
        if report.created or report.error:
            jobs.add_log(job_id, f"index {report.describe()}")
    build = builds[0]
    with transaction.atomic():
        job = Job.objects.select_for_update().filter(pk=job_id).first()
        if job is None or job.status not in jobs.ACTIVE or job.chunks.exclude(status=S.SUCCEEDED).exists():
            return False  # another finisher got here first, or the job was cancelled meanwhile
        message = f"{done} embedded" + (f", {failed} unreadable" if failed else "")
        activated = False
        if job.params.get("activate") or ModelVersion.active() is None:
            version.activate()
            activated = True
        jobs.transition(job_id, S.SUCCEEDED, expect=jobs.ACTIVE, progress_done=done, progress_total=images_total,
                        result={"embedded": done, "failed": failed, "index_created": build.created,
                                "activated": activated}, message=message)
    jobs.add_log(job_id, f"done: {done} embedded, {failed} unreadable"
                         f"{', index built' if build.created else ''}{', now active for search' if activated else ''}")
    image_ids = [i for ids in JobChunk.objects.filter(job_id=job_id).values_list("image_ids", flat=True) for i in ids]
    flag_after(job_id, version, image_ids)
    return True


def flag_after(job_id: int, version: ModelVersion, image_ids: list[int]) -> int:
    """The near-duplicate pass after an embedding job (search.duplicates; only
    the flagging version flags): its progress goes to the job's message at
    most every PROGRESS_WRITE_SECONDS, its outcome to the log and the result."""
    if not flags_with(version):
        jobs.add_log(job_id, f"near-duplicates not flagged: {version.name} is not the version they are flagged "
                             "with (CBIR_NEAR_DUPLICATE_VERSION, default the active one)")
        return 0
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or now - last[0] >= runner.PROGRESS_WRITE_SECONDS:
            last[0] = now
            Job.objects.filter(pk=job_id).update(message=f"near-duplicates: {done:,} of {total:,} image(s) looked up")

    jobs.add_log(job_id, f"near-duplicates: looking up {len(image_ids):,} image(s) with {version.name}")
    flagged = flag_new_near_duplicates(version, image_ids, progress=progress)
    jobs.add_log(job_id, f"{flagged} near-duplicate pair(s) flagged (see admin: Near duplicates)")
    result = Job.objects.filter(pk=job_id).values_list("result", flat=True).first() or {}
    Job.objects.filter(pk=job_id).update(result={**result, "near_duplicates": flagged})
    return flagged
