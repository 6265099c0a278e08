"""Image preprocessing, defined once.

The same code turns a file into a network input for indexing, querying,
training and evaluation: decode, pick the picture a viewer sees (`to_rgb`:
the displayed frame, EXIF orientation, the embedded colour profile converted
to sRGB, every mode to RGB with transparency composited on white), resize to
size×size (as in the study: the whole image, squashed, no crop), scale to
[0, 1], normalise.

Importing this module also sets up decoding for every process that reads
images (web, workers, training): the HEIC/HEIF opener of pillow-heif is
registered, and PNG metadata limits are raised (see MAX_PNG_METADATA_CHUNK).

Networks with their own pretrained configuration (timm models) may instead ask
for timm's evaluation transform: resize the shorter side to
floor(size / crop_pct) and take the centre size×size crop ("center"), or
squash to that square and crop its centre ("squash"), with their own
interpolation (timm.data.transforms_factory.transforms_imagenet_eval).
"""

from __future__ import annotations

import functools
import io
import logging
import math
import struct
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image, ImageCms, PngImagePlugin

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The EfficientNet-Lite weights were trained on inputs scaled to [-1, 1].
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)

# --- Decoding set-up, for every process that imports this module -------------

try:  # HEIC/HEIF (iPhone photos) through libheif; Pillow reads AVIF itself (PIL.features "avif").
    import pillow_heif

    pillow_heif.register_heif_opener()
    HEIF_SUPPORTED = True
except ImportError:  # pragma: no cover - pillow-heif is a dependency; without it HEIC is refused by name
    HEIF_SUPPORTED = False

# PNG text (tEXt/zTXt/iTXt, e.g. XMP) and ICC profile (iCCP) chunks: Pillow
# refuses a whole image when one decompresses to more than 1 MiB
# (MAX_TEXT_CHUNK) or all of them to more than 64 MiB (MAX_TEXT_MEMORY). Real
# photos exceed the first (Photoshop/Lightroom XMP histories, large LUT
# profiles), so both are raised, to bounds that still stop a metadata bomb
# from exhausting memory. Pixels keep their own limit (CBIR_MAX_PIXELS, checked
# from the header before decoding). Module globals of Pillow: set once here,
# where every decoding path (search.imaging, load_rgb, the trainer) gets them.
MAX_PNG_METADATA_CHUNK = 32 * 1024 * 1024  # bytes, one decompressed text or profile chunk
MAX_PNG_METADATA_TOTAL = 128 * 1024 * 1024  # characters, all text chunks of one image
PngImagePlugin.MAX_TEXT_CHUNK = max(PngImagePlugin.MAX_TEXT_CHUNK, MAX_PNG_METADATA_CHUNK)
PngImagePlugin.MAX_TEXT_MEMORY = max(PngImagePlugin.MAX_TEXT_MEMORY, MAX_PNG_METADATA_TOTAL)

# --- The picture a viewer sees ------------------------------------------------


def select_displayed_frame(image: Image.Image) -> Image.Image:
    """Seek a multi-frame image, in place, to the frame a browser shows first.

    * animated GIF, WebP, AVIF, APNG: the first frame of the animation;
    * an APNG whose default image (IDAT) is not part of the animation (Pillow
      sets ``info["default_image"]`` and counts it as frame 0): frame 1, the
      first animation frame, as browsers show it (APNG spec, "fcTL" before
      "IDAT" or not; https://wiki.mozilla.org/APNG_Specification);
    * MPO (multi-picture JPEG from cameras), multi-image HEIF: the first (primary) image.

    Returns the same image object. Images that are not read from a file (no
    frames) are left as they are.
    """
    if not getattr(image, "is_animated", False):
        return image
    frame = 1 if image.format == "PNG" and image.info.get("default_image") else 0
    if image.tell() != frame:
        image.seek(frame)
    return image


ORIENTATION_TAG = 0x0112
# EXIF orientation → the transposition that shows the picture upright (EXIF 2.3, 4.6.4 A).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}
_EXIF_SHORT = 3  # TIFF field type


def exif_orientation(image: Image.Image) -> int:
    """The image's EXIF orientation (1–8), honoured only when well formed as
    the standard says: tag 0x0112 in IFD0 of the EXIF block, type SHORT,
    count 1, value 1–8. Anything else (LONG, SSHORT, FLOAT or RATIONAL type,
    count 2, out of range, a broken block, an orientation only in XMP) gives
    1: browsers (Firefox) ignore such tags too, so the stored picture, its
    thumbnail and the page agree. Never raises.

    Source: the raw EXIF bytes (``info["exif"]``: JPEG APP1, PNG eXIf, WebP,
    HEIF), or for a TIFF file its own first IFD."""
    raw = image.info.get("exif")
    try:
        if isinstance(raw, bytes | bytearray):
            return _ifd0_orientation(bytes(raw.removeprefix(b"Exif\x00\x00")))
        tags = getattr(image, "tag_v2", None)  # a TIFF file: Pillow parsed its IFD (count not kept)
        if tags is not None and tags.tagtype.get(ORIENTATION_TAG) == _EXIF_SHORT:
            value = tags.get(ORIENTATION_TAG)
            return value if isinstance(value, int) and 1 <= value <= 8 else 1
    except Exception:  # noqa: BLE001 - broken metadata must not make a readable image unusable
        return 1
    return 1


def _ifd0_orientation(tiff: bytes) -> int:
    """Tag 0x0112 of a TIFF-structured block's IFD0, when SHORT, count 1, 1–8; else 1."""
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None or struct.unpack(order + "H", tiff[2:4])[0] != 42:
        return 1
    (offset,) = struct.unpack(order + "I", tiff[4:8])
    (entries,) = struct.unpack(order + "H", tiff[offset:offset + 2])
    for i in range(entries):
        start = offset + 2 + 12 * i
        tag, kind, count = struct.unpack(order + "HHI", tiff[start:start + 8])
        if tag == ORIENTATION_TAG:
            if kind != _EXIF_SHORT or count != 1:
                return 1
            (value,) = struct.unpack(order + "H", tiff[start + 8:start + 10])
            return value if 1 <= value <= 8 else 1
    return 1


def upright(image: Image.Image) -> Image.Image:
    """`image` turned upright by its EXIF orientation (exif_orientation: only
    a well-formed tag counts); the image itself when there is nothing to do."""
    method = _UPRIGHT.get(exif_orientation(image))
    return image if method is None else image.transpose(method)


def to_rgb(image: Image.Image) -> Image.Image:
    """The picture a viewer sees, as an sRGB "RGB" image of the upright size.

    In order: the displayed frame (`select_displayed_frame`); EXIF orientation
    1–8 (`upright`: only a well-formed tag; a malformed one or a broken EXIF
    block is ignored); an embedded ICC colour
    profile (``info["icc_profile"]``: Display P3, Adobe RGB, ProPhoto, a grey
    or CMYK profile…) converted to sRGB with LittleCMS (Pillow's ImageCms,
    perceptual intent), or the pixels taken as sRGB when there is none or it
    cannot be read; every mode to RGB: 16/32-bit and float greyscale scaled to
    8 bits, CMYK, palette, 1-bit; transparency in every form (an alpha channel,
    premultiplied alpha, a palette's alpha, a PNG tRNS transparent colour in
    1-bit, L, I;16 and RGB images) composited on white.

    Never raises for colour or orientation metadata; decoding errors of the
    pixels themselves (truncated, corrupt data) propagate from Pillow.
    """
    select_displayed_frame(image)
    _scale_low_bit_depth_trns(image)
    image = upright(image)
    icc = image.info.get("icc_profile")
    colour, alpha = _colour_and_alpha(image)
    rgb = _to_srgb(colour, icc)
    if alpha is None or alpha.getextrema() == (255, 255):
        return rgb
    return Image.composite(rgb, Image.new("RGB", rgb.size, (255, 255, 255)), alpha)


# PNG greyscale of 1, 2 or 4 bits: Pillow's raw mode → the largest sample value.
_LOW_BIT_DEPTH_MAX = {"1": 1, "L;2": 3, "L;4": 15}


def _scale_low_bit_depth_trns(image: Image.Image) -> None:
    """A 1/2/4-bit greyscale PNG's tRNS grey is a sample value (0..2^bits-1,
    PNG spec 11.3.2.1) while Pillow decodes the pixels scaled to 0..255; scale
    the value the same way (in place, before decoding, while the tile still
    tells the bit depth) so the transparent grey is found."""
    transparency = image.info.get("transparency")
    tile = getattr(image, "tile", None)  # ImageFile only
    if image.format != "PNG" or image.mode not in ("1", "L") or not isinstance(transparency, int) or not tile:
        return
    top = _LOW_BIT_DEPTH_MAX.get(tile[0].args if isinstance(tile[0].args, str) else "")
    if top is not None and transparency <= top:
        image.info["transparency"] = transparency * 255 // top


def _colour_and_alpha(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """Split any mode into colour pixels (RGB, L, CMYK, or what convert("RGB")
    takes) and an 8-bit alpha mask (None when opaque)."""
    mode = image.mode
    transparency = image.info.get("transparency")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: scale the real range to 8 bits rather than clipping.
        array = np.asarray(image, dtype=np.float64)
        alpha = None
        if isinstance(transparency, int):  # PNG tRNS: this grey value is transparent
            alpha = Image.fromarray(np.where(array == transparency, 0, 255).astype(np.uint8), "L")
        high = array.max() if array.size else 0
        if high > 255:
            array = array * (255.0 / (65535.0 if high <= 65535 else high))
        return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="L"), alpha
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 1.0)
        scale = 255.0 / (high - low) if high > low else 0.0
        return Image.fromarray(((array - low) * scale).astype(np.uint8), mode="L"), None
    if mode == "La":  # premultiplied grey + alpha (Pillow has no La → LA conversion)
        premultiplied, coverage = (np.asarray(band, dtype=np.float64) for band in image.split())
        grey = np.where(coverage > 0, premultiplied * 255.0 / np.maximum(coverage, 1), 0)
        return (Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8), "L"),
                Image.fromarray(coverage.astype(np.uint8), "L"))
    if mode == "RGB" and isinstance(transparency, tuple) and max(transparency) > 255:
        # A 48-bit PNG's tRNS colour is 16-bit; Pillow keeps the high byte of each sample.
        image.info["transparency"] = tuple(v >> 8 for v in transparency)
    if mode in ("RGBA", "RGBa", "PA") or (mode in ("P", "RGB") and transparency is not None):
        rgba = image.convert("RGBA")
        return rgba.convert("RGB"), rgba.getchannel("A")
    if mode in ("LA",) or (mode in ("L", "1") and transparency is not None):
        la = image.convert("LA")
        return la.getchannel("L"), la.getchannel("A")
    if mode == "1":
        return image.convert("L"), None
    if mode == "P":
        return image.convert("RGB"), None
    return image, None


# Profile colour spaces (ICC header field) that match each mode of colour pixels.
_PROFILE_SPACES = {"RGB": "RGB ", "L": "GRAY", "CMYK": "CMYK"}


def _to_srgb(colour: Image.Image, icc: bytes | None) -> Image.Image:
    """RGB pixels in sRGB: `colour` converted from its ICC profile when it has a
    readable one of its own colour space, else taken as they are."""
    if icc and colour.mode in _PROFILE_SPACES:
        try:
            transform = _transform_to_srgb(bytes(icc), colour.mode)
        except (OSError, ValueError, TypeError, ImageCms.PyCMSError) as exc:
            logger.debug("ignoring an unreadable ICC profile: %s", exc)
            transform = None
        if transform is not None:
            try:
                converted = ImageCms.applyTransform(colour, transform)
                if converted is not None:
                    return converted
            except (OSError, ValueError, ImageCms.PyCMSError) as exc:
                logger.debug("ignoring an ICC profile that cannot be applied: %s", exc)
    return colour if colour.mode == "RGB" else colour.convert("RGB")


_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


@functools.lru_cache(maxsize=32)
def _transform_to_srgb(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """A LittleCMS transform from the profile `icc` (bytes of an ICC file) for
    pixels of `mode` to sRGB "RGB"; None when the profile's colour space does
    not match the mode. Raises ImageCms.PyCMSError/OSError for an unreadable
    profile. Cached: photos of one camera share their profile."""
    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    if profile.profile.xcolor_space != _PROFILE_SPACES[mode]:
        return None
    # NOCACHE: LittleCMS's one-pixel cache is not safe when threads share a transform.
    return ImageCms.buildTransform(profile, _SRGB, mode, "RGB", renderingIntent=ImageCms.Intent.PERCEPTUAL,
                                   flags=ImageCms.Flags.NOCACHE)


RESAMPLING = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
              "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS,
              "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}
CROP_MODES = ("center", "squash")


@dataclass(frozen=True)
class Preprocessing:
    """How a model version wants its input; stored on the ModelVersion row.

    size: input side in pixels. resample: one of RESAMPLING's names.
    crop_pct None (the default, the study's way): squash the whole image to
    size×size. A number in (0, 1]: timm's evaluation transform, scaling to
    floor(size / crop_pct) then cropping the centre size×size, the shorter
    side first ("center") or the whole image squashed first ("squash").
    Raises ValueError on an unknown resample or crop_mode or a crop_pct outside (0, 1]."""

    size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    grayscale: bool = False
    resample: str = field(default="bilinear")
    crop_pct: float | None = None
    crop_mode: str = "center"

    def __post_init__(self) -> None:
        if self.resample not in RESAMPLING:
            raise ValueError(f"unknown resample {self.resample!r}; known: {', '.join(RESAMPLING)}")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], not {self.crop_pct!r}")
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"unknown crop_mode {self.crop_mode!r}; known: {', '.join(CROP_MODES)}")

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.crop_pct is None:  # versions made before cropping existed keep their exact dict
            del data["crop_pct"], data["crop_mode"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        crop_pct = data.get("crop_pct")
        return cls(
            size=int(data.get("size", 224)),
            mean=tuple(data.get("mean", IMAGENET_MEAN)),
            std=tuple(data.get("std", IMAGENET_STD)),
            grayscale=bool(data.get("grayscale", False)),
            resample=str(data.get("resample", "bilinear")),
            crop_pct=None if crop_pct is None else float(crop_pct),
            crop_mode=str(data.get("crop_mode", "center")),
        )

    def resize(self, image: Image.Image) -> Image.Image:
        """RGB (or L when grayscale) image of size×size; `image` must already be RGB."""
        if image.mode != "RGB":
            image = to_rgb(image)
        resample = RESAMPLING[self.resample]
        if self.crop_pct is None:
            image = image.resize((self.size, self.size), resample, reducing_gap=2.0)
        else:
            image = self._scale_and_crop(image, resample)
        return image.convert("L") if self.grayscale else image

    def _scale_and_crop(self, image: Image.Image, resample) -> Image.Image:
        """timm's eval transform: Resize(floor(size / crop_pct)) then CenterCrop(size)."""
        assert self.crop_pct is not None
        scale = math.floor(self.size / self.crop_pct)
        width, height = image.size
        if self.crop_mode == "squash":
            new_w = new_h = scale
        elif width <= height:  # torchvision Resize(int): the shorter side becomes `scale`
            new_w, new_h = scale, int(scale * height / width)
        else:
            new_w, new_h = int(scale * width / height), scale
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), resample, reducing_gap=None)
        left = int(round((new_w - self.size) / 2.0))
        top = int(round((new_h - self.size) / 2.0))
        return image.crop((left, top, left + self.size, top + self.size))

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """A float tensor (C, size, size), normalised."""
        image = self.resize(image)
        array = np.asarray(image, dtype=np.float32) / 255.0
        if array.ndim == 2:
            array = array[None, :, :]
            mean = np.float32(sum(self.mean) / 3)
            std = np.float32(sum(self.std) / 3)
            return torch.from_numpy((array - mean) / std)
        normalised = (array - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.to_tensor(image)


def load_rgb(path, *, draft_size: int | None = None) -> Image.Image:
    """Open a stored image file as the sRGB picture a viewer sees (`to_rgb`).
    JPEGs are decoded at reduced size when that is still at least `draft_size`
    (much faster for big photos). Raises what Pillow raises for a file it
    cannot read (OSError, UnidentifiedImageError, ValueError, SyntaxError)."""
    with Image.open(path) as image:
        if draft_size and image.format in ("JPEG", "MPO"):
            image.draft("RGB", (draft_size * 2, draft_size * 2))
        rgb = to_rgb(image)
        rgb.load()
        return rgb
