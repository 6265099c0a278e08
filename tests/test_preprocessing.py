"""Every image mode becomes upright RGB, transparency on white; the tensor is normalised."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from training.core.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, to_rgb


def _roundtrip(image: Image.Image, fmt: str) -> Image.Image:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return Image.open(io.BytesIO(out.getvalue()))


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "CMYK", "1", "I", "F", "YCbCr"])
def test_opaque_modes_become_rgb(mode):
    image = Image.new("RGB", (8, 6), (120, 60, 30)).convert(mode)
    out = to_rgb(image)
    assert out.mode == "RGB" and out.size == (8, 6)


def test_rgba_is_composited_on_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    image.putpixel((0, 0), (255, 0, 0, 255))
    out = to_rgb(image)
    assert out.getpixel((1, 1)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (255, 0, 0)


def test_la_is_composited_on_white():
    image = Image.new("LA", (2, 2), (0, 0))  # black, transparent
    image.putpixel((0, 0), (0, 255))
    out = to_rgb(image)
    assert out.getpixel((1, 1)) == (255, 255, 255) and out.getpixel((0, 0)) == (0, 0, 0)


def test_palette_with_transparency_is_composited_on_white():
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0
    out = to_rgb(_roundtrip(image, "PNG"))
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (10, 200, 10)


def test_16_bit_greyscale_keeps_its_range():
    array = np.array([[0, 65535], [32768, 16384]], dtype=np.uint16)
    image = Image.frombytes("I;16", (2, 2), array.astype("<u2").tobytes())
    image = _roundtrip(image, "PNG")
    assert image.mode in ("I;16", "I")
    out = np.asarray(to_rgb(image))
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 1].tolist() == [255, 255, 255]
    assert 120 <= out[1, 0, 0] <= 135


def test_cmyk_jpeg_is_converted():
    image = _roundtrip(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG")
    assert image.mode == "CMYK"
    r, g, b = to_rgb(image).getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (20, 10), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 10))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif, quality=95)
    upright = to_rgb(Image.open(io.BytesIO(out.getvalue())))
    assert upright.size == (10, 20)
    # After a 90° clockwise turn the white (left) half is on top.
    assert sum(upright.getpixel((5, 3))) > 600 and sum(upright.getpixel((5, 16))) < 150


def test_tensor_is_resized_and_normalised():
    prep = Preprocessing(size=16)
    tensor = prep(Image.new("RGB", (40, 30), (255, 255, 255)))
    assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.float32
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(tensor[:, 0, 0], expected)


def test_grayscale_preprocessing_gives_one_channel():
    tensor = Preprocessing(size=8, grayscale=True)(Image.new("RGB", (9, 9), (10, 20, 30)))
    assert tensor.shape == (1, 8, 8)


def test_preprocessing_round_trips_through_a_dict():
    prep = Preprocessing(size=64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), grayscale=True)
    assert Preprocessing.from_dict(prep.to_dict()) == prep
