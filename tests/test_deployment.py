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
