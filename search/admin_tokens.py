"""Admin for API tokens: a staff member creates one, sees its key once, and
can revoke it. Only the key's SHA-256 is stored (search.models.ApiToken)."""

from __future__ import annotations

from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.cache import add_never_cache_headers

from search.models import ApiToken


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["name", "prefix", "user", "created", "last_used", "revoked"]
    list_filter = ["revoked"]
    search_fields = ["name", "prefix", "user__username"]
    list_select_related = ["user"]
    actions = ["revoke"]

    def get_fields(self, request, obj=None):
        if obj is None:
            return ["name", "user"]
        return ["name", "prefix", "user", "created", "last_used", "revoked"]

    def get_readonly_fields(self, request, obj=None):
        # The owner and the key never change: a new key is a new token. Revocation is final
        # (ApiToken.save refuses to undo it), so once revoked the box is no longer a box.
        if obj is None:
            return []
        return ["prefix", "user", "created", "last_used", *(["revoked"] if obj.revoked else [])]

    def get_changeform_initial_data(self, request):
        return {"user": request.user.pk}

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        if db_field.name == "user":
            # Tokens belong to active staff; a token stops working when its owner stops being either.
            kwargs["queryset"] = get_user_model().objects.filter(is_staff=True, is_active=True)
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def save_model(self, request, obj, form, change):
        if not change:
            obj._new_key = obj.set_new_key()
        super().save_model(request, obj, form, change)

    def response_add(self, request, obj, post_url_continue=None):
        """Show the key on this one page (never in a message, which would be
        stored in the session or a cookie until displayed)."""
        response = TemplateResponse(request, "admin/search/apitoken/created.html", {
            **self.admin_site.each_context(request), "title": "API token created", "opts": self.model._meta,
            "token": obj, "key": obj._new_key, "list_url": reverse("admin:search_apitoken_changelist")})
        add_never_cache_headers(response)
        return response

    @admin.action(description="Revoke the selected tokens", permissions=["change"])
    def revoke(self, request, queryset):
        count = queryset.filter(revoked=False).update(revoked=True)
        self.message_user(request, f"Revoked {count} token(s).", messages.SUCCESS)
