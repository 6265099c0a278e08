"""Admin for jobs, and the admin screens that start them (build an index,
import a zip, activate a model version, train, evaluate)."""

from __future__ import annotations

import uuid

from django.contrib import admin, messages
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.html import format_html

from search import import_jobs, jobs
from search.models import Job
from training.core.networks.base import WeightsUnavailable


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = ["id", "kind", "status", "target", "progress", "duration_display", "created_by", "created"]
    list_filter = ["kind", "status", "dataset", "model_version"]
    search_fields = ["id", "message", "error"]
    readonly_fields = [f.name for f in Job._meta.fields] + ["page"]
    list_select_related = ["dataset", "model_version", "created_by"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    @admin.display(description="target")
    def target(self, obj):
        parts = [str(x) for x in (obj.dataset, obj.model_version) if x]
        return " · ".join(parts) or "—"

    @admin.display(description="progress")
    def progress(self, obj):
        return format_html('<progress max="100" value="{}"></progress> {}/{}', int(obj.percent),
                           obj.progress_done, obj.progress_total)

    @admin.display(description="duration")
    def duration_display(self, obj):
        duration = obj.duration
        return str(duration).split(".")[0] if duration else "—"

    @admin.display(description="live page")
    def page(self, obj):
        url = reverse("job-detail", args=[obj.pk])
        return format_html('<a href="{}">{}</a>', url, url)


def job_link(job: Job) -> str:
    return format_html('<a href="{}">job #{}</a>', reverse("job-detail", args=[job.pk]), job.pk)


def jobs_link(field: str, pk: int, label: str = "jobs") -> str:
    url = reverse("admin:search_job_changelist") + f"?{field}__id__exact={pk}"
    return format_html('<a href="{}">{}</a>', url, label)


def start_or_report(request, start, success: str):
    """Run a job starter; report the outcome as an admin message."""
    try:
        job = start()
    except jobs.JobError as exc:
        messages.error(request, str(exc))
        return None
    except (ValueError, WeightsUnavailable) as exc:
        messages.error(request, f"Not started: {exc}")
        return None
    messages.success(request, format_html("{} — {}", success, job_link(job)))
    return job


def save_upload(upload) -> str:
    """Save an uploaded zip where workers can read it; returns its path."""
    path = import_jobs.uploads_dir() / f"{uuid.uuid4().hex}.zip"
    with path.open("wb") as handle:
        for chunk in upload.chunks():
            handle.write(chunk)
    return str(path)


def intermediate(request, modeladmin, title: str, form, queryset, action: str, template="admin/cbir_form.html",
                 extra: dict | None = None):
    return render(request, template, {
        **modeladmin.admin_site.each_context(request), "title": title, "form": form, "objects": queryset,
        "action": action, "opts": modeladmin.model._meta, **(extra or {}),
    })


def redirect_to_job(job: Job | None, fallback: str):
    return redirect("job-detail", job_id=job.pk) if job else redirect(fallback)


