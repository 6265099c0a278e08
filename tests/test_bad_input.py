"""Bad input on every surface: the corpus of tests/badinput.py against the API,
the search page, the admin upload, the admin zip import, the folder and zip
importers and the import job. Each input gets a correct result or a clear 4xx
message; never a 500 (the test client raises it), never a file or row left
behind by a rejected input, and one bad file never aborts a batch.

The outcome table is printed at the end of the module (and kept in
docs/bad-input.md, made by bench/bad_input_table.py)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from django.urls import reverse

from search.models import Dataset, Image, Job
from tests import badinput as corpus

# Pillow warns about the corpus's broken EXIF blocks; that they are only warnings is the point.
pytestmark = [pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning"),
              pytest.mark.filterwarnings("ignore:Tag data larger than file:UserWarning")]

FILE_CASES = corpus.file_cases()
PARAM_CASES = corpus.param_cases()
ZIP_CASES = corpus.zip_cases()
FOLDER_CASES = corpus.folder_cases()

TABLES: dict[str, list[list[str]]] = {"files": [], "params": [], "zips": [], "folders": [], "admin zip": [], "admin": []}


@pytest.fixture(scope="module", autouse=True)
def _print_the_table(request):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or not any(TABLES.values()):
        return
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        for title, headers in (("files", corpus.FILE_HEADERS), ("params", corpus.PARAM_HEADERS),
                               ("zips", corpus.ZIP_HEADERS), ("folders", corpus.FOLDER_HEADERS),
                               ("admin zip", ["input", "outcome", "message"]), ("admin", corpus.ADMIN_HEADERS)):
            if TABLES[title]:
                reporter.write_line(f"\n\nBad input: {title}\n" + corpus.markdown_table(headers, TABLES[title]))


@pytest.fixture
def limits(settings):
    for name, value in corpus.LIMITS.items():
        setattr(settings, name, value)
    return settings


def _words_in(words: str, message: str) -> bool:
    return words.lower() in message.lower()


@pytest.mark.parametrize("case", FILE_CASES, ids=[c.kind for c in FILE_CASES])
def test_each_file_gets_the_expected_outcome_on_every_surface(case, limits, client, admin_client, indexed, tmp_path):
    outcomes = {
        "API": corpus.api_search(client, case),
        "page": corpus.search_page(client, case),
        "admin add": corpus.admin_add(admin_client, Dataset.objects.create(name="admin-target"), case),
        "folder import": corpus.folder_import(Dataset.objects.create(name="folder-target"), tmp_path / "f", case),
        "zip import": corpus.zip_import(Dataset.objects.create(name="zip-target"), tmp_path / "z", case),
    }
    TABLES["files"].append(corpus.file_row(case, outcomes))
    for surface, outcome in outcomes.items():
        assert not outcome.problems, (surface, outcome)
        assert outcome.accepted == case.accept, (surface, outcome)
        if case.accept:
            continue
        words = case.import_words if case.import_words and surface.endswith("import") else case.words
        assert _words_in(words, outcome.message), (surface, outcome)
        if surface in ("API", "page"):
            assert outcome.code == str(case.api_status), (surface, outcome)


@pytest.mark.parametrize("case", PARAM_CASES, ids=[f"{c.kind} {c.method} {c.path}" for c in PARAM_CASES])
def test_each_parameter_gets_the_expected_status_and_message(case, limits, client, indexed):
    outcome = corpus.param_request(client, case, Image.objects.order_by("pk").first().pk)
    TABLES["params"].append(corpus.param_row(case, outcome))
    assert not outcome.problems, outcome
    assert _words_in(case.words, outcome.message), outcome


@pytest.mark.parametrize("case", ZIP_CASES, ids=[c.kind for c in ZIP_CASES])
def test_each_zip_is_imported_or_refused_as_expected(case, limits, dataset, tmp_path):
    imported = corpus.zip_case_import(dataset, tmp_path / "import", case)
    job = corpus.zip_case_job(Dataset.objects.create(name="job-target"), tmp_path / "job", case)
    TABLES["zips"].append(corpus.zip_row(case, imported, job))
    assert not imported.problems, imported
    assert not job.problems, job
    if case.imported is None:
        assert imported.code == "refused" and _words_in(case.words, imported.message), imported
        assert job.code == "failed" and _words_in(case.words, job.message), job
        return
    assert imported.code.split(",")[0] == f"imported {case.imported}", imported
    assert job.code == f"succeeded, imported {case.imported}", job
    assert _words_in(case.words, imported.message), imported


@pytest.mark.parametrize("case", FOLDER_CASES, ids=[c.kind for c in FOLDER_CASES])
def test_each_folder_is_imported_as_expected(case, limits, dataset, tmp_path):
    outcome = corpus.folder_case_import(dataset, tmp_path / "root", case)
    TABLES["folders"].append(corpus.folder_row(case, outcome))
    assert not outcome.problems, outcome
    assert outcome.code.split(",")[0] == f"imported {case.imported}", outcome
    assert _words_in(case.words, outcome.message), outcome


def test_a_nul_character_in_the_admin_label_filter_is_no_server_error(admin_client, indexed):
    response = admin_client.get("/admin/search/image/?label=%00")
    # Every admin list refuses a NUL with words (cbirsite.middleware.AdminNulQueryMiddleware).
    assert response.status_code == 400 and "NUL" in response.content.decode()


def test_the_corpus_has_at_least_30_kinds_of_input():
    kinds = {c.kind for c in FILE_CASES} | {c.kind for c in PARAM_CASES} | {c.kind for c in ZIP_CASES} | {
        c.kind for c in FOLDER_CASES}
    assert len(kinds) >= 30


# --- Admin lists and forms --------------------------------------------------------

ADMIN_CASES = corpus.admin_cases()


@pytest.mark.parametrize("case", ADMIN_CASES, ids=[c.kind for c in ADMIN_CASES])
def test_admin_lists_and_forms_refuse_bad_input_with_words(case, admin_client, db):
    outcome = corpus.admin_request(admin_client, case)
    TABLES["admin"].append(corpus.admin_row(case, outcome))
    assert not outcome.problems, outcome
    assert _words_in(case.words, outcome.message), outcome


# --- The admin zip import (its form; the job it starts runs the importer above) ---

def _zip_upload(data: bytes, name: str = "photos.zip") -> io.BytesIO:
    upload = io.BytesIO(data)
    upload.name = name
    return upload


ADMIN_ZIP_CASES = corpus.admin_zip_cases()


@pytest.mark.parametrize("kind", list(ADMIN_ZIP_CASES))
def test_the_admin_zip_import_refuses_with_a_message_and_keeps_nothing(kind, limits, admin_client, dataset, tmp_path):
    outcome = corpus.admin_zip_import(admin_client, dataset, kind, tmp_path)
    TABLES["admin zip"].append([kind, outcome.cell, outcome.message])
    assert not outcome.problems, outcome
    assert outcome.code == "200" and _words_in(ADMIN_ZIP_CASES[kind][1], outcome.message), outcome
    assert not Job.objects.exists() and not Image.objects.exists()


def test_the_admin_zip_import_of_an_unknown_dataset_says_so(admin_client, db):
    url = reverse("admin:search_dataset_import_zip", args=[999_999])
    response = admin_client.get(url, follow=True)
    TABLES["admin zip"].append(["unknown dataset id", str(response.redirect_chain[0][1]), "No such dataset."])
    assert response.redirect_chain[0][0] == reverse("admin:search_dataset_changelist")
    assert "No such dataset." in response.content.decode()


@pytest.mark.worker
@pytest.mark.timeout(180)
def test_a_hostile_zip_through_the_admin_imports_only_its_images(live_worker, admin_client, tmp_path):
    """The whole path, admin form → job → real worker, with a zip full of trouble."""
    from search.jobs import S
    from tests.helpers import wait_for

    dataset = Dataset.objects.create(name="hostile")
    good = [corpus.good_png(500 + i) for i in range(3)]
    data = corpus._zip_bytes({
        "../escape.png": good[0], "deep/er/ok.png": good[1], "été $(id).png": good[2], "copy.png": good[2],
        "notes.txt": b"text", "empty.png": b"", "cut.jpg": corpus.truncated(corpus.cmyk_jpeg()),
        "header-bomb.png": corpus.raw_png(100_000, 100_000, 8, 2), "__MACOSX/._ok.png": b"\0",
    })
    url = reverse("admin:search_dataset_import_zip", args=[dataset.pk])
    response = admin_client.post(url, {"archive": _zip_upload(data), "labels_from_folders": "on", "apply": "1"})
    assert response.status_code == 302, response.content.decode()[:2000]
    job = Job.objects.get(kind=Job.Kind.IMPORT)
    job = wait_for(lambda: Job.objects.filter(pk=job.pk, status__in=[S.SUCCEEDED, S.FAILED]).first(),
                   message="the import job")
    assert job.status == S.SUCCEEDED, job.error
    assert (job.result["imported"], job.result["duplicates"], job.result["not_images"]) == (3, 1, 1)
    reasons = {r["file"]: r["reason"] for r in job.result["reasons"]}
    assert "empty" in reasons["empty.png"] and "truncated" in reasons["cut.jpg"]
    assert "pixels" in reasons["header-bomb.png"]
    assert sorted(dataset.images.values_list("label", flat=True), key=str) == [None, None, "deep/er"]
    assert not Path(job.params["zip_path"]).exists()  # the uploaded copy is removed when done
    assert not list(tmp_path.parent.rglob("escape.png"))
