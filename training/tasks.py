"""Celery tasks of the "train" and "evaluate" job kinds (the "train" queue):
one-line wrappers that take a job id and call the plain function a command or
a test calls too."""

from __future__ import annotations

from celery import shared_task
from django.conf import settings

from training import train_job
from training.evaluation import jobs as evaluation_jobs


@shared_task(acks_late=True, time_limit=settings.CBIR_TRAIN_TIME_LIMIT + 300,
             soft_time_limit=settings.CBIR_TRAIN_TIME_LIMIT)
def run_training(job_id: int) -> str:
    return train_job.run_training_job(job_id)


@shared_task(acks_late=True, time_limit=settings.CBIR_TRAIN_TIME_LIMIT + 300,
             soft_time_limit=settings.CBIR_TRAIN_TIME_LIMIT)
def run_evaluation(job_id: int) -> str:
    return evaluation_jobs.run_evaluation_job(job_id)
