"""While the database is unreachable, answer 503 with a readable message (an
HTML page, or JSON under /api/) instead of a 500 and a stack trace. The same
for a media folder that cannot be written (search.ingest.StorageError, e.g.
adding an image in the admin with the disk full).

Nothing needs restarting when the database is back: connections are checked
before reuse (CONN_HEALTH_CHECKS) and a connection that failed is closed at the
end of its request, so the next request opens a fresh one."""

from __future__ import annotations

import logging

from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template.loader import render_to_string

logger = logging.getLogger(__name__)

MESSAGE = ("The database is not answering right now, so this cannot be done. "
           "Nothing was lost; try again in a minute.")
RETRY_AFTER_SECONDS = 30


def wants_json(request: HttpRequest) -> bool:
    return request.path.startswith("/api/") or request.headers.get("Accept", "").startswith("application/json")


class DatabaseUnavailableMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        from search.ingest import StorageError

        # Connection refused, server gone, connection lost mid-query: Django wraps them all in these two.
        if isinstance(exception, (OperationalError, InterfaceError)):
            message = MESSAGE
        elif isinstance(exception, StorageError):
            message = f"Nothing was stored: {exception}."
        else:
            return None
        logger.warning("service unavailable for %s %s: %s", request.method, request.path, exception)
        response: HttpResponse
        if wants_json(request):
            response = JsonResponse({"error": message}, status=503)
        else:
            # Rendered without the request: context processors (the user, messages) would query the database.
            response = HttpResponse(render_to_string("503.html", {"message": message}), status=503)
        response["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response


class ApiBadRequestMiddleware:
    """Under /api/, a request body Django cannot read (malformed multipart, too
    many fields or files, form data over DATA_UPLOAD_MAX_MEMORY_SIZE) answers
    JSON like every other API error, not Django's HTML 400 page (or, with
    DEBUG, a traceback page)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        from django.core.exceptions import BadRequest, RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent
        from django.http.multipartparser import MultiPartParserError

        if not request.path.startswith("/api/"):
            return None
        if isinstance(exception, RequestDataTooBig):
            status = 413
        elif isinstance(exception, (MultiPartParserError, TooManyFieldsSent, TooManyFilesSent, BadRequest)):
            status = 400
        else:
            return None
        return JsonResponse({"error": f"the request could not be read: {exception}"}, status=status)


NUL_MESSAGE = ("The address holds a NUL character (%00), which no name, label or filter value can contain; "
               "remove it and try again. Nothing was changed.")


class AdminNulQueryMiddleware:
    """In the admin, a NUL character in the query string (a list filter such
    as ?status=%00, the search box ?q=%00, any lookup) answers 400 with words.
    PostgreSQL refuses NUL in text (psycopg DataError, so a 500), and each
    admin list builds its own lookups from the query string, so the one guard
    is here, before any of them runs."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        from django.urls import NoReverseMatch, reverse

        try:
            admin_root = reverse("admin:index")
        except NoReverseMatch:  # a URLconf without the admin (a test's own)
            return self.get_response(request)
        if request.path.startswith(admin_root) and any(
                "\x00" in key or any("\x00" in value for value in values) for key, values in request.GET.lists()):
            return HttpResponse(NUL_MESSAGE, status=400, content_type="text/plain; charset=utf-8")
        return self.get_response(request)
