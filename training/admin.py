from __future__ import annotations

import json

from django.contrib import admin, messages
from django.utils.html import format_html

from search import embed_jobs, hnsw
from search.admin import DatasetAdmin as SearchDatasetAdmin
from search.admin_deletes import DeleteThroughJobsMixin
from search.admin_jobs import intermediate, redirect_to_job, start_or_report
from search.delete_jobs import Outcome
from search.models import Dataset
from training.evaluation.jobs import start_evaluation_job
from training.forms import BuildIndexForm, TrainForm
from training.models import ModelVersion
from training.train_job import start_training_job

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

    @admin.display(description="index")
    def index_ready(self, obj):
        return hnsw.state_in_words(obj)

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
        from search.indexing import missing_image_ids

        if queryset.count() != 1:
            self.message_user(request, "Select exactly one model version to activate.", messages.ERROR)
            return
        version = queryset.get()
        if version.is_active:
            self.message_user(request, f"{version} is already active.", messages.INFO)
            return
        if hnsw.is_ready(version) and not missing_image_ids(None, version):
            version.activate()
            self.message_user(request, f"{version} is now used for search.", messages.SUCCESS)
            return
        start_or_report(request, lambda: embed_jobs.start_activation(version, user=request.user),
                        f"{version} has no complete index yet: embedding every dataset, then switching search to it")


class DatasetAdmin(SearchDatasetAdmin):
    """search's dataset admin with the actions that need model versions (this
    app's): search imports nothing from training's app layer, and training
    comes after search in INSTALLED_APPS, so this registration replaces search's."""

    actions = ["build_index", "train_model", "evaluate"]

    @admin.action(description="Build index… (embed the images with a model version)")
    def build_index(self, request, queryset):
        form = BuildIndexForm(request.POST if "apply" in request.POST else None)
        if "apply" in request.POST and form.is_valid():
            version = form.cleaned_data["model"]
            started = [start_or_report(request, lambda d=d: embed_jobs.start_embed_job(version, d, user=request.user),
                                       f"Indexing {d} with {version}") for d in queryset]
            started = [j for j in started if j]
            return redirect_to_job(started[0], "admin:search_dataset_changelist") if len(started) == 1 else None
        return intermediate(request, self, "Build the index", form, queryset, "build_index")

    @admin.action(description="Train a model…")
    def train_model(self, request, queryset):
        if queryset.count() != 1:
            self.message_user(request, "Select exactly one dataset to train on.", messages.ERROR)
            return None
        dataset = queryset.get()
        form = TrainForm(request.POST if "apply" in request.POST else None, dataset=dataset)
        if "apply" in request.POST and form.is_valid():
            job = start_or_report(request, lambda: start_training_job(dataset, user=request.user, **form.config_fields()),
                                  f"Training on {dataset}")
            return redirect_to_job(job, "admin:search_dataset_changelist") if job else None
        return intermediate(request, self, f"Train a model on {dataset}", form, queryset, "train_model")

    @admin.action(description="Evaluate retrieval quality (active model version)")
    def evaluate(self, request, queryset):
        version = ModelVersion.active()
        if version is None:
            self.message_user(request, "No active model version to evaluate.", messages.ERROR)
            return None
        for dataset in queryset:
            start_or_report(request, lambda d=dataset: start_evaluation_job(version, d, user=request.user),
                            f"Evaluating {version} on {dataset}")
        return None


admin.site.unregister(Dataset)
admin.site.register(Dataset, DatasetAdmin)
