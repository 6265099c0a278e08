"""Who may search, and how often (docs/security.md).

- `check_access`: with CBIR_SEARCH_REQUIRES_LOGIN on, search needs a signed-in
  user or, on the JSON API and /media/, an API token (`Authorization: Bearer`).
  A token that is sent must be valid, whatever the setting.
- `count_search`: the per-client rate limit (CBIR_SEARCH_RATE_LIMIT), a fixed
  window counted with one atomic upsert in PostgreSQL, keyed by the API token
  or else the client's IP address (`client_ip`).

Staff-only pages do not come here: they use Django's staff checks
(`staff_member_required`, the admin's own), and a token never opens them.
"""

from __future__ import annotations

import ipaddress
import math
import random
import time
from datetime import timedelta
from functools import lru_cache, wraps

from django.conf import settings
from django.contrib.auth.views import redirect_to_login
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone

from cbirsite.env import parse_rate
from search.models import ApiToken, RateCounter
from search.services import SearchError

# last_used is written at most this often per token (not one UPDATE per search).
LAST_USED_PRECISION = timedelta(seconds=60)
# One counted search in this many also deletes the counters of ended windows.
CLEANUP_ONE_IN = 1000
PERIOD_NAMES = {1: "second", 60: "minute", 3600: "hour", 86400: "day"}


class InvalidToken(Exception):
    pass


class RateLimited(SearchError):
    """Over CBIR_SEARCH_RATE_LIMIT: 429, with the seconds until the window ends."""

    status = 429

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# --- Tokens and login ---------------------------------------------------------

def token_from_request(request: HttpRequest) -> ApiToken | None:
    """The token of an `Authorization: Bearer <key>` header; None without one
    (other schemes, e.g. a proxy's Basic auth, are left alone); InvalidToken
    for a key that is unknown, revoked, or whose owner is no longer active staff."""
    scheme, _, key = request.META.get("HTTP_AUTHORIZATION", "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    key = key.strip()
    if not key:
        raise InvalidToken("the Authorization header has no key after 'Bearer'")
    # Looked up by the hash of a 256-bit random key: a timing difference in the
    # index lookup tells an attacker nothing about a valid key.
    token = ApiToken.objects.select_related("user").filter(key_hash=ApiToken.hash_key(key)).first()
    if token is None or token.revoked or not (token.user.is_active and token.user.is_staff):
        raise InvalidToken("this API token is unknown or revoked, or its owner may no longer use it")
    now = timezone.now()
    if token.last_used is None or now - token.last_used >= LAST_USED_PRECISION:
        ApiToken.objects.filter(pk=token.pk).update(last_used=now)
        token.last_used = now
    return token


def _unauthorized(message: str) -> JsonResponse:
    response = JsonResponse({"error": message}, status=401)
    response["WWW-Authenticate"] = 'Bearer realm="cbir"'
    return response


def check_access(request: HttpRequest, *, api: bool, tokens: bool | None = None) -> HttpResponse | None:
    """None when the request may go on, else the response that refuses it:
    401 JSON for the API (`api`), a redirect to the login page otherwise.
    `tokens` (default: `api`) says whether a Bearer token is read; the one
    used is left on `request.api_token` for the rate limit."""
    token = None
    if api if tokens is None else tokens:
        try:
            token = token_from_request(request)
        except InvalidToken as exc:
            return _unauthorized(str(exc))
    request.api_token = token  # type: ignore[attr-defined]  # read by the rate limit
    if not settings.CBIR_SEARCH_REQUIRES_LOGIN or token is not None or request.user.is_authenticated:
        return None
    if api:
        return _unauthorized("log in, or send an API token: Authorization: Bearer <key>")
    return redirect_to_login(request.get_full_path())


def login_when_required(view):
    """For read-only pages that show the collection (the model pages): the same
    rule as the search pages."""

    @wraps(view)
    def wrapped(request: HttpRequest, *args, **kwargs):
        return check_access(request, api=False) or view(request, *args, **kwargs)

    return wrapped


# --- Client address -----------------------------------------------------------

@lru_cache(maxsize=8)
def _networks(items: tuple[str, ...]) -> tuple:
    return tuple(ipaddress.ip_network(item, strict=False) for item in items)


def _address(text: str):
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def client_ip(request: HttpRequest) -> str:
    """REMOTE_ADDR, unless it is one of CBIR_TRUSTED_PROXIES: then
    X-Forwarded-For is read from the right (each proxy appends the address it
    saw) and the first address that is not a trusted proxy is the client.
    Entries further left were written by the client and are never believed."""
    remote = request.META.get("REMOTE_ADDR", "")
    proxies = _networks(tuple(settings.CBIR_TRUSTED_PROXIES))
    remote_address = _address(remote)
    if not proxies or remote_address is None or not any(remote_address in net for net in proxies):
        return remote
    for hop in reversed(request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")):
        address = _address(hop)
        if address is None:
            break  # garbage where a proxy should have written an address: stop believing the header
        if not any(address in net for net in proxies):
            return str(address)
    return remote


# --- Rate limit ---------------------------------------------------------------

def _clock() -> float:
    return time.time()


_UPSERT = f"""
    INSERT INTO {RateCounter._meta.db_table} AS c (key, window_start, count) VALUES (%s, %s, 1)
    ON CONFLICT (key) DO UPDATE SET
        count = CASE WHEN EXCLUDED.window_start > c.window_start THEN 1 ELSE c.count + 1 END,
        window_start = GREATEST(c.window_start, EXCLUDED.window_start)
    RETURNING count
"""


def rate_key(request: HttpRequest) -> str:
    token = getattr(request, "api_token", None)
    return f"token:{token.pk}" if token is not None else f"ip:{client_ip(request)}"[:100]


def count_search(request: HttpRequest) -> None:
    """Count one search for this client; RateLimited when it is over the limit.

    One statement, atomic under concurrency from any number of processes and
    hosts (the row is locked for the increment). Web servers' clocks decide
    the window; GREATEST keeps a slightly late clock from resetting a count."""
    rate = parse_rate(settings.CBIR_SEARCH_RATE_LIMIT)
    if rate is None:
        return
    limit, period = rate
    now = _clock()
    window = int(now // period) * period
    with connection.cursor() as cursor:
        cursor.execute(_UPSERT, [rate_key(request), window])
        count = cursor.fetchone()[0]
        if random.randrange(CLEANUP_ONE_IN) == 0:
            # Rows whose window has ended are dead: the next search restarts them at 1.
            cursor.execute(f"DELETE FROM {RateCounter._meta.db_table} WHERE window_start < %s", [window])
    if count > limit:
        retry_after = max(1, math.ceil(window + period - now))
        unit = PERIOD_NAMES.get(period, f"{period} s")
        raise RateLimited(f"too many searches: the limit is {limit} per {unit}; try again in {retry_after} s",
                          retry_after)
