"""CBIR_PRODUCTION: refuses to start with DEBUG on or the published secret key,
and turns on what `manage.py check --deploy` asks for (HTTPS redirect, secure
cookies, HSTS, security headers), so the check finds no issues."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

import pytest
from django.conf import settings as django_settings
from django.test import Client

# Removed from the child's environment first, so a value exported in the
# developer's shell cannot change the outcome.
CLEARED = ["DEBUG", "SECRET_KEY", "SECRET_KEY_FILE", "ALLOWED_HOSTS", "CBIR_PRODUCTION", "CBIR_BEHIND_TLS_PROXY",
           "SECURE_SSL_REDIRECT", "SECURE_HSTS_SECONDS", "SECURE_HSTS_INCLUDE_SUBDOMAINS", "SECURE_HSTS_PRELOAD"]


def _run(args: list[str], **overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update(DJANGO_SETTINGS_MODULE="cbirsite.settings", DATABASE_URL=os.environ["DATABASE_URL"],
               XDG_RUNTIME_DIR=env.get("XDG_RUNTIME_DIR", "/tmp"))
    env.update(overrides)
    return subprocess.run([sys.executable, *args], env=env, cwd=django_settings.BASE_DIR,
                          capture_output=True, text=True, timeout=300)


def _production(**extra: str) -> dict:
    return {"CBIR_PRODUCTION": "1", "DEBUG": "0", "SECRET_KEY": secrets.token_urlsafe(50),
            "ALLOWED_HOSTS": "example.org", **extra}


def test_check_deploy_finds_no_issues_in_production():
    result = _run(["manage.py", "check", "--deploy"], **_production())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "System check identified no issues (0 silenced)." in result.stdout, result.stdout + result.stderr


def test_check_deploy_warns_about_the_development_defaults():
    # The same check on the laptop defaults: the production switch is what fixes these.
    result = _run(["manage.py", "check", "--deploy"])
    for warning in ("security.W004", "security.W008", "security.W012", "security.W016", "security.W018"):
        assert warning in result.stderr + result.stdout, warning


@pytest.mark.parametrize("overrides, named", [
    ({"DEBUG": "1"}, "DEBUG"),
    ({"SECRET_KEY": ""}, "SECRET_KEY"),
    ({"SECRET_KEY": "insecure-dev-key-change-me-for-any-real-deployment"}, "SECRET_KEY"),
])
def test_production_refuses_to_start_with_debug_or_the_default_key(overrides, named):
    result = _run(["-c", "import django; django.setup()"], **_production(**overrides))
    last_line = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    assert result.returncode != 0
    assert last_line.startswith("django.core.exceptions.ImproperlyConfigured:") and named in last_line, last_line
    assert "CBIR_PRODUCTION" in last_line


def test_production_settings_and_their_overrides():
    code = ("from django.conf import settings as s; print(s.DEBUG, s.SECURE_SSL_REDIRECT, s.SESSION_COOKIE_SECURE, "
            "s.CSRF_COOKIE_SECURE, s.SECURE_HSTS_SECONDS, s.SECURE_HSTS_INCLUDE_SUBDOMAINS, s.SECURE_HSTS_PRELOAD, "
            "s.X_FRAME_OPTIONS, getattr(s, 'SECURE_PROXY_SSL_HEADER', None))")
    default = _run(["-c", code], **_production(DEBUG=""))  # DEBUG defaults to off in production
    assert default.stdout.split() == ["False", "True", "True", "True", "31536000", "True", "True", "DENY", "None"], \
        default.stderr[-2000:]
    tuned = _run(["-c", code], **_production(SECURE_HSTS_SECONDS="3600", SECURE_HSTS_PRELOAD="0",
                                            SECURE_SSL_REDIRECT="0", CBIR_BEHIND_TLS_PROXY="1"))
    assert tuned.stdout.split()[:7] == ["False", "False", "True", "True", "3600", "True", "False"]
    assert "('HTTP_X_FORWARDED_PROTO', 'https')" in tuned.stdout
    laptop = _run(["-c", code])
    assert laptop.stdout.split()[:7] == ["True", "False", "False", "False", "0", "False", "False"]


def test_https_redirect_spares_the_health_check(db, settings):
    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_HSTS_SECONDS = 31536000
    client = Client()  # a new handler reads the changed settings
    assert client.get("/healthz").status_code == 200
    response = client.get("/search/")
    assert response.status_code == 301 and response["Location"] == "https://testserver/search/"
    secure = client.get("/search/", secure=True)
    assert secure.status_code == 200 and secure["Strict-Transport-Security"].startswith("max-age=31536000")
    assert secure["X-Frame-Options"] == "DENY" and secure["X-Content-Type-Options"] == "nosniff"
    assert secure["Referrer-Policy"] == "same-origin"
