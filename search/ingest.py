"""Adding images to a dataset: one file (admin, API), a folder, a zip.

`add_image` is the single way an image enters the system: it validates the
bytes, skips exact duplicates (same SHA-256 in the same dataset), stores the
original and a thumbnail under MEDIA_ROOT and writes the row. A rejected input
leaves no file and no row behind."""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import os
import stat
import struct
import tempfile
import unicodedata
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError, transaction

from search.imaging import ImageRejected, decode_image, make_thumbnail
from search.models import Dataset, Image, split_for
from search.names import printable_name  # noqa: F401 - also this module's API

logger = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]


def _noop(done: int, total: int, message: str) -> None:
    pass


# What an import's result (a Job row's JSON, shown on its page) keeps of its skipped files:
# the first REASONS_KEPT (file, reason) pairs, and a count for each of the COUNTED_REASONS
# commonest reasons (the rest summed), so a zip of a million bad entries stays a small row.
REASONS_KEPT = 1000
COUNTED_REASONS = 100


@dataclass
class ImportReport:
    imported: int = 0
    duplicates: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)
    image_ids: list[int] = field(default_factory=list)

    @property
    def rejected_count(self) -> int:
        return len(self.rejected)

    def as_dict(self) -> dict:
        return {
            "imported": self.imported,
            "duplicates": self.duplicates,
            "rejected": self.rejected_count,
            "not_images": self.not_images,
            "reasons": [{"file": name, "reason": reason} for name, reason in self.rejected[:REASONS_KEPT]],
            "reasons_left_out": max(0, self.rejected_count - REASONS_KEPT),
            "reason_counts": self._capped_reason_counts(),
        }

    def _capped_reason_counts(self) -> dict[str, int]:
        counts = Counter(reason for _, reason in self.rejected)
        kept = dict(counts.most_common(COUNTED_REASONS))
        other = sum(counts.values()) - sum(kept.values())
        return {**kept, "(other reasons)": other} if other else kept

    @property
    def not_images(self) -> int:
        return sum(1 for _, reason in self.rejected if reason == "not an image")

    def summary(self) -> str:
        text = (f"imported {self.imported}, duplicates skipped {self.duplicates}, "
                f"unreadable skipped {self.rejected_count - self.not_images}")
        return text + (f", other files (not images) skipped {self.not_images}" if self.not_images else "")


class StorageError(Exception):
    """MEDIA_ROOT cannot be written (disk full, read-only, not a folder). Not a
    fault of the file being imported, so an import stops at the first one
    instead of reporting every later file as bad. `report` holds what was
    imported before it, when an importer raised it."""

    report: ImportReport | None = None


def _storage_error(exc: OSError) -> StorageError:
    return StorageError(f"cannot write to the media folder {settings.MEDIA_ROOT} ({exc.strerror or exc}); "
                        f"free some space or fix its permissions, then import again")


def _write_atomically(relative: str, data: bytes) -> Path:
    """Write a file under MEDIA_ROOT through a temporary name, so no reader
    ever sees half a file and a failure leaves nothing behind."""
    target = Path(settings.MEDIA_ROOT) / relative
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
    except OSError as exc:
        raise _storage_error(exc) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _storage_error(exc) from exc
        raise
    return target


def nfc(text: str) -> str:
    """Unicode NFC: the same name typed on Linux/Windows (composed "é") and
    stored by macOS (decomposed "e" + U+0301) becomes one string, so one label."""
    return unicodedata.normalize("NFC", text)


# Info-ZIP Unicode Path extra field (APPNOTE.TXT 4.6.9): version 1, the CRC-32
# of the name as stored in the header, then the name in UTF-8.
_UNICODE_PATH_EXTRA = 0x7075
_UTF8_FLAG = 0x800


def zip_entry_name(info) -> str:
    """The name of a zip entry (a zipfile.ZipInfo) the way Info-ZIP `unzip` reads it, in NFC.

    When the UTF-8 flag (bit 11) is set, Python has decoded it already.
    Otherwise: the Info-ZIP Unicode Path extra field (0x7075) when present and
    its CRC-32 matches the raw name (a stale field is ignored, as unzip does);
    else the raw bytes as UTF-8 when they are valid UTF-8 (Info-ZIP `zip` on
    Linux stores UTF-8 names without the flag); else code page 437, the zip
    format's original encoding (what Python gives). Never raises.
    """
    if info.flag_bits & _UTF8_FLAG:
        return nfc(info.filename)
    try:
        raw = info.orig_filename.encode("cp437")  # Python decoded the header bytes as cp437: undo it exactly
    except UnicodeEncodeError:  # not a name zipfile decoded from cp437
        return nfc(info.filename)
    unicode_path = _unicode_path_extra(info.extra, raw)
    if unicode_path is not None:
        return nfc(unicode_path)
    try:
        return nfc(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return nfc(raw.decode("cp437"))


def _unicode_path_extra(extra: bytes, raw_name: bytes) -> str | None:
    """The UTF-8 name of a 0x7075 extra field whose CRC matches `raw_name`, or None."""
    at = 0
    while at + 4 <= len(extra):
        kind, size = struct.unpack_from("<HH", extra, at)
        body = extra[at + 4:at + 4 + size]
        at += 4 + size
        if kind != _UNICODE_PATH_EXTRA or len(body) < 5 or body[0] != 1:
            continue
        (crc,) = struct.unpack_from("<I", body, 1)
        if crc != zlib.crc32(raw_name) & 0xFFFFFFFF:
            continue
        try:
            return body[5:].decode("utf-8") or None
        except UnicodeDecodeError:
            continue
    return None


def storage_paths(dataset_id: int, sha256: str, extension: str) -> tuple[str, str]:
    shard = sha256[:2]
    return (f"datasets/{dataset_id}/{shard}/{sha256}.{extension}",
            f"thumbnails/{dataset_id}/{shard}/{sha256}.jpg")


def add_image(dataset: Dataset, data: bytes, original_filename: str, label: str | None = None) -> tuple[Image, bool]:
    """Store one image. Returns (image, created); created is False for an exact
    duplicate already in the dataset. Raises ImageRejected for bad input."""
    max_bytes = settings.CBIR_MAX_IMPORT_FILE_BYTES
    if len(data) > max_bytes:
        raise ImageRejected(f"the file is larger than the limit of {max_bytes:,} bytes")
    # The duplicate check before decoding: a copy costs a hash, not a decode (a zip of many copies).
    existing = Image.objects.filter(dataset=dataset, sha256=hashlib.sha256(data).hexdigest()).first()
    if existing:
        return existing, False
    decoded = decode_image(data)
    file_path, thumb_path = storage_paths(dataset.pk, decoded.sha256, decoded.extension)
    label = printable_name(label or "").strip()[:200] or None
    written: list[Path] = []
    try:
        written.append(_write_atomically(file_path, data))
        written.append(_write_atomically(thumb_path, make_thumbnail(decoded.rgb)))
        with transaction.atomic():
            image = Image.objects.create(
                dataset=dataset, file=file_path, thumbnail=thumb_path, sha256=decoded.sha256,
                label=label, split=split_for(decoded.sha256), width=decoded.width, height=decoded.height,
                original_filename=printable_name(original_filename)[:500],
            )
        return image, True
    except IntegrityError:
        # Another process stored the same bytes in the meantime: same paths, same content.
        existing = Image.objects.filter(dataset=dataset, sha256=decoded.sha256).first()
        if existing:
            return existing, False
        _remove_unreferenced(written)
        raise
    except BaseException:
        _remove_unreferenced(written)
        raise


def _remove_unreferenced(paths: Iterable[Path]) -> None:
    root = Path(settings.MEDIA_ROOT)
    for path in paths:
        relative = str(path.relative_to(root))
        if not Image.objects.filter(file=relative).exists() and not Image.objects.filter(thumbnail=relative).exists():
            path.unlink(missing_ok=True)


SYMLINK_REASON = "a symbolic link (not followed: it could publish a file from outside the folder)"


def iter_folder(root: Path) -> Iterator[Path]:
    """Every regular file below root, and every symbolic link to a file, sorted
    (the links are yielded so that import_folder reports them; it never reads
    through one). Symlinks to folders are not descended into (no loops, nothing
    from outside the root). Hidden files and folders are skipped."""
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (Path(folder) / d).is_symlink())
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(folder) / name
            if path.is_file():  # a link to a regular file too (reported, not read)
                yield path


def _read_no_follow(path: Path) -> bytes:
    """The bytes of a regular file, refusing a symbolic link even if one replaced
    the file since the walk (O_NOFOLLOW). Raises ImageRejected, OSError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageRejected(SYMLINK_REASON) from None
        raise
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ImageRejected("not a regular file")
        if info.st_size > settings.CBIR_MAX_IMPORT_FILE_BYTES:
            raise ImageRejected(f"the file is larger than the limit of {settings.CBIR_MAX_IMPORT_FILE_BYTES:,} bytes")
        return handle.read(settings.CBIR_MAX_IMPORT_FILE_BYTES + 1)


def label_for(path: Path, root: Path, depth: int | None = None) -> str | None:
    """The label of a file below `root`: its folder path (the first `depth`
    levels), in NFC, so composed and decomposed spellings are one label."""
    parts = path.parent.relative_to(root).parts
    if depth:
        parts = parts[:depth]
    return nfc("/".join(parts)) or None


# A file of no image format whose name does not claim to be an image (a .txt,
# .ogg or .dat beside the photos) is counted as "not an image" rather than
# reported one by one; a "photo.jpg" that holds text, or an image of a format
# not accepted (a TIFF, a PSD, whatever its name), is reported with its reason.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".png", ".apng", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif",
                  ".avif", ".mpo", ".psd", ".jxl", ".jp2", ".svg", ".ico", ".dng", ".cr2", ".cr3", ".nef", ".arw"}


def _import_one(report: ImportReport, dataset: Dataset, name: str, label: str | None, read: Callable[[], bytes],
                *, unreadable: tuple[type[BaseException], ...], describe: Callable[[BaseException], str]) -> None:
    """Read and add one file, recording the outcome in `report`: a bad file is
    reported with its reason; a storage failure stops the whole import."""
    try:
        image, created = add_image(dataset, read(), name, label)
    except ImageRejected as exc:
        reason = str(exc)
        if exc.not_an_image and Path(name).suffix.lower() not in IMAGE_SUFFIXES:
            reason = "not an image"
        report.rejected.append((name, reason))
    except StorageError as exc:
        exc.report = report
        raise
    except unreadable as exc:
        report.rejected.append((name, describe(exc)))
    else:
        if created:
            report.imported += 1
            report.image_ids.append(image.pk)
        else:
            report.duplicates += 1


def import_blobs(dataset: Dataset, blobs: Iterable[tuple[str, str | None, bytes]], total: int, *,
                 progress: Progress = _noop) -> ImportReport:
    """Import images that are already bytes in memory (e.g. arrays encoded as
    PNG by an importer of another format): each (display name, label, bytes)
    goes through the same checks as a file of a folder (add_image: validation,
    SHA-256 duplicate check, original and thumbnail on disk, one row). A bad
    image is reported, never aborts; a StorageError stops the import."""
    report = ImportReport()
    for index, (name, label, data) in enumerate(blobs, start=1):
        _import_one(report, dataset, name, label, functools.partial(bytes, data), unreadable=(), describe=str)
        progress(index, total, name)
    return report


def import_folder(root: str | Path, dataset: Dataset, *, labels_from_folders: bool = False,
                  label_depth: int | None = None, progress: Progress = _noop) -> ImportReport:
    """Import every image below `root`. Files are recognised by content; one bad
    file never aborts the import, it is reported with its reason. A storage
    failure (StorageError) stops it: every later file would fail the same way."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    files = list(iter_folder(root))
    report = ImportReport()
    for index, path in enumerate(files, start=1):
        relative = nfc(printable_name(str(path.relative_to(root))))
        label = label_for(path, root, label_depth) if labels_from_folders else None
        _import_one(report, dataset, relative, label, functools.partial(_read_no_follow, path), unreadable=(OSError,),
                    describe=lambda exc: f"cannot be read ({getattr(exc, 'strerror', None) or exc})")
        progress(index, len(files), relative)
    return report


def _zip_entry_problem(exc: BaseException) -> str:
    """Why a zip entry cannot be read, in words (no library messages)."""
    import lzma

    text = str(exc)
    if "encrypted" in text:
        return "it is encrypted"
    if "CRC" in text:
        return "its data do not match the checksum the zip declares for it"
    if "compression method" in text:
        return "it uses a compression method that cannot be read"
    if isinstance(exc, (zlib.error, lzma.LZMAError, EOFError)) or "decompress" in text:
        return "its compressed data are corrupt"
    return "the entry is damaged"


class ZipRejected(ValueError):
    """The archive as a whole is refused (not a zip, too many entries, too big, overlapping entries)."""


_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, 22 bytes, name length, extra length (APPNOTE 4.3.7)


def check_no_overlap(archive, fp) -> None:
    """Refuse (ZipRejected) a zip whose entries share bytes: two central
    directory records pointing at one local header, or a local header plus
    its declared compressed data running into the next entry or into the
    central directory (the "overlapping files" zip bomb, cpython#109858;
    Python 3.11's zipfile does not check it). `fp` is the open zip file;
    each local header is read (30 bytes and its name/extra lengths), nothing
    is decompressed."""
    entries = sorted(archive.infolist(), key=lambda info: info.header_offset)
    end_of_data = archive.start_dir
    for index, info in enumerate(entries):
        fp.seek(info.header_offset)
        header = fp.read(_LOCAL_HEADER.size)
        if len(header) < _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
            raise ZipRejected(f"not a readable zip file (the entry {printable_name(info.filename)[:100]!r} "
                              f"has no local header where the directory says)")
        name_length, extra_length = _LOCAL_HEADER.unpack(header)[1:]
        end = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length + info.compress_size
        following = entries[index + 1].header_offset if index + 1 < len(entries) else end_of_data
        if end > following:
            raise ZipRejected("the zip's entries overlap (several entries share the same data, a zip bomb "
                              "that `unzip -t` calls \"possible zip bomb\"); nothing was imported")


def import_zip(zip_path: str | Path, dataset: Dataset, *, labels_from_folders: bool = False,
               progress: Progress = _noop, should_stop: Callable[[], bool] | None = None) -> ImportReport:
    """Import the images in a zip. Entry names are only used as labels and
    display names, never as paths on disk (no traversal); sizes are checked
    while reading (no zip bombs); one bad entry never aborts the import; a
    zip that declares more than CBIR_ZIP_MAX_TOTAL_BYTES is refused whole.
    Names are decoded as `unzip` does (zip_entry_name) and normalised to NFC."""
    import lzma
    import zipfile
    import zlib

    max_entries = settings.CBIR_ZIP_MAX_ENTRIES
    max_total = settings.CBIR_ZIP_MAX_TOTAL_BYTES
    max_file = settings.CBIR_MAX_IMPORT_FILE_BYTES
    try:
        archive = zipfile.ZipFile(zip_path)
    except UnicodeDecodeError:
        raise ZipRejected("not a readable zip file (an entry name is marked as UTF-8 but is not)") from None
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ZipRejected(f"not a readable zip file ({exc})") from None
    report = ImportReport()
    with archive:
        entries = [info for info in archive.infolist() if not info.is_dir()]
        if len(entries) > max_entries:
            raise ZipRejected(f"the zip holds {len(entries):,} files; the limit is {max_entries:,}")
        check_no_overlap(archive, archive.fp)
        declared = sum(info.file_size for info in entries)
        if declared > max_total:
            # Refused before anything is stored; reads below never exceed the declared sizes.
            raise ZipRejected(f"the zip unpacks to {declared:,} bytes, more than the limit of {max_total:,}")
        total_read = 0
        for index, info in enumerate(entries, start=1):
            name = printable_name(zip_entry_name(info)).replace("\\", "/")
            parts = [p for p in name.split("/") if p not in ("", ".", "..")]
            display = "/".join(parts) or "(unnamed)"
            if should_stop and should_stop():
                break
            if not parts or parts[-1].startswith(".") or parts[0] == "__MACOSX":
                progress(index, len(entries), display)
                continue
            label = "/".join(parts[:-1]) or None if labels_from_folders else None
            def read(info=info) -> bytes:
                nonlocal total_read
                if info.file_size > max_file:
                    raise ImageRejected(f"the file is larger than the limit of {max_file:,} bytes")
                if total_read + info.file_size > max_total:
                    raise ZipRejected(f"the zip unpacks to more than {max_total:,} bytes; stopped here")
                with archive.open(info) as handle:
                    # The declared size may lie (zip bomb): read at most the limit.
                    data = handle.read(max_file + 1)
                if len(data) > max_file:
                    raise ImageRejected(f"the file is larger than the limit of {max_file:,} bytes")
                total_read += len(data)
                return data

            try:
                # Corrupt member, bad CRC, encrypted entry, unsupported compression: that entry only.
                _import_one(report, dataset, display, label, read,
                            unreadable=(zipfile.BadZipFile, OSError, RuntimeError, EOFError, zlib.error,
                                        lzma.LZMAError),
                            describe=lambda exc: f"cannot be read from the zip ({_zip_entry_problem(exc)})")
            except ZipRejected as exc:
                report.rejected.append((display, str(exc)))
                break
            progress(index, len(entries), display)
    return report
