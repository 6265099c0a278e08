"""docker-compose.yml is checked by parsing (there is no Docker engine here):
it must describe the documented services, and every command it runs must
exist in this project."""

import shlex
from pathlib import Path

import pytest
import tomllib
import yaml
from django.core.management import get_commands

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def declared_packages():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        names += extra
    return {n.split(">")[0].split("=")[0].split("[")[0].split(";")[0].strip().lower() for n in names}


def test_compose_has_the_services_of_a_deployment(compose):
    services = compose["services"]
    assert {"db", "redis", "web", "worker", "migrate", "flower"} <= set(services)
    assert services["db"]["image"].startswith("pgvector/pgvector")
    assert "--appendonly" in services["redis"]["command"]
    for name in ("db", "redis", "web", "worker"):
        assert "healthcheck" in services[name], name
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert {"pgdata", "media"} <= set(compose["volumes"])
    assert services["flower"]["profiles"] == ["monitoring"]


def _command(service) -> list[str]:
    command = service.get("command")
    return shlex.split(command) if isinstance(command, str) else list(command or [])


def test_every_command_exists_in_the_project(compose, declared_packages, settings):
    commands = get_commands()
    seen = set()
    for name, service in compose["services"].items():
        argv = _command(service)
        if not argv or "image" in service and "build" not in service and not name.startswith("x-"):
            continue  # third-party images run their own commands
        program = argv[0]
        seen.add(program)
        if program == "python":
            assert argv[1] == "manage.py" and argv[2] in commands, argv
        elif program == "celery":
            assert "celery" in declared_packages and argv[1:3] == ["-A", "cbirsite"]
            sub = argv[3]
            if sub == "worker":
                from search import jobs

                queues = set(argv[argv.index("-Q") + 1].split(","))
                routed = set(jobs.queues())  # every registered job kind's queue
                assert routed <= queues, (routed, queues)
            else:
                assert sub == "flower" and "flower" in declared_packages
        elif program == "gunicorn":
            assert "gunicorn" in declared_packages and argv[1] == "cbirsite.wsgi:application"
            from cbirsite.wsgi import application  # noqa: F401 - it must import
        else:
            pytest.fail(f"{name}: unknown program {program}")
    assert {"python", "celery", "gunicorn"} <= seen


def test_health_check_url_exists(client, db):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"ok": True}


def test_the_example_environment_names_real_settings():
    names = [line.split("=")[0] for line in (ROOT / ".env.example").read_text().splitlines()
             if line and not line.startswith("#")]
    settings_text = (ROOT / "cbirsite" / "settings.py").read_text()
    for name in names:
        if name == "POSTGRES_PASSWORD":
            continue  # read by the database image
        assert f'"{name}"' in settings_text, name


def test_dockerfile_copies_what_the_app_needs():
    text = (ROOT / "Dockerfile").read_text()
    for folder in ("cbirsite", "search", "training", "templates", "manage.py"):
        assert f"COPY {folder}" in text


def test_the_database_gets_the_settings_the_embedded_one_gets(compose):
    """The same postgresql.conf settings as cbirsite/machine.py sizes for the
    embedded server, as `postgres -c` flags, and shared memory for a parallel build."""
    from cbirsite.machine import postgres_settings

    db = compose["services"]["db"]
    argv = _command(db)
    assert argv[0] == "postgres"
    flags = {argv[i + 1].split("=", 1)[0] for i, a in enumerate(argv) if a == "-c"}
    assert set(postgres_settings()) <= flags
    assert db["shm_size"]


def _ensure_test_packages(tmp_path, fashion_dir):
    """Run scripts/cbir's ensure_test_packages as root with a fake apt-get that records its arguments
    (Chromium, its driver and Redis faked present), and return what it was asked to install."""
    import os
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "apt.log"
    log.unlink(missing_ok=True)
    fakes = {"apt-get": f'echo "$@" >> {shlex.quote(str(log))}', "id": "echo 0",
             "chromium": "true", "chromedriver": "true", "redis-server": "true"}
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    script = f"source scripts/cbir && FASHION_PACKAGE_DIR={shlex.quote(str(fashion_dir))} && ensure_test_packages"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CBIR_VAR_DIR": str(tmp_path / "var")}
    subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, check=True, capture_output=True, timeout=60)
    return log.read_text().splitlines() if log.exists() else []


def test_the_test_command_installs_fashion_mnist_when_it_is_missing(tmp_path):
    calls = _ensure_test_packages(tmp_path, tmp_path / "no-such-dir")
    assert any(c.startswith("install") and "dataset-fashion-mnist" in c.split() for c in calls), calls
    (tmp_path / "present").mkdir()
    assert _ensure_test_packages(tmp_path, tmp_path / "present") == []
