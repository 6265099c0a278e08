"""Celery tasks of the "import", "embed" and "delete" job kinds: one-line wrappers that
take an id and call the plain function a command or a test calls too."""

from __future__ import annotations

from celery import shared_task
from django.conf import settings

from search import delete_jobs, embed_jobs, import_jobs


@shared_task(acks_late=True, time_limit=settings.CBIR_CHUNK_TIME_LIMIT + 60,
             soft_time_limit=settings.CBIR_CHUNK_TIME_LIMIT)
def embed_chunk(chunk_id: int) -> str:
    return embed_jobs.run_chunk(chunk_id)


@shared_task(acks_late=True, time_limit=settings.CBIR_FINISH_TIME_LIMIT + 60,
             soft_time_limit=settings.CBIR_FINISH_TIME_LIMIT)
def finish_embed_job(job_id: int) -> str:
    return embed_jobs.finish_embed_job(job_id)


@shared_task(acks_late=True, time_limit=settings.CBIR_IMPORT_TIME_LIMIT + 60,
             soft_time_limit=settings.CBIR_IMPORT_TIME_LIMIT)
def run_import(job_id: int) -> str:
    return import_jobs.run_import_job(job_id)


@shared_task(acks_late=True, time_limit=settings.CBIR_DELETE_TIME_LIMIT + 60,
             soft_time_limit=settings.CBIR_DELETE_TIME_LIMIT)
def run_delete(job_id: int) -> str:
    return delete_jobs.run_delete_job(job_id)
