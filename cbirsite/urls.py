from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import URLPattern, include, path, re_path

import training.urls
from search import views as search_views
from search.access import login_when_required


def _login_when_required(patterns: list) -> list:
    """The model pages show the collection (thumbnails, labels, file names), so
    they follow the search pages' rule (CBIR_SEARCH_REQUIRES_LOGIN). Applied
    here, to every pattern, so a page added to training/urls.py gets it too."""
    wrapped = []
    for pattern in patterns:
        if not isinstance(pattern, URLPattern):
            raise TypeError(f"cbirsite/urls.py: cannot apply the login rule to {pattern!r}; list plain paths")
        wrapped.append(URLPattern(pattern.pattern, login_when_required(pattern.callback), pattern.default_args,
                                  pattern.name))
    return wrapped


urlpatterns = [
    path("admin/", admin.site.urls),
    # Sign-in for everyone with an account (the admin's login page takes staff only).
    path("accounts/login/", auth_views.LoginView.as_view(redirect_authenticated_user=True), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("", include("search.urls")),
    path("", include(_login_when_required(training.urls.urlpatterns))),
    # Dataset media by URL only: no directory listing, real paths confined to MEDIA_ROOT.
    re_path(r"^media/(?P<path>.+)$", search_views.media, name="media"),
]
