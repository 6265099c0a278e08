"""Who can do what: every URL of the URL conf is tried anonymously and as a
signed-in non-staff user. URLs are read from the URL conf, so a page added
later is tested too: anything not on the public or search lists below is
taken to be staff-only, and a new public page fails here until it is listed.

Also: CSRF on every form, uploads never stored, and /media/ serving nothing
but dataset files (no traversal, no listing, no symlinks out)."""

from __future__ import annotations

import io
import re
import tempfile
from pathlib import Path

import pytest
from django.test import Client, RequestFactory
from django.urls import URLResolver, get_resolver, resolve
from django.urls.exceptions import Resolver404
from django.utils.regex_helper import normalize

from search.models import Image, Job

ROOT = Path(__file__).resolve().parent.parent

# Anyone, always.
PUBLIC = {"healthz", "accounts/login/", "accounts/logout/", "admin/login/", "admin/logout/"}
# Public, or for signed-in users when CBIR_SEARCH_REQUIRES_LOGIN is on.
SEARCH = {"", "search/", "search/refine", "images/<int:image_id>/similar/", "api/search",
          "api/images/<int:image_id>/similar", "api/feedback", "^media/(?P<path>.+)$"}
SEARCH_PREFIXES = ("models/",)  # the model comparison pages show the collection like search results do
LOGIN_PAGES = ("/accounts/login/", "/admin/login/")


def _join(prefix: str, route: str) -> str:
    """As django.urls.resolvers joins routes into ResolverMatch.route."""
    return prefix + route.removeprefix("^") if prefix else route


def _patterns(patterns=None, prefix=""):
    """(full route, chain of patterns) for every URL of the URL conf, includes followed."""
    for pattern in get_resolver().url_patterns if patterns is None else patterns:
        route = _join(prefix, str(pattern.pattern))
        if isinstance(pattern, URLResolver):
            for full, chain in _patterns(pattern.url_patterns, route):
                yield full, [pattern, *chain]
        else:
            yield route, [pattern]


CHAINS = dict(_patterns())


def _sample_url(route: str) -> str | None:
    """A URL that the URL conf resolves to `route`, with sample arguments."""
    regex = "".join(re.sub(r"(\\Z|\$)$", "", p.pattern.regex.pattern.removeprefix("^")) for p in CHAINS[route])
    for template, params in normalize(regex):
        for value in ("1", "search", "auth"):
            url = "/" + template % {name: value for name in params}
            try:
                if resolve(url).route == route:
                    return url
            except Resolver404:
                continue
    return None


def _kind(route: str) -> str:
    if route in PUBLIC:
        return "public"
    if route in SEARCH or route.startswith(SEARCH_PREFIXES):
        return "search"
    return "staff"


ALL_ROUTES = sorted(CHAINS)
STAFF_ROUTES = [r for r in ALL_ROUTES if _kind(r) == "staff"]
SEARCH_ROUTES = [r for r in ALL_ROUTES if _kind(r) == "search"]


def _refused(response) -> bool:
    """Sent to a login page, or 401/403."""
    if response.status_code in (401, 403):
        return True
    return response.status_code == 302 and response["Location"].startswith(LOGIN_PAGES)


@pytest.fixture
def visitor(client, django_user_model):
    """A signed-in user who is not staff."""
    client.force_login(django_user_model.objects.create_user("visitor", password="a-long-password-1"))
    return client


def test_the_url_conf_is_read_and_every_url_can_be_built():
    assert {"jobs/", "api/search", "healthz", "admin/"} <= set(ALL_ROUTES)
    assert len(STAFF_ROUTES) > 20  # the admin's pages are among them
    missing = [route for route in ALL_ROUTES if _sample_url(route) is None]
    # Only admin catch-all-style patterns that no sample reaches may be missing.
    assert all(route.startswith("admin/") for route in missing), missing


@pytest.mark.parametrize("route", STAFF_ROUTES)
def test_staff_pages_refuse_anonymous_and_non_staff_users(route, client, django_user_model, db):
    url = _sample_url(route)
    if url is None:
        pytest.skip(f"no sample URL for {route}")
    for who in ("anonymous", "visitor"):
        if who == "visitor":
            client.force_login(django_user_model.objects.create_user("visitor", password="a-long-password-1"))
        for method in ("get", "post"):
            response = getattr(client, method)(url)
            assert _refused(response), (who, method, url, response.status_code, response.get("Location"))


@pytest.mark.parametrize("route", SEARCH_ROUTES)
def test_search_pages_are_public_by_default(route, client, db, settings):
    settings.CBIR_SEARCH_REQUIRES_LOGIN = False
    response = client.get(_sample_url(route))
    assert not _refused(response), (route, response.status_code)


@pytest.mark.parametrize("route", SEARCH_ROUTES)
def test_search_pages_need_a_login_when_the_setting_is_on(route, client, django_user_model, db, settings):
    settings.CBIR_SEARCH_REQUIRES_LOGIN = True
    url = _sample_url(route)
    for method in ("get", "post"):
        response = getattr(client, method)(url)
        if url.startswith("/api/"):
            assert response.status_code == 401 and "log in" in response.json()["error"], (method, url)
            assert response["WWW-Authenticate"].startswith("Bearer")
        else:
            assert response.status_code in (302, 405), (method, url, response.status_code)
            if response.status_code == 302:
                assert response["Location"].startswith("/accounts/login/?next="), response["Location"]
            else:
                assert method == "post"  # a GET-only page
    client.force_login(django_user_model.objects.create_user("visitor", password="a-long-password-1"))
    assert not _refused(client.get(url)), url


@pytest.mark.parametrize("route", sorted(PUBLIC))
def test_public_pages_stay_public_when_search_needs_a_login(route, client, db, settings):
    settings.CBIR_SEARCH_REQUIRES_LOGIN = True
    response = client.get(_sample_url(route))
    assert not _refused(response) and response.status_code < 500, (route, response.status_code)


def test_the_login_page_signs_in_a_user_who_is_not_staff(client, django_user_model, db, settings):
    settings.CBIR_SEARCH_REQUIRES_LOGIN = True
    django_user_model.objects.create_user("visitor", password="a-long-password-1")
    page = client.get("/search/", follow=True)
    assert page.redirect_chain[-1][0].startswith("/accounts/login/?next=/search/")
    assert b"csrfmiddlewaretoken" in page.content
    response = client.post("/accounts/login/?next=/search/",
                           {"username": "visitor", "password": "a-long-password-1", "next": "/search/"})
    assert response.status_code == 302 and response["Location"] == "/search/"
    assert client.get("/search/").status_code == 200


def test_a_search_with_a_session_works_when_login_is_required(visitor, indexed, settings):
    settings.CBIR_SEARCH_REQUIRES_LOGIN = True
    image = Image.objects.filter(label="red").first()
    assert visitor.get(f"/api/images/{image.pk}/similar?k=3").status_code == 200
    assert visitor.get(f"/images/{image.pk}/similar/").status_code == 200
    assert visitor.get("/media/" + image.thumbnail.name).status_code == 200


def test_a_non_staff_user_cannot_cancel_or_rerun_a_job(visitor, dataset):
    job = Job.objects.create(kind=Job.Kind.IMPORT, dataset=dataset, status=Job.Status.RUNNING)
    for action in ("cancel", "rerun"):
        response = visitor.post(f"/jobs/{job.pk}/{action}")
        assert response.status_code == 302 and response["Location"].startswith("/admin/login/")
    assert visitor.get(f"/jobs/{job.pk}/status").status_code == 403
    job.refresh_from_db()
    assert job.status == Job.Status.RUNNING


def _staff_user(django_user_model, name, *permissions):
    from django.contrib.auth.models import Permission

    user = django_user_model.objects.create_user(name, password="a-long-password-1", is_staff=True)
    user.user_permissions.set([Permission.objects.get(content_type__app_label="search", codename=codename)
                               for codename in permissions])
    return user


def test_job_pages_need_the_view_permission_and_cancel_rerun_the_change_permission(client, django_user_model,
                                                                                    dataset):
    job = Job.objects.create(kind=Job.Kind.IMPORT, dataset=dataset, status=Job.Status.RUNNING)
    failed = Job.objects.create(kind=Job.Kind.IMPORT, dataset=dataset, status=Job.Status.FAILED)
    # Staff without either permission: 403 everywhere (never a 500, never a login redirect loop).
    client.force_login(_staff_user(django_user_model, "bare-staff"))
    for url in ("/jobs/", f"/jobs/{job.pk}/"):
        assert client.get(url).status_code == 403, url
    status = client.get(f"/jobs/{job.pk}/status")
    assert status.status_code == 403 and "search.view_job" in status.json()["error"]
    assert client.post(f"/jobs/{job.pk}/cancel").status_code == 403
    assert client.post(f"/jobs/{failed.pk}/rerun").status_code == 403
    # May read, not change: the pages and the log, no buttons, cancel and rerun refused.
    client.force_login(_staff_user(django_user_model, "reader", "view_job"))
    assert client.get("/jobs/").status_code == 200
    page = client.get(f"/jobs/{job.pk}/")
    assert page.status_code == 200 and 'id="cancel-form"' not in page.content.decode()
    assert client.get(f"/jobs/{job.pk}/status").json()["status"] == "running"
    assert client.post(f"/jobs/{job.pk}/cancel").status_code == 403
    assert client.post(f"/jobs/{failed.pk}/rerun").status_code == 403
    job.refresh_from_db()
    failed.refresh_from_db()
    assert job.status == Job.Status.RUNNING and failed.status == Job.Status.FAILED
    # May read and change: the buttons, and cancel works.
    client.force_login(_staff_user(django_user_model, "operator", "view_job", "change_job"))
    assert 'id="cancel-form"' in client.get(f"/jobs/{job.pk}/").content.decode()
    response = client.post(f"/jobs/{job.pk}/cancel")
    assert response.status_code == 302 and response["Location"] == f"/jobs/{job.pk}/"
    job.refresh_from_db()
    assert job.status == Job.Status.CANCELLED


# --- CSRF -------------------------------------------------------------------------

def _post_forms(text: str) -> list[str]:
    return re.findall(r"<form\b[^>]*method=[\"']post[\"'][^>]*>.*?</form>", text, flags=re.S | re.I)


def test_every_post_form_in_the_templates_has_a_csrf_token():
    forms = []
    for template in (ROOT / "templates").rglob("*.html"):
        for form in _post_forms(template.read_text()):
            forms.append(template)
            assert "{% csrf_token %}" in form, f"{template.relative_to(ROOT)}: a POST form without {{% csrf_token %}}"
    assert len(forms) >= 5


def test_the_search_form_needs_its_csrf_token_and_the_api_does_not(db, make_image_bytes):
    client = Client(enforce_csrf_checks=True)
    data = make_image_bytes(pattern=1)
    assert client.post("/search/", {"image": io.BytesIO(data)}).status_code == 403
    form = client.get("/search/")
    token = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', form.content).group(1).decode()
    # Past CSRF: 503 because no index is ready in this empty database.
    assert client.post("/search/", {"image": io.BytesIO(data), "csrfmiddlewaretoken": token}).status_code == 503
    # The API is csrf_exempt: a read-only query that stores nothing (docs/security.md).
    assert Client(enforce_csrf_checks=True).post("/api/search", {"image": io.BytesIO(data)}).status_code == 503


# --- Uploads are never stored -------------------------------------------------------

def _files(root) -> set:
    return {p for p in Path(root).rglob("*") if p.is_file()}


def test_query_uploads_leave_nothing_behind(client, indexed, settings, tmp_path, monkeypatch, make_image_bytes):
    """Uploads over FILE_UPLOAD_MAX_MEMORY_SIZE go to a temporary file (lowered
    here so every upload does); Django deletes it when the request ends."""
    from django.core.files import uploadedfile

    settings.FILE_UPLOAD_MAX_MEMORY_SIZE = 256
    settings.FILE_UPLOAD_TEMP_DIR = str(tmp_path / "upload-tmp")
    Path(settings.FILE_UPLOAD_TEMP_DIR).mkdir()
    temporary: list[str] = []
    original_init = uploadedfile.TemporaryUploadedFile.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        temporary.append(self.file.name)

    monkeypatch.setattr(uploadedfile.TemporaryUploadedFile, "__init__", recording_init)
    system_tmp = Path(tempfile.gettempdir())
    system_uploads_before = set(system_tmp.glob("*.upload*"))
    media_before, rows_before = _files(settings.MEDIA_ROOT), Image.objects.count()

    for i in range(12):
        data = make_image_bytes(size=(64, 64), pattern=1000 + i)
        assert len(data) > settings.FILE_UPLOAD_MAX_MEMORY_SIZE
        assert client.post("/api/search", {"image": io.BytesIO(data), "k": "3"}).status_code == 200
        assert client.post("/search/", {"image": io.BytesIO(data), "k": "3"}).status_code == 200

    assert len(temporary) == 24 and all(name.startswith(settings.FILE_UPLOAD_TEMP_DIR) for name in temporary)
    assert not any(Path(name).exists() for name in temporary)
    assert list(Path(settings.FILE_UPLOAD_TEMP_DIR).iterdir()) == []
    assert set(system_tmp.glob("*.upload*")) <= system_uploads_before
    assert _files(settings.MEDIA_ROOT) == media_before and Image.objects.count() == rows_before


# --- /media/ ------------------------------------------------------------------------

@pytest.fixture
def media_tree(settings, tmp_path):
    """MEDIA_ROOT with a dataset file, a secret beside it, and symlinks out."""
    root = Path(settings.MEDIA_ROOT)
    (root / "datasets" / "1").mkdir(parents=True)
    (root / "thumbnails").mkdir()
    (root / "datasets" / "1" / "cat.png").write_bytes(b"\x89PNG not really")
    (root / "datasets" / "1" / ".tmp-half").write_bytes(b"partial")
    (root / "notes.txt").write_text("inside MEDIA_ROOT but not a dataset file")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("SECRET")
    (root.parent / "beside.txt").write_text("SECRET")
    (root / "datasets" / "1" / "link.png").symlink_to(outside / "secret.txt")
    (root / "datasets" / "out").symlink_to(outside, target_is_directory=True)
    (root / "thumbnails" / "inside.png").symlink_to(root / "datasets" / "1" / "cat.png")
    return root


def test_dataset_files_are_served_by_their_url(client, db, media_tree):
    response = client.get("/media/datasets/1/cat.png")
    assert response.status_code == 200 and b"".join(response.streaming_content) == b"\x89PNG not really"
    assert response["Content-Type"] == "image/png" and response["X-Content-Type-Options"] == "nosniff"
    assert client.get("/media/thumbnails/inside.png").status_code == 200  # a link that stays inside


TRAVERSALS = [
    "/media/../cbirsite/settings.py",
    "/media/datasets/../../beside.txt",
    "/media/%2e%2e/beside.txt",
    "/media/datasets/%2e%2e/%2e%2e/beside.txt",
    "/media/datasets/1/%2e%2e%2f%2e%2e%2f..%2fbeside.txt",
    "/media//etc/passwd",
    "/media/%2fetc%2fpasswd",
    "/media/datasets/1/..\\..\\..\\beside.txt",
    "/media/datasets/1/cat.png%00.txt",
    "/media/datasets/1/link.png",  # symlink to a file outside
    "/media/datasets/out/secret.txt",  # symlinked folder outside
    "/media/datasets/1/.tmp-half",  # a half-written file
    "/media/notes.txt",  # in MEDIA_ROOT, but not a dataset file
    "/media/datasets/",  # no listings
    "/media/datasets/1",
    "/media/datasets/1/",
    "/media/datasets/1/missing.png",
]


@pytest.mark.parametrize("url", TRAVERSALS)
def test_nothing_else_is_served_from_media(client, db, media_tree, url):
    response = client.get(url)
    assert response.status_code == 404, (url, response.status_code)
    assert b"SECRET" not in response.content and b"Index of" not in response.content


def test_djangos_own_serve_would_follow_the_symlink_out(media_tree):
    # Why search.views.media exists: the stock view checks the path as written.
    from django.views.static import serve

    response = serve(RequestFactory().get("/"), "datasets/1/link.png", document_root=str(media_tree))
    assert b"".join(response.streaming_content) == b"SECRET"


def test_media_needs_a_login_or_token_when_search_does(client, db, media_tree, settings):
    settings.CBIR_SEARCH_REQUIRES_LOGIN = True
    response = client.get("/media/datasets/1/cat.png")
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")
    bad = client.get("/media/datasets/1/cat.png", HTTP_AUTHORIZATION="Bearer nope")
    assert bad.status_code == 401
