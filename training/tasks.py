"""Celery tasks for training and evaluation (the "train" queue). Thin: they
take a job id and call plain functions that a command or a test calls too."""

from __future__ import annotations

from celery import shared_task
from django.conf import settings

from search.models import Job


@shared_task(acks_late=True, time_limit=settings.CBIR_TRAIN_TIME_LIMIT + 300,
             soft_time_limit=settings.CBIR_TRAIN_TIME_LIMIT)
def run_training(job_id: int) -> str:
    from training.trainer import run_training_job

    return run_training_job(job_id)


@shared_task(acks_late=True, time_limit=settings.CBIR_TRAIN_TIME_LIMIT + 300,
             soft_time_limit=settings.CBIR_TRAIN_TIME_LIMIT)
def run_evaluation(job_id: int) -> str:
    from training.evaluation.jobs import run_evaluation_job

    return run_evaluation_job(job_id)


# search.jobs.task_for() finds the task of a job kind here (for re-runs and recovery).
TASKS_BY_KIND = {Job.Kind.TRAIN: run_training, Job.Kind.EVALUATE: run_evaluation}
