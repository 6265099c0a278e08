"""Deleting from the admin: datasets, images and model versions go through
search.deletion / search.delete_jobs instead of Django's per-object delete.

- The delete page and the bulk "Delete selected" action share one path
  (`DeleteThroughJobsMixin.perform_delete`): a small delete happens within the
  request, a large one (over CBIR_DELETE_IN_REQUEST_MAX images) starts a
  "delete" job and the page goes to it.
- While a job works on the dataset (or the image's dataset, or the model
  version), the delete is refused with a message naming the job ("cancel job
  #N first") and nothing is deleted: never a 500.
- The confirmation page of a large delete shows counts, not every row
  (Django's default lists each related object, which for 200,000 images is
  a page of millions of lines)."""

from __future__ import annotations

from typing import Any, ClassVar

from django.conf import settings
from django.contrib import messages
from django.contrib.admin.actions import delete_selected
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Q
from django.shortcuts import redirect
from django.utils.html import format_html

from search import jobs
from search.admin_jobs import job_link
from search.delete_jobs import Outcome
from search.models import Dataset, Embedding, Image, Job, NearDuplicate

SUMMARY_OVER = 100  # objects: above this, the confirmation page shows counts only


def image_counts(images) -> dict[str, int]:
    """What deleting these images (a queryset) removes, counted in three queries."""
    ids = images.values("pk")
    return {
        "images": images.count(),
        "embeddings": Embedding.objects.filter(image__in=ids).count(),
        "near-duplicate pairs": NearDuplicate.objects.filter(Q(image__in=ids) | Q(duplicate_of__in=ids)).count(),
    }


class DeleteThroughJobsMixin:
    """For a ModelAdmin: implement `perform_delete(request, objs) -> Outcome`
    (raising jobs.JobError to refuse) and, optionally, `delete_summary(objs)`."""

    _state_attr = "_cbir_delete_outcome"
    delete_confirmation_template: ClassVar[Any] = "admin/cbir_delete_confirmation.html"
    delete_selected_confirmation_template: ClassVar[Any] = "admin/cbir_delete_selected_confirmation.html"

    def perform_delete(self, request, objs: list) -> Outcome:
        raise NotImplementedError

    def delete_summary(self, objs: list) -> dict[str, int] | None:
        """Counts for the confirmation page, or None for Django's full list."""
        return None

    def busy_jobs(self, obj) -> list[Job]:
        """The active jobs that would make deleting `obj` refused (no lock: for display)."""
        if isinstance(obj, Dataset):
            where = Q(dataset=obj)
        elif isinstance(obj, Image):
            where = Q(dataset_id=obj.dataset_id)
        else:
            where = Q(model_version=obj)
        return list(Job.objects.filter(where, status__in=jobs.ACTIVE).order_by("created"))

    # --- Django's hooks -------------------------------------------------------

    def render_delete_form(self, request, context):
        obj = context.get("object")
        context.update(busy_jobs=self.busy_jobs(obj) if obj is not None else [],
                       delete_in_request_max=settings.CBIR_DELETE_IN_REQUEST_MAX)
        return super().render_delete_form(request, context)

    def delete_model(self, request, obj) -> None:
        self._delete(request, [obj])

    def delete_queryset(self, request, queryset) -> None:
        self._delete(request, list(queryset))

    def _delete(self, request, objs: list) -> None:
        try:
            outcome: Any = self.perform_delete(request, objs)
        except jobs.JobError as exc:
            outcome = exc
        setattr(request, self._state_attr, outcome)

    def _report(self, request, default_message: str) -> Any:
        """Message the outcome; a redirect to the job page for a job, else None."""
        outcome = getattr(request, self._state_attr, None)
        if isinstance(outcome, jobs.JobError):
            messages.error(request, f"Nothing was deleted: {outcome}")
            return None
        if isinstance(outcome, Outcome) and outcome.job is not None:
            messages.success(request, format_html("Deleting in the background — {}", job_link(outcome.job)))
            return redirect("job-detail", job_id=outcome.job.pk)
        messages.success(request, default_message)
        return None

    def response_delete(self, request, obj_display, obj_id):
        outcome = getattr(request, self._state_attr, None)
        if isinstance(outcome, jobs.JobError):
            messages.error(request, f"Nothing was deleted: {outcome}")
            opts = self.model._meta
            return redirect(f"admin:{opts.app_label}_{opts.model_name}_change", obj_id)
        response = self._report(request, f"Deleted {obj_display}.") if outcome is not None else None
        if response is not None:
            return response
        return super().response_delete(request, obj_display, obj_id)

    def get_deleted_objects(self, objs, request):
        objs = list(objs)
        summary = self.delete_summary(objs)
        if summary is None:
            return super().get_deleted_objects(objs, request)
        perms_needed = set()
        for obj in objs:
            if not self.has_delete_permission(request, obj):
                perms_needed.add(self.model._meta.verbose_name)
        if summary.get("images") and not request.user.has_perm("search.delete_image"):
            perms_needed.add(Image._meta.verbose_name)
        shown = [str(obj) for obj in objs[:SUMMARY_OVER]]
        if len(objs) > SUMMARY_OVER:
            shown.append(f"… and {len(objs) - SUMMARY_OVER:,} more")
        shown += [f"{n:,} {name}" for name, n in summary.items() if n]
        return shown, summary, perms_needed, []

    def get_actions(self, request):
        actions = super().get_actions(request)
        if "delete_selected" in actions:
            _, name, description = actions["delete_selected"]
            actions["delete_selected"] = (type(self)._delete_selected_action, name, description)
        return actions

    @staticmethod
    def _delete_selected_action(modeladmin, request, queryset):
        """Django's delete_selected, but the confirmed delete goes through
        perform_delete and reports what really happened."""
        if not request.POST.get("post"):
            response = delete_selected(modeladmin, request, queryset)  # the confirmation page
            if response is not None and hasattr(response, "context_data"):
                response.context_data["delete_in_request_max"] = settings.CBIR_DELETE_IN_REQUEST_MAX
            return response
        _, _, perms_needed, protected = modeladmin.get_deleted_objects(queryset, request)
        if perms_needed or protected:
            raise PermissionDenied
        objs = list(queryset)
        if not objs:
            return None
        modeladmin._delete(request, objs)
        outcome = getattr(request, modeladmin._state_attr, None)
        if isinstance(outcome, Outcome) and outcome.job is None:
            modeladmin.log_deletions(request, objs)
        return modeladmin._report(request, f"Deleted {len(objs):,} {modeladmin.opts.verbose_name_plural}.")


def dataset_summary(datasets: list[Dataset]) -> dict[str, int] | None:
    """Counts for deleting datasets, when they hold more than SUMMARY_OVER images."""
    images = Image.objects.filter(dataset__in=[d.pk for d in datasets])
    if images.count() <= SUMMARY_OVER:
        return None
    by = Dataset.objects.filter(pk__in=[d.pk for d in datasets]).aggregate(n=Count("pk"))
    return {"datasets": by["n"], **image_counts(images)}
