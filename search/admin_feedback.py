"""Admin for relevance marks (search.models.Feedback): staff see them, filter
by verdict, model version and dataset, and export a selection as CSV. Marks
are made on the results pages and through the API, never edited here."""

from __future__ import annotations

import csv

from django.contrib import admin
from django.http import HttpResponse

from search.models import Feedback

CSV_COLUMNS = ["id", "created", "model_version", "query_image_id", "query_sha256", "result_image_id",
               "result_dataset", "result_label", "verdict", "user", "session_key"]


@admin.register(Feedback)
class FeedbackAdmin(admin.ModelAdmin):
    list_display = ["created", "verdict", "result", "query", "model_version", "who"]
    list_filter = ["verdict", "model_version", "result__dataset"]
    search_fields = ["query_sha256", "result__label", "user__username", "session_key"]
    list_select_related = ["result", "query_image", "model_version", "user"]
    readonly_fields = ["model_version", "query_image", "query_sha256", "result", "verdict", "user", "session_key",
                       "created"]
    exclude = ["query_vector"]
    actions = ["export_csv"]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="query")
    def query(self, mark: Feedback) -> str:
        return f"image #{mark.query_image_id}" if mark.query_image_id else f"upload {mark.query_sha256[:12]}…"

    @admin.display(description="who")
    def who(self, mark: Feedback) -> str:
        return mark.user.get_username() if mark.user else f"session {mark.session_key[:8]}…"

    @admin.action(description="Export selected marks as CSV", permissions=["view"])
    def export_csv(self, request, queryset) -> HttpResponse:
        response = HttpResponse(content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = 'attachment; filename="relevance-marks.csv"'
        writer = csv.writer(response)
        writer.writerow(CSV_COLUMNS)
        rows = queryset.select_related("model_version", "result__dataset", "user").order_by("pk")
        for mark in rows.iterator():
            writer.writerow([mark.pk, mark.created.isoformat(), mark.model_version.name, mark.query_image_id or "",
                             mark.query_sha256, mark.result_id, mark.result.dataset.name, mark.result.label or "",
                             mark.verdict, mark.user.get_username() if mark.user else "", mark.session_key])
        return response
