"""Search pages and the JSON API. Views validate input, call one function from
search.services, and render; errors become a clear message with the right
status, never a 500."""

from __future__ import annotations

import base64
from functools import wraps
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.http.response import HttpResponseBase
from django.middleware.csrf import CsrfViewMiddleware
from django.shortcuts import render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_http_methods, require_safe
from django.views.static import serve

from search import access, feedback, services
from search.imaging import ACCEPT_ATTRIBUTE, ACCEPTED_FORMATS_TEXT, make_thumbnail
from search.models import Dataset, Image
from search.services import SearchError, UploadTooLarge

# Multipart overhead allowed on top of the file itself.
_MULTIPART_SLACK = 64 * 1024


class LengthRequired(SearchError):
    """A body sent without Content-Length (chunked transfer): WSGI gives Django none of it."""

    status = 411


def _check_content_length(request: HttpRequest) -> None:
    if request.META.get("CONTENT_LENGTH") in (None, ""):
        raise LengthRequired("the request has no Content-Length header (chunked transfer encoding is not "
                             "supported): send the image as multipart/form-data with a Content-Length")
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length > settings.CBIR_MAX_UPLOAD_BYTES + _MULTIPART_SLACK:
        raise UploadTooLarge(f"the upload is larger than the limit of {settings.CBIR_MAX_UPLOAD_BYTES:,} bytes")


def _uploaded_bytes(request: HttpRequest) -> bytes:
    _check_content_length(request)
    upload = request.FILES.get("image")
    if upload is None:
        raise services.BadParameter("no image was sent: use the multipart field 'image'")
    if (upload.size or 0) > settings.CBIR_MAX_UPLOAD_BYTES:
        raise UploadTooLarge(f"the upload is larger than the limit of {settings.CBIR_MAX_UPLOAD_BYTES:,} bytes")
    return upload.read()


def _page_context(**extra) -> dict:
    return {"datasets": Dataset.objects.order_by("name"), "max_k": settings.CBIR_MAX_K,
            "max_upload_mb": settings.CBIR_MAX_UPLOAD_BYTES / 1024 / 1024, "accepted_formats": ACCEPTED_FORMATS_TEXT,
            "accept_attribute": ACCEPT_ATTRIBUTE, **extra}


def _query_preview(rgb) -> str:
    """A small data: URL of the (already decoded) query image for the results page; nothing is stored."""
    return "data:image/jpeg;base64," + base64.b64encode(make_thumbnail(rgb, 256)).decode()


def guarded(*, api: bool, counted: tuple[str, ...] = ("GET", "POST")):
    """Who may search (login when CBIR_SEARCH_REQUIRES_LOGIN; on the API also a
    token) and how often: requests with a method in `counted` are searches and
    count towards the client's CBIR_SEARCH_RATE_LIMIT (429 + Retry-After)."""

    def decorator(view):
        @wraps(view)
        def wrapped(request: HttpRequest, *args, **kwargs):
            refused = access.check_access(request, api=api)
            if refused is not None:
                return refused
            if request.method in counted:
                try:
                    access.count_search(request)
                except access.RateLimited as exc:
                    response = _json_error(exc) if api else render(
                        request, "search/index.html", _page_context(error=str(exc)), status=exc.status)
                    response["Retry-After"] = str(exc.retry_after)
                    return response
            return view(request, *args, **kwargs)

        return wrapped

    return decorator


@require_GET
@guarded(api=False, counted=())
def index(request: HttpRequest) -> HttpResponse:
    return render(request, "search/index.html", _page_context())


@require_http_methods(["GET", "POST"])
@guarded(api=False, counted=("POST",))
def search_page(request: HttpRequest) -> HttpResponse:
    if request.method == "GET":
        return render(request, "search/index.html", _page_context())
    try:
        result = _search_posted(request)
    except SearchError as exc:
        return render(request, "search/index.html", _page_context(error=str(exc)), status=exc.status)
    return render(request, "search/results.html", _page_context(
        result=result, query_preview=_query_preview(result.query_rgb) if result.query_rgb is not None else None,
        selected_dataset=request.POST.get("dataset", ""), k=result.k))


def _search_posted(request: HttpRequest) -> services.SearchResult:
    """A POSTed search (page or API): an uploaded `image`, optionally refined by
    `positive` / `negative` ids; without an image, the marks alone (and
    `query_sha256`, a recent upload) make the query (services.search_refined)."""
    _check_content_length(request)
    positive, negative = request.POST.getlist("positive"), request.POST.getlist("negative")
    k, dataset = request.POST.get("k"), request.POST.get("dataset")
    who = feedback.searcher(request)
    if "image" not in request.FILES and (positive or negative or request.POST.get("query_sha256")):
        return services.search_refined(k=k, dataset=dataset, query_sha256=request.POST.get("query_sha256"),
                                       positive=positive, negative=negative, user=who["user"],
                                       session_key=who["session_key"])
    return services.search_by_upload(_uploaded_bytes(request), k=k, dataset=dataset, positive=positive,
                                     negative=negative, user=who["user"], session_key=who["session_key"])


@require_GET
@guarded(api=False)
def refine_page(request: HttpRequest) -> HttpResponse:
    """The results page's *Refine*: the marks so far as positive / negative ids,
    with the recent upload they were given on (query_sha256) or none."""
    try:
        result = services.search_refined(k=request.GET.get("k"), dataset=request.GET.get("dataset"),
                                         positive=request.GET.getlist("positive"),
                                         negative=request.GET.getlist("negative"),
                                         query_sha256=request.GET.get("query_sha256"),
                                         **feedback.searcher(request))
    except SearchError as exc:
        return render(request, "search/index.html", _page_context(error=str(exc)), status=exc.status)
    return render(request, "search/results.html", _page_context(
        result=result, selected_dataset=request.GET.get("dataset", ""), k=result.k))


@require_GET
@guarded(api=False)
def similar_page(request: HttpRequest, image_id: int) -> HttpResponse:
    query = Image.objects.select_related("dataset").filter(pk=image_id).first()
    try:
        result = services.search_by_image(image_id, k=request.GET.get("k"), dataset=request.GET.get("dataset"),
                                          positive=request.GET.getlist("positive"),
                                          negative=request.GET.getlist("negative"))
    except SearchError as exc:
        return render(request, "search/index.html", _page_context(error=str(exc)), status=exc.status)
    return render(request, "search/results.html", _page_context(
        result=result, query_image=query, selected_dataset=request.GET.get("dataset", ""), k=result.k))


def json_methods(*methods: str):
    """Like require_http_methods, but a wrong method gets a JSON message."""

    def decorator(view):
        @wraps(view)
        def wrapped(request: HttpRequest, *args, **kwargs):
            if request.method not in methods:
                response = JsonResponse(
                    {"error": f"method {request.method} is not allowed here; use {' or '.join(methods)}"}, status=405)
                response["Allow"] = ", ".join(methods)
                return response
            return view(request, *args, **kwargs)

        return wrapped

    return decorator


def _json_error(exc: SearchError) -> JsonResponse:
    return JsonResponse({"error": str(exc)}, status=exc.status)


# csrf_exempt: a query, not an action. It does write (the upload's embedding,
# kept for its searcher; search.feedback.remember_upload), but only an upsert a
# forged request could repeat, changing nothing anyone sees; marks, which do,
# check CSRF in api_feedback. See docs/security.md.
@csrf_exempt
@guarded(api=True, counted=("POST",))  # 401 before 405: a client without access learns nothing more
@json_methods("POST")
def api_search(request: HttpRequest) -> JsonResponse:
    try:
        result = _search_posted(request)
    except SearchError as exc:
        return _json_error(exc)
    return JsonResponse(result.as_dict())


@guarded(api=True, counted=("GET",))
@json_methods("GET")
def api_similar(request: HttpRequest, image_id: int) -> JsonResponse:
    try:
        result = services.search_by_image(image_id, k=request.GET.get("k"), dataset=request.GET.get("dataset"),
                                          positive=request.GET.getlist("positive"),
                                          negative=request.GET.getlist("negative"))
    except SearchError as exc:
        return _json_error(exc)
    return JsonResponse(result.as_dict())


@csrf_exempt  # checked below for cookie sessions; an API token is not a cookie, so needs no CSRF token
@guarded(api=True, counted=("POST",))  # the search rate limit: a mark costs what a search does
@json_methods("POST")
def api_feedback(request: HttpRequest) -> JsonResponse:
    """Relevance marks: form fields query_image_id or query_sha256, image_id
    (repeatable), verdict right|wrong, optional model and dataset (the
    search's; search.feedback.parse_marks). 201 with the marks stored; 400 and nothing
    stored for bad input; 403 without a CSRF token on a cookie session."""
    if getattr(request, "api_token", None) is None:
        refused = CsrfViewMiddleware(lambda r: HttpResponse()).process_view(request, lambda r: HttpResponse(), (), {})
        if refused is not None:
            return JsonResponse({"error": "CSRF token missing or incorrect: send the csrftoken cookie's value as "
                                          "the X-CSRFToken header, or use an API token"}, status=403)
    who = feedback.searcher(request)
    try:
        version = services.ready_version()
        marks = feedback.parse_marks(request.POST, version, services.parse_dataset(request.POST.get("dataset")),
                                     **who)
        stored = feedback.record_marks(version, marks, **who)
    except SearchError as exc:
        return _json_error(exc)
    except IntegrityError:  # an image deleted as the marks were stored (record_marks locks, so this is rare)
        return JsonResponse({"error": "an image marked or queried no longer exists: search again"}, status=400)
    return JsonResponse({"model": version.name, "verdict": marks.verdict, "stored": len(stored),
                         "marks": [{"id": m.pk, "image_id": m.result_id} for m in stored]}, status=201)


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """For load balancers and container health checks: the database answers."""
    from django.db import connection

    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception as exc:  # noqa: BLE001 - any failure means unhealthy
        return JsonResponse({"ok": False, "error": f"database: {type(exc).__name__}"}, status=503)
    return JsonResponse({"ok": True})


# The folders of MEDIA_ROOT that hold dataset images and their thumbnails: the
# only ones served. Anything else there (a stray upload, a partial ".tmp-" file)
# is not.
MEDIA_FOLDERS = ("datasets", "thumbnails")


@require_safe
def media(request: HttpRequest, path: str) -> HttpResponseBase:
    """A dataset image or thumbnail by its URL, under the same login rule as
    search (API tokens accepted). No directory listings, no dotfiles, and the
    real path, symlinks resolved, must stay inside MEDIA_ROOT: Django's own
    static `serve` checks the path as written and follows symlinks out."""
    refused = access.check_access(request, api=False, tokens=True)
    if refused is not None:
        return refused
    root = Path(settings.MEDIA_ROOT).resolve()
    parts = path.split("/")
    if "\\" in path or "\x00" in path or parts[0] not in MEDIA_FOLDERS or any(
            part in ("", ".", "..") or part.startswith(".") for part in parts):
        raise Http404("no such file")
    try:
        real = (root / path).resolve(strict=True)
    except (OSError, RuntimeError):  # missing, or a symlink loop
        raise Http404("no such file") from None
    if not real.is_relative_to(root) or real.relative_to(root).parts[0] not in MEDIA_FOLDERS or not real.is_file():
        raise Http404("no such file")
    response = serve(request, real.relative_to(root).as_posix(), document_root=str(root))
    # An image never needs to run anything, whatever a browser sniffs it to be.
    response["Content-Security-Policy"] = "default-src 'none'; sandbox"
    if settings.CBIR_SEARCH_REQUIRES_LOGIN:
        response["Cache-Control"] = "private"
    return response
