"""Deterministic modified copies of images, for identical-image retrieval
(copy detection): query with a changed copy, look for the original.

Every change takes its random parameters from the `random.Random` it is given,
and `generate_queries` gives each query its own generator seeded from
(seed, kind, index), so a query's image depends only on those three values:
not on which other kinds are asked for, nor on the order queries are consumed.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from os import PathLike

from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps, features

from training.core.preprocessing import load_rgb, to_rgb

KINDS: tuple[str, ...] = ("crop", "resize", "jpeg", "rotate", "brightness_contrast", "flip", "grayscale", "overlay")

# Documented parameter ranges (closed intervals).
CROP_AREA = (0.70, 0.90)  # fraction of the area kept: 10–30 % removed
RESIZE_SCALE = (0.30, 0.70)  # both sides scaled by the same factor
JPEG_QUALITY = (10, 30)
ROTATE_DEGREES = (5.0, 15.0)  # magnitude; the sign is random
ENHANCE_FACTORS = ((0.6, 0.8), (1.2, 1.4))  # brightness and contrast, drawn independently
OVERLAY_OPACITY = (0.4, 0.8)  # of the logo
OVERLAY_LOGO_SIDE = (0.15, 0.30)  # of the shorter image side
OVERLAY_TEXTS = ("SAMPLE", "(c) stock photo", "watermark", "www.example.com", "DRAFT")
WHITE = (255, 255, 255)


@dataclass(frozen=True)
class CopyQuery:
    original_id: Hashable
    kind: str
    image: Image.Image


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind of copy {kind!r}; known kinds: {', '.join(KINDS)}")


def _crop_size(width: int, height: int, area: float, rng: random.Random) -> tuple[int, int]:
    """Integer (w, h) whose area fraction is ~`area` and always inside CROP_AREA
    (rounding to whole pixels must not push it outside the documented range)."""
    total = width * height
    low, high = CROP_AREA
    # Width fraction in [area, 1] so the height fraction area/fw stays <= 1.
    candidates = [max(1, min(width, round(width * rng.uniform(area, 1.0)))), width]
    for w in candidates:
        h_low = math.ceil(low * total / w)
        h_high = min(height, math.floor(high * total / w))
        if h_low <= h_high:
            return w, min(max(round(area * total / w), h_low), h_high)
    # e.g. a very short image: keep the full height and crop the width only.
    w_low = math.ceil(low * total / height)
    w_high = min(width, math.floor(high * total / height))
    if w_low <= w_high:
        return min(max(round(area * total / height), w_low), w_high), height
    raise ValueError(f"a {width}×{height} image is too small to crop to {low:.0%}–{high:.0%} of its area")


def _crop(image: Image.Image, rng: random.Random) -> Image.Image:
    width, height = image.size
    w, h = _crop_size(width, height, rng.uniform(*CROP_AREA), rng)
    left = rng.randint(0, width - w)
    top = rng.randint(0, height - h)
    return image.crop((left, top, left + w, top + h))


def _resize(image: Image.Image, rng: random.Random) -> Image.Image:
    scale = rng.uniform(*RESIZE_SCALE)
    width, height = image.size
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def _jpeg(image: Image.Image, rng: random.Random) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=rng.randint(*JPEG_QUALITY))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        decoded.load()
        return decoded.convert("RGB")


def _rotate(image: Image.Image, rng: random.Random) -> Image.Image:
    angle = rng.uniform(*ROTATE_DEGREES) * rng.choice((-1, 1))
    # expand=False keeps the size, so corners are cut and white fills the gaps.
    return image.rotate(angle, resample=Image.Resampling.BILINEAR, expand=False, fillcolor=WHITE)


def _enhance_factor(rng: random.Random) -> float:
    return rng.uniform(*rng.choice(ENHANCE_FACTORS))


def _brightness_contrast(image: Image.Image, rng: random.Random) -> Image.Image:
    brightness = _enhance_factor(rng)
    contrast = _enhance_factor(rng)
    image = ImageEnhance.Brightness(image).enhance(brightness)
    return ImageEnhance.Contrast(image).enhance(contrast)


def _flip(image: Image.Image, rng: random.Random) -> Image.Image:
    return ImageOps.mirror(image)


def _grayscale(image: Image.Image, rng: random.Random) -> Image.Image:
    return image.convert("L").convert("RGB")


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow's built-in font: no font file to ship. Sizing it needs FreeType;
    # without it the fixed-size bitmap font still gives a visible overlay.
    if features.check("freetype2"):
        return ImageFont.load_default(size=size)
    return ImageFont.load_default()


def _overlay(image: Image.Image, rng: random.Random) -> Image.Image:
    width, height = image.size
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)

    # Logo: a filled rectangle or ellipse, partly transparent.
    side = max(2, round(min(width, height) * rng.uniform(*OVERLAY_LOGO_SIDE)))
    logo_w, logo_h = min(side, width), min(side, height)
    left = rng.randint(0, width - logo_w)
    top = rng.randint(0, height - logo_h)
    colour = tuple(rng.randint(0, 255) for _ in range(3))
    alpha = round(255 * rng.uniform(*OVERLAY_OPACITY))
    shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
    shape((left, top, left + logo_w - 1, top + logo_h - 1), fill=(*colour, alpha))

    # Text: opaque, sized to the image, anywhere it may be partly cut off.
    text = rng.choice(OVERLAY_TEXTS)
    font = _font(max(8, min(width, height) // 10))
    text_colour = tuple(rng.randint(0, 255) for _ in range(3))
    draw.text((rng.randint(0, max(0, width - 8)), rng.randint(0, max(0, height - 8))), text,
              font=font, fill=(*text_colour, 255))

    return Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")


_CHANGES: dict[str, Callable[[Image.Image, random.Random], Image.Image]] = {
    "crop": _crop,
    "resize": _resize,
    "jpeg": _jpeg,
    "rotate": _rotate,
    "brightness_contrast": _brightness_contrast,
    "flip": _flip,
    "grayscale": _grayscale,
    "overlay": _overlay,
}
assert tuple(_CHANGES) == KINDS


def make_copy(image: Image.Image, kind: str, rng: random.Random) -> Image.Image:
    """A modified RGB copy of `image` (which is not changed). Kinds:

    * crop: keep a random window of 70–90 % of the area (aspect may change), at
      a random position; the area is kept in range after rounding to pixels.
    * resize: both sides × s, s ∈ [0.3, 0.7] (rounded, at least 1 px).
    * jpeg: encode and decode in memory at quality ∈ [10, 30].
    * rotate: ±[5, 15]° about the centre, same size, white corners.
    * brightness_contrast: brightness, then contrast, each × a factor drawn
      from [0.6, 0.8] ∪ [1.2, 1.4].
    * flip: horizontal mirror (uses no randomness).
    * grayscale: to L and back to RGB, so R == G == B (uses no randomness).
    * overlay: a filled rectangle or ellipse (15–30 % of the shorter side, 40–80 %
      opaque) and a short text in Pillow's default font, at random positions.

    Raises ValueError on an unknown kind, naming the known ones.
    """
    _check_kind(kind)
    if image.mode != "RGB":
        image = to_rgb(image)
    result = _CHANGES[kind](image, rng)
    return result if result.mode == "RGB" else result.convert("RGB")


def query_rng(seed: int, kind: str, index: int) -> random.Random:
    """The generator for query `index` of `kind`. A str seed is hashed with
    SHA-512 by `random`, so it is stable across processes (unlike hash())."""
    return random.Random(f"{seed}:{kind}:{index}")


def generate_queries(
    items: Sequence[tuple[Hashable, str | PathLike]],
    *,
    kinds: Sequence[str] = KINDS,
    per_kind: int,
    seed: int,
    load: Callable[[str | PathLike], Image.Image] = load_rgb,
) -> Iterator[CopyQuery]:
    """Yield `per_kind` modified copies for each kind in `kinds`.

    The originals are `per_kind` distinct items drawn with random.Random(seed)
    from `items` sorted by id (so the order of `items` does not matter), and
    the same originals serve every kind, so kinds are compared on the same
    images. Copy `index` of `kind` is made from original `index` with
    `query_rng(seed, kind, index)`. Queries come out original by original
    (each file is loaded once), kinds in the order given.

    Arguments are checked before anything is yielded: ValueError on an unknown
    kind, a duplicate id, or `per_kind` larger than the number of items.
    """
    for kind in kinds:
        _check_kind(kind)
    if per_kind < 0:
        raise ValueError(f"per_kind must be >= 0, got {per_kind}")
    ordered = sorted(items, key=lambda item: str(item[0]) if not isinstance(item[0], int) else item[0])
    ids = [item_id for item_id, _ in ordered]
    if len(set(ids)) != len(ids):
        raise ValueError("items contain duplicate ids")
    if per_kind > len(ordered):
        raise ValueError(f"per_kind={per_kind} but only {len(ordered)} images to choose originals from")
    originals = random.Random(seed).sample(ordered, per_kind)
    kinds = tuple(kinds)

    def queries() -> Iterator[CopyQuery]:
        for index, (original_id, path) in enumerate(originals):
            image = load(path)
            for kind in kinds:
                yield CopyQuery(original_id, kind, make_copy(image, kind, query_rng(seed, kind, index)))

    return queries()
