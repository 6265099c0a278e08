"""HEIC and AVIF through every way in (stored as uploaded, JPEG thumbnails),
the accepted-formats list on the page, and issue 11's small things: 411 for
an upload without Content-Length, no empty dataset left by an import that
imported nothing, and the API's "notice" when a search has fewer results."""

from __future__ import annotations

import io
import re
import socket
import zipfile
from pathlib import Path

import pytest
from django.core.management import call_command
from PIL import Image as PILImage

from search.imaging import ACCEPTED_FORMATS_TEXT, decode_image
from search.ingest import add_image, import_folder, import_zip
from search.models import Dataset, Image
from tests import badinput as corpus
from training.core.preprocessing import load_rgb

ORANGE = (240, 120, 20)


def _orange(fmt: str) -> bytes:
    image = PILImage.new("RGB", (40, 30), ORANGE)
    return corpus.heic(image) if fmt == "HEIC" else corpus.avif(image)


def _close(actual, expected, tolerance: int) -> bool:
    return max(abs(int(a) - int(e)) for a, e in zip(actual, expected)) <= tolerance


# --- HEIC and AVIF --------------------------------------------------------------------

@pytest.mark.parametrize("fmt,extension", [("HEIC", "heic"), ("AVIF", "avif")])
def test_heic_and_avif_are_stored_as_uploaded_with_a_jpeg_thumbnail(fmt, extension, dataset, settings):
    data = _orange(fmt)
    image, created = add_image(dataset, data, f"IMG_0001.{extension.upper()}")
    assert created and image.file.name.endswith(f".{extension}") and image.thumbnail.name.endswith(".jpg")
    stored = Path(settings.MEDIA_ROOT) / image.file.name
    assert stored.read_bytes() == data  # the original, byte for byte
    thumbnail = (Path(settings.MEDIA_ROOT) / image.thumbnail.name).read_bytes()
    assert thumbnail[:3] == b"\xff\xd8\xff"
    assert _close(PILImage.open(io.BytesIO(thumbnail)).convert("RGB").getpixel((10, 10)), ORANGE, 16)
    assert (image.width, image.height) == (40, 30)
    # Indexing and training read the stored file.
    assert _close(load_rgb(stored).getpixel((10, 10)), ORANGE, 16)


@pytest.mark.parametrize("fmt,content_type", [("HEIC", "image/heic"), ("AVIF", "image/avif")])
def test_a_stored_heic_or_avif_is_served_with_its_type(fmt, content_type, dataset, client):
    image, _ = add_image(dataset, _orange(fmt), f"photo.{fmt.lower()}")
    response = client.get(f"/media/{image.file.name}")
    assert response.status_code == 200 and response["Content-Type"] == content_type
    assert client.get(f"/media/{image.thumbnail.name}")["Content-Type"] == "image/jpeg"


def test_heic_and_avif_are_imported_from_a_folder_and_a_zip(dataset, tmp_path):
    folder = tmp_path / "photos" / "fruit"
    folder.mkdir(parents=True)
    (folder / "a.heic").write_bytes(_orange("HEIC"))
    (folder / "b.avif").write_bytes(_orange("AVIF"))
    report = import_folder(tmp_path / "photos", dataset, labels_from_folders=True)
    assert (report.imported, report.rejected) == (2, [])
    zipped = Dataset.objects.create(name="zipped")
    path = tmp_path / "photos.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("fruit/IMG_1.HEIC", _orange("HEIC"))
        archive.writestr("fruit/IMG_2.avif", _orange("AVIF"))
    report = import_zip(path, zipped, labels_from_folders=True)
    assert (report.imported, report.rejected) == (2, [])
    assert sorted(Path(f).suffix for f in zipped.images.values_list("file", flat=True)) == [".avif", ".heic"]
    assert set(Image.objects.values_list("label", flat=True)) == {"fruit"}


@pytest.mark.parametrize("fmt", ["HEIC", "AVIF"])
def test_a_heic_or_avif_upload_is_searched(fmt, client, indexed):
    upload = io.BytesIO(_orange(fmt))
    upload.name = f"photo.{fmt.lower()}"
    response = client.post("/api/search", {"image": upload, "k": "3"})
    assert response.status_code == 200, response.content
    assert len(response.json()["results"]) == 3


def test_the_upload_page_and_the_admin_list_the_accepted_formats(client, admin_client, db):
    page = client.get("/").content.decode()
    assert ACCEPTED_FORMATS_TEXT in page and "HEIC/HEIF" in page and "AVIF" in page
    assert re.search(r'accept="image/\*,\.heic,\.heif,\.avif"', page)
    assert ACCEPTED_FORMATS_TEXT in admin_client.get("/admin/search/image/add/").content.decode()


def test_the_docs_list_the_same_formats():
    docs = (Path(__file__).parent.parent / "docs" / "bad-input.md").read_text()
    assert f"accepted: {ACCEPTED_FORMATS_TEXT}" in docs


def test_a_refused_upload_names_its_format_on_the_api_and_the_page(client, indexed):
    for path in ("/api/search", "/search/"):
        upload = io.BytesIO(corpus.encode(corpus.noise(seed=8), "TIFF"))
        upload.name = "scan.tif"
        response = client.post(path, {"image": upload})
        assert response.status_code == 400
        text = response.json()["error"] if path.startswith("/api") else response.content.decode()
        assert "detected: TIFF" in text and "HEIC/HEIF" in text


# --- 411: an upload without Content-Length ------------------------------------------------

@pytest.mark.parametrize("path", ["/api/search", "/search/"])
def test_an_upload_without_content_length_gets_411(path, client, indexed):
    response = client.generic("POST", path, b"", HTTP_TRANSFER_ENCODING="chunked",
                              CONTENT_TYPE="multipart/form-data; boundary=xyz")
    assert "CONTENT_LENGTH" not in response.wsgi_request.META
    assert response.status_code == 411
    text = response.json()["error"] if path.startswith("/api") else response.content.decode()
    assert "Content-Length" in text and "no image was sent" not in text


def test_a_chunked_upload_to_the_live_server_gets_411(live_server, transactional_db):
    """A real chunked request on a socket, as `curl -H 'Transfer-Encoding: chunked'` sends it."""
    host, port = live_server.thread.host, live_server.thread.port
    body = (b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + corpus.good_png(1) + b"\r\n--b--\r\n")
    chunked = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    request = (b"POST /api/search HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
               b"Content-Type: multipart/form-data; boundary=b\r\nConnection: close\r\n\r\n" + chunked)
    with socket.create_connection((host, port), timeout=30) as connection:
        connection.sendall(request)
        response = b""
        while chunk := connection.recv(65536):
            response += chunk
    status_line, _, rest = response.partition(b"\r\n")
    assert status_line.split()[1] == b"411", response[:500]
    assert b"Content-Length" in rest


# --- No empty dataset left behind ----------------------------------------------------------

def _bad_folder(tmp_path) -> Path:
    root = tmp_path / "bad"
    root.mkdir()
    (root / "cut.png").write_bytes(corpus.good_png(2)[:60])
    (root / "notes.txt").write_text("not an image")
    return root


def test_a_folder_import_that_imports_nothing_creates_no_dataset(db, tmp_path, capsys):
    call_command("import_images", str(_bad_folder(tmp_path)), "--dataset", "new-set", "--no-progress")
    out = capsys.readouterr().out
    assert not Dataset.objects.filter(name="new-set").exists()
    assert "nothing was imported, so dataset 'new-set' was not created" in out


def test_an_in_process_zip_import_that_imports_nothing_creates_no_dataset(db, tmp_path, capsys):
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("cut.png", corpus.good_png(3)[:60])
    call_command("import_images", str(path), "--dataset", "zip-set", "--in-process", "--no-progress")
    assert not Dataset.objects.filter(name="zip-set").exists()
    assert "was not created" in capsys.readouterr().out


def test_a_refused_zip_creates_no_dataset(db, tmp_path):
    path = tmp_path / "many.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(3):
            archive.writestr(f"e{i}.txt", b"x")
    from django.core.management.base import CommandError
    from django.test import override_settings

    with override_settings(CBIR_ZIP_MAX_ENTRIES=2), pytest.raises(CommandError, match="limit"):
        call_command("import_images", str(path), "--dataset", "refused", "--in-process", "--no-progress")
    assert not Dataset.objects.filter(name="refused").exists()


def test_an_existing_dataset_stays_when_nothing_is_imported(dataset, tmp_path):
    call_command("import_images", str(_bad_folder(tmp_path)), "--dataset", dataset.name, "--no-progress")
    assert Dataset.objects.filter(pk=dataset.pk).exists()


def test_a_folder_import_with_images_creates_its_dataset(db, image_folder, capsys):
    call_command("import_images", str(image_folder), "--dataset", "good-set", "--no-progress")
    assert Dataset.objects.get(name="good-set").images.count() == 12
    assert "created dataset 'good-set'" in capsys.readouterr().out


# --- Why a search has fewer results: "notice" ------------------------------------------------

def _search(client, dataset: str, k: int = 5) -> dict:
    upload = io.BytesIO(corpus.good_png(4))
    upload.name = "q.png"
    response = client.post("/api/search", {"image": upload, "k": str(k), "dataset": dataset})
    assert response.status_code == 200, response.content
    return response.json()


def test_the_api_says_why_a_dataset_filtered_search_is_empty(client, indexed, tiny_version):
    Dataset.objects.create(name="empty-set")
    body = _search(client, "empty-set")
    assert body["results"] == [] and "has no images yet" in body["notice"]

    unindexed = Dataset.objects.create(name="new-photos")
    add_image(unindexed, corpus.good_png(5), "a.png")
    body = _search(client, "new-photos")
    assert body["results"] == [] and "nothing in dataset 'new-photos' is indexed yet" in body["notice"]
    assert tiny_version.name in body["notice"]


def test_the_api_says_when_part_of_a_dataset_is_not_indexed(client, indexed):
    add_image(indexed, corpus.good_png(6), "late.png")
    body = _search(client, indexed.name, k=20)
    assert len(body["results"]) == 12 and "only 12 of the 13 images" in body["notice"]


def test_a_full_result_has_no_notice(client, indexed):
    body = _search(client, indexed.name, k=5)
    assert len(body["results"]) == 5 and body["notice"] is None


def test_more_like_this_says_when_a_dataset_has_fewer_images(client, indexed):
    image = Image.objects.filter(dataset=indexed).order_by("pk").first()
    body = client.get(f"/api/images/{image.pk}/similar", {"k": "50", "dataset": indexed.name}).json()
    assert len(body["results"]) == 11 and "only 11 indexed images" in body["notice"]


def test_the_page_shows_the_notice_too(client, indexed):
    Dataset.objects.create(name="empty-set")
    upload = io.BytesIO(corpus.good_png(7))
    upload.name = "q.png"
    page = client.post("/search/", {"image": upload, "k": "5", "dataset": "empty-set"}).content.decode()
    assert "No indexed images match in this dataset: dataset &#x27;empty-set&#x27; has no images yet." in page


def test_decoding_an_upload_never_needs_the_file_name():
    assert decode_image(_orange("HEIC")).format == "HEIF"
