"""The Celery app. Configuration comes from Django settings (CELERY_ names);
tasks live in search/tasks.py and training/tasks.py."""

import os

from celery import Celery, Task

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "cbirsite.settings")


class KernelTask(Task):
    """Every task's base: its requests are search.worker.KernelRequest (named,
    so it is imported in the worker only, once Django is set up), which puts a
    job back in the queue at once when the pool process running it dies."""

    Request = "search.worker:KernelRequest"


app = Celery("cbirsite", task_cls=KernelTask)
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
