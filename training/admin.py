from __future__ import annotations

import json

from django.contrib import admin, messages
from django.utils.html import format_html

from search import embed_jobs
from search.admin_deletes import DeleteThroughJobsMixin
from search.delete_jobs import Outcome
from training.models import ModelVersion

# Fields that determine the stored vectors: editing them would make the embeddings lie.
FROZEN_FIELDS = ["architecture", "config", "weights_source", "weights_path", "weights_sha256", "dimension",
                 "preprocessing"]


@admin.register(ModelVersion)
class ModelVersionAdmin(DeleteThroughJobsMixin, admin.ModelAdmin):
    list_display = ("name", "active_mark", "architecture", "dimension", "weights_source", "short_sha", "n_embeddings",
                    "index_ready", "job_links", "created")
    list_filter = ["architecture", "weights_source", "is_active"]
    search_fields = ["name", "architecture"]
    readonly_fields = FROZEN_FIELDS + ["is_active", "metrics_pretty", "job_links", "created"]
    fields = ("name", "notes", *readonly_fields)
    actions = ["activate"]

    def has_add_permission(self, request):
        # Versions come from pretrained weights (build_index) or from training jobs.
        return False

    def has_delete_permission(self, request, obj=None):
        if obj is not None and obj.is_active:
            return False
        return super().has_delete_permission(request, obj)

    def perform_delete(self, request, objs):
        """Refused (nothing deleted) for the active version or one a job works
        on; see search/admin_deletes.py."""
        from search.deletion import delete_versions

        delete_versions(objs)
        return Outcome()

    @admin.display(description="active", boolean=True, ordering="is_active")
    def active_mark(self, obj):
        return obj.is_active

    @admin.display(description="weights sha256")
    def short_sha(self, obj):
        return obj.weights_sha256[:12]

    @admin.display(description="embeddings")
    def n_embeddings(self, obj):
        return obj.embeddings.count()

    @admin.display(description="index", boolean=True)
    def index_ready(self, obj):
        return obj.index_exists()

    @admin.display(description="metrics")
    def metrics_pretty(self, obj):
        return format_html("<pre>{}</pre>", json.dumps(obj.metrics, indent=2, sort_keys=True))

    @admin.display(description="jobs")
    def job_links(self, obj):
        from search.admin_jobs import jobs_link

        return jobs_link("model_version", obj.pk) if obj.pk else "—"

    @admin.action(description="Activate for search")
    def activate(self, request, queryset):
        """A version that has embedded every image switches at once; otherwise an
        activation job embeds what is missing and switches when complete."""
        from search.admin_jobs import start_or_report
        from search.indexing import missing_image_ids

        if queryset.count() != 1:
            self.message_user(request, "Select exactly one model version to activate.", messages.ERROR)
            return
        version = queryset.get()
        if version.is_active:
            self.message_user(request, f"{version} is already active.", messages.INFO)
            return
        if version.index_exists() and not missing_image_ids(None, version):
            version.activate()
            self.message_user(request, f"{version} is now used for search.", messages.SUCCESS)
            return
        start_or_report(request, lambda: embed_jobs.start_activation(version, user=request.user),
                        f"{version} has no complete index yet: embedding every dataset, then switching search to it")
