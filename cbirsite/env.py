"""Typed readers for settings that come from the environment.

Every reader returns the default when the variable is unset or empty and raises
ImproperlyConfigured with the variable's name and the bad value otherwise, so a
typo stops start-up instead of silently running with a wrong setting.
A secret may also be given as NAME_FILE, the path of a file that holds it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import overload
from urllib.parse import parse_qs, unquote, urlparse

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def env_str(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    if value:
        return value
    file_name = os.environ.get(f"{name}_FILE")
    if file_name:
        try:
            value = Path(file_name).read_text().strip()
        except OSError as exc:
            raise ImproperlyConfigured(f"{name}_FILE={file_name!r} cannot be read: {exc}") from exc
        if not value:
            # A secret file that was named but is empty is a mistake, not "unset":
            # an empty DATABASE_URL_FILE would otherwise start the embedded database.
            raise ImproperlyConfigured(f"{name}_FILE={file_name!r} is empty")
        return value
    return default


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name}={value!r} is not a boolean; use one of {sorted(_TRUE | _FALSE)}")


@overload
def env_int(name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int: ...
@overload
def env_int(name: str, default: None, *, minimum: int | None = None, maximum: int | None = None) -> int | None: ...


def env_int(name: str, default: int | None, *, minimum: int | None = None, maximum: int | None = None) -> int | None:
    """An integer; `default` (None allowed: "unset") when the variable is unset or empty."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name}={value} is below the minimum {minimum}")
    if maximum is not None and value > maximum:
        raise ImproperlyConfigured(f"{name}={value} is above the maximum {maximum}")
    return value


_BYTE_UNITS = {"": 1, "b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3, "tb": 1024**4}


def env_bytes(name: str, default: int, *, minimum: int | None = None) -> int:
    """A size in bytes: "1073741824", "512MB", "4GB" (units are powers of 1,024, as PostgreSQL reads them)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    number = raw.rstrip("bBkKmMgGtT ")
    unit = raw[len(number):].strip().lower()
    if unit and not unit.endswith("b"):
        unit += "b"
    try:
        value = int(float(number) * _BYTE_UNITS[unit])
    except (ValueError, KeyError):
        raise ImproperlyConfigured(f"{name}={raw!r} is not a size; write e.g. 4GB, 512MB or a number of bytes") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name}={raw!r} is below the minimum of {minimum} bytes")
    return value


def env_float(name: str, default: float, *, minimum: float | None = None, maximum: float | None = None) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a number") from None
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ImproperlyConfigured(f"{name}={value} is outside [{minimum}, {maximum}]")
    return value


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(name, "").strip().lower() or default
    if value not in choices:
        raise ImproperlyConfigured(f"{name}={value!r} must be one of {', '.join(choices)}")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def database_from_url(url: str, variable: str = "DATABASE_URL") -> dict:
    """Turn postgresql://user:pass@host:port/name?host=/socket/dir into Django's
    DATABASES entry; `variable` is where it came from, for the error message."""
    parsed = urlparse(url)
    if parsed.scheme not in ("postgres", "postgresql", "pgsql"):
        raise ImproperlyConfigured(
            f"{variable} must be a postgresql:// URL (this project needs PostgreSQL with pgvector); got scheme {parsed.scheme!r}"
        )
    query = {key: values[-1] for key, values in parse_qs(parsed.query).items()}
    host = query.pop("host", None) or unquote(parsed.hostname or "")
    name = unquote(parsed.path.lstrip("/")) or "postgres"
    try:
        port = parsed.port
    except ValueError:
        raise ImproperlyConfigured(f"{variable} has an invalid port: {url!r}") from None
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": name,
        "USER": unquote(parsed.username or ""),
        "PASSWORD": unquote(parsed.password or ""),
        "HOST": host,
        "PORT": str(port or ""),
        "OPTIONS": query,
        "CONN_MAX_AGE": 60,
        "CONN_HEALTH_CHECKS": True,
    }


# Window lengths a rate may use: "60/m" is 60 per minute ("60/minute" also reads).
RATE_PERIODS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60,
                "h": 3600, "hour": 3600, "d": 86400, "day": 86400}


def parse_rate(value: str) -> tuple[int, int] | None:
    """"60/m" -> (60, 60): that many requests per fixed window of that many
    seconds. "0" or "off" -> None (no limit). ValueError on anything else."""
    text = value.strip().lower().replace(" ", "")
    if text in ("0", "off"):
        return None
    count, sep, unit = text.partition("/")
    seconds = RATE_PERIODS.get(unit) or (RATE_PERIODS.get(unit[:-1]) if len(unit) > 3 and unit[-1] == "s" else None)
    if not sep or not count.isdigit() or int(count) < 1 or seconds is None:
        raise ValueError(f"{value!r} is not a rate: write COUNT/UNIT with a unit of s, m, h or d "
                         "(e.g. 60/m), or 0 for no limit")
    return int(count), seconds


def env_rate(name: str, default: str) -> str:
    """A rate such as "60/m" or "0" (off), checked now and returned as written."""
    value = os.environ.get(name, "").strip() or default
    try:
        parse_rate(value)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name}: {exc}") from None
    return value


def env_networks(name: str) -> list[str]:
    """Comma-separated IP addresses or networks (10.0.0.0/8), each checked."""
    import ipaddress

    items = env_list(name, [])
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ImproperlyConfigured(f"{name}: {item!r} is not an IP address or network") from None
    return items
