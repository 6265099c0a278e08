"""The bad-input table of docs/bad-input.md: every case of tests/badinput.py
against the API, the search page, the admin, the folder and zip importers and
the import job, with what each answered.

    .venv/bin/python bench/bad_input_table.py > /tmp/table.md

It runs on a throwaway database (created, migrated and dropped here, on the
server DATABASE_URL names or the embedded one) and a temporary MEDIA_ROOT, with
a tiny randomly initialised model version indexing 12 small images, and the
small limits of tests/badinput.py (LIMITS). Django's test client is used, so a
server error shows as "500" in the table rather than stopping the run. A cell
ending in "✗ …" is a broken promise (a file or row left behind, a wrong
count); the tests in tests/test_bad_input.py fail on those.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from _common import REPO


def main() -> int:
    # Not _common.setup_django: the scratch database is migrated here, whatever state the main one is in.
    os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "cbirsite.settings")
    import django

    django.setup()
    import logging

    from django.conf import settings
    from django.db import connection
    from django.test.utils import override_settings, setup_test_environment

    from tests import badinput as corpus

    logging.getLogger("django.request").setLevel(logging.ERROR)  # every 4xx would be logged
    setup_test_environment()
    settings.DATABASES["default"].setdefault("TEST", {})["NAME"] = f"bench_bad_input_{os.getpid()}"
    old_name = connection.settings_dict["NAME"]
    connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
    try:
        with tempfile.TemporaryDirectory(prefix="cbir-bad-input-") as scratch:
            scratch = Path(scratch)
            limits = {**corpus.LIMITS, "MEDIA_ROOT": scratch / "media", "CBIR_WEIGHTS_DIR": scratch / "weights",
                      "CBIR_UPLOADS_DIR": str(scratch / "uploads"), "CBIR_LOADER_WORKERS": 0,
                      # Hundreds of searches from one client in a minute: not what this table is about.
                      "CBIR_SEARCH_RATE_LIMIT": "0"}
            with override_settings(**limits):
                # The scratch folder's random name would make every run's doc differ.
                print(run(corpus, scratch).replace(scratch.name, "cbir-bad-input-…"))
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)
    return 0


def _safely(call, *args) -> object:
    from tests.badinput import Outcome

    try:
        return call(*args)
    except Exception as exc:  # noqa: BLE001 - a server error is a row of the table, not the end of the run
        return Outcome(False, "500", f"{type(exc).__name__}: {exc}", ["server error"])


def run(corpus, scratch: Path) -> str:
    from django.contrib.auth import get_user_model
    from django.test import Client

    from search.indexing import build_index
    from search.ingest import import_folder
    from search.models import Dataset, Image
    from tests.helpers import image_bytes
    from training.versions import get_or_create_version

    folder = scratch / "indexed"
    for label, color in (("red", (250, 20, 20)), ("blue", (20, 20, 250))):
        (folder / label).mkdir(parents=True)
        for i in range(6):
            (folder / label / f"{label}-{i}.png").write_bytes(image_bytes(color, pattern=hash((label, i)) % 10_000))
    indexed = Dataset.objects.create(name="indexed")
    import_folder(folder, indexed, labels_from_folders=True)
    version = get_or_create_version("tiny", random_weights=True, config={"dimension": 32, "size": 32})
    build_index(indexed, version)
    version.activate()
    image_id = Image.objects.order_by("pk").first().pk

    client = Client()
    admin = Client()
    admin.force_login(get_user_model().objects.create_superuser("bench-admin", "", "x"))

    out = []
    rows = []
    for n, case in enumerate(corpus.file_cases()):
        outcomes = {
            "API": _safely(corpus.api_search, client, case),
            "page": _safely(corpus.search_page, client, case),
            "admin add": _safely(corpus.admin_add, admin, Dataset.objects.create(name=f"admin-{n}"), case),
            "folder import": _safely(corpus.folder_import, Dataset.objects.create(name=f"folder-{n}"),
                                     scratch / f"folder-{n}", case),
            "zip import": _safely(corpus.zip_import, Dataset.objects.create(name=f"zip-{n}"), scratch / f"zip-{n}",
                                  case),
        }
        rows.append(corpus.file_row(case, outcomes))
    out.append("### Files (search upload, API, admin upload, folder and zip import)\n\n"
               + corpus.markdown_table(corpus.FILE_HEADERS, rows))

    rows = [corpus.param_row(case, _safely(corpus.param_request, client, case, image_id))
            for case in corpus.param_cases()]
    out.append("### Parameters and methods\n\n" + corpus.markdown_table(corpus.PARAM_HEADERS, rows))

    rows = []
    for n, case in enumerate(corpus.zip_cases()):
        imported = _safely(corpus.zip_case_import, Dataset.objects.create(name=f"zipcase-{n}"),
                           scratch / f"zipcase-{n}", case)
        job = _safely(corpus.zip_case_job, Dataset.objects.create(name=f"zipjob-{n}"), scratch / f"zipjob-{n}", case)
        rows.append(corpus.zip_row(case, imported, job))
    out.append("### Zips (import_zip, and the import job a worker runs)\n\n"
               + corpus.markdown_table(corpus.ZIP_HEADERS, rows))

    rows = [corpus.folder_row(case, _safely(corpus.folder_case_import, Dataset.objects.create(name=f"dir-{n}"),
                                            scratch / f"dir-{n}", case))
            for n, case in enumerate(corpus.folder_cases())]
    out.append("### Folders (import_folder, manage.py import_images)\n\n"
               + corpus.markdown_table(corpus.FOLDER_HEADERS, rows))

    rows = [corpus.admin_row(case, _safely(corpus.admin_request, admin, case)) for case in corpus.admin_cases()]
    out.append("### Admin lists and forms\n\n" + corpus.markdown_table(corpus.ADMIN_HEADERS, rows))

    target = Dataset.objects.create(name="admin-zip")
    rows = []
    for kind in corpus.admin_zip_cases():
        outcome = _safely(corpus.admin_zip_import, admin, target, kind, scratch)
        rows.append([kind, outcome.cell, outcome.message[:160]])
    unknown = admin.get("/admin/search/dataset/999999999/import-zip/")
    rows.append(["unknown dataset id", str(unknown.status_code), "redirect to the dataset list: No such dataset."])
    out.append("### Admin \"Import a zip\" (refused before a job starts)\n\n"
               + corpus.markdown_table(["input", "status", "message"], rows))
    return "\n\n".join(out)


if __name__ == "__main__":
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # for tests.badinput
    sys.exit(main())
