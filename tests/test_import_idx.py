"""Importing IDX files (MNIST / Fashion-MNIST format): the reader, the command,
labels, duplicates, --limit, --classes, and bad files that must change nothing."""

from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from django.core.management import CommandError, call_command

from search.idx import (
    CLASS_PRESETS,
    IdxError,
    label_names,
    parse_classes,
    read_idx,
    read_images_and_labels,
)
from search.models import Dataset, Image, split_for
from tests.helpers import write_idx

FASHION = Path("/usr/share/datasets/fashion-mnist")


def make_pair(folder: Path, *, n: int = 12, size=(8, 6), classes: int = 3, gz: bool = True, seed: int = 0):
    """n random greyscale images and labels 0..classes-1; image 5 repeats image 0
    (so the file itself holds one exact duplicate). Returns (images path, labels
    path, images, labels)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *size), dtype=np.uint8)
    images[5] = images[0]
    labels = (np.arange(n) % classes).astype(np.uint8)
    suffix = ".gz" if gz else ""
    images_path, labels_path = folder / f"imgs-idx3-ubyte{suffix}", folder / f"lbls-idx1-ubyte{suffix}"
    write_idx(images_path, images)
    write_idx(labels_path, labels)
    return images_path, labels_path, images, labels


def media_files(root) -> list[Path]:
    return [p for p in Path(root).rglob("*") if p.is_file()]


# --- The reader ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trips_every_element_type(tmp_path, dtype, gz):
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.shape == (2, 3, 4)
    np.testing.assert_array_equal(back, array)


def test_the_header_is_big_endian_and_gzip_is_judged_by_content(tmp_path):
    images = np.zeros((3, 2, 5), np.uint8)
    path = tmp_path / "no-suffix"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00\x00\x00\x03\x00\x00\x00\x02\x00\x00\x00\x05"
                                   + images.tobytes()))
    assert read_idx(path).shape == (3, 2, 5)
    raw = tmp_path / "raw.gz"  # a .gz name on an uncompressed file
    raw.write_bytes(b"\x00\x00\x08\x01\x00\x00\x01\x00" + bytes(range(256)))
    assert read_idx(raw).tolist() == list(range(256))


@pytest.mark.parametrize("content, message", [
    (b"", "too short"),
    (b"\x00\x00\x08", "too short"),
    (b"\x12\x34\x08\x03" + bytes(20), "not an IDX file"),
    (b"\x00\x00\x07\x03" + bytes(20), "not an IDX file"),
    (b"\x00\x00\x08\x00", "not an IDX file"),
    (b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated header"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x05" + bytes(4), "truncated"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x05" + bytes(6), "unexpected bytes after"),
    (b"\x00\x00\x08\x03\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", "more than the limit"),
])
def test_read_idx_rejects_bad_files_with_a_reason(tmp_path, content, message):
    path = tmp_path / "bad"
    path.write_bytes(content)
    with pytest.raises(IdxError, match=message):
        read_idx(path)


def test_a_corrupt_gzip_stream_is_an_idx_error(tmp_path):
    path = tmp_path / "x.gz"
    write_idx(path, np.arange(1000, dtype=np.uint8).reshape(10, 10, 10))
    data = bytearray(path.read_bytes())
    data[-6] ^= 0xFF  # inside the CRC/size trailer
    path.write_bytes(bytes(data))
    with pytest.raises(IdxError, match="corrupt gzip"):
        read_idx(path)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(IdxError, match="corrupt gzip"):
        read_idx(path)


def test_the_pair_must_be_images_and_labels_of_the_same_count(tmp_path):
    images_path, labels_path, _, _ = make_pair(tmp_path)
    with pytest.raises(IdxError, match="not an IDX image file"):
        read_images_and_labels(labels_path, labels_path)
    with pytest.raises(IdxError, match="not an IDX label file"):
        read_images_and_labels(images_path, images_path)
    write_idx(tmp_path / "short-labels", np.zeros(11, np.uint8))
    with pytest.raises(IdxError, match="holds 12 images but .* holds 11 labels"):
        read_images_and_labels(images_path, tmp_path / "short-labels")


def test_class_names_presets_and_mismatch():
    assert parse_classes(None) is None and parse_classes("") is None
    assert parse_classes("fashion-mnist")[9] == "Ankle boot" and len(CLASS_PRESETS["fashion-mnist"]) == 10
    assert parse_classes(" a , b ") == ["a", "b"]
    with pytest.raises(ValueError, match="empty class name"):
        parse_classes("a,,b")
    with pytest.raises(ValueError, match="more than once"):
        parse_classes("a,b,a")
    labels = np.array([0, 2, 1], np.uint8)
    assert label_names(labels, None) == ["0", "2", "1"]
    assert label_names(labels, ["x", "y", "z"]) == ["x", "z", "y"]
    with pytest.raises(IdxError, match="labels 0–2 \\(3 classes\\) but --classes names 2"):
        label_names(labels, ["x", "y"])


# --- The command --------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False])
def test_it_imports_every_image_with_its_label_split_and_thumbnail(db, tmp_path, settings, capsys, gz):
    images_path, labels_path, images, labels = make_pair(tmp_path, gz=gz)
    call_command("import_idx", str(images_path), str(labels_path), dataset="idx", no_progress=True)
    out = capsys.readouterr().out
    assert "imported 11, duplicates skipped 1" in out and "images/s" in out
    dataset = Dataset.objects.get(name="idx")
    rows = list(Image.objects.filter(dataset=dataset).order_by("original_filename"))
    assert len(rows) == 11  # image 5 is image 0 again
    expected = {i: str(int(labels[i])) for i in range(12) if i != 5}
    assert {int(r.original_filename.split("[")[1].rstrip("]")): r.label for r in rows} == expected
    for row in rows:
        assert row.original_filename.startswith(images_path.name + "[")
        assert (row.width, row.height) == (images.shape[2], images.shape[1])
        assert row.split == split_for(row.sha256)
        assert row.file.name.endswith(".png")
        assert (Path(settings.MEDIA_ROOT) / row.file.name).is_file()
        assert (Path(settings.MEDIA_ROOT) / row.thumbnail.name).is_file()
    # The stored PNG holds the file's pixels, unchanged.
    from PIL import Image as PILImage
    first = next(r for r in rows if r.original_filename.endswith("[00]"))
    with PILImage.open(Path(settings.MEDIA_ROOT) / first.file.name) as stored:
        np.testing.assert_array_equal(np.asarray(stored), images[0])


def test_class_names_become_the_labels(db, tmp_path):
    images_path, labels_path, _, labels = make_pair(tmp_path)
    call_command("import_idx", str(images_path), str(labels_path), dataset="named", classes="cat,dog,bird",
                 no_progress=True)
    counts = Counter(Image.objects.filter(dataset__name="named").values_list("label", flat=True))
    names = ["cat", "dog", "bird"]
    expected = Counter(names[int(v)] for i, v in enumerate(labels) if i != 5)
    assert counts == expected


def test_importing_again_finds_only_duplicates(db, tmp_path, settings, capsys):
    images_path, labels_path, _, _ = make_pair(tmp_path)
    call_command("import_idx", str(images_path), str(labels_path), dataset="again", no_progress=True)
    before = sorted(map(str, media_files(settings.MEDIA_ROOT)))
    capsys.readouterr()
    call_command("import_idx", str(images_path), str(labels_path), dataset="again", no_progress=True)
    assert "imported 0, duplicates skipped 12" in capsys.readouterr().out
    assert Image.objects.filter(dataset__name="again").count() == 11
    assert sorted(map(str, media_files(settings.MEDIA_ROOT))) == before


def test_limit_imports_the_first_n(db, tmp_path, capsys):
    images_path, labels_path, _, _ = make_pair(tmp_path)
    call_command("import_idx", str(images_path), str(labels_path), dataset="lim", limit=4, no_progress=True)
    rows = Image.objects.filter(dataset__name="lim")
    assert sorted(r.original_filename for r in rows) == [f"{images_path.name}[{i:02d}]" for i in range(4)]
    assert "4 images of 12" in capsys.readouterr().out
    with pytest.raises(CommandError, match="--limit must be at least 1"):
        call_command("import_idx", str(images_path), str(labels_path), dataset="lim", limit=0, no_progress=True)


def test_too_few_class_names_is_an_error_and_creates_nothing(db, tmp_path, settings):
    images_path, labels_path, _, _ = make_pair(tmp_path, classes=3)
    with pytest.raises(CommandError, match="3 classes.*--classes names 2"):
        call_command("import_idx", str(images_path), str(labels_path), dataset="nope", classes="a,b",
                     no_progress=True)
    # Checked over the whole label file, even when --limit would only reach label 0.
    with pytest.raises(CommandError, match="--classes names 2"):
        call_command("import_idx", str(images_path), str(labels_path), dataset="nope", classes="a,b", limit=1,
                     no_progress=True)
    assert not Dataset.objects.filter(name="nope").exists()
    assert media_files(settings.MEDIA_ROOT) == []


def corruptions(folder: Path):
    """(name, images path, labels path, expected message) for bad pairs."""
    images_path, labels_path, _, labels = make_pair(folder)
    raw = gzip.decompress(images_path.read_bytes())
    bad = folder / "bad"
    bad.mkdir()

    def write(name: str, data: bytes) -> Path:
        (bad / name).write_bytes(data)
        return bad / name

    truncated_gz = images_path.read_bytes()
    yield "bad magic", write("magic", b"\x00\x00\x07\x03" + raw[4:]), labels_path, "not an IDX"
    yield "truncated images", write("trunc", raw[:-10]), labels_path, "truncated"
    yield "truncated gzip", write("trunc.gz", truncated_gz[: len(truncated_gz) // 2]), labels_path, "corrupt gzip"
    yield "trailing bytes", write("trailing", raw + b"\x00"), labels_path, "unexpected bytes"
    yield "labels as images", labels_path, labels_path, "not an IDX image file"
    write_idx(bad / "labels-11", labels[:11])
    yield "count mismatch", images_path, bad / "labels-11", "holds 12 images but"
    yield "missing file", images_path, bad / "absent", "cannot be read"
    yield "not idx at all", write("text", b"hello, this is a text file\n"), labels_path, "not an IDX"
    yield "good images, corrupt labels", images_path, write("lbl-trunc", gzip.decompress(
        labels_path.read_bytes())[:-1]), "truncated"


def test_a_corrupt_file_is_a_clear_error_and_changes_nothing(db, tmp_path, settings):
    # An existing dataset with rows stays exactly as it was; a new one is never created.
    (tmp_path / "good").mkdir()
    good_images, good_labels, _, _ = make_pair(tmp_path / "good", seed=1)
    call_command("import_idx", str(good_images), str(good_labels), dataset="existing", no_progress=True)
    rows_before = list(Image.objects.order_by("pk").values_list("pk", "sha256", "label"))
    files_before = sorted(map(str, media_files(settings.MEDIA_ROOT)))
    seen = 0
    for name, images_path, labels_path, message in corruptions(tmp_path):
        for dataset in ("fresh", "existing"):
            with pytest.raises(CommandError, match=message):
                call_command("import_idx", str(images_path), str(labels_path), dataset=dataset, no_progress=True)
        seen += 1
        assert not Dataset.objects.filter(name="fresh").exists(), name
        assert list(Image.objects.order_by("pk").values_list("pk", "sha256", "label")) == rows_before, name
        assert sorted(map(str, media_files(settings.MEDIA_ROOT))) == files_before, name
    assert seen == 9


@pytest.mark.skipif(not (FASHION / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST is not installed (Debian: apt-get install dataset-fashion-mnist)")
def test_the_real_fashion_mnist_test_file(db, settings, capsys):
    images_path, labels_path = FASHION / "t10k-images-idx3-ubyte.gz", FASHION / "t10k-labels-idx1-ubyte.gz"
    images, labels = read_images_and_labels(images_path, labels_path)
    assert images.shape == (10_000, 28, 28) and labels.shape == (10_000,) and labels.max() == 9
    call_command("import_idx", str(images_path), str(labels_path), dataset="fashion", classes="fashion-mnist",
                 limit=50, no_progress=True)
    rows = list(Image.objects.filter(dataset__name="fashion"))
    unique = len({images[i].tobytes() for i in range(50)})
    assert len(rows) == unique
    names = CLASS_PRESETS["fashion-mnist"]
    for row in rows:
        index = int(row.original_filename.split("[")[1].rstrip("]"))
        assert row.label == names[labels[index]]
        assert (row.width, row.height) == (28, 28)
        assert (Path(settings.MEDIA_ROOT) / row.thumbnail.name).is_file()


# --- The Fashion-MNIST demo (CBIR_DEMO=fashion scripts/cbir up) ------------------

def fake_fashion(folder: Path) -> Path:
    """The four Fashion-MNIST file names with a few random images each: 6 test, 8 training."""
    rng = np.random.default_rng(7)
    for part, n in (("t10k", 6), ("train", 8)):
        write_idx(folder / f"{part}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{part}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    return folder


def test_the_fashion_demo_imports_test_images_first_up_to_the_limit_and_indexes_them(tiny_version, tmp_path):
    from search.models import Embedding

    folder = fake_fashion(tmp_path)
    call_command("demo", fashion_mnist=str(folder), limit=9, dataset="fashion", model=tiny_version.name)
    rows = Image.objects.filter(dataset__name="fashion")
    names = sorted(r.original_filename for r in rows)
    assert names == ([f"t10k-images-idx3-ubyte.gz[{i}]" for i in range(6)]
                     + [f"train-images-idx3-ubyte.gz[{i}]" for i in range(3)])
    assert set(rows.values_list("label", flat=True)) <= set(CLASS_PRESETS["fashion-mnist"])
    assert Embedding.objects.filter(image__dataset__name="fashion", model_version=tiny_version).count() == 9
    # Run again with no limit: the rest is added, nothing twice.
    call_command("demo", fashion_mnist=str(folder), limit=0, dataset="fashion", model=tiny_version.name)
    assert Image.objects.filter(dataset__name="fashion").count() == 14
    assert Embedding.objects.filter(image__dataset__name="fashion", model_version=tiny_version).count() == 14


def test_the_fashion_demo_names_the_package_when_the_files_are_missing(db, tmp_path):
    with pytest.raises(CommandError, match="apt-get install dataset-fashion-mnist"):
        call_command("demo", fashion_mnist=str(tmp_path), dataset="fashion")
    assert not Dataset.objects.filter(name="fashion").exists()
