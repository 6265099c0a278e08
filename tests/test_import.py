"""Importing a folder: duplicates, unreadable files, labels, splits, files on disk."""

import os
from collections import Counter
from pathlib import Path

import pytest
from django.core.management import call_command

from search.imaging import ImageRejected
from search.ingest import add_image, import_folder
from search.models import Dataset, Image, Split, split_for


def test_it_imports_images_and_reports_duplicates_and_unreadable_files(dataset, image_folder, settings):
    report = import_folder(image_folder, dataset, labels_from_folders=True)
    assert report.imported == 12
    assert report.duplicates == 1
    reasons = dict(report.rejected)
    assert reasons["notes.txt"] == "not an image"
    assert "truncated" in reasons[os.path.join("blue", "broken.png")]
    assert Image.objects.filter(dataset=dataset).count() == 12
    for image in Image.objects.all():
        assert (Path(settings.MEDIA_ROOT) / image.file.name).is_file()
        assert (Path(settings.MEDIA_ROOT) / image.thumbnail.name).is_file()
        assert image.width == 32 and image.height == 32 and len(image.sha256) == 64


def test_labels_come_from_folder_names(dataset, image_folder):
    import_folder(image_folder, dataset, labels_from_folders=True)
    assert Counter(Image.objects.values_list("label", flat=True)) == {"red": 6, "blue": 6}


def test_without_labels_from_folders_images_are_unlabelled(dataset, image_folder):
    import_folder(image_folder, dataset)
    assert set(Image.objects.values_list("label", flat=True)) == {None}


def test_importing_again_imports_nothing(dataset, image_folder):
    import_folder(image_folder, dataset)
    again = import_folder(image_folder, dataset)
    assert again.imported == 0 and again.duplicates == 13


def test_the_same_image_may_live_in_two_datasets(db, image_folder):
    first = Dataset.objects.create(name="a")
    second = Dataset.objects.create(name="b")
    assert import_folder(image_folder, first).imported == 12
    assert import_folder(image_folder, second).imported == 12


def test_splits_are_60_20_20_and_stable():
    splits = Counter(split_for(f"{i:064x}") for i in range(20_000))
    assert abs(splits[Split.TRAIN] / 20_000 - 0.6) < 0.02
    assert abs(splits[Split.VAL] / 20_000 - 0.2) < 0.02
    assert abs(splits[Split.TEST] / 20_000 - 0.2) < 0.02
    assert all(split_for(f"{i:064x}") == split_for(f"{i:064x}") for i in range(100))
    # The seed changes the assignment, the content decides it.
    assert [split_for(f"{i:064x}", "other") for i in range(50)] != [split_for(f"{i:064x}") for i in range(50)]


def test_an_image_gets_the_same_split_in_any_dataset(db, image_folder):
    first = Dataset.objects.create(name="a")
    second = Dataset.objects.create(name="b")
    import_folder(image_folder, first)
    import_folder(image_folder, second)
    for image in Image.objects.filter(dataset=first):
        assert Image.objects.get(dataset=second, sha256=image.sha256).split == image.split


def test_a_rejected_file_leaves_no_row_and_no_file(dataset, settings):
    with pytest.raises(ImageRejected):
        add_image(dataset, b"GIF89a" + b"\0" * 20, "bad.gif")
    assert Image.objects.count() == 0
    assert not any(p.is_file() for p in Path(settings.MEDIA_ROOT).rglob("*"))


def test_a_symlink_loop_does_not_trap_the_walk(dataset, image_folder):
    (image_folder / "red" / "loop").symlink_to(image_folder, target_is_directory=True)
    report = import_folder(image_folder, dataset)
    assert report.imported == 12


def test_the_command_prints_counts_and_reasons(dataset, image_folder, capsys):
    call_command("import_images", str(image_folder), "--dataset", "new-set", "--labels-from-folders", "--no-progress")
    out = capsys.readouterr().out
    assert "imported 12, duplicates skipped 1, unreadable skipped 1, other files (not images) skipped 1" in out
    assert "broken.png: the image file is truncated" in out
    assert Dataset.objects.get(name="new-set").images.count() == 12


# --- Progress when stderr is not a terminal ---------------------------------------

def _database_url() -> str:
    from django.db import connection

    s = connection.settings_dict
    return f"postgresql://{s['USER']}:{s['PASSWORD']}@/{s['NAME']}?host={s['HOST']}"


@pytest.mark.timeout(120)
def test_the_import_command_prints_few_plain_progress_lines_to_a_pipe(transactional_db, image_folder, tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "DATABASE_URL": _database_url(), "MEDIA_ROOT": str(tmp_path / "media"),
           "PYTHONUNBUFFERED": "1"}
    run = subprocess.run([sys.executable, "manage.py", "import_images", str(image_folder), "--dataset", "piped",
                          "--labels-from-folders"], cwd=root, env=env, capture_output=True, text=True, timeout=100)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "\r" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("importing into piped:")]
    # The first update and the end (the import takes well under PLAIN_INTERVAL_S): never one line per image.
    assert 1 <= len(lines) <= 3, run.stderr
    assert Image.objects.filter(dataset__name="piped").count() == 12
    done, total = lines[-1].split(": ", 1)[1].split(" ", 1)[0].split("/")
    assert done == total


def test_plain_progress_lines_are_throttled_and_the_end_is_printed():
    import subprocess
    import sys

    probe = (
        "import time\n"
        "from search.management import progress\n"
        "progress.PLAIN_INTERVAL_S = 0.2\n"
        "with progress.progress_bar('probe', unit='step') as update:\n"
        "    for i in range(1, 1001):\n"
        "        update(i, 1000, f'step {i}')\n"
        "        time.sleep(0.001)\n"
    )
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "\r" not in run.stderr
    lines = run.stderr.splitlines()
    # ~1.1 s at one line per 0.2 s at most, plus the first and the last.
    assert 2 <= len(lines) <= 10, lines
    assert lines[0].startswith("probe: 1/1000 step") and lines[-1] == "probe: 1000/1000 step (100 %) step 1000"


def test_an_import_job_keeps_the_first_reasons_and_counts_per_reason_of_many_bad_entries(dataset, tmp_path,
                                                                                          settings):
    from search.import_jobs import run_import_job
    from search.models import Job
    from tests.badinput import _zip_bytes, good_png

    settings.MEDIA_ROOT = tmp_path / "media"
    bad = 1500  # the result keeps the first 1,000 (file, reason) pairs and counts per reason
    entries = {f"bad/{i:05}.png": b"" for i in range(bad)}  # empty files
    entries.update({f"text/{i:05}.png": b"not a picture at all" for i in range(300)})
    entries["ok.png"] = good_png(7)
    zip_path = tmp_path / "many-bad.zip"
    zip_path.write_bytes(_zip_bytes(entries))
    job = Job.objects.create(kind=Job.Kind.IMPORT, dataset=dataset, params={"zip_path": str(zip_path)})
    run_import_job(job.pk)
    job.refresh_from_db()
    assert job.status == Job.Status.SUCCEEDED, job.error
    result = job.result
    assert result["imported"] == 1 and result["rejected"] == bad + 300
    assert len(result["reasons"]) == 1000
    assert result["reasons_left_out"] == bad + 300 - 1000
    assert [r["file"] for r in result["reasons"][:2]] == ["bad/00000.png", "bad/00001.png"]
    assert sum(result["reason_counts"].values()) == bad + 300
    assert len(result["reason_counts"]) <= 101  # the 100 commonest, the rest summed
    assert max(result["reason_counts"].values()) == bad  # every empty file has the same reason
