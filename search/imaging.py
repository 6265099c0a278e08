"""Decoding and checking images that come from outside: uploads, imported
files, zip entries. Everything that rejects an image raises ImageRejected with
a message a person can act on; nothing here writes to disk."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from django.conf import settings
from PIL import Image, ImageFile, UnidentifiedImageError

from training.preprocessing import to_rgb

# Formats accepted by content (never by file name).
ACCEPTED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "MPO": "jpg"}
# Openers to try; the JPEG opener also yields MPO (multi-picture JPEGs from cameras).
OPEN_FORMATS = ["JPEG", "PNG", "WEBP", "BMP", "GIF"]

Image.init()  # register every plugin, so `formats=` below knows MPO and friends

# A truncated file is an error, never a half-grey picture.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageRejected(ValueError):
    """The bytes are not an image this system accepts; str(exc) says why."""


@dataclass
class DecodedImage:
    rgb: Image.Image  # upright RGB, transparency on white, first frame
    format: str  # PIL format name, e.g. "JPEG"
    extension: str  # file extension to store it under
    width: int  # of the upright image
    height: int
    sha256: str  # of the original bytes


def _pixel_limit() -> int:
    return int(getattr(settings, "CBIR_MAX_PIXELS", 50_000_000))


def decode_image(data: bytes, *, max_pixels: int | None = None, draft_size: int | None = None) -> DecodedImage:
    """Decode and fully load an image from bytes, or raise ImageRejected.

    Checks, in order: not empty; a format we accept (by content); pixel count
    within the limit *before* decoding (decompression bombs); decodes fully
    (truncated or corrupt data fail here); converts to upright RGB.
    `draft_size` lets JPEG decoding skip resolution the caller will not use.
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
        raise ImageRejected(
            "not a supported image (accepted: JPEG, PNG, WebP, BMP, GIF, judged by content, not by file name)"
        ) from None
    except Image.DecompressionBombError:
        raise ImageRejected(f"the image has too many pixels (limit {max_pixels:,})") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for corrupt headers
        raise ImageRejected(f"the image header is corrupt ({type(exc).__name__}: {exc})") from None
    with image:
        width, height = image.size
        if width < 1 or height < 1:
            raise ImageRejected("the image has no pixels")
        if width * height > max_pixels:
            raise ImageRejected(f"the image is {width}×{height} = {width * height:,} pixels; the limit is {max_pixels:,}")
        try:
            if draft_size and image.format in ("JPEG", "MPO"):
                image.draft("RGB", (draft_size, draft_size))
            image.seek(0)  # animated GIF/WebP: the first frame
            image.load()
            rgb = to_rgb(image)
            rgb.load()
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
            message = str(exc) or type(exc).__name__
            if "truncated" in message.lower() or isinstance(exc, EOFError):
                raise ImageRejected("the image file is truncated (incomplete data)") from None
            raise ImageRejected(f"the image data are corrupt ({message})") from None
        fmt = image.format or "PNG"
    if draft_size and fmt in ("JPEG", "MPO"):
        # The stored size is the real one, not the draft's.
        width, height = _upright_size(data, width, height)
    else:
        width, height = rgb.size
    return DecodedImage(rgb=rgb, format=fmt, extension=ACCEPTED_FORMATS.get(fmt, "img"),
                        width=width, height=height, sha256=hashlib.sha256(data).hexdigest())


def _upright_size(data: bytes, width: int, height: int) -> tuple[int, int]:
    try:
        with Image.open(io.BytesIO(data)) as image:
            orientation = image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001
        orientation = 1
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def make_thumbnail(rgb: Image.Image, size: int | None = None) -> bytes:
    """A JPEG thumbnail no larger than size×size, keeping the aspect ratio."""
    size = size or int(getattr(settings, "CBIR_THUMBNAIL_SIZE", 256))
    thumb = rgb.copy()
    thumb.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    thumb.save(out, format="JPEG", quality=85, optimize=True)
    return out.getvalue()


def read_limited(fileobj, limit: int) -> bytes:
    """Read at most `limit` bytes; raise ImageRejected when there is more."""
    data = fileobj.read(limit + 1)
    if len(data) > limit:
        raise ImageRejected(f"the file is larger than the limit of {limit:,} bytes")
    return data
