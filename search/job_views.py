"""Staff pages for jobs: the list, one job with live progress, cancel, re-run."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_POST

from search import jobs
from search.models import Job


@staff_member_required
@require_GET
def job_list(request: HttpRequest) -> HttpResponse:
    status = request.GET.get("status", "")
    queryset = Job.objects.select_related("dataset", "model_version", "created_by")
    if status in Job.Status.values:
        queryset = queryset.filter(status=status)
    return render(request, "search/jobs.html", {"jobs": queryset[:100], "status": status,
                                                "statuses": Job.Status.choices})


@staff_member_required
@require_GET
def job_detail(request: HttpRequest, job_id: int) -> HttpResponse:
    job = get_object_or_404(Job.objects.select_related("dataset", "model_version", "created_by"), pk=job_id)
    return render(request, "search/job.html", {"job": job, "status": jobs.job_status(job)})


def _staff_json(view):
    """Staff only, answered in JSON (no redirect to a login page)."""

    def wrapped(request: HttpRequest, *args, **kwargs):
        if not (request.user.is_authenticated and request.user.is_staff):
            return JsonResponse({"error": "staff login required"}, status=403)
        return view(request, *args, **kwargs)

    return wrapped


@_staff_json
@require_GET
def job_status(request: HttpRequest, job_id: int) -> JsonResponse:
    job = Job.objects.filter(pk=job_id).first()
    if job is None:
        return JsonResponse({"error": f"no job {job_id}"}, status=404)
    return JsonResponse(jobs.job_status(job))


@staff_member_required
@require_POST
def job_cancel(request: HttpRequest, job_id: int) -> HttpResponse:
    job = get_object_or_404(Job, pk=job_id)
    if jobs.cancel(job):
        messages.success(request, f"Job #{job.pk} cancelled.")
    else:
        messages.error(request, f"Job #{job.pk} is {job.status} and cannot be cancelled.")
    return redirect("job-detail", job_id=job.pk)


@staff_member_required
@require_POST
def job_rerun(request: HttpRequest, job_id: int) -> HttpResponse:
    job = get_object_or_404(Job, pk=job_id)
    try:
        jobs.rerun(job)
        messages.success(request, f"Job #{job.pk} queued again.")
    except jobs.JobError as exc:
        messages.error(request, str(exc))
    return redirect("job-detail", job_id=job.pk)
