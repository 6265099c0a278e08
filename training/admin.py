from __future__ import annotations

import json

from django.contrib import admin, messages
from django.shortcuts import redirect, render
from django.urls import path
from django.utils.html import format_html
from django.views.decorators.http import require_POST

from search import embed_jobs, hnsw
from search.admin import DatasetAdmin as SearchDatasetAdmin
from search.admin_deletes import DeleteThroughJobsMixin
from search.admin_jobs import intermediate, redirect_to_job, start_or_report
from search.delete_jobs import Outcome
from search.models import Dataset
from training import activation
from training.evaluation.jobs import start_evaluation_job
from training.forms import BuildIndexForm, TrainForm
from training.models import Activation, ModelVersion
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
    change_list_template = "admin/training/modelversion/change_list.html"

    def get_urls(self):
        return [path("rollback/", self.admin_site.admin_view(require_POST(self.rollback_view)),
                     name="training_modelversion_rollback"), *super().get_urls()]

    def changelist_view(self, request, extra_context=None):
        extra = {"rollback_to": activation.previous_version() if self.has_change_permission(request) else None,
                 "active_version": ModelVersion.active(),
                 **(extra_context or {})}
        return super().changelist_view(request, extra_context=extra)

    def rollback_view(self, request):
        """*Roll back*: search goes back to the version active before the last
        switch: at once when it could be activated at once
        (activation.can_switch_at_once, as *Activate*), else through an
        activation job, as *Activate* does."""
        if not self.has_change_permission(request):
            self.message_user(request, "You may not change model versions.", messages.ERROR)
            return redirect("admin:training_modelversion_changelist")
        target = activation.previous_version()
        if target is None:
            self.message_user(request, "There is no earlier version to roll back to.", messages.ERROR)
        elif activation.can_switch_at_once(target):
            target.activate(user=request.user, reason="rollback")
            self.message_user(request, f"Rolled back: {target} is used for search again.", messages.SUCCESS)
        else:
            # The same fallback as *Activate*: embed what it lacks, then switch.
            start_or_report(request, lambda: embed_jobs.start_activation(target, user=request.user),
                            f"{target} has no complete index any more (images were added or its index was "
                            "dropped): embedding what is missing, then switching search back to it")
        return redirect("admin:training_modelversion_changelist")

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

    @admin.action(description="Activate for search", permissions=["change"])
    def activate(self, request, queryset):
        """A version that has embedded every image switches at once; otherwise an
        activation job embeds what is missing and switches when complete."""
        if queryset.count() != 1:
            self.message_user(request, "Select exactly one model version to activate.", messages.ERROR)
            return
        version = queryset.get()
        if version.is_active:
            self.message_user(request, f"{version} is already active.", messages.INFO)
            return
        active = ModelVersion.active()
        lines = activation.compare(version, active)
        worse = [line for line in lines if line.worse]
        if worse and "confirm" not in request.POST:
            # The gate: what gets worse, measured on the sets the active version was measured on.
            return render(request, "admin/training/activate_confirmation.html", {
                **self.admin_site.each_context(request), "title": f"Activate {version}?", "version": version,
                "active": active, "lines": lines, "worse": worse, "opts": self.model._meta})
        if activation.can_switch_at_once(version):
            version.activate(user=request.user, reason="admin" + (" (confirmed: worse on some sets)" if worse else ""))
            compared = "; ".join(f"{line.measure} on {line.dataset} {line.active:.3f} → {line.candidate:.3f}"
                                 for line in lines if line.candidate is not None)
            self.message_user(request, f"{version} is now used for search." + (f" Compared with {active}: {compared}."
                                                                             if compared else ""), messages.SUCCESS)
            return
        start_or_report(request, lambda: embed_jobs.start_activation(version, user=request.user),
                        f"{version} has no complete index yet: embedding every dataset, then switching search to it")


@admin.register(Activation)
class ActivationAdmin(admin.ModelAdmin):
    """The log of every switch of the search version (read-only)."""

    list_display = ["created", "version_name", "previous_name", "user", "reason"]
    list_filter = ["reason"]
    readonly_fields = ["created", "version", "version_name", "previous", "previous_name", "user", "reason"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


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
