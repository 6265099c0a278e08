"""Admin for near-duplicate images: the flagged pairs side by side, and a page
of groups where the extras (all but the oldest image of a group) can be
deleted. Imported at the end of search/admin.py."""

from __future__ import annotations

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import path, reverse
from django.utils.html import format_html

from search.duplicates import delete_extras, flagging_version, group_ids, near_duplicate_threshold, with_images
from search.jobs import JobError
from search.models import Dataset, NearDuplicate

GROUPS_PER_PAGE = 50


def _thumb(image) -> str:
    return format_html(
        '<a href="{}" title="{} (#{})"><img src="{}" style="max-height:80px;max-width:120px" loading="lazy" '
        'alt="image {}"></a><div class="small">#{} {}</div>',
        reverse("admin:search_image_change", args=[image.pk]), image.original_filename, image.pk,
        image.thumbnail.url, image.pk, image.pk, image.original_filename[:40])


class DatasetFilter(admin.SimpleListFilter):
    title = "dataset"
    parameter_name = "dataset"

    def lookups(self, request, model_admin):
        datasets = Dataset.objects.filter(images__near_duplicates__isnull=False).distinct().order_by("name")
        return [(str(d.pk), d.name) for d in datasets]

    def queryset(self, request, queryset):
        value = self.value()
        return queryset.filter(image__dataset_id=int(value)) if value and value.isdigit() else queryset


@admin.register(NearDuplicate)
class NearDuplicateAdmin(admin.ModelAdmin):
    list_display = ("image_thumb", "duplicate_thumb", "similarity_display", "dataset", "model_version", "created")
    list_filter = [DatasetFilter, "model_version"]
    list_select_related = ["image", "image__dataset", "duplicate_of", "model_version"]
    search_fields = ["image__original_filename", "duplicate_of__original_filename"]
    readonly_fields = ["image_thumb", "duplicate_thumb", "similarity", "model_version", "created"]
    fields = tuple(readonly_fields)
    list_per_page = 50
    change_list_template = "admin/search/nearduplicate/change_list.html"

    def has_add_permission(self, request):
        return False  # flagged by search.duplicates after embedding

    def has_change_permission(self, request, obj=None):
        return False

    @admin.display(description="image (newer)")
    def image_thumb(self, obj):
        return _thumb(obj.image)

    @admin.display(description="near-duplicate of (older)")
    def duplicate_thumb(self, obj):
        return _thumb(obj.duplicate_of)

    @admin.display(description="similarity", ordering="similarity")
    def similarity_display(self, obj):
        return f"{obj.similarity:.4f}"

    @admin.display(description="dataset", ordering="image__dataset__name")
    def dataset(self, obj):
        return obj.image.dataset.name

    def get_urls(self):
        groups = path("groups/", self.admin_site.admin_view(self.groups_view), name="search_nearduplicate_groups")
        return [groups, *super().get_urls()]

    def groups_view(self, request: HttpRequest) -> HttpResponse:
        """GET: one page of GROUPS_PER_PAGE groups of one dataset, under the
        flagging version (search.duplicates.flagging_version), with the
        threshold and the group count. POST action=delete_extras with some
        `group` values (the kept image's id): a confirmation page, then, with
        confirm=yes, the extras of those groups are deleted."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        datasets = Dataset.objects.filter(images__near_duplicates__isnull=False).distinct().order_by("name")
        dataset = self._chosen_dataset(request, datasets)
        version = flagging_version()
        all_groups = group_ids(dataset, version) if dataset else []
        page = Paginator(all_groups, GROUPS_PER_PAGE).get_page(request.GET.get("page"))
        context = {
            **self.admin_site.each_context(request), "opts": self.model._meta, "title": "Near-duplicate groups",
            "datasets": datasets, "dataset": dataset, "groups": with_images(list(page.object_list)), "page_obj": page,
            "n_groups": len(all_groups), "n_images": sum(len(g) for g in all_groups),
            "threshold": near_duplicate_threshold(), "version": version,
            "can_delete": request.user.has_perm("search.delete_image"),
        }
        if dataset is not None and request.method == "POST" and request.POST.get("action") == "delete_extras":
            if not context["can_delete"]:
                raise PermissionDenied
            chosen = {int(v) for v in request.POST.getlist("group") if v.isdigit()}
            selected = with_images([ids for ids in all_groups if ids[0] in chosen])
            back = f"{request.path}?dataset={dataset.pk}&page={page.number}"
            if not selected:
                self.message_user(request, "Select at least one group.", messages.WARNING)
            elif request.POST.get("confirm") == "yes":
                try:
                    deleted = delete_extras(dataset, [group[0].pk for group in selected], version)
                except JobError as exc:
                    self.message_user(request, f"Nothing was deleted: {exc}", messages.ERROR)
                    return HttpResponseRedirect(back)
                self.message_user(request, f"Deleted {len(deleted)} image(s); kept the first image of "
                                           f"{len(selected)} group(s).", messages.SUCCESS)
                return HttpResponseRedirect(back)
            else:
                return render(request, "admin/search/nearduplicate/groups.html",
                              {**context, "confirm": True, "selected": selected,
                               "n_extras": sum(len(group) - 1 for group in selected)})
        return render(request, "admin/search/nearduplicate/groups.html", context)

    @staticmethod
    def _chosen_dataset(request: HttpRequest, datasets) -> Dataset | None:
        raw = request.POST.get("dataset") or request.GET.get("dataset") or ""
        if raw.isdigit():
            chosen = Dataset.objects.filter(pk=int(raw)).first()
            if chosen:
                return chosen
        return datasets.first()
