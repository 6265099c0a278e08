"""The Celery app. Configuration comes from Django settings (CELERY_ names);
tasks live in search/tasks.py and training/tasks.py."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "cbirsite.settings")

app = Celery("cbirsite")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
