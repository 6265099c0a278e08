"""Shared fixtures: a temporary MEDIA_ROOT and weights folder for every test,
tiny images, and a tiny model version (random weights, 32-d)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import image_bytes

if not os.environ.get("XDG_RUNTIME_DIR"):
    # platformdirs (used by the embedded PostgreSQL package) warns without one.
    _xdg = Path("/tmp") / f"cbir-xdg-{os.getuid()}"
    _xdg.mkdir(mode=0o700, exist_ok=True)
    os.environ["XDG_RUNTIME_DIR"] = str(_xdg)


# Float32 networks in the whole suite, this process and the workers and commands it
# starts, whatever the CPU: results that compare rankings then do not depend on
# whether the machine has bfloat16 (AMX / AVX-512 BF16). The bfloat16 path is tested
# on its own, forced (tests/test_precision.py), and "auto" where it says so.
os.environ.setdefault("CBIR_CPU_PRECISION", "float32")

if not os.environ.get("DATABASE_URL"):
    # The embedded server (the settings start nothing): started here, and its URL
    # exported for what the tests start (workers, `manage.py` subprocesses).
    from cbirsite import embedded
    from cbirsite.embedded_db.base import ensure_started

    ensure_started()
    os.environ["DATABASE_URL"] = embedded.POSTGRES_URL


@pytest.fixture(scope="session")
def django_db_modify_db_settings():
    """A test database of this run's own, so two test runs on one server do not collide."""
    from django.conf import settings

    settings.DATABASES["default"].setdefault("TEST", {})["NAME"] = f"test_cbir_{os.getpid()}"


@pytest.fixture(autouse=True)
def _isolated_storage(settings, tmp_path_factory):
    settings.MEDIA_ROOT = tmp_path_factory.mktemp("media")
    settings.CBIR_WEIGHTS_DIR = tmp_path_factory.mktemp("weights")
    settings.CBIR_LOADER_WORKERS = 0
    settings.CBIR_CPU_PRECISION = "float32"  # as the environment above (the settings may be read before it)
    # No search calibration after each index build in this process (tests/test_calibration.py
    # turns it on; worker processes keep the default and calibrate as shipped).
    settings.CBIR_HNSW_CALIBRATION_QUERIES = 0
    return settings.MEDIA_ROOT


@pytest.fixture
def make_image_bytes():
    return image_bytes


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Two labelled classes of distinct noisy images plus junk: 6 red, 6 blue,
    one exact duplicate, one text file, one truncated PNG."""
    root = tmp_path / "photos"
    for offset, (label, color) in enumerate((("red", (250, 20, 20)), ("blue", (20, 20, 250)))):
        folder = root / label
        folder.mkdir(parents=True)
        for i in range(6):
            # Fixed patterns: the same bytes, hence the same splits, in every run.
            (folder / f"{label}-{i}.png").write_bytes(image_bytes(color, pattern=100 * offset + i))
    (root / "red" / "copy-of-red-0.png").write_bytes((root / "red" / "red-0.png").read_bytes())
    (root / "notes.txt").write_text("not an image")
    good = image_bytes((1, 2, 3), size=(64, 64), pattern=99)
    (root / "blue" / "broken.png").write_bytes(good[: len(good) // 2])
    return root


@pytest.fixture
def dataset(db):
    from search.models import Dataset

    return Dataset.objects.create(name="test-set")


@pytest.fixture
def tiny_version(db):
    """A model version of the tiny CNN with saved random weights (explicitly asked for)."""
    from training.versions import get_or_create_version

    return get_or_create_version("tiny", random_weights=True, config={"dimension": 32, "size": 32})


@pytest.fixture
def indexed(db, dataset, image_folder, tiny_version):
    """The image folder imported and indexed with the tiny version, which is active."""
    from search.indexing import build_index
    from search.ingest import import_folder

    import_folder(image_folder, dataset, labels_from_folders=True)
    build_index(dataset, tiny_version)
    tiny_version.activate()
    return dataset


# --- Real Redis and Celery workers --------------------------------------------

@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    from tests.workers import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    from cbirsite.celery import app

    app.conf.broker_url = server.url
    yield server
    server.stop()


@pytest.fixture(scope="session", autouse=True)
def _test_broker(redis_server):
    """Every test talks to this run's private Redis from the first test on: the
    Celery app caches producer pools per broker (its control mailbox too), so a
    first send or ping against another broker misdirected later ones."""
    return redis_server


@pytest.fixture(scope="session")
def shared_media(tmp_path_factory):
    return tmp_path_factory.mktemp("shared-media")


@pytest.fixture(scope="session")
def worker_env(django_db_setup, redis_server, shared_media, tmp_path_factory):
    """Environment for worker processes: the test database, the test Redis, shared media."""
    from django.db import connection

    from tests.workers import database_url

    env = dict(os.environ)
    env.update({
        "DATABASE_URL": database_url(connection.settings_dict),
        "REDIS_URL": redis_server.url,
        "MEDIA_ROOT": str(shared_media),
        "CBIR_WEIGHTS_DIR": str(tmp_path_factory.mktemp("worker-weights")),
        "CBIR_LOADER_WORKERS": "0",
        "CBIR_JOB_STALE_SECONDS": "3",
        "CBIR_RECOVERY_INTERVAL": "0.5",
        "CBIR_JOB_QUEUED_RESEND_SECONDS": "5",
        "CBIR_WORKER_PING_TIMEOUT": "1.0",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    })
    return env


@pytest.fixture(scope="session")
def session_worker(worker_env, tmp_path_factory):
    from cbirsite.celery import app
    from tests.workers import Worker

    worker = Worker("session", worker_env, tmp_path_factory.mktemp("logs") / "session-worker.log").start()
    try:
        worker.wait_ready(app)
        yield worker
    finally:
        worker.stop()  # also when it never became ready: no worker outlives the test run


@pytest.fixture
def live_worker(session_worker, transactional_db, settings, shared_media, redis_server):
    """A running worker that sees this test's committed rows and files."""
    settings.MEDIA_ROOT = shared_media
    settings.CELERY_BROKER_URL = redis_server.url
    settings.CBIR_WORKER_PING_TIMEOUT = 2.0
    yield session_worker
    session_worker.wait_idle()  # before the flush: see Worker.wait_idle


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item (the browser fixture screenshots failures)."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
