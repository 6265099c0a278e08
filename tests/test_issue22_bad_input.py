"""Issue 22: file symlinks, overlapping zips, NUL in admin lists, racing
publishers, a JPEG missing only its EOI, control characters in names, dataset
names. Real PostgreSQL, real files, real threads."""

from __future__ import annotations

import io
import struct
import threading
import unicodedata
import zipfile
from pathlib import Path

import numpy as np
import pytest
from django.contrib import admin
from django.core.management import CommandError, call_command
from django.db import connection
from PIL import Image as PILImage

from search.imaging import ImageRejected, decode_image
from search.ingest import ZipRejected, import_folder, import_zip, printable_name
from search.models import Dataset, DatasetNameError, Image, dataset_named, normalise_dataset_name
from tests import badinput as corpus


def _png(seed: int) -> bytes:
    return corpus.good_png(seed)


# --- 1. symlinks ----------------------------------------------------------------

def test_no_symlink_form_publishes_a_file(db, tmp_path, settings):
    settings.MEDIA_ROOT = tmp_path / "media"
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "secret.png").write_bytes(_png(1))
    (outside / "dir").mkdir()
    (outside / "dir" / "inner.png").write_bytes(_png(2))
    root = tmp_path / "drop"
    (root / "cats").mkdir(parents=True)
    (root / "cats" / "ok.png").write_bytes(_png(3))
    (root / "cats" / "a.png").symlink_to(outside / "secret.png")           # file, out of the root
    (root / "cats" / "into.png").symlink_to(root / "cats" / "ok.png")     # file, into the root
    (root / "cats" / "chain.png").symlink_to(root / "cats" / "a.png")     # chained
    (root / "folder").symlink_to(outside / "dir", target_is_directory=True)  # folder
    dataset = Dataset.objects.create(name="links")
    report = import_folder(root, dataset)
    assert report.imported == 1
    assert list(Image.objects.values_list("original_filename", flat=True)) == ["cats/ok.png"]
    rejected = dict(report.rejected)
    assert set(rejected) == {"cats/a.png", "cats/into.png", "cats/chain.png"}
    assert all("symbolic link" in reason for reason in rejected.values())


# --- 2. overlapping zip entries -------------------------------------------------

def _overlapping_central(copies: int) -> bytes:
    """One stored PNG; the central directory lists it `copies` times."""
    data = _zip_one()
    archive = zipfile.ZipFile(io.BytesIO(data))
    info = archive.infolist()[0]
    start = archive.start_dir
    end = data.rfind(b"PK\x05\x06")
    record = data[start:end]
    eocd = bytearray(data[end:])
    eocd[8:10] = copies.to_bytes(2, "little")
    eocd[10:12] = copies.to_bytes(2, "little")
    eocd[12:16] = (len(record) * copies).to_bytes(4, "little")
    assert info.header_offset == 0
    return data[:start] + record * copies + bytes(eocd)


def _zip_one() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("a.png", _png(5))
    return out.getvalue()


def _overlapping_local() -> bytes:
    """Two entries; the first's declared compressed size runs into the second's local header."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("a.png", _png(6))
        archive.writestr("b.png", _png(7))
    data = bytearray(out.getvalue())
    archive = zipfile.ZipFile(io.BytesIO(bytes(data)))
    second = archive.infolist()[1].header_offset
    first = archive.infolist()[0]
    central = data.find(b"PK\x01\x02")
    size = first.compress_size + 100
    data[central + 20:central + 24] = size.to_bytes(4, "little")  # compressed size in the central record
    data[central + 24:central + 28] = size.to_bytes(4, "little")
    assert second < first.header_offset + 30 + len("a.png") + size
    return bytes(data)


@pytest.mark.parametrize("make", [lambda: _overlapping_central(3), _overlapping_local],
                         ids=["central directory", "local headers"])
def test_a_zip_with_overlapping_entries_is_refused_whole(make, db, tmp_path, settings):
    settings.MEDIA_ROOT = tmp_path / "media"
    path = tmp_path / "bomb.zip"
    path.write_bytes(make())
    dataset = Dataset.objects.create(name="overlap")
    with pytest.raises(ZipRejected, match="overlap"):
        import_zip(path, dataset)
    assert not Image.objects.exists()


# --- 3. NUL in every admin list ------------------------------------------------

def _admin_lists():
    for model, model_admin in admin.site._registry.items():
        names = []
        for item in model_admin.list_filter:
            if isinstance(item, str):
                names.append(item)
            elif isinstance(item, tuple):
                names.append(item[0])
            else:
                names.append(item.parameter_name)
        if model_admin.search_fields:
            names.append("q")
        for name in names:
            yield model, name


@pytest.mark.parametrize("model,parameter", list(_admin_lists()),
                         ids=[f"{m._meta.label}-{p}" for m, p in _admin_lists()])
def test_a_nul_in_any_admin_filter_or_search_box_is_a_400_with_words(model, parameter, admin_client):
    url = f"/admin/{model._meta.app_label}/{model._meta.model_name}/"
    for query in ({parameter: "\x00"}, {f"{parameter}__exact": "a\x00b"}):
        response = admin_client.get(url, query)
        assert response.status_code == 400, (url, query)
        assert "NUL" in response.content.decode()


# --- 4. racing publishers -------------------------------------------------------

@pytest.mark.django_db(transaction=True)
def test_concurrent_publishers_each_get_a_version_with_its_weights(tmp_path, settings):
    from training.core.config import TrainConfig
    from training.core.networks.base import sha256_of
    from training.models import ModelVersion
    from training.versions import create_initial_version

    settings.CBIR_WEIGHTS_DIR = tmp_path / "weights"
    dataset = Dataset.objects.create(name="race")
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def publish():
        try:
            barrier.wait()
            create_initial_version(TrainConfig(architecture="tiny", image_size=32, augment=False), dataset)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=publish) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    versions = list(ModelVersion.objects.filter(name__startswith="tiny-race-init-"))
    assert sorted(v.name for v in versions) == [f"tiny-race-init-{n}" for n in (1, 2, 3, 4)]
    for version in versions:
        assert Path(version.weights_path).is_file() and sha256_of(version.weights_path) == version.weights_sha256


# --- 5. a JPEG missing only its EOI --------------------------------------------

def test_a_jpeg_missing_only_its_eoi_is_accepted_and_real_truncations_refused(settings):
    rng = np.random.default_rng(22)
    image = PILImage.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    out = io.BytesIO()
    image.save(out, "JPEG")
    full = out.getvalue()
    complete = np.asarray(decode_image(full).rgb)
    decoded = decode_image(full[:-2])
    assert np.array_equal(np.asarray(decoded.rgb), complete)
    scan = full.rfind(b"\xff\xda")
    for cut in range(scan + 2, len(full) - 2, 7):
        try:
            accepted = decode_image(full[:cut])
        except ImageRejected as exc:  # "truncated", or a header cut short
            assert "truncated" in str(exc) or "incomplete" in str(exc)
        else:  # accepted only when its pixels are the complete file's
            assert np.array_equal(np.asarray(accepted.rgb), complete), cut
    progressive = io.BytesIO()
    image.save(progressive, "JPEG", progressive=True)
    with pytest.raises(ImageRejected, match="truncated"):
        decode_image(progressive.getvalue()[:-2])


# --- 6. control characters and bidi overrides in names -------------------------

CONTROLS = [chr(c) for c in [*range(1, 0x20), *range(0x7F, 0xA0)]] + [
    "\u061c", "\u200e", "\u200f", "\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067", "\u2068",
    "\u2069"]


def test_every_control_and_bidi_character_is_replaced_in_names():
    for char in CONTROLS:
        shown = printable_name(f"a{char}b")
        assert shown == "a\ufffdb", ascii(char)
    assert printable_name("a\x00b") == "ab"
    assert printable_name("été ☀") == "été ☀"


def test_zip_entry_names_with_controls_give_safe_labels_and_report_lines(db, tmp_path, settings):
    settings.MEDIA_ROOT = tmp_path / "media"
    names = {f"dir{char}x/f{i}.png": _png(100 + i) for i, char in enumerate(CONTROLS) if char not in "\\/"}
    names["evil\nskipped: x.png/\x1b]0;pwned\x07.png"] = b"not an image"
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in names.items():
            archive.writestr(name, data)
    path = tmp_path / "names.zip"
    path.write_bytes(out.getvalue())
    settings.CBIR_ZIP_MAX_ENTRIES = 1000
    dataset = Dataset.objects.create(name="controls")
    report = import_zip(path, dataset, labels_from_folders=True)
    assert report.imported == len(names) - 1
    shown = [*Image.objects.values_list("label", flat=True), *Image.objects.values_list("original_filename", flat=True),
             *(name for name, _ in report.rejected)]
    for text in shown:
        assert not any(char in text for char in CONTROLS), ascii(text)


# --- 7. dataset names -----------------------------------------------------------

@pytest.mark.parametrize("raw,expected", [(" padded ", "padded"), (unicodedata.normalize("NFD", "café"), "café")])
def test_dataset_names_are_normalised(raw, expected):
    assert normalise_dataset_name(raw) == expected


@pytest.mark.parametrize("raw", ["", "   ", "x" * 101, "line1\nline2", "a\x00b", "tab\there", "rtl\u202egnp"])
def test_bad_dataset_names_are_refused_with_words(raw):
    with pytest.raises(DatasetNameError):
        normalise_dataset_name(raw)


@pytest.mark.parametrize("raw", ["", "   ", "x" * 101, "line1\nline2", "a\x00b"])
def test_import_images_refuses_a_bad_dataset_name_and_creates_nothing(raw, db, tmp_path, settings):
    settings.MEDIA_ROOT = tmp_path / "media"
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(_png(9))
    with pytest.raises(CommandError, match="dataset name"):
        call_command("import_images", str(tmp_path / "in"), dataset=raw, no_progress=True)
    assert not Dataset.objects.exists() and not Image.objects.exists()


def test_a_dataset_created_padded_or_nfd_is_found_by_its_plain_spelling(db, tmp_path, settings):
    settings.MEDIA_ROOT = tmp_path / "media"
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(_png(10))
    call_command("import_images", str(tmp_path / "in"), dataset=" " + unicodedata.normalize("NFD", "café") + " ",
                 no_progress=True)
    assert list(Dataset.objects.values_list("name", flat=True)) == ["café"]
    assert dataset_named("café") is not None and dataset_named(" café ") is not None


def test_the_report_csv_of_a_dataset_with_a_line_break_is_no_500(db, client):
    Dataset.objects.bulk_create([Dataset(name="line1\nline2")])  # as an older version could store it
    response = client.get("/models/report.csv", {"dataset": "line1\nline2"})
    assert response.status_code in (200, 400, 404)
    if response.status_code == 200:
        assert "\n" not in response["Content-Disposition"]


@pytest.mark.parametrize("raw", ["", "   ", "x" * 101, "line1\nline2"])
def test_the_admin_refuses_a_bad_dataset_name_with_words(raw, admin_client):
    response = admin_client.post("/admin/search/dataset/add/", {"name": raw, "description": ""})
    assert response.status_code == 200 and response.context["adminform"].form.errors["name"]
    assert not Dataset.objects.exists()


def test_the_admin_stores_a_padded_nfd_name_as_nfc(admin_client):
    admin_client.post("/admin/search/dataset/add/", {"name": " " + unicodedata.normalize("NFD", "café"),
                                                     "description": ""})
    assert list(Dataset.objects.values_list("name", flat=True)) == ["café"]



LEGACY_NAMES = ["tab\there", "two\nlines", "  padded  ", unicodedata.normalize("NFD", "café"), "rtl\u202eevil", "x" * 100]


@pytest.mark.parametrize("legacy", LEGACY_NAMES)
def test_a_dataset_named_before_the_normaliser_stays_reachable(legacy, admin_client):
    from search.services import BadParameter, parse_dataset

    old = Dataset.objects.create(name=legacy)  # as stored before names were normalised
    assert dataset_named(legacy) == old and parse_dataset(legacy) == old
    for nothing in ("a\x00b", "x" * 1000):  # no 500 for a name no dataset can have
        assert dataset_named(nothing) is None
        with pytest.raises(BadParameter, match="unknown dataset"):
            parse_dataset(nothing)
    page = admin_client.get(f"/admin/search/dataset/{old.pk}/change/")
    assert page.status_code == 200
    # Its description can be edited without renaming it (a tab or a bidi control survives; padding is stripped).
    response = admin_client.post(f"/admin/search/dataset/{old.pk}/change/", {"name": legacy, "description": "kept"})
    assert response.status_code == 302, response.context["adminform"].form.errors
    old.refresh_from_db()
    assert old.description == "kept" and old.name in (legacy, legacy.strip())
    response = admin_client.post(f"/admin/search/dataset/{old.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302 and not Dataset.objects.filter(pk=old.pk).exists()


def test_renaming_a_legacy_dataset_to_a_bad_name_is_refused(admin_client):
    old = Dataset.objects.create(name="tab\there")
    response = admin_client.post(f"/admin/search/dataset/{old.pk}/change/", {"name": "new\tname", "description": ""})
    assert response.status_code == 200 and response.context["adminform"].form.errors["name"]
    old.refresh_from_db()
    assert old.name == "tab\there"

# --- EXIF orientation stored with another type or count --------------------------

def _exif_orientation_block(tagtype: int, count: int, payload: bytes, order: str = "<") -> bytes:
    """A TIFF-structured EXIF block, by hand: header, IFD0 with one entry (tag
    0x0112), the value in place when it fits 4 bytes, else just after the IFD."""
    mark = b"II" if order == "<" else b"MM"
    field, extra = (payload.ljust(4, b"\0"), b"") if len(payload) <= 4 else (struct.pack(order + "I", 26), payload)
    return (mark + struct.pack(order + "HI", 42, 8) + struct.pack(order + "H", 1)
            + struct.pack(order + "HHI", 0x0112, tagtype, count) + field + struct.pack(order + "I", 0) + extra)


ORIENTATION_FORMS = {  # name: (TIFF type, count, payload of orientation 6, or 9), honoured?
    "SHORT": (3, 1, struct.pack("<H", 6), True),
    "SHORT big-endian": (3, 1, struct.pack(">H", 6), True),
    "LONG": (4, 1, struct.pack("<I", 6), False),
    "SSHORT": (8, 1, struct.pack("<h", 6), False),
    "FLOAT": (11, 1, struct.pack("<f", 6.0), False),
    "RATIONAL": (5, 1, struct.pack("<II", 6, 1), False),
    "SHORT count 2": (3, 2, struct.pack("<HH", 6, 6), False),
    "SHORT value 9": (3, 1, struct.pack("<H", 9), False),
}


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("form", list(ORIENTATION_FORMS))
def test_only_a_well_formed_exif_orientation_turns_the_image(form, fmt):
    from training.core.preprocessing import exif_orientation, to_rgb

    tagtype, count, payload, honoured = ORIENTATION_FORMS[form]
    block = _exif_orientation_block(tagtype, count, payload, ">" if "big" in form else "<")
    picture = PILImage.new("RGB", (40, 20), (255, 255, 255))
    picture.paste((0, 0, 0), (20, 0, 40, 20))  # right half black
    out = io.BytesIO()
    picture.save(out, format=fmt, exif=(b"Exif\x00\x00" + block) if fmt == "JPEG" else block, quality=95)
    data = out.getvalue()
    with PILImage.open(io.BytesIO(data)) as opened:
        assert exif_orientation(opened) == (6 if honoured else 1)
        rgb = to_rgb(opened)
    assert rgb.size == ((20, 40) if honoured else (40, 20))
    decoded = decode_image(data)  # the import path: stored size and picture agree
    assert (decoded.width, decoded.height) == rgb.size == decoded.rgb.size
    if fmt == "JPEG":
        drafted = decode_image(data, draft_size=16)  # a search query's draft decode
        assert (drafted.width, drafted.height) == rgb.size


def test_a_broken_exif_block_is_no_orientation_and_no_error():
    from training.core.preprocessing import exif_orientation

    for block in (b"", b"II*\x00", b"II*\x00\xff\xff\xff\x00", b"XX*\x00\x08\x00\x00\x00",
                  _exif_orientation_block(3, 1, struct.pack("<H", 6))[:19]):
        image = PILImage.new("RGB", (4, 2))
        image.info["exif"] = b"Exif\x00\x00" + block
        assert exif_orientation(image) == 1


@pytest.mark.parametrize("tagtype,expected", [(3, 6), (4, 1), (8, 1)], ids=["SHORT", "LONG", "SSHORT"])
def test_a_tiff_files_own_orientation_tag_counts_only_as_a_short(tagtype, expected):
    from PIL import TiffImagePlugin

    from training.core.preprocessing import exif_orientation

    ifd = TiffImagePlugin.ImageFileDirectory_v2()
    ifd[0x0112] = 6
    ifd.tagtype[0x0112] = tagtype
    out = io.BytesIO()
    PILImage.new("RGB", (8, 4)).save(out, "TIFF", tiffinfo=ifd)
    with PILImage.open(io.BytesIO(out.getvalue())) as opened:
        assert exif_orientation(opened) == expected
