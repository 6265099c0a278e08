"""Decoding and checking images that come from outside: uploads, imported
files, zip entries. Everything that rejects an image raises ImageRejected with
a message a person can act on; nothing here writes to disk."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import mimetypes
import random
import struct
import warnings
from dataclasses import dataclass

from django.conf import settings
from PIL import Image, ImageFile, UnidentifiedImageError, features

from training.core.preprocessing import HEIF_SUPPORTED, MAX_PNG_METADATA_CHUNK, exif_orientation, to_rgb

logger = logging.getLogger(__name__)

Image.init()  # register every plugin, so `formats=` below knows MPO and friends

AVIF_SUPPORTED = bool(features.check("avif"))  # Pillow ≥ 11.2 built with libavif

# Formats accepted by content (never by file name): PIL format name → the
# extension the original is stored under (HEIF is refined by its brand below).
ACCEPTED_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif",
                    **({"HEIF": "heic"} if HEIF_SUPPORTED else {}), **({"AVIF": "avif"} if AVIF_SUPPORTED else {})}
# Openers to try; the JPEG opener also yields MPO (multi-picture JPEGs from cameras).
OPEN_FORMATS = [fmt for fmt in ACCEPTED_FORMATS if fmt != "MPO"]
# The accepted formats as people name them: the one list the upload page, the
# admin, error messages and docs/bad-input.md show.
ACCEPTED_FORMAT_NAMES = ["JPEG", "PNG", "WebP", "BMP", "GIF"] + (["HEIC/HEIF"] if HEIF_SUPPORTED else []) + (
    ["AVIF"] if AVIF_SUPPORTED else [])
ACCEPTED_FORMATS_TEXT = ", ".join(ACCEPTED_FORMAT_NAMES)
# For the file picker: HEIC/AVIF files are not "image/*" to every browser.
ACCEPT_ATTRIBUTE = "image/*" + (",.heic,.heif" if HEIF_SUPPORTED else "") + (",.avif" if AVIF_SUPPORTED else "")

# Originals are served under their extension (views.media): make sure the newer ones have a type
# whatever /etc/mime.types says.
for _mime, _suffix in (("image/heic", ".heic"), ("image/heif", ".heif"), ("image/avif", ".avif")):
    mimetypes.add_type(_mime, _suffix)

# A truncated file is an error, never a half-grey picture.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageRejected(ValueError):
    """The bytes are not an image this system accepts; str(exc) says why.

    `not_an_image` is True when the bytes are of no image format at all (text,
    a PDF, an archive, unknown bytes): importers count such files beside the
    photos as "not an image" instead of listing each one."""

    def __init__(self, message: str, *, not_an_image: bool = False) -> None:
        super().__init__(message)
        self.not_an_image = not_an_image


@dataclass
class DecodedImage:
    rgb: Image.Image  # the picture a viewer sees: sRGB, upright, transparency on white, displayed frame
    format: str  # PIL format name, e.g. "JPEG", "HEIF", "AVIF"
    extension: str  # file extension to store the original under
    width: int  # of the upright image
    height: int
    sha256: str  # of the original bytes


def _pixel_limit() -> int:
    return int(getattr(settings, "CBIR_MAX_PIXELS", 50_000_000))


def not_supported_message(data: bytes) -> str:
    """Why bytes no opener recognises are refused, in words: the format when
    its magic bytes say (TIFF, PDF, SVG…; see detect_format), or that it
    starts like an accepted format but its header is corrupt, and the list of
    accepted formats (ACCEPTED_FORMATS_TEXT). Always starts with "not a
    supported image"."""
    detected = detect_format(data)
    accepted = f"accepted: {ACCEPTED_FORMATS_TEXT}, judged by content, not by file name"
    if detected is None:
        return f"not a supported image ({accepted})"
    name, is_accepted = detected
    if is_accepted:
        return (f"not a supported image: it starts like a {name} file, but its header is corrupt or incomplete "
                f"({accepted})")
    return f"not a supported image (detected: {name}; {accepted})"


# Magic bytes at the start of a file: (prefix, name, accepted when decodable).
_MAGIC = [
    (b"\x89PNG\r\n\x1a\n", "PNG", True), (b"\xff\xd8\xff", "JPEG", True), (b"GIF87a", "GIF", True),
    (b"GIF89a", "GIF", True), (b"II*\0", "TIFF", False), (b"MM\0*", "TIFF", False), (b"II+\0", "BigTIFF", False),
    (b"MM\0+", "BigTIFF", False), (b"%PDF", "PDF", False), (b"%!PS", "PostScript", False),
    (b"8BPS", "Photoshop (PSD)", False), (b"PK\x03\x04", "zip archive", False), (b"\xff\x0a", "JPEG XL", False),
    (b"\0\0\0\x0cJXL \r\n\x87\n", "JPEG XL", False), (b"\0\0\x01\0", "Windows icon (ICO)", False),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000", False), (b"\xff\x4f\xff\x51", "JPEG 2000", False),
    (b"gimp xcf", "GIMP (XCF)", False), (b"qoif", "QOI", False), (b"\x1f\x8b", "gzip archive", False),
    (b"Rar!", "RAR archive", False), (b"7z\xbc\xaf\x27\x1c", "7-Zip archive", False),
]
# The names detect_format gives that are images (accepted or not); the others are documents, archives, media.
IMAGE_FORMAT_NAMES = {"PNG", "JPEG", "GIF", "WebP", "BMP", "HEIC/HEIF", "AVIF", "TIFF", "BigTIFF", "Photoshop (PSD)",
                      "JPEG XL", "Windows icon (ICO)", "JPEG 2000", "GIMP (XCF)", "QOI", "SVG", "Canon raw (CR3)"}
# ISO-BMFF brands (the "ftyp" box at offset 4).
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1", b"mif2"}
_AVIF_BRANDS = {b"avif", b"avis"}


def detect_format(data: bytes) -> tuple[str, bool] | None:
    """(format name, whether it is an accepted format) by magic bytes, or None.

    A cheap sniff of the first bytes for messages only; decoding decides
    whether an image is accepted.
    """
    head = data[:1024]
    for prefix, name, accepted in _MAGIC:
        if head.startswith(prefix):
            return name, accepted
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP", True
    if head[:4] == b"RIFF":
        return {b"AVI ": "AVI video", b"WAVE": "WAV audio"}.get(head[8:12], "RIFF"), False
    if head[:2] == b"BM" and len(head) >= 26:
        return "BMP", True
    if head[4:8] == b"ftyp":
        brands = {head[i:i + 4] for i in range(8, min(len(head), 8 + 4 * 8), 4)}
        if head[8:12] in _AVIF_BRANDS or (brands & _AVIF_BRANDS and not brands & _HEIF_BRANDS - {b"mif1", b"msf1"}):
            return "AVIF", AVIF_SUPPORTED
        if brands & _HEIF_BRANDS:
            return "HEIC/HEIF", HEIF_SUPPORTED
        if head[8:12] == b"crx ":
            return "Canon raw (CR3)", False
        return "MP4/QuickTime video", False
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<svg") or (text.startswith((b"<?xml", b"<!--", b"<!doctype svg")) and b"<svg" in text):
        return "SVG", False
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "HTML", False
    return None


def _extension(fmt: str, data: bytes) -> str:
    """The extension to store an original under: its format's, with HEIF
    named .heic for HEVC-coded files and .heif otherwise (by ftyp brand)."""
    if fmt == "HEIF":
        return "heic" if data[8:12] in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis") else "heif"
    return ACCEPTED_FORMATS.get(fmt, "img")


def _header_error_message(exc: BaseException) -> str:
    """Words for an exception raised while reading an image header; no library internals."""
    text = str(exc)
    if "truncated" in text.lower() or isinstance(exc, EOFError):
        return "the image file is truncated (incomplete data)"
    if "MAX_TEXT" in text or "text chunks" in text:
        return (f"the image holds more metadata (text or colour profile) than the limit of "
                f"{MAX_PNG_METADATA_CHUNK // 2**20} MiB, a guard against metadata bombs")
    return "the image header is corrupt (it cannot be read)"


_EOI = b"\xff\xd9"
# Entropy-coded bytes that a decoder still missing blocks would decode into
# other pixels; fixed (seeded) so the decision is the same on every run. No 0xFF (a marker).
_FILLERS = [bytes(random.Random(seed).randrange(0, 255) for _ in range(512)) for seed in (22, 23, 24)]


def _pixels(data: bytes) -> bytes | None:
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as image:
            image.load()
            return image.tobytes()
    except Exception:  # noqa: BLE001 - any failure means "not this way"
        return None


def only_eoi_missing(data: bytes) -> bool:
    """Whether a baseline JPEG that does not end with its EOI marker (FFD9)
    is complete otherwise (Pillow#2717: some cameras and encoders drop it;
    browsers show such files). Appending EOI alone would also "repair" a cut
    file (the decoder fills the missing blocks with grey), so the bytes are
    decoded three more times with arbitrary entropy data before the EOI: a
    file still missing blocks decodes them into other pixels; a complete one
    ignores them. Progressive JPEGs are never taken for complete: one cut
    between two scans is indistinguishable from a whole one."""
    if data.endswith(_EOI) or not data.startswith(b"\xff\xd8"):
        return False
    with contextlib.suppress(Exception), Image.open(io.BytesIO(data), formats=["JPEG"]) as image:
        if image.info.get("progressive") or image.info.get("progression"):
            return False
    base = _pixels(data + _EOI)
    return base is not None and all(_pixels(data + filler + _EOI) == base for filler in _FILLERS)


def decode_image(data: bytes, *, max_pixels: int | None = None, draft_size: int | None = None) -> DecodedImage:
    """Decode and fully load an image from bytes, or raise ImageRejected; see
    _decode_image. A baseline JPEG missing only its final EOI marker is decoded
    as if it had one (only_eoi_missing); the original bytes are what is stored
    and hashed."""
    try:
        return _decode_image(data, max_pixels=max_pixels, draft_size=draft_size)
    except ImageRejected as exc:
        if "truncated" not in str(exc) or not only_eoi_missing(data):
            raise
    decoded = _decode_image(data + _EOI, max_pixels=max_pixels, draft_size=draft_size)
    decoded.sha256 = hashlib.sha256(data).hexdigest()
    return decoded


def _decode_image(data: bytes, *, max_pixels: int | None = None, draft_size: int | None = None) -> DecodedImage:
    """Decode and fully load an image from bytes, or raise ImageRejected.

    Checks, in order: not empty; a format we accept (ACCEPTED_FORMATS, by
    content; a refused one is named when its magic bytes say what it is);
    pixel count within the limit *before* decoding (decompression bombs);
    decodes fully (truncated or corrupt data fail here); the picture a viewer
    sees, as sRGB RGB (training.core.preprocessing.to_rgb: displayed frame, EXIF
    orientation, ICC profile, transparency on white).
    `draft_size` lets JPEG decoding skip resolution the caller will not use.
    Rejection messages are plain words, without exception names or library constants.
    """
    if not data:
        raise ImageRejected("the file is empty")
    max_pixels = _pixel_limit() if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below decides; Pillow's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=OPEN_FORMATS)
    except UnidentifiedImageError:
        detected = detect_format(data)
        raise ImageRejected(not_supported_message(data),
                            not_an_image=detected is None or detected[0] not in IMAGE_FORMAT_NAMES) from None
    except Image.DecompressionBombError:
        raise ImageRejected(f"the image has too many pixels (limit {max_pixels:,})") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for corrupt headers
        logger.debug("image header refused: %r", exc)
        raise ImageRejected(_header_error_message(exc)) from None
    with image:
        width, height = image.size
        if width < 1 or height < 1:
            raise ImageRejected("the image has no pixels")
        if width * height > max_pixels:
            raise ImageRejected(f"the image is {width}×{height} = {width * height:,} pixels; the limit is {max_pixels:,}")
        try:
            if draft_size and image.format in ("JPEG", "MPO"):
                image.draft("RGB", (draft_size, draft_size))
            rgb = to_rgb(image)
            rgb.load()
        except (OSError, SyntaxError, ValueError, EOFError, KeyError, IndexError, struct.error,
                Image.DecompressionBombError) as exc:
            logger.debug("image data refused: %r", exc)
            message = str(exc) or type(exc).__name__
            if "truncated" in message.lower() or isinstance(exc, EOFError):
                raise ImageRejected("the image file is truncated (incomplete data)") from None
            if "MAX_TEXT" in message or "text chunks" in message:
                raise ImageRejected(_header_error_message(exc)) from None
            raise ImageRejected("the image data are corrupt (they cannot be decoded)") from None
        fmt = image.format or "PNG"
    if draft_size and fmt in ("JPEG", "MPO"):
        # The stored size is the real one, not the draft's.
        width, height = _upright_size(data, width, height)
    else:
        width, height = rgb.size
    return DecodedImage(rgb=rgb, format=fmt, extension=_extension(fmt, data),
                        width=width, height=height, sha256=hashlib.sha256(data).hexdigest())


def _upright_size(data: bytes, width: int, height: int) -> tuple[int, int]:
    try:
        with Image.open(io.BytesIO(data)) as image:
            orientation = exif_orientation(image)
    except Exception:  # noqa: BLE001
        orientation = 1
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def make_thumbnail(rgb: Image.Image, size: int | None = None) -> bytes:
    """A JPEG thumbnail (bytes) no larger than size×size pixels, keeping the
    aspect ratio; `rgb` is already sRGB (DecodedImage.rgb), so none is embedded."""
    size = size or int(getattr(settings, "CBIR_THUMBNAIL_SIZE", 256))
    thumb = rgb.copy()
    thumb.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    thumb.save(out, format="JPEG", quality=85, optimize=True)
    return out.getvalue()


