from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.db import transaction
from django.db.models import Count, Q
from django.shortcuts import redirect, render
from django.urls import path
from django.utils.html import format_html, format_html_join

from search import hnsw, import_jobs, jobs
from search.admin_deletes import DeleteThroughJobsMixin, dataset_summary, image_counts
from search.admin_jobs import intermediate, jobs_link, redirect_to_job, save_upload, start_or_report
from search.delete_jobs import Outcome, delete_or_start
from search.forms import ImageUploadForm, SetLabelForm, SetSplitForm, ZipImportForm
from search.indexing import coverage
from search.ingest import add_image
from search.models import Dataset, DatasetNameError, Embedding, Image, Split, normalise_dataset_name


class DatasetForm(forms.ModelForm):
    """The admin's dataset form: the name normalised as every creation path does (normalise_dataset_name)."""

    class Meta:
        model = Dataset
        fields = ["name", "description"]

    def clean_name(self) -> str:
        raw = self.cleaned_data.get("name") or ""
        if self.instance.pk and raw == self.instance.name:
            # A name stored before the normaliser, left as it is: the rest of the form can still be saved.
            return raw
        try:
            return normalise_dataset_name(raw)
        except DatasetNameError as exc:
            raise forms.ValidationError(str(exc)) from None

@admin.register(Dataset)
class DatasetAdmin(DeleteThroughJobsMixin, admin.ModelAdmin):
    form = DatasetForm
    list_display = ["name", "n_images", "n_train", "n_val", "n_test", "n_labels", "coverage_summary", "job_links",
                    "created"]
    search_fields = ["name", "description"]
    readonly_fields = ["created", "split_table", "label_table", "coverage_table", "job_links"]
    fields = ["name", "description", "created", "split_table", "label_table", "coverage_table", "job_links"]
    # Build index…, Train a model…, Evaluate: added by training/admin.py (they need model versions).
    actions: list[str] = []
    change_form_template = "admin/search/dataset/change_form.html"

    # --- Deleting (search/admin_deletes.py) ------------------------------------------

    def perform_delete(self, request, objs):
        """All or nothing: refused (JobError) when a job works on one of them."""
        outcome = Outcome()
        with transaction.atomic():
            for dataset in objs:
                step = delete_or_start(dataset=dataset, user=request.user)
                outcome.deleted += step.deleted
                outcome.job = step.job or outcome.job
        return outcome

    def delete_summary(self, objs):
        return dataset_summary(objs)

    # --- Jobs started from here -------------------------------------------------

    def get_urls(self):
        return [path("<int:dataset_id>/import-zip/", self.admin_site.admin_view(self.import_zip_view),
                     name="search_dataset_import_zip")] + super().get_urls()

    @admin.display(description="jobs")
    def job_links(self, obj):
        return jobs_link("dataset", obj.pk) if obj.pk else "—"

    def import_zip_view(self, request, dataset_id: int):
        dataset = Dataset.objects.filter(pk=dataset_id).first()
        if dataset is None or not self.has_change_permission(request, dataset):
            messages.error(request, "No such dataset.")
            return redirect("admin:search_dataset_changelist")
        form = ZipImportForm(request.POST or None, request.FILES or None)
        if request.method == "POST" and form.is_valid():
            try:
                jobs.check_workers("embed")
            except jobs.JobError as exc:
                messages.error(request, str(exc))
            else:
                path = save_upload(form.cleaned_data["archive"])
                job = start_or_report(request, lambda: import_jobs.start_import_job(
                    dataset, path, labels_from_folders=form.cleaned_data["labels_from_folders"], user=request.user,
                    original_name=form.cleaned_data["archive"].name, check=False), "Import started")
                if job:
                    return redirect_to_job(job, "admin:search_dataset_changelist")
                from pathlib import Path

                Path(path).unlink(missing_ok=True)
        return intermediate(request, self, f"Import a zip into {dataset}", form, [dataset], "", extra={
            "multipart": True, "submit_label": "Upload and import"})

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(
            _n=Count("images", distinct=True),
            _train=Count("images", filter=Q(images__split=Split.TRAIN), distinct=True),
            _val=Count("images", filter=Q(images__split=Split.VAL), distinct=True),
            _test=Count("images", filter=Q(images__split=Split.TEST), distinct=True),
            _labels=Count("images__label", distinct=True),
        )

    @admin.display(description="images", ordering="_n")
    def n_images(self, obj):
        return obj._n

    @admin.display(description="train", ordering="_train")
    def n_train(self, obj):
        return obj._train

    @admin.display(description="val", ordering="_val")
    def n_val(self, obj):
        return obj._val

    @admin.display(description="test", ordering="_test")
    def n_test(self, obj):
        return obj._test

    @admin.display(description="labels", ordering="_labels")
    def n_labels(self, obj):
        return obj._labels

    @admin.display(description="embedded (per model version)")
    def coverage_summary(self, obj):
        parts = [(f"{v.name}{' ★' if v.is_active else ''}", n, obj._n) for v, n in coverage(obj) if n]
        if not parts:
            return "—"
        return format_html_join(", ", "{}: {}/{}", parts)

    @admin.display(description="images per split")
    def split_table(self, obj):
        if not obj.pk:
            return "—"
        rows = obj.images.values("split").annotate(n=Count("id")).order_by("split")
        return format_html("<table>{}</table>", format_html_join("", "<tr><td>{}</td><td>{}</td></tr>",
                                                                  ((r["split"], r["n"]) for r in rows)))

    @admin.display(description="images per label")
    def label_table(self, obj):
        if not obj.pk:
            return "—"
        rows = obj.images.values("label").annotate(
            n=Count("id"), train=Count("id", filter=Q(split=Split.TRAIN)),
            val=Count("id", filter=Q(split=Split.VAL)), test=Count("id", filter=Q(split=Split.TEST)),
        ).order_by("label")
        body = format_html_join("", "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                                ((r["label"] or "(none)", r["n"], r["train"], r["val"], r["test"]) for r in rows))
        return format_html("<table><tr><th>label</th><th>all</th><th>train</th><th>val</th><th>test</th></tr>{}</table>", body)

    @admin.display(description="embeddings per model version")
    def coverage_table(self, obj):
        if not obj.pk:
            return "—"
        total = obj.images.count()
        rows = [(v.name, " (active)" if v.is_active else "", n, total, hnsw.state_in_words(v))
                for v, n in coverage(obj)]
        return format_html("<table>{}</table>", format_html_join(
            "", "<tr><td>{}{}</td><td>{} / {}</td><td>{}</td></tr>", rows)) if rows else "no model version yet"


class LabelFilter(admin.SimpleListFilter):
    title = "label"
    parameter_name = "label"

    def lookups(self, request, model_admin):
        labels = Image.objects.exclude(label=None).values_list("label", flat=True).distinct().order_by("label")
        return [("__none__", "(no label)")] + [(label, label) for label in labels[:500]]

    def queryset(self, request, queryset):
        value = self.value()
        if value == "__none__":
            return queryset.filter(label=None)
        if value and "\x00" in value:
            return queryset.none()  # no label holds NUL, and PostgreSQL would refuse the query (a 500)
        if value:
            return queryset.filter(label=value)
        return queryset


@admin.register(Image)
class ImageAdmin(DeleteThroughJobsMixin, admin.ModelAdmin):
    list_display = ["thumb", "id", "original_filename", "label", "split", "dataset", "size", "created"]
    list_display_links = ["thumb", "id"]
    list_editable = ["label"]
    list_filter = ["dataset", LabelFilter, "split"]
    search_fields = ["original_filename"]
    list_per_page = 50
    actions = ["set_label", "set_split"]
    readonly_fields = ["preview", "dataset", "sha256", "width", "height", "original_filename", "file", "thumbnail",
                       "split", "created", "embedded_by"]
    fields = ["preview", "dataset", "label", "split", "original_filename", "width", "height", "sha256", "file",
              "thumbnail", "embedded_by", "created"]

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("dataset")

    def perform_delete(self, request, objs):
        return delete_or_start(image_ids=[obj.pk for obj in objs], user=request.user)

    def delete_summary(self, objs):
        return image_counts(Image.objects.filter(pk__in=[o.pk for o in objs])) if len(objs) > 100 else None

    @admin.display(description="")
    def thumb(self, obj):
        return format_html('<img src="{}" style="max-height:64px;max-width:96px" loading="lazy" alt="">', obj.thumbnail.url)

    @admin.display(description="image")
    def preview(self, obj):
        return format_html('<a href="{}"><img src="{}" style="max-height:256px" alt=""></a>', obj.file.url, obj.thumbnail.url)

    @admin.display(description="size")
    def size(self, obj):
        return f"{obj.width}×{obj.height}"

    @admin.display(description="embedded by")
    def embedded_by(self, obj):
        names = Embedding.objects.filter(image=obj).values_list("model_version__name", flat=True)
        return ", ".join(names) or "—"

    def get_form(self, request, obj=None, **kwargs):
        if obj is None:
            kwargs["form"] = ImageUploadForm
        return super().get_form(request, obj, **kwargs)

    def get_fields(self, request, obj=None):
        return ["dataset", "label", "upload"] if obj is None else self.fields

    def get_readonly_fields(self, request, obj=None):
        return [] if obj is None else self.readonly_fields

    def save_model(self, request, obj, form, change):
        if change:
            return super().save_model(request, obj, form, change)
        upload = form.cleaned_data["upload"]
        image, _ = add_image(form.cleaned_data["dataset"], form.cleaned_data["data"], upload.name,
                             form.cleaned_data.get("label"))
        obj.pk = image.pk
        obj.__dict__.update(image.__dict__)

    def _bulk_form(self, request, queryset, form_class, field, title):
        if "apply" in request.POST:
            form = form_class(request.POST)
            if form.is_valid():
                value = form.cleaned_data[field] or None
                count = queryset.update(**{field: value})
                self.message_user(request, f"Set {field} of {count} image(s) to {value!r}.", messages.SUCCESS)
                return None
        else:
            form = form_class()
        return render(request, "admin/search/image/bulk_set.html", {
            **self.admin_site.each_context(request), "title": title, "form": form, "images": queryset,
            "action": request.POST.get("action"), "opts": self.model._meta,
        })

    @admin.action(description="Set the label of the selected images…")
    def set_label(self, request, queryset):
        return self._bulk_form(request, queryset, SetLabelForm, "label", "Set label")

    @admin.action(description="Set the split of the selected images…")
    def set_split(self, request, queryset):
        return self._bulk_form(request, queryset, SetSplitForm, "split", "Set split")


# Registers the near-duplicate and API token admins.
from search import admin_duplicates, admin_feedback, admin_tokens  # noqa: E402,F401
