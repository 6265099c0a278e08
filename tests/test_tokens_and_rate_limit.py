"""API tokens (created in the admin, key shown once, only its hash stored) and
the per-client search rate limit (a fixed-window counter in PostgreSQL)."""

from __future__ import annotations

import io
import threading

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.test import RequestFactory

from cbirsite.env import env_networks, env_rate, parse_rate
from search import access
from search.models import ApiToken, Image, RateCounter


@pytest.fixture
def staff(client, django_user_model):
    user = django_user_model.objects.create_user("editor", password="a-long-password-1", is_staff=True,
                                                 is_superuser=True)
    client.force_login(user)
    return user


@pytest.fixture
def token_and_key(django_user_model, db):
    owner = django_user_model.objects.create_user("owner", password="a-long-password-1", is_staff=True)
    token = ApiToken(name="partner", user=owner)
    key = token.set_new_key()
    token.save()
    return token, key


# What a search gets in an empty database: past the limit, refused for want of an index.
NO_INDEX = 503


def _bearer(key: str) -> dict:
    return {"HTTP_AUTHORIZATION": f"Bearer {key}"}


# --- Tokens -------------------------------------------------------------------

def test_a_token_created_in_the_admin_shows_its_key_once_and_stores_only_its_hash(client, staff):
    response = client.post("/admin/search/apitoken/add/", {"name": "mobile app", "user": staff.pk})
    assert response.status_code == 200 and b"shown only this once" in response.content
    assert "no-store" in response["Cache-Control"]
    key = response.context["key"]
    assert key.startswith(ApiToken.KEY_PREFIX) and len(key) > 40
    token = ApiToken.objects.get()
    assert token.user == staff and token.key_hash == ApiToken.hash_key(key) and key[:12] == token.prefix
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM search_apitoken")
        assert key not in repr(cursor.fetchall())
    for url in ("/admin/search/apitoken/", f"/admin/search/apitoken/{token.pk}/change/"):
        page = client.get(url)
        assert page.status_code == 200 and key.encode() not in page.content


def test_a_valid_token_opens_the_api_when_login_is_required(client, indexed, token_and_key, settings):
    settings.CBIR_SEARCH_REQUIRES_LOGIN = True
    token, key = token_and_key
    image = Image.objects.filter(label="red").first()
    assert client.get(f"/api/images/{image.pk}/similar?k=3").status_code == 401
    response = client.get(f"/api/images/{image.pk}/similar?k=3", **_bearer(key))
    assert response.status_code == 200 and len(response.json()["results"]) == 3
    upload = client.post("/api/search", {"image": io.BytesIO(Image.objects.first().file.read())}, **_bearer(key))
    assert upload.status_code == 200
    thumbnail = response.json()["results"][0]["thumbnail_url"]
    assert client.get(thumbnail, **_bearer(key)).status_code == 200
    token.refresh_from_db()
    assert token.last_used is not None


def test_a_bad_token_is_refused_even_when_search_is_public(client, indexed, token_and_key, settings):
    settings.CBIR_SEARCH_REQUIRES_LOGIN = False
    image = Image.objects.first()
    for header in ("Bearer wrong", "Bearer ", "bearer cbir_nope"):
        response = client.get(f"/api/images/{image.pk}/similar", HTTP_AUTHORIZATION=header)
        assert response.status_code == 401 and "error" in response.json(), header
    # Another scheme (a proxy's Basic auth) is not ours to judge.
    assert client.get(f"/api/images/{image.pk}/similar", HTTP_AUTHORIZATION="Basic dXNlcjpwYXNz").status_code == 200


@pytest.mark.parametrize("change", ["revoked", "owner deactivated", "owner no longer staff"])
def test_a_token_stops_working(change, client, indexed, token_and_key):
    token, key = token_and_key
    image = Image.objects.first()
    url = f"/api/images/{image.pk}/similar"
    assert client.get(url, **_bearer(key)).status_code == 200
    if change == "revoked":
        token.revoked = True
        token.save()
    else:
        setattr(token.user, "is_active" if change == "owner deactivated" else "is_staff", False)
        token.user.save()
    response = client.get(url, **_bearer(key))
    assert response.status_code == 401 and "revoked" in response.json()["error"]


def test_the_revoke_action_in_the_admin(client, staff, token_and_key):
    token, key = token_and_key
    response = client.post("/admin/search/apitoken/", {"action": "revoke", "_selected_action": [token.pk]})
    assert response.status_code == 302
    token.refresh_from_db()
    assert token.revoked


def test_no_bulk_write_or_stale_form_un_revokes_a_token(client, staff, token_and_key):
    from django.core.exceptions import ValidationError
    from django.db import transaction
    from django.db.models import Value
    from django.test.utils import CaptureQueriesContext

    token, key = token_and_key
    stale = ApiToken.objects.get(pk=token.pk)  # read before the revocation, as a form opened earlier
    assert client.post("/admin/search/apitoken/", {"action": "revoke", "_selected_action": [token.pk]}).status_code == 302
    for write in (lambda: ApiToken.objects.filter(pk=token.pk).update(revoked=False),
                  lambda: ApiToken.objects.update(revoked=Value(False)),
                  lambda: ApiToken.objects.bulk_update([stale], ["revoked"]),
                  lambda: ApiToken.objects.bulk_update([stale], ["name", "revoked"]),
                  stale.save):
        # (bulk_update's own atomic block marks the enclosing one for rollback: a savepoint of the test's)
        with pytest.raises(ValidationError, match="revocation is final"), transaction.atomic():
            write()
        assert ApiToken.objects.get(pk=token.pk).revoked
    # Saving an unrevoked token never writes the column: a revocation committed between
    # save()'s check and its UPDATE survives it.
    other = ApiToken(name="other", user=token.user)
    other.set_new_key()
    other.save()
    loaded = ApiToken.objects.get(pk=other.pk)
    loaded.name = "renamed"
    with CaptureQueriesContext(connection) as queries:
        loaded.save()
    updates = [q["sql"] for q in queries if q["sql"].startswith("UPDATE")]
    assert updates and all('"revoked"' not in sql for sql in updates)
    assert ApiToken.objects.get(pk=other.pk).name == "renamed"
    assert ApiToken.objects.filter(pk=other.pk).update(revoked=True) == 1  # revoking in bulk still works


def test_revocation_is_final_in_the_admin_the_model_and_the_api(client, staff, indexed, token_and_key):
    from django.core.exceptions import ValidationError

    token, key = token_and_key
    url = f"/api/images/{Image.objects.first().pk}/similar"
    change = f"/admin/search/apitoken/{token.pk}/change/"
    assert client.get(url, **_bearer(key)).status_code == 200
    # Before revocation the admin offers the box; tick it.
    assert b'name="revoked"' in client.get(change).content
    response = client.post(change, {"name": "partner", "revoked": "on"})
    assert response.status_code == 302, response.content.decode()[-2000:]
    token.refresh_from_db()
    assert token.revoked and client.get(url, **_bearer(key)).status_code == 401
    # Revoked: the box is gone; a form posted without it (unticked) changes the name, never the revocation.
    page = client.get(change)
    assert page.status_code == 200 and b'name="revoked"' not in page.content
    assert client.post(change, {"name": "partner, renamed"}).status_code == 302
    token.refresh_from_db()
    assert token.name == "partner, renamed" and token.revoked
    assert client.get(url, **_bearer(key)).status_code == 401
    # The model refuses too, with words (a script, the shell, another form).
    token.revoked = False
    with pytest.raises(ValidationError, match="revocation is final"):
        token.full_clean()
    with pytest.raises(ValidationError, match="revocation is final"):
        token.save()
    assert ApiToken.objects.get(pk=token.pk).revoked
    response = client.get(url, **_bearer(key))
    assert response.status_code == 401 and "revoked" in response.json()["error"]


def test_a_token_never_opens_staff_pages(client, token_and_key):
    _, key = token_and_key
    assert client.get("/jobs/", **_bearer(key)).status_code == 302
    assert client.get("/jobs/1/status", **_bearer(key)).status_code == 403
    assert client.get("/admin/", **_bearer(key)).status_code == 302


# --- Rate limit -----------------------------------------------------------------

def test_rate_settings_are_parsed_and_checked(monkeypatch):
    assert parse_rate("60/m") == (60, 60) and parse_rate("1000/hour") == (1000, 3600)
    assert parse_rate("5/s") == (5, 1) and parse_rate("0") is None and parse_rate("off") is None
    for bad in ("60", "x/m", "0/m", "60/week", "60/ms"):
        with pytest.raises(ValueError):
            parse_rate(bad)
    monkeypatch.setenv("CBIR_SEARCH_RATE_LIMIT", "sixty")
    with pytest.raises(ImproperlyConfigured, match="CBIR_SEARCH_RATE_LIMIT"):
        env_rate("CBIR_SEARCH_RATE_LIMIT", "60/m")
    monkeypatch.setenv("CBIR_TRUSTED_PROXIES", "10.0.0.0/8, proxy.example.org")
    with pytest.raises(ImproperlyConfigured, match="proxy.example.org"):
        env_networks("CBIR_TRUSTED_PROXIES")


def test_over_the_limit_the_api_answers_429_with_retry_after(client, indexed, settings):
    settings.CBIR_SEARCH_RATE_LIMIT = "3/m"
    image = Image.objects.first()
    url = f"/api/images/{image.pk}/similar?k=2"
    assert [client.get(url).status_code for _ in range(3)] == [200, 200, 200]
    response = client.get(url)
    assert response.status_code == 429 and "3 per minute" in response.json()["error"]
    assert 1 <= int(response["Retry-After"]) <= 60
    # Uploads count in the same budget.
    assert client.post("/api/search", {"image": io.BytesIO(b"x")}).status_code == 429


def test_over_the_limit_the_pages_answer_429_with_a_message(client, db, settings, make_image_bytes):
    settings.CBIR_SEARCH_RATE_LIMIT = "2/h"
    for _ in range(5):
        assert client.get("/search/").status_code == 200  # showing the form is not a search
    data = make_image_bytes(pattern=1)
    # Failed searches count too (503 here: no index is ready).
    assert [client.post("/search/", {"image": io.BytesIO(data)}).status_code for _ in range(2)] == [503, 503]
    response = client.post("/search/", {"image": io.BytesIO(data)})
    assert response.status_code == 429 and b"too many searches" in response.content
    assert client.get("/images/1/similar/").status_code == 429
    assert int(response["Retry-After"]) <= 3600


def test_each_client_has_its_own_budget(client, db, settings, token_and_key):
    settings.CBIR_SEARCH_RATE_LIMIT = "1/m"
    _, key = token_and_key
    url = "/api/images/1/similar"
    assert client.get(url, REMOTE_ADDR="192.0.2.1").status_code == NO_INDEX
    assert client.get(url, REMOTE_ADDR="192.0.2.1").status_code == 429
    assert client.get(url, REMOTE_ADDR="192.0.2.2").status_code == NO_INDEX
    # A token has its own budget, whatever address it comes from.
    assert client.get(url, REMOTE_ADDR="192.0.2.1", **_bearer(key)).status_code == NO_INDEX
    assert client.get(url, REMOTE_ADDR="192.0.2.2", **_bearer(key)).status_code == 429


def test_x_forwarded_for_is_ignored_unless_the_proxy_is_trusted(client, db, settings):
    settings.CBIR_SEARCH_RATE_LIMIT = "1/m"
    settings.CBIR_TRUSTED_PROXIES = []
    url = "/api/images/1/similar"
    assert client.get(url, REMOTE_ADDR="198.51.100.7", HTTP_X_FORWARDED_FOR="203.0.113.1").status_code == NO_INDEX
    # A new X-Forwarded-For does not make a new client.
    assert client.get(url, REMOTE_ADDR="198.51.100.7", HTTP_X_FORWARDED_FOR="203.0.113.2").status_code == 429


def test_behind_trusted_proxies_the_client_is_the_first_untrusted_hop_from_the_right(settings):
    settings.CBIR_TRUSTED_PROXIES = ["10.0.0.0/8", "192.168.1.1"]
    factory = RequestFactory()

    def ip(remote, forwarded=None):
        extra = {"HTTP_X_FORWARDED_FOR": forwarded} if forwarded is not None else {}
        return access.client_ip(factory.get("/", REMOTE_ADDR=remote, **extra))

    assert ip("10.1.2.3", "203.0.113.9") == "203.0.113.9"
    # Client-written entries (left) are not believed: the proxy appended what it saw.
    assert ip("10.1.2.3", "1.1.1.1, 203.0.113.9") == "203.0.113.9"
    assert ip("10.1.2.3", "1.1.1.1, 203.0.113.9, 192.168.1.1") == "203.0.113.9"
    assert ip("10.1.2.3", "") == "10.1.2.3"
    assert ip("10.1.2.3", "203.0.113.9, not-an-address") == "10.1.2.3"
    assert ip("198.51.100.7", "203.0.113.9") == "198.51.100.7"  # not from a trusted proxy
    assert ip("10.1.2.3", "2001:db8::1") == "2001:db8::1"


def test_a_new_window_starts_a_new_count(db, settings, monkeypatch):
    settings.CBIR_SEARCH_RATE_LIMIT = "2/m"
    request = RequestFactory().get("/", REMOTE_ADDR="192.0.2.50")
    request.api_token = None
    now = [600.0]  # the start of a minute
    monkeypatch.setattr(access, "_clock", lambda: now[0])
    access.count_search(request)
    access.count_search(request)
    now[0] = 659.2
    with pytest.raises(access.RateLimited) as raised:
        access.count_search(request)
    assert raised.value.retry_after == 1 and raised.value.status == 429
    now[0] = 660.0
    access.count_search(request)  # a new window
    # A web server whose clock is a little behind does not reset the count.
    now[0] = 659.9
    access.count_search(request)
    assert RateCounter.objects.get(key="ip:192.0.2.50").count == 2
    now[0] = 660.5
    with pytest.raises(access.RateLimited):
        access.count_search(request)


def test_zero_turns_the_limit_off(client, db, settings):
    settings.CBIR_SEARCH_RATE_LIMIT = "0"
    assert {client.get("/api/images/1/similar").status_code for _ in range(20)} == {NO_INDEX}
    assert not RateCounter.objects.exists()


def test_counting_is_exact_under_concurrency(transactional_db, settings):
    """Many threads (each its own database connection) count at once: the
    upsert loses no increment and lets exactly `limit` searches through."""
    settings.CBIR_SEARCH_RATE_LIMIT = "37/h"
    threads, per_thread = 8, 10
    allowed, refused = [], []
    barrier = threading.Barrier(threads)

    def worker():
        from django.db import connection as thread_connection

        request = RequestFactory().get("/", REMOTE_ADDR="192.0.2.99")
        request.api_token = None
        barrier.wait()
        try:
            for _ in range(per_thread):
                try:
                    access.count_search(request)
                    allowed.append(1)
                except access.RateLimited:
                    refused.append(1)
        finally:
            thread_connection.close()

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=60)
    assert RateCounter.objects.get(key="ip:192.0.2.99").count == threads * per_thread
    assert len(allowed) == 37 and len(refused) == threads * per_thread - 37


def test_old_windows_are_cleaned_up(db, settings, monkeypatch):
    settings.CBIR_SEARCH_RATE_LIMIT = "5/m"
    RateCounter.objects.create(key="ip:192.0.2.1", window_start=0, count=3)
    monkeypatch.setattr(access, "CLEANUP_ONE_IN", 1)
    request = RequestFactory().get("/", REMOTE_ADDR="192.0.2.2")
    request.api_token = None
    access.count_search(request)
    assert list(RateCounter.objects.values_list("key", flat=True)) == ["ip:192.0.2.2"]
