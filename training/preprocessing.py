"""Image preprocessing, defined once.

The same code turns a file into a network input for indexing, querying,
training and evaluation: decode, apply EXIF orientation, convert every mode to
RGB (transparency composited on white), resize to size×size (as in the study:
the whole image, squashed, no crop), scale to [0, 1], normalise.

Networks with their own pretrained configuration (timm models) may instead ask
for timm's evaluation transform: resize the shorter side to
floor(size / crop_pct) and take the centre size×size crop ("center"), or
squash to that square and crop its centre ("squash"), with their own
interpolation (timm.data.transforms_factory.transforms_imagenet_eval).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The EfficientNet-Lite weights were trained on inputs scaled to [-1, 1].
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)


def to_rgb(image: Image.Image) -> Image.Image:
    """Return an RGB copy of any PIL image, upright and with transparency on white."""
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - broken EXIF must not make a readable image unusable
        pass
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
        mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: scale the real range to 8 bits rather than clipping.
        array = np.asarray(image, dtype=np.float64)
        high = array.max() if array.size else 0
        if high > 255:
            array = array * (255.0 / (65535.0 if high <= 65535 else high))
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="L")
        mode = "L"
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 1.0)
        scale = 255.0 / (high - low) if high > low else 0.0
        image = Image.fromarray(((array - low) * scale).astype(np.uint8), mode="L")
        mode = "L"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "1":
        image = image.convert("L")
    return image.convert("RGB")


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
    """Open a stored image file as RGB. JPEGs are decoded at reduced size when
    that is still at least `draft_size` (much faster for big photos)."""
    with Image.open(path) as image:
        if draft_size and image.format == "JPEG":
            image.draft("RGB", (draft_size * 2, draft_size * 2))
        image.load()
        return to_rgb(image)
