"""Building the index: embeds what is missing, idempotent, makes the HNSW index."""

from pathlib import Path

import numpy as np
from django.core.management import call_command

from search import hnsw
from search.indexing import build_index, ensure_hnsw_index, missing_image_ids
from search.ingest import import_folder
from search.models import Embedding, Image
from training.models import ModelVersion


def test_build_index_embeds_every_image_once_and_creates_the_index(dataset, image_folder, tiny_version):
    import_folder(image_folder, dataset)
    report = build_index(dataset, tiny_version)
    assert report.embedded == 12 and report.failed == [] and report.index_created
    assert hnsw.is_ready(tiny_version)
    assert Embedding.objects.filter(model_version=tiny_version).count() == 12
    vectors = np.array([np.asarray(e.vector, dtype=np.float32) for e in Embedding.objects.all()], dtype=np.float32)
    assert vectors.shape == (12, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)


def test_running_it_again_embeds_nothing_new(dataset, image_folder, tiny_version):
    import_folder(image_folder, dataset)
    build_index(dataset, tiny_version)
    before = dict(Embedding.objects.values_list("image_id", "created"))
    again = build_index(dataset, tiny_version)
    assert again.embedded == 0 and not again.index_created
    assert dict(Embedding.objects.values_list("image_id", "created")) == before


def test_new_images_are_embedded_by_the_next_build(dataset, image_folder, tiny_version, make_image_bytes):
    import_folder(image_folder, dataset)
    build_index(dataset, tiny_version)
    (image_folder / "new.png").write_bytes(make_image_bytes(pattern=12345))
    import_folder(image_folder, dataset)
    assert len(missing_image_ids(dataset, tiny_version)) == 1
    assert build_index(dataset, tiny_version).embedded == 1


def test_a_missing_file_is_reported_and_does_not_abort(dataset, image_folder, tiny_version, settings):
    import_folder(image_folder, dataset)
    victim = Image.objects.first()
    (Path(settings.MEDIA_ROOT) / victim.file.name).unlink()
    report = build_index(dataset, tiny_version, batch_size=4)
    assert report.embedded == 11
    assert [image_id for image_id, _ in report.failed] == [victim.pk]


def test_the_first_indexed_version_becomes_active(dataset, image_folder, tiny_version):
    import_folder(image_folder, dataset)
    assert ModelVersion.active() is None
    build_index(dataset, tiny_version)
    assert ModelVersion.active() == tiny_version


def test_ensure_index_is_idempotent(tiny_version):
    assert ensure_hnsw_index(tiny_version) is True
    assert ensure_hnsw_index(tiny_version) is False


def test_deleting_a_version_drops_its_index(dataset, image_folder, tiny_version):
    import_folder(image_folder, dataset)
    build_index(dataset, tiny_version)
    name = hnsw.index_name(tiny_version)
    tiny_version.delete()
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_indexes WHERE indexname = %s", [name])
        assert cursor.fetchone() is None
    assert Embedding.objects.count() == 0


def test_the_command_reports_and_is_idempotent(dataset, image_folder, capsys):
    import_folder(image_folder, dataset)
    call_command("build_index", "--dataset", dataset.name, "--model", "tiny", "--random-weights", "--no-progress")
    assert "embedded 12 new image(s)" in capsys.readouterr().out
    version = ModelVersion.objects.get(architecture="tiny")
    assert version.weights_source == "random" and Path(version.weights_path).is_file()
    call_command("build_index", "--dataset", dataset.name, "--model", version.name, "--no-progress")
    assert "embedded 0 new image(s)" in capsys.readouterr().out


def test_the_command_explains_an_unknown_model(dataset):
    import pytest
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="neither a model version"):
        call_command("build_index", "--dataset", dataset.name, "--model", "nope", "--no-progress")
