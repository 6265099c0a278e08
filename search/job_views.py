"""Staff pages for jobs: the list, one job with live progress, cancel, re-run.

Staff only, and by Django permissions like the admin: reading jobs (their pages,
logs, progress) needs search.view_job, cancelling or re-running one
search.change_job (a superuser has both). A staff user without them gets 403."""

from __future__ import annotations

from functools import wraps

from django.contrib import messages
from django.contrib.admin.views.decorators import staff_member_required
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_POST

from search import jobs
from search.models import Job

VIEW_JOB = "search.view_job"
CHANGE_JOB = "search.change_job"


def _staff_with(permission: str):
    """Staff only (others go to the admin's login page), then `permission` or 403."""

    def decorator(view):
        @wraps(view)
        def checked(request: HttpRequest, *args, **kwargs):
            if not request.user.has_perm(permission):
                raise PermissionDenied(f"this needs the {permission} permission")
            return view(request, *args, **kwargs)

        return staff_member_required(checked)

    return decorator


@_staff_with(VIEW_JOB)
@require_GET
def job_list(request: HttpRequest) -> HttpResponse:
    status = request.GET.get("status", "")
    queryset = Job.objects.select_related("dataset", "model_version", "created_by")
    if status in Job.Status.values:
        queryset = queryset.filter(status=status)
    return render(request, "search/jobs.html", {"jobs": queryset[:100], "status": status,
                                                "statuses": Job.Status.choices})


@_staff_with(VIEW_JOB)
@require_GET
def job_detail(request: HttpRequest, job_id: int) -> HttpResponse:
    job = get_object_or_404(Job.objects.select_related("dataset", "model_version", "created_by"), pk=job_id)
    return render(request, "search/job.html", {"job": job, "status": jobs.job_status(job),
                                               "can_change": request.user.has_perm(CHANGE_JOB)})


def _staff_json(view):
    """Staff with search.view_job only, answered in JSON (no redirect to a login page)."""

    @wraps(view)
    def wrapped(request: HttpRequest, *args, **kwargs):
        if not (request.user.is_authenticated and request.user.is_staff):
            return JsonResponse({"error": "staff login required"}, status=403)
        if not request.user.has_perm(VIEW_JOB):
            return JsonResponse({"error": f"this needs the {VIEW_JOB} permission"}, status=403)
        return view(request, *args, **kwargs)

    return wrapped


@_staff_json
@require_GET
def job_status(request: HttpRequest, job_id: int) -> JsonResponse:
    job = Job.objects.filter(pk=job_id).first()
    if job is None:
        return JsonResponse({"error": f"no job {job_id}"}, status=404)
    return JsonResponse(jobs.job_status(job))


@_staff_with(CHANGE_JOB)
@require_POST
def job_cancel(request: HttpRequest, job_id: int) -> HttpResponse:
    job = get_object_or_404(Job, pk=job_id)
    if jobs.cancel(job):
        messages.success(request, f"Job #{job.pk} cancelled.")
    else:
        messages.error(request, f"Job #{job.pk} is {job.status} and cannot be cancelled.")
    return redirect("job-detail", job_id=job.pk)


@_staff_with(CHANGE_JOB)
@require_POST
def job_rerun(request: HttpRequest, job_id: int) -> HttpResponse:
    job = get_object_or_404(Job, pk=job_id)
    try:
        jobs.rerun(job)
        messages.success(request, f"Job #{job.pk} queued again.")
    except jobs.JobError as exc:
        messages.error(request, str(exc))
    return redirect("job-detail", job_id=job.pk)
