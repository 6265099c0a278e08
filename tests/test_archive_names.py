"""Names in zips and folders (issue 11, item 6): decoded the way Info-ZIP's
`unzip` does (the Unicode Path extra field, else UTF-8, else code page 437) and
normalised to NFC, so a label is the same whichever tool wrote the archive."""

from __future__ import annotations

import io
import struct
import unicodedata
import zipfile

import pytest

from search.ingest import import_folder, import_zip, zip_entry_name
from search.models import Image
from tests.badinput import REAL_PHOTOS, good_png, unicode_path_extra, zip_with_raw_names

NFC = unicodedata.normalize("NFC", "Löwe")
NFD = unicodedata.normalize("NFD", "Löwe")


def _labels_and_names(tmp_path, dataset, data: bytes) -> tuple[list, list]:
    path = tmp_path / "upload.zip"
    path.write_bytes(data)
    report = import_zip(path, dataset, labels_from_folders=True)
    assert not report.rejected, report.rejected
    rows = Image.objects.filter(dataset=dataset).order_by("original_filename")
    return [r.label for r in rows], [r.original_filename for r in rows]


def test_the_reported_infozip_zip_gives_the_label_ete(dataset, tmp_path):
    labels, names = _labels_and_names(tmp_path, dataset, (REAL_PHOTOS / "infozip_utf8_noflag.zip").read_bytes())
    assert labels == ["été"] and names == ["été/a.png"]


def test_utf8_names_without_the_flag_are_read_as_utf8(dataset, tmp_path):
    data = zip_with_raw_names([("dossier été/☀.png".encode(), good_png(1), b""),
                               ("日本/写真.png".encode(), good_png(2), b"")])
    labels, names = _labels_and_names(tmp_path, dataset, data)
    assert sorted(labels) == ["dossier été", "日本"]
    assert sorted(names) == ["dossier été/☀.png", "日本/写真.png"]


def test_real_cp437_names_are_read_as_cp437(dataset, tmp_path):
    raw = "Café/Übersicht.png".encode("cp437")  # é = 0x82, Ü = 0x9a: not valid UTF-8
    labels, names = _labels_and_names(tmp_path, dataset, zip_with_raw_names([(raw, good_png(3), b"")]))
    assert labels == ["Café"] and names == ["Café/Übersicht.png"]


def test_the_unicode_path_extra_field_wins_when_its_crc_matches(dataset, tmp_path):
    raw = b"caf_/a.png"  # what an old tool wrote in the header; the real name is in the extra field
    data = zip_with_raw_names([(raw, good_png(4), unicode_path_extra(raw, "café ☕/a.png"))])
    labels, names = _labels_and_names(tmp_path, dataset, data)
    assert labels == ["café ☕"] and names == ["café ☕/a.png"]


def test_a_stale_unicode_path_extra_field_is_ignored(dataset, tmp_path):
    """Renamed by a tool that did not update the extra field: its CRC no longer matches the header name."""
    raw = "Löwe/a.png".encode()
    data = zip_with_raw_names([(raw, good_png(5), unicode_path_extra(raw, "old name/a.png", crc=12345))])
    labels, _ = _labels_and_names(tmp_path, dataset, data)
    assert labels == [NFC]


def test_nfc_and_nfd_spellings_are_one_label_in_a_zip(dataset, tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:  # flagged UTF-8, as macOS and Python write them
        archive.writestr(f"{NFC}/a.png", good_png(6))
        archive.writestr(f"{NFD}/b.png", good_png(7))
    labels, names = _labels_and_names(tmp_path, dataset, buffer.getvalue())
    assert labels == [NFC, NFC] and names == [f"{NFC}/a.png", f"{NFC}/b.png"]
    assert all(unicodedata.is_normalized("NFC", n) for n in names)


def test_nfc_and_nfd_spellings_are_one_label_in_a_folder(dataset, tmp_path):
    root = tmp_path / "photos"
    for spelling, seed in ((NFC, 8), (NFD, 9)):  # two different folders to Linux
        (root / spelling).mkdir(parents=True)
        (root / spelling / f"{seed}.png").write_bytes(good_png(seed))
    report = import_folder(root, dataset, labels_from_folders=True)
    assert report.imported == 2
    assert set(Image.objects.values_list("label", flat=True)) == {NFC}
    assert sorted(Image.objects.values_list("original_filename", flat=True)) == [f"{NFC}/8.png", f"{NFC}/9.png"]


@pytest.mark.parametrize("raw,extra,expected", [
    ("été/a.png".encode(), b"", "été/a.png"),
    ("été/a.png".encode("cp437"), b"", "été/a.png"),
    (b"plain/a.png", b"", "plain/a.png"),
    (b"x/a.png", unicode_path_extra(b"x/a.png", NFD), NFC),
    (b"x/a.png", struct.pack("<HH", 0x7075, 3) + b"\1\0\0", "x/a.png"),  # a truncated field
    (b"x/a.png", struct.pack("<HH", 0x5455, 5) + b"\1\0\0\0\0" + unicode_path_extra(b"x/a.png", "y/b.png"),
     "y/b.png"),  # after another extra field (extended timestamp)
])
def test_zip_entry_name(raw, extra, expected):
    info = zipfile.ZipFile(io.BytesIO(zip_with_raw_names([(raw, b"data", extra)]))).infolist()[0]
    assert zip_entry_name(info) == expected
