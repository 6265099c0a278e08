"""Configuration from the environment: a bad value stops start-up with an
ImproperlyConfigured that names the variable, and the typed readers behind
settings.py parse what they promise."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.conf import settings as django_settings
from django.core.exceptions import ImproperlyConfigured

from cbirsite.env import database_from_url, env_bool, env_choice, env_float, env_int, env_list, env_str

# Variables the start-up cases set; removed from the child's environment first,
# so a value exported in the developer's shell cannot change the outcome.
TESTED = ["DEBUG", "CBIR_DEVICE", "CBIR_MAX_UPLOAD_BYTES", "CBIR_MAX_K", "CBIR_DEFAULT_K", "SECRET_KEY",
          "SECRET_KEY_FILE", "DATABASE_URL_FILE"]


START = "import django; django.setup()"


def _start_django(code: str = START, **overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in TESTED}
    env.update(DJANGO_SETTINGS_MODULE="cbirsite.settings", DATABASE_URL=os.environ["DATABASE_URL"],
               XDG_RUNTIME_DIR=env.get("XDG_RUNTIME_DIR", "/tmp"))
    env.update(overrides)
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=django_settings.BASE_DIR,
                          capture_output=True, text=True, timeout=120)


BAD_ENVIRONMENT = {
    "DEBUG": {"DEBUG": "maybe"},
    "CBIR_DEVICE": {"CBIR_DEVICE": "gpu"},
    "CBIR_MAX_UPLOAD_BYTES": {"CBIR_MAX_UPLOAD_BYTES": "abc"},
    "CBIR_MAX_K": {"CBIR_MAX_K": "0"},
    "DATABASE_URL": {"DATABASE_URL": "sqlite:///x.db"},
    "CBIR_DEFAULT_K": {"CBIR_DEFAULT_K": "500"},
    # Secrets given as files: unreadable, empty, or holding a bad value.
    "SECRET_KEY_FILE": {"SECRET_KEY_FILE": "/nonexistent/secret-key"},
    "DATABASE_URL_FILE": {"DATABASE_URL": "", "DATABASE_URL_FILE": "/dev/null"},
}


def test_the_test_database_url_is_in_the_environment():
    # settings.py exports the embedded server's URL so child processes find it.
    assert database_from_url(os.environ["DATABASE_URL"])["HOST"] == django_settings.DATABASES["default"]["HOST"]


def test_bad_environment_values_stop_start_up_naming_the_variable():
    # One child per bad variable, in parallel: each fails while reading settings,
    # before any app (or torch) is imported, so this stays quick.
    with ThreadPoolExecutor(max_workers=len(BAD_ENVIRONMENT)) as pool:
        results = dict(zip(BAD_ENVIRONMENT, pool.map(lambda env: _start_django(**env), BAD_ENVIRONMENT.values())))
    for name, result in results.items():
        last_line = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
        assert result.returncode != 0, name
        assert last_line.startswith("django.core.exceptions.ImproperlyConfigured:"), (name, result.stderr[-2000:])
        assert name in last_line, (name, last_line)
    assert "PostgreSQL" in results["DATABASE_URL"].stderr
    assert "CBIR_MAX_K" in results["CBIR_DEFAULT_K"].stderr  # says what it is compared with
    assert "cannot be read" in results["SECRET_KEY_FILE"].stderr
    assert "is empty" in results["DATABASE_URL_FILE"].stderr  # not a silent switch to the embedded database


def test_a_good_environment_is_read(tmp_path):
    # Only the settings are loaded (what the failures above exercise), so torch is not imported.
    url_file = tmp_path / "db-url"
    url_file.write_text(os.environ["DATABASE_URL"] + "\n")
    result = _start_django(
        "from django.conf import settings as s; print(s.DEBUG, s.CBIR_DEVICE, s.CBIR_MAX_K, s.CBIR_DEFAULT_K, "
        "s.DATABASES['default']['HOST'])",
        DEBUG="off", CBIR_DEVICE="CPU", CBIR_MAX_K="50", CBIR_DEFAULT_K="50",
        DATABASE_URL="", DATABASE_URL_FILE=str(url_file),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    host = django_settings.DATABASES["default"]["HOST"]
    assert result.stdout.split() == ["False", "cpu", "50", "50", host]


# --- env_bool -------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("1", True), ("true", True), ("TRUE", True), (" yes ", True), ("on", True),
    ("0", False), ("false", False), ("No", False), ("off", False),
])
def test_env_bool_reads_the_usual_spellings(monkeypatch, raw, expected):
    monkeypatch.setenv("CBIR_FLAG", raw)
    assert env_bool("CBIR_FLAG", not expected) is expected


@pytest.mark.parametrize("default", [True, False])
def test_env_bool_unset_or_empty_gives_the_default(monkeypatch, default):
    monkeypatch.delenv("CBIR_FLAG", raising=False)
    assert env_bool("CBIR_FLAG", default) is default
    monkeypatch.setenv("CBIR_FLAG", "  ")
    assert env_bool("CBIR_FLAG", default) is default


@pytest.mark.parametrize("raw", ["maybe", "2", "y", "truee"])
def test_env_bool_refuses_anything_else(monkeypatch, raw):
    monkeypatch.setenv("CBIR_FLAG", raw)
    with pytest.raises(ImproperlyConfigured, match=r"CBIR_FLAG=.*not a boolean"):
        env_bool("CBIR_FLAG", False)


# --- env_int / env_float / env_choice -----------------------------------------

def test_env_int_parses_and_defaults(monkeypatch):
    monkeypatch.delenv("CBIR_N", raising=False)
    assert env_int("CBIR_N", 7) == 7
    monkeypatch.setenv("CBIR_N", " 42 ")
    assert env_int("CBIR_N", 7, minimum=1, maximum=42) == 42
    monkeypatch.setenv("CBIR_N", "-3")
    assert env_int("CBIR_N", 7) == -3


@pytest.mark.parametrize("raw, words", [
    ("abc", "not an integer"), ("1.5", "not an integer"), ("1e3", "not an integer"),
    ("0", "below the minimum 1"), ("101", "above the maximum 100"),
])
def test_env_int_refuses_bad_values_naming_the_variable(monkeypatch, raw, words):
    monkeypatch.setenv("CBIR_N", raw)
    with pytest.raises(ImproperlyConfigured, match="CBIR_N") as info:
        env_int("CBIR_N", 10, minimum=1, maximum=100)
    assert words in str(info.value)


def test_env_float_parses_and_checks_its_range(monkeypatch):
    monkeypatch.setenv("CBIR_X", "0.25")
    assert env_float("CBIR_X", 1.0, minimum=0, maximum=1) == 0.25
    for bad in ("fast", "1.5"):
        monkeypatch.setenv("CBIR_X", bad)
        with pytest.raises(ImproperlyConfigured, match="CBIR_X"):
            env_float("CBIR_X", 1.0, minimum=0, maximum=1)


def test_env_choice_is_case_insensitive_and_refuses_others(monkeypatch):
    monkeypatch.setenv("CBIR_DEVICE", "CUDA")
    assert env_choice("CBIR_DEVICE", "auto", ("auto", "cpu", "cuda")) == "cuda"
    monkeypatch.setenv("CBIR_DEVICE", "gpu")
    with pytest.raises(ImproperlyConfigured, match="CBIR_DEVICE='gpu' must be one of auto, cpu, cuda"):
        env_choice("CBIR_DEVICE", "auto", ("auto", "cpu", "cuda"))


# --- env_list -------------------------------------------------------------------

def test_env_list_splits_on_commas_and_drops_blanks(monkeypatch):
    monkeypatch.setenv("CBIR_HOSTS", " example.org, ,api.example.org ,")
    assert env_list("CBIR_HOSTS", ["localhost"]) == ["example.org", "api.example.org"]


def test_env_list_unset_or_empty_gives_the_default(monkeypatch):
    monkeypatch.delenv("CBIR_HOSTS", raising=False)
    assert env_list("CBIR_HOSTS", ["localhost"]) == ["localhost"]
    monkeypatch.setenv("CBIR_HOSTS", "")
    assert env_list("CBIR_HOSTS", ["localhost"]) == ["localhost"]


# --- env_str and NAME_FILE secrets ------------------------------------------------

def test_env_str_reads_a_secret_from_name_file(monkeypatch, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s3cret-value\n")  # files written by editors and orchestrators end in a newline
    monkeypatch.delenv("CBIR_SECRET", raising=False)
    monkeypatch.setenv("CBIR_SECRET_FILE", str(secret))
    assert env_str("CBIR_SECRET", "default") == "s3cret-value"


def test_env_str_prefers_the_variable_over_the_file(monkeypatch, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("from-file")
    monkeypatch.setenv("CBIR_SECRET", "from-env")
    monkeypatch.setenv("CBIR_SECRET_FILE", str(secret))
    assert env_str("CBIR_SECRET") == "from-env"


def test_env_str_unset_gives_the_default(monkeypatch):
    monkeypatch.delenv("CBIR_SECRET", raising=False)
    monkeypatch.delenv("CBIR_SECRET_FILE", raising=False)
    assert env_str("CBIR_SECRET", "default") == "default"
    assert env_str("CBIR_SECRET") is None


def test_env_str_refuses_an_unreadable_file(monkeypatch, tmp_path):
    monkeypatch.delenv("CBIR_SECRET", raising=False)
    monkeypatch.setenv("CBIR_SECRET_FILE", str(tmp_path / "nowhere"))
    with pytest.raises(ImproperlyConfigured, match="CBIR_SECRET_FILE=.*cannot be read"):
        env_str("CBIR_SECRET", "default")


def test_env_str_refuses_an_empty_secret_file(monkeypatch, tmp_path):
    # An empty DATABASE_URL_FILE must not silently fall back to the embedded database.
    empty = tmp_path / "empty"
    empty.write_text("\n")
    monkeypatch.delenv("CBIR_SECRET", raising=False)
    monkeypatch.setenv("CBIR_SECRET_FILE", str(empty))
    with pytest.raises(ImproperlyConfigured, match="CBIR_SECRET_FILE=.*is empty"):
        env_str("CBIR_SECRET", "default")


# --- database_from_url ------------------------------------------------------------

def test_database_from_url_tcp():
    db = database_from_url("postgresql://cbir:secret@db.example.org:6543/images?sslmode=require")
    assert db["ENGINE"] == "django.db.backends.postgresql"
    assert (db["NAME"], db["USER"], db["PASSWORD"], db["HOST"], db["PORT"]) == (
        "images", "cbir", "secret", "db.example.org", "6543")
    assert db["OPTIONS"] == {"sslmode": "require"}


def test_database_from_url_unix_socket_in_the_query():
    db = database_from_url("postgresql://postgres:@/postgres?host=/work/var/Run%20Dir/pg")
    assert (db["NAME"], db["USER"], db["PASSWORD"], db["HOST"], db["PORT"]) == (
        "postgres", "postgres", "", "/work/var/Run Dir/pg", "")
    assert db["OPTIONS"] == {}  # host is a connection setting, not an option


def test_database_from_url_unix_socket_percent_encoded_in_the_host():
    # libpq's form; the path keeps its case (socket paths are case-sensitive).
    db = database_from_url("postgresql://cbir@%2FUsers%2FAlice%2Fcbir%2Fvar%2Fpg/images")
    assert (db["HOST"], db["NAME"], db["USER"]) == ("/Users/Alice/cbir/var/pg", "images", "cbir")


def test_database_from_url_decodes_user_and_password():
    db = database_from_url("postgres://app%2Buser:p%40ss%3Aw%2Fo%23rd@localhost/my%20db")
    assert (db["USER"], db["PASSWORD"], db["NAME"], db["HOST"]) == ("app+user", "p@ss:w/o#rd", "my db", "localhost")


def test_database_from_url_ipv6_host():
    db = database_from_url("postgresql://u:p@[::1]:5433/d")
    assert (db["HOST"], db["PORT"]) == ("::1", "5433")


def test_database_from_url_defaults_the_database_name():
    assert database_from_url("postgresql://u@localhost")["NAME"] == "postgres"


@pytest.mark.parametrize("url", ["sqlite:///x.db", "mysql://u:p@localhost/d", "localhost:5432/d", ""])
def test_database_from_url_refuses_other_databases(url):
    with pytest.raises(ImproperlyConfigured, match="DATABASE_URL must be a postgresql:// URL"):
        database_from_url(url)


@pytest.mark.parametrize("url", ["postgresql://u@localhost:port/d", "postgresql://u@localhost:99999/d"])
def test_database_from_url_refuses_a_bad_port(url):
    with pytest.raises(ImproperlyConfigured, match="DATABASE_URL has an invalid port"):
        database_from_url(url)


def test_importing_the_settings_without_database_url_starts_no_database(tmp_path):
    """The embedded PostgreSQL starts on a process's first connection
    (cbirsite.embedded_db), not when the settings are imported (a notebook, a
    distributed rank, `manage.py help`)."""
    code = ("import django; django.setup(); from django.conf import settings; "
            "print(settings.DATABASES['default']['ENGINE'], settings.DATABASES['default']['HOST'])")
    env = {k: v for k, v in os.environ.items() if k not in (*TESTED, "DATABASE_URL")}
    env.update(DJANGO_SETTINGS_MODULE="cbirsite.settings", CBIR_VAR_DIR=str(tmp_path / "var"),
               XDG_RUNTIME_DIR=env.get("XDG_RUNTIME_DIR", "/tmp"))
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=django_settings.BASE_DIR,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["cbirsite.embedded_db", str(tmp_path / "var" / "pg")]
    assert not (tmp_path / "var" / "pg").exists()
