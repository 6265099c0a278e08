"""The JSON API and the pages: results, and a clear message for every bad input,
with nothing stored."""

import io
from pathlib import Path

import pytest
from PIL import Image as PILImage

from search.models import Image


def _files_under(root) -> set:
    return {p for p in Path(root).rglob("*") if p.is_file()}


@pytest.fixture
def unchanged(settings, db):
    """Asserts, after the test, that no image row and no media file was added."""
    rows_before = Image.objects.count()
    files_before = _files_under(settings.MEDIA_ROOT)
    yield
    assert Image.objects.count() == rows_before
    assert _files_under(settings.MEDIA_ROOT) == files_before


def _upload(data: bytes, name="q.png"):
    return io.BytesIO(data), name


def test_api_search_returns_the_documented_shape(client, indexed, tiny_version, make_image_bytes, unchanged):
    data = make_image_bytes((20, 20, 240), pattern=77)
    response = client.post("/api/search", {"image": io.BytesIO(data), "k": "5"})
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == tiny_version.name and body["k"] == 5 and len(body["results"]) == 5
    first = body["results"][0]
    assert set(first) == {"image_id", "score", "label", "dataset", "url", "thumbnail_url"}
    assert first["dataset"] == indexed.name and first["label"] in ("red", "blue")
    assert first["url"].startswith("/media/") and first["thumbnail_url"].startswith("/media/")
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True) and -1 <= scores[-1] <= scores[0] <= 1
    assert client.get(first["thumbnail_url"]).status_code == 200


def test_api_default_k_is_10(client, indexed, make_image_bytes):
    body = client.post("/api/search", {"image": io.BytesIO(make_image_bytes(pattern=5))}).json()
    assert body["k"] == 10 and len(body["results"]) == 10


def test_api_similar_excludes_the_image(client, indexed):
    image = Image.objects.filter(label="red").first()
    body = client.get(f"/api/images/{image.pk}/similar?k=3").json()
    assert len(body["results"]) == 3 and image.pk not in [r["image_id"] for r in body["results"]]


def test_api_similar_unknown_image_is_404(client, indexed):
    response = client.get("/api/images/999999999/similar")
    assert response.status_code == 404 and "no image" in response.json()["error"]


def _truncated_jpeg(make_image_bytes):
    data = make_image_bytes(size=(64, 64), fmt="JPEG", pattern=3)
    return data[: len(data) // 2]


def _bomb():
    """A small PNG that declares 20,000 × 20,000 pixels."""
    out = io.BytesIO()
    PILImage.new("1", (20_000, 20_000)).save(out, format="PNG", optimize=True)
    return out.getvalue()


BAD_FILES = {
    "empty file": (lambda m: b"", "empty"),
    "text named .jpg": (lambda m: b"hello, I am text", "not a supported image"),
    "truncated JPEG": (_truncated_jpeg, "truncated"),
    "decompression bomb": (lambda m: _bomb(), "pixels"),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_api_rejects_bad_files_with_400_and_stores_nothing(client, indexed, make_image_bytes, unchanged, kind):
    make, message = BAD_FILES[kind]
    response = client.post("/api/search", {"image": _upload(make(make_image_bytes), "photo.jpg")[0]})
    assert response.status_code == 400, response.content
    assert message in response.json()["error"]


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_page_shows_bad_file_errors(client, indexed, make_image_bytes, unchanged, kind):
    make, message = BAD_FILES[kind]
    response = client.post("/search/", {"image": io.BytesIO(make(make_image_bytes))})
    assert response.status_code == 400
    assert message in response.content.decode()
    assert 'role="alert"' in response.content.decode()


@pytest.mark.parametrize("k,message", [("0", "from 1 to 100"), ("-1", "from 1 to 100"), ("101", "from 1 to 100"),
                                       ("abc", "whole number")])
def test_bad_k_is_400(client, indexed, make_image_bytes, unchanged, k, message):
    response = client.post("/api/search", {"image": io.BytesIO(make_image_bytes(pattern=1)), "k": k})
    assert response.status_code == 400 and message in response.json()["error"]
    assert client.get(f"/api/images/{Image.objects.first().pk}/similar?k={k}").status_code == 400


def test_unknown_dataset_is_400(client, indexed, make_image_bytes):
    response = client.post("/api/search", {"image": io.BytesIO(make_image_bytes(pattern=1)), "dataset": "nope"})
    assert response.status_code == 400 and "unknown dataset" in response.json()["error"]


def test_missing_image_field_is_400(client, indexed, unchanged):
    response = client.post("/api/search", {"k": "3"})
    assert response.status_code == 400 and "'image'" in response.json()["error"]


def test_wrong_method_is_405_with_a_message(client, indexed):
    response = client.get("/api/search")
    assert response.status_code == 405 and "POST" in response.json()["error"]
    assert client.post(f"/api/images/{Image.objects.first().pk}/similar").status_code == 405


def test_oversize_upload_is_413(client, indexed, settings, make_image_bytes, unchanged):
    settings.CBIR_MAX_UPLOAD_BYTES = 2048
    data = make_image_bytes(size=(128, 128), pattern=2)
    big = data + b"\0" * (100 * 1024)
    response = client.post("/api/search", {"image": io.BytesIO(big)})
    assert response.status_code == 413 and "limit" in response.json()["error"]
    page = client.post("/search/", {"image": io.BytesIO(big)})
    assert page.status_code == 413


def test_no_index_is_503(client, db, make_image_bytes):
    response = client.post("/api/search", {"image": io.BytesIO(make_image_bytes(pattern=1))})
    assert response.status_code == 503 and "no search index" in response.json()["error"]


def test_upload_page_renders(client, db):
    response = client.get("/")
    assert response.status_code == 200
    assert b'type="file"' in response.content and b"drop" in response.content.lower()


def test_results_page_shows_query_and_top_10_with_scores_and_more_like_this(client, indexed, make_image_bytes,
                                                                            unchanged):
    response = client.post("/search/", {"image": io.BytesIO(make_image_bytes(pattern=8))})
    html = response.content.decode()
    assert response.status_code == 200
    assert html.count('class="hit"') == 10
    assert "data:image/jpeg;base64," in html  # the query, shown without being stored
    assert html.count("More like this") == 10
    assert 'class="score"' in html


def test_more_like_this_page(client, indexed):
    image = Image.objects.first()
    response = client.get(f"/images/{image.pk}/similar/?k=4")
    assert response.status_code == 200 and response.content.decode().count('class="hit"') == 4


def test_media_has_no_directory_listing_and_no_escape(client, indexed):
    assert client.get("/media/datasets/").status_code == 404
    client.raise_request_exception = False  # as a real server answers it
    assert client.get("/media/../cbirsite/settings.py").status_code in (400, 404)
    assert client.get("/media/%2e%2e/%2e%2e/etc/passwd").status_code in (400, 404)
