"""A corpus of bad (and awkward but valid) inputs, generated here, each with the
outcome every surface must give, and the code that runs it against the surfaces:
the API (`POST /api/search`, `GET /api/images/<id>/similar`), the search page
(`POST /search/`), the admin image upload, the admin zip import, the folder
importer and the zip importer.

Used by tests/test_bad_input.py (which asserts the outcomes) and by
bench/bad_input_table.py (which prints them as the table in docs/bad-input.md).
Every case is made in memory by the functions below; no file is checked in.

The limits are set small (LIMITS) so that the oversize cases and the bombs stay
small and fast; the behaviour is the same at the default limits.
"""

from __future__ import annotations

import io
import os
import struct
import unicodedata
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

LIMITS = {
    "CBIR_MAX_UPLOAD_BYTES": 64 * 1024,
    "CBIR_MAX_IMPORT_FILE_BYTES": 64 * 1024,
    "CBIR_MAX_PIXELS": 4_000_000,
    "CBIR_MAX_K": 100,
    "CBIR_ZIP_MAX_ENTRIES": 50,
    "CBIR_ZIP_MAX_TOTAL_BYTES": 1024 * 1024,
    "CBIR_ZIP_MAX_UPLOAD_BYTES": 512 * 1024,
}

UNICODE_NAME = "été ☀ $(touch pwned); `id` & 'quote' \"dq\" *?.png"


# --- Making images --------------------------------------------------------------

def noise(size=(32, 32), seed=0, mode="RGB") -> PILImage.Image:
    rng = np.random.default_rng(seed)
    image = PILImage.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), "RGB")
    return image if mode == "RGB" else image.convert(mode)


def encode(image: PILImage.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def good_png(seed: int = 12345) -> bytes:
    return encode(noise(seed=seed), "PNG")


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes | None = None,
            crc_ok: bool = True) -> bytes:
    """A PNG written by hand, for what Pillow will not write (48-bit RGB, absurd headers)."""
    ihdr_body = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    ihdr = _chunk(b"IHDR", ihdr_body)
    if not crc_ok:
        ihdr = ihdr[:-4] + b"\0\0\0\0"
    idat = _chunk(b"IDAT", zlib.compress(rows if rows is not None else b"\0", 9))
    return b"\x89PNG\r\n\x1a\n" + ihdr + idat + _chunk(b"IEND", b"")


def png_rgb48(width=24, height=16) -> bytes:
    rng = np.random.default_rng(48)
    pixels = rng.integers(0, 65536, size=(height, width, 3), dtype=np.uint16).astype(">u2")
    rows = b"".join(b"\0" + pixels[y].tobytes() for y in range(height))
    return raw_png(width, height, 16, 2, rows)


def jpeg_with_exif(orientation) -> bytes:
    exif = PILImage.Exif()
    exif[0x0112] = orientation
    return encode(noise((40, 24), seed=61), "JPEG", exif=exif.tobytes())


def jpeg_with_app1(payload: bytes) -> bytes:
    """A valid JPEG with an APP1 (EXIF) segment holding `payload`, right after SOI."""
    body = encode(noise((40, 24), seed=62), "JPEG")
    segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return body[:2] + segment + body[2:]


def exif_orientation_block(tagtype: int, count: int, payload: bytes) -> bytes:
    """A little-endian TIFF-structured EXIF block written by hand: IFD0 holds one
    entry, the orientation (0x0112), of this TIFF type and count (Pillow
    writes only a SHORT), its value in place or, over 4 bytes, after the IFD."""
    field, extra = (payload.ljust(4, b"\0"), b"") if len(payload) <= 4 else (struct.pack("<I", 26), payload)
    return (b"II" + struct.pack("<HI", 42, 8) + struct.pack("<H", 1) + struct.pack("<HHI", 0x0112, tagtype, count)
            + field + struct.pack("<I", 0) + extra)


# Orientation 6 in the forms a browser ignores: each is accepted and not turned.
MALFORMED_ORIENTATIONS = {
    "LONG": (4, 1, struct.pack("<I", 6)),
    "SSHORT": (8, 1, struct.pack("<h", 6)),
    "FLOAT": (11, 1, struct.pack("<f", 6.0)),
    "RATIONAL": (5, 1, struct.pack("<II", 6, 1)),
    "SHORT, count 2": (3, 2, struct.pack("<HH", 6, 6)),
}


def jpeg_without_eoi() -> bytes:
    """A baseline JPEG missing only its final EOI marker (FF D9), as some cameras and tools write."""
    data = encode(noise((40, 24), seed=64), "JPEG")
    assert data.endswith(b"\xff\xd9")
    return data[:-2]


def jpeg_with_corrupt_sof() -> bytes:
    data = bytearray(encode(noise((40, 24), seed=63), "JPEG"))
    at = data.find(b"\xff\xc0")
    data[at + 9] = 7  # seven colour components: no such JPEG
    return bytes(data)


def animated(fmt: str) -> bytes:
    frames = [noise((32, 32), seed=70 + i) for i in range(3)]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def bomb_png() -> bytes:
    """A small file (a few kB) that really decodes to 4,096 × 4,096 = 16.8 M pixels."""
    return encode(PILImage.new("1", (4096, 4096)), "PNG", optimize=True)


def bomb_gif() -> bytes:
    return encode(PILImage.new("P", (4096, 4096)), "GIF")


def over_the_size_limit() -> bytes:
    return encode(noise((256, 256), seed=80), "PNG")  # ~196 kB of incompressible pixels


def bmp_with_absurd_header() -> bytes:
    data = bytearray(encode(noise((8, 8), seed=81), "BMP"))
    struct.pack_into("<i", data, 18, 2_000_000_000)  # width
    return bytes(data)


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: int(len(data) * keep)]


def cmyk_jpeg() -> bytes:
    return encode(noise((32, 32), seed=90).convert("CMYK"), "JPEG")


def grey16_png() -> bytes:
    array = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 61).astype("<u2")
    image = PILImage.fromarray(array)
    assert image.mode == "I;16", image.mode
    return encode(image, "PNG")


def palette_png_with_transparency() -> bytes:
    image = noise((32, 32), seed=91).convert("P", palette=PILImage.Palette.ADAPTIVE, colors=16)
    return encode(image, "PNG", transparency=0)


# --- Colour profiles, transparency, frames, formats (real-photo kinds) -------------

REAL_PHOTOS = Path(__file__).parent / "data" / "real_photos"

# Chromaticities (x, y) of red, green, blue and the white point.
D65 = (0.3127, 0.3290)
SRGB_PRIMARIES = ((0.64, 0.33), (0.30, 0.60), (0.15, 0.06))
ADOBE_RGB_PRIMARIES = ((0.64, 0.33), (0.21, 0.71), (0.15, 0.06))
DISPLAY_P3_PRIMARIES = ((0.680, 0.320), (0.265, 0.690), (0.150, 0.060))
_BRADFORD = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])
_D50_XYZ = np.array([0.9642, 1.0, 0.8249])


def _xyz(x: float, y: float) -> np.ndarray:
    return np.array([x / y, 1.0, (1 - x - y) / y])


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _tag_xyz(xyz) -> bytes:
    return b"XYZ \0\0\0\0" + b"".join(_s15(v) for v in xyz)


def _tag_text(text: str) -> bytes:
    return b"text\0\0\0\0" + text.encode("ascii") + b"\0"


def _tag_desc(text: str) -> bytes:
    ascii_ = text.encode("ascii") + b"\0"
    return (b"desc\0\0\0\0" + struct.pack(">I", len(ascii_)) + ascii_ + struct.pack(">II", 0, 0)
            + struct.pack(">HB", 0, 0) + b"\0" * 67)


def _tag_gamma(gamma: float) -> bytes:
    return b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256))


def icc_profile(description: str, *, primaries=None, white=D65, gamma: float = 2.2, grey: bool = False,
                padding: int = 0) -> bytes:
    """A valid ICC v2 display profile, built byte by byte (ICC.1:2001-04):
    an RGB matrix/TRC profile with these primaries and white point, chromatically
    adapted to the D50 connection space with the Bradford transform, or a grey
    (kTRC) profile. `padding` bytes of copyright text make it as large as needed."""
    tags: list[tuple[bytes, bytes]] = [(b"desc", _tag_desc(description)),
                                       (b"cprt", _tag_text("test profile" + " " * padding)),
                                       (b"wtpt", _tag_xyz(_D50_XYZ))]
    if grey:
        tags.append((b"kTRC", _tag_gamma(gamma)))
    else:
        columns = np.stack([_xyz(*p) for p in primaries], axis=1)
        scale = np.linalg.solve(columns, _xyz(*white))
        to_xyz = columns * scale  # RGB (linear) → XYZ under the profile's white
        cone = _BRADFORD @ _xyz(*white), _BRADFORD @ _D50_XYZ
        adapt = np.linalg.inv(_BRADFORD) @ np.diag(cone[1] / cone[0]) @ _BRADFORD
        colorants = adapt @ to_xyz
        tags += [(b"rXYZ", _tag_xyz(colorants[:, 0])), (b"gXYZ", _tag_xyz(colorants[:, 1])),
                 (b"bXYZ", _tag_xyz(colorants[:, 2]))]
        tags += [(name, _tag_gamma(gamma)) for name in (b"rTRC", b"gTRC", b"bTRC")]
    offset = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for name, data in tags:
        data += b"\0" * (-len(data) % 4)
        table += name + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (struct.pack(">I", size) + b"lcms" + struct.pack(">I", 0x02100000) + b"mntr"
              + (b"GRAY" if grey else b"RGB ") + b"XYZ " + struct.pack(">6H", 2026, 1, 1, 0, 0, 0) + b"acsp"
              + b"\0" * 24 + struct.pack(">I", 0) + b"".join(_s15(v) for v in _D50_XYZ) + b"\0" * 48)
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


def in_profile(image: PILImage.Image, profile: bytes) -> PILImage.Image:
    """`image` (sRGB) converted into `profile` with LittleCMS, the profile attached (info["icc_profile"])."""
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    target = ImageCms.ImageCmsProfile(io.BytesIO(profile))
    out = ImageCms.profileToProfile(image, srgb, target, outputMode=image.mode)
    out.info["icc_profile"] = profile
    return out


def colour_patches(size=(48, 32)) -> PILImage.Image:
    """Six saturated and two neutral sRGB patches: where a wrong profile shows most."""
    colours = [(230, 40, 30), (40, 200, 60), (30, 60, 220), (250, 200, 20), (20, 200, 220), (200, 40, 200),
               (128, 128, 128), (245, 245, 245)]
    image = PILImage.new("RGB", size)
    width = size[0] // 4
    for i, colour in enumerate(colours):
        x, y = (i % 4) * width, (i // 4) * (size[1] // 2)
        image.paste(colour, (x, y, x + width, y + size[1] // 2))
    return image


def jpeg_with_profile(primaries, name: str) -> bytes:
    profile = icc_profile(name, primaries=primaries, gamma=2.2)
    return encode(in_profile(colour_patches(), profile), "JPEG", quality=95, icc_profile=profile)


def png_big_metadata(kind: str) -> bytes:
    """A valid 16×16 PNG carrying more than 1 MiB (decompressed) of metadata:
    compressed XMP in an iTXt chunk, a zTXt chunk, or a 1.5 MiB ICC profile."""
    from PIL import PngImagePlugin

    image = PILImage.new("RGB", (16, 16), (20, 160, 40))
    big = "x" * (1_536 * 1024)
    if kind == "icc":
        return encode(image, "PNG", icc_profile=icc_profile("big sRGB", primaries=SRGB_PRIMARIES, gamma=2.2,
                                                              padding=1_536 * 1024))
    info = PngImagePlugin.PngInfo()
    if kind == "itxt":
        info.add_itxt("XML:com.adobe.xmp", f'<x:xmpmeta xmlns:x="adobe:ns:meta/">{big}</x:xmpmeta>', zip=True)
    else:
        info.add_text("Comment", big, zip=True)
    return encode(image, "PNG", pnginfo=info)


def png_metadata_bomb() -> bytes:
    """A PNG whose zTXt chunk inflates to 33 MiB (from ~33 kB): past the raised
    metadata bound (training.core.preprocessing.MAX_PNG_METADATA_CHUNK)."""
    plain = encode(PILImage.new("RGB", (8, 8), (1, 2, 3)), "PNG")
    at = plain.index(b"IDAT") - 4
    chunk = _chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b" " * (33 * 1024 * 1024), 9))
    return plain[:at] + chunk + plain[at:]


def apng(default_in_animation: bool) -> bytes:
    """An animated PNG: red default image, then blue and green animation frames.
    With default_in_animation the red image is the first frame; otherwise it is
    only for viewers without APNG support and a browser shows blue first."""
    red, blue, green = (PILImage.new("RGB", (16, 16), c) for c in ((220, 0, 0), (0, 0, 220), (0, 180, 0)))
    return encode(red, "PNG", save_all=True, append_images=[blue, green], duration=100,
                  default_image=not default_in_animation)


def mpo() -> bytes:
    """A multi-picture JPEG (a camera's MPO): orange first picture, blue second."""
    first, second = PILImage.new("RGB", (24, 16), (240, 140, 20)), PILImage.new("RGB", (24, 16), (20, 40, 240))
    return encode(first, "MPO", save_all=True, append_images=[second])


def heic(image: PILImage.Image | None = None, **options) -> bytes:
    """A real HEIC (HEVC in HEIF) encoded by libheif through pillow-heif."""
    import pillow_heif

    pillow_heif.register_heif_opener()
    return encode(image if image is not None else noise((32, 24), seed=110), "HEIF", quality=90, **options)


def avif(image: PILImage.Image | None = None, **options) -> bytes:
    """A real AVIF encoded by Pillow's own AVIF plugin (libavif)."""
    return encode(image if image is not None else noise((32, 24), seed=111), "AVIF", quality=90, **options)


# --- The cases ----------------------------------------------------------------

@dataclass(frozen=True)
class FileCase:
    """One file sent to every surface that takes a file."""

    kind: str
    name: str
    make: Callable[[], bytes]
    accept: bool
    words: str = ""  # in the rejection message, on every surface
    api_status: int = 400  # the status the API and the page give a rejection
    import_words: str = ""  # when importers word it differently (e.g. "not an image" for a .txt)

    @property
    def expected(self) -> str:
        if self.accept:
            return "accepted"
        return f"{self.api_status}: {self.words}"


def file_cases() -> list[FileCase]:
    jpeg = encode(noise((64, 64), seed=3), "JPEG")
    png = encode(noise((64, 64), seed=4), "PNG")
    not_image = "not a supported image"
    return [
        # Not images at all, whatever the name says.
        FileCase("empty file", "empty.jpg", lambda: b"", False, "empty"),
        FileCase("text file named .jpg", "notes.jpg", lambda: b"hello, I am text\n" * 10, False, not_image),
        FileCase("HTML renamed .jpg", "page.jpg",
                 lambda: b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>", False,
                 "detected: HTML"),
        FileCase("SVG renamed .png", "drawing.png",
                 lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" '
                         b'height="10"/></svg>', False, "detected: SVG"),
        FileCase("PDF renamed .jpg", "document.jpg",
                 lambda: b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n", False,
                 "detected: PDF"),
        FileCase("zip renamed .png", "archive.png", lambda: _zip_bytes({"a.png": good_png(5)}), False, "detected: zip"),
        FileCase("random bytes .png", "noise.png", lambda: np.random.default_rng(7).bytes(4000), False, not_image),
        FileCase("TIFF (a real image, not accepted)", "scan.jpg", lambda: encode(noise(seed=8), "TIFF"), False,
                 "detected: TIFF"),
        FileCase("text file named .txt", "readme.txt", lambda: b"just some notes", False, not_image,
                 import_words="not an image"),
        # Broken images.
        FileCase("truncated JPEG", "cut.jpg", lambda: truncated(jpeg), False, "truncated"),
        FileCase("truncated PNG", "cut.png", lambda: truncated(png), False, "truncated"),
        FileCase("JPEG cut inside its header", "head.jpg", lambda: jpeg[:120], False, "truncated"),
        FileCase("PNG signature only", "sig.png", lambda: b"\x89PNG\r\n\x1a\n", False, not_image),
        FileCase("PNG with a bad header checksum", "crc.png", lambda: raw_png(8, 8, 8, 2, crc_ok=False), False,
                 not_image),
        FileCase("PNG with width 0", "zero.png", lambda: raw_png(0, 8, 8, 2), False, not_image),
        FileCase("PNG declaring 100000×100000", "huge-header.png", lambda: raw_png(100_000, 100_000, 8, 2), False,
                 "pixels"),
        FileCase("JPEG with a corrupt frame header", "sof.jpg", jpeg_with_corrupt_sof, False, not_image),
        FileCase("GIF header only", "head.gif", lambda: b"GIF89a\x10\x00\x10\x00\x00\x00\x00", False, not_image),
        FileCase("BMP with an absurd width", "wide.bmp", bmp_with_absurd_header, False, "pixels"),
        FileCase("decompression bomb PNG (3 kB, 16.8 Mpx)", "bomb.png", bomb_png, False, "pixels"),
        FileCase("decompression bomb GIF", "bomb.gif", bomb_gif, False, "pixels"),
        FileCase("over the size limit", "big.png", over_the_size_limit, False, "limit", api_status=413),
        # Awkward but valid: accepted.
        FileCase("EXIF orientation 9 (no such value)", "exif9.jpg", lambda: jpeg_with_exif(9), True),
        FileCase("EXIF orientation 65535", "exif65535.jpg", lambda: jpeg_with_exif(65535), True),
        FileCase("EXIF orientation 6 (rotated)", "exif6.jpg", lambda: jpeg_with_exif(6), True),
        *(FileCase(f"EXIF orientation 6 stored as {form} (not turned, as browsers do)", f"exif-{n}.jpg",
                   lambda form=form: jpeg_with_app1(b"Exif\0\0" + exif_orientation_block(*MALFORMED_ORIENTATIONS[form])),
                   True) for n, form in enumerate(MALFORMED_ORIENTATIONS)),
        FileCase("baseline JPEG missing only its EOI marker", "no-eoi.jpg", jpeg_without_eoi, True),
        FileCase("broken EXIF block", "exif-broken.jpg",
                 lambda: jpeg_with_app1(b"Exif\0\0MM\0\x2a\xff\xff\xff\xf0garbage"), True),
        FileCase("EXIF block with a runaway IFD", "exif-ifd.jpg",
                 lambda: jpeg_with_app1(b"Exif\0\0II\x2a\0\x08\0\0\0\xff\xff" + b"\x12\x01\x03\0" * 8), True),
        FileCase("CMYK JPEG", "cmyk.jpg", cmyk_jpeg, True),
        FileCase("greyscale JPEG", "grey.jpg", lambda: encode(noise(seed=92, mode="L"), "JPEG"), True),
        FileCase("progressive JPEG", "prog.jpg", lambda: encode(noise(seed=93), "JPEG", progressive=True), True),
        FileCase("JPEG with trailing garbage", "tail.jpg", lambda: encode(noise(seed=94), "JPEG") + b"\0garbage" * 50,
                 True),
        FileCase("16-bit greyscale PNG", "grey16.png", grey16_png, True),
        FileCase("48-bit RGB PNG", "rgb48.png", png_rgb48, True),
        FileCase("palette PNG with transparency", "palette.png", palette_png_with_transparency, True),
        FileCase("LA PNG (grey + alpha)", "la.png", lambda: encode(noise(seed=95, mode="LA"), "PNG"), True),
        FileCase("RGBA PNG", "rgba.png", lambda: encode(noise(seed=96, mode="RGBA"), "PNG"), True),
        FileCase("1-bit PNG", "bits.png", lambda: encode(noise(seed=97, mode="1"), "PNG"), True),
        FileCase("animated GIF (first frame)", "anim.gif", lambda: animated("GIF"), True),
        FileCase("animated WebP (first frame)", "anim.webp", lambda: animated("WEBP"), True),
        FileCase("lossless WebP with alpha", "alpha.webp",
                 lambda: encode(noise(seed=98, mode="RGBA"), "WEBP", lossless=True), True),
        FileCase("BMP", "plain.bmp", lambda: encode(noise(seed=99), "BMP"), True),
        FileCase("1×1 image", "dot.png", lambda: encode(PILImage.new("RGB", (1, 1), (9, 99, 199)), "PNG"), True),
        FileCase("20000×1 image", "wide.png",
                 lambda: encode(PILImage.linear_gradient("L").resize((20_000, 1)), "PNG"), True),
        FileCase("1×20000 image", "tall.png",
                 lambda: encode(PILImage.linear_gradient("L").resize((1, 20_000)), "PNG"), True),
        FileCase("PNG named .jpg", "actually-png.jpg", lambda: good_png(100), True),
        # Real-photo kinds (issue 11): what a browser shows is what is embedded and thumbnailed.
        FileCase("JPEG with a ProPhoto RGB profile (reported photo)", "clownfish_prophoto.jpg",
                 lambda: (REAL_PHOTOS / "clownfish_prophoto.jpg").read_bytes(), True),
        FileCase("JPEG with an Adobe RGB profile", "adobe.jpg",
                 lambda: jpeg_with_profile(ADOBE_RGB_PRIMARIES, "Adobe RGB (1998)-like"), True),
        FileCase("PNG with a Display P3 profile", "p3.png", lambda: encode(
            in_profile(colour_patches(), p3 := icc_profile("Display P3-like", primaries=DISPLAY_P3_PRIMARIES)),
            "PNG", icc_profile=p3), True),
        FileCase("JPEG with an unreadable ICC profile", "bad-icc.jpg",
                 lambda: encode(noise(seed=102), "JPEG", icc_profile=b"not a profile" * 10), True),
        FileCase("RGB PNG with a tRNS transparent colour (reported photo)", "tiger_rgb_trns_magenta.png",
                 lambda: (REAL_PHOTOS / "tiger_rgb_trns_magenta.png").read_bytes(), True),
        FileCase("16-bit greyscale PNG with a tRNS transparent grey", "grey16-trns.png",
                 lambda: encode(PILImage.open(io.BytesIO(grey16_png())), "PNG", transparency=61), True),
        FileCase("APNG whose default image is not in the animation (reported)", "apng_hidden_default.png",
                 lambda: (REAL_PHOTOS / "apng_hidden_default.png").read_bytes(), True),
        FileCase("animated PNG", "anim.png", lambda: animated("PNG"), True),
        FileCase("MPO (a camera's multi-picture JPEG)", "camera.mpo", mpo, True),
        FileCase("PNG with over 1 MiB of compressed XMP (reported)", "png_big_xmp.png",
                 lambda: (REAL_PHOTOS / "png_big_xmp.png").read_bytes(), True),
        FileCase("PNG with a 1.5 MiB zTXt text chunk", "ztxt.png", lambda: png_big_metadata("ztxt"), True),
        FileCase("PNG with a 1.5 MiB ICC profile", "big-icc.png", lambda: png_big_metadata("icc"), True),
        FileCase("PNG metadata bomb (33 MiB of text)", "text-bomb.png", png_metadata_bomb, False, "metadata"),
        FileCase("HEIC (iPhone photo)", "IMG_0001.HEIC", heic, True),
        FileCase("AVIF", "photo.avif", avif, True),
        FileCase("HEIC named .jpg", "IMG_0002.jpg", lambda: heic(noise((24, 24), seed=112)), True),
        FileCase("Photoshop PSD", "layers.psd", lambda: b"8BPS\0\1" + b"\0" * 64, False, "detected: Photoshop"),
        FileCase("unicode, spaces and shell characters in the name", UNICODE_NAME, lambda: good_png(101), True),
    ]


@dataclass(frozen=True)
class ParamCase:
    """A request to the API or the page with a bad (or odd) parameter."""

    kind: str
    method: str
    path: str  # "{image}" is replaced by an indexed image's id
    data: dict = field(default_factory=dict)  # "image": True sends a good image; "_fields"/"_files": N adds N
    status: int = 400
    words: str = ""
    raw: bytes | None = None  # a raw body instead of `data`, with this content type:
    content_type: str = ""
    meta: dict = field(default_factory=dict)  # extra WSGI environ (headers as HTTP_*)


def param_cases() -> list[ParamCase]:
    cases = []
    for k in ("0", "-1", "101", "abc", "1.5", "99999999999999999999999"):
        words = "whole number" if k in ("abc", "1.5") else "from 1 to 100"
        cases += [
            ParamCase(f"k = {k}", "POST", "/api/search", {"image": True, "k": k}, 400, words),
            ParamCase(f"k = {k}", "POST", "/search/", {"image": True, "k": k}, 400, words),
            ParamCase(f"k = {k}", "GET", "/api/images/{image}/similar", {"k": k}, 400, words),
        ]
    cases += [
        ParamCase("k = ' 5 ' (spaces)", "POST", "/api/search", {"image": True, "k": " 5 "}, 200),
        ParamCase("k empty (default 10)", "POST", "/api/search", {"image": True, "k": ""}, 200),
        ParamCase("unknown dataset", "POST", "/api/search", {"image": True, "dataset": "no-such-set"}, 400,
                  "unknown dataset"),
        ParamCase("unknown dataset", "POST", "/search/", {"image": True, "dataset": "no-such-set"}, 400,
                  "unknown dataset"),
        ParamCase("unknown dataset", "GET", "/api/images/{image}/similar", {"dataset": "no-such-set"}, 400,
                  "unknown dataset"),
        ParamCase("dataset name with a NUL character", "POST", "/api/search", {"image": True, "dataset": "a\x00b"},
                  400, "unknown dataset"),
        ParamCase("dataset name with a NUL character", "POST", "/search/", {"image": True, "dataset": "a\x00b"},
                  400, "unknown dataset"),
        ParamCase("dataset name with a NUL character", "GET", "/api/images/{image}/similar", {"dataset": "\x00"},
                  400, "unknown dataset"),
        ParamCase("dataset name with a NUL character", "GET", "/images/{image}/similar/", {"dataset": "\x00"},
                  400, "unknown dataset"),
        ParamCase("dataset name with a line break", "POST", "/api/search", {"image": True, "dataset": "a\nb"},
                  400, "unknown dataset"),
        ParamCase("dataset name with a bidi override", "POST", "/search/", {"image": True, "dataset": "a\u202eb"},
                  400, "unknown dataset"),
        ParamCase("dataset name of 1,000 characters", "GET", "/api/images/{image}/similar", {"dataset": "x" * 1000},
                  400, "unknown dataset"),
        ParamCase("k = abc", "GET", "/images/{image}/similar/", {"k": "abc"}, 400, "whole number"),
        ParamCase("unknown image id", "GET", "/images/999999999/similar/", {}, 404, "no image"),
        ParamCase("missing image field", "POST", "/api/search", {"k": "3"}, 400, "'image'"),
        ParamCase("missing image field", "POST", "/search/", {"k": "3"}, 400, "'image'"),
        ParamCase("image sent as a text field", "POST", "/api/search", {"image": "not a file"}, 400, "'image'"),
        ParamCase("JSON body instead of a form", "POST", "/api/search", {}, 400, "'image'", raw=b'{"k": 3}',
                  content_type="application/json"),
        ParamCase("multipart without a boundary", "POST", "/api/search", {}, 400, "could not be read",
                  raw=b"garbage", content_type="multipart/form-data"),
        ParamCase("multipart with a wrong boundary", "POST", "/api/search", {}, 400, "'image'",
                  raw=b"--other\r\ngarbage", content_type="multipart/form-data; boundary=xyz"),
        ParamCase("1,100 form fields (limit 1,000)", "POST", "/api/search", {"image": True, "_fields": 1100}, 400,
                  "could not be read"),
        ParamCase("200 files (limit 100)", "POST", "/api/search", {"image": True, "_files": 200}, 400,
                  "could not be read"),
        ParamCase("unknown image id", "GET", "/api/images/999999999/similar", {}, 404, "no image"),
        ParamCase("chunked upload (no Content-Length)", "POST", "/api/search", {}, 411, "Content-Length", raw=b"",
                  content_type="multipart/form-data; boundary=xyz", meta={"HTTP_TRANSFER_ENCODING": "chunked"}),
        ParamCase("chunked upload (no Content-Length)", "POST", "/search/", {}, 411, "Content-Length", raw=b"",
                  content_type="multipart/form-data; boundary=xyz", meta={"HTTP_TRANSFER_ENCODING": "chunked"}),
        ParamCase("wrong method", "GET", "/api/search", {}, 405, "POST"),
        ParamCase("wrong method", "PUT", "/api/search", {}, 405, "POST"),
        ParamCase("wrong method", "POST", "/api/images/{image}/similar", {}, 405, "GET"),
        ParamCase("wrong method", "DELETE", "/search/", {}, 405, ""),
    ]
    # Digits that are not ASCII: str.isdigit() says yes to them, int() does not.
    for odd in ("\u00b2", "\u2460", "\u0663"):  # superscript two, circled one, Arabic-Indic three
        cases += [
            ParamCase(f"positive = {odd!r} (a non-ASCII digit)", "POST", "/api/search",
                      {"image": True, "positive": odd}, 400, "must be image ids"),
            ParamCase(f"positive = {odd!r} (a non-ASCII digit)", "GET", "/api/images/{image}/similar",
                      {"positive": odd}, 400, "must be image ids"),
            ParamCase(f"negative = {odd!r} (a non-ASCII digit)", "GET", "/images/{image}/similar/",
                      {"negative": odd}, 400, "must be image ids"),
            ParamCase(f"positive = {odd!r} (a non-ASCII digit)", "GET", "/search/refine",
                      {"positive": odd}, 400, "must be image ids"),
            ParamCase(f"query_image_id = {odd!r} (a non-ASCII digit)", "POST", "/api/feedback",
                      {"query_image_id": odd, "image_id": "1", "verdict": "right"}, 400, "must be image ids"),
            ParamCase(f"image_id = {odd!r} (a non-ASCII digit)", "POST", "/api/feedback",
                      {"query_image_id": "1", "image_id": odd, "verdict": "right"}, 400, "must be image ids"),
        ]
    return cases


def _zip_bytes(entries: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _patch_entry(data: bytes, *, flag_bits: int = 0, method: int | None = None, declared_size: int | None = None,
                 name_from: bytes | None = None, name_to: bytes | None = None) -> bytes:
    """Edit the first entry's headers (local and central) the way a hostile zip would."""
    data = bytearray(data)
    local = data.find(b"PK\x03\x04")
    central = data.find(b"PK\x01\x02")
    for offset, flag_at, method_at, size_at in ((local, 6, 8, 22), (central, 8, 10, 24)):
        if flag_bits:
            struct.pack_into("<H", data, offset + flag_at, struct.unpack_from("<H", data, offset + flag_at)[0] | flag_bits)
        if method is not None:
            struct.pack_into("<H", data, offset + method_at, method)
        if declared_size is not None:
            struct.pack_into("<I", data, offset + size_at, declared_size)
    if name_from is not None:
        data = bytearray(bytes(data).replace(name_from, name_to))
    return bytes(data)


def unicode_path_extra(raw_name: bytes, name: str, *, crc: int | None = None) -> bytes:
    """An Info-ZIP Unicode Path extra field (0x7075) for a header name `raw_name`."""
    body = struct.pack("<BI", 1, zlib.crc32(raw_name) if crc is None else crc) + name.encode("utf-8")
    return struct.pack("<HH", 0x7075, len(body)) + body


def zip_with_raw_names(entries: list[tuple[bytes, bytes, bytes]]) -> bytes:
    """A zip whose entry names are exactly these bytes, with the UTF-8 flag
    (bit 11) clear, as Info-ZIP on Linux or an old Windows tool writes them:
    (raw name, data, extra field). Written under ASCII placeholders of the same
    length, then the placeholders are replaced in both headers."""
    buffer = io.BytesIO()
    placeholders = []
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for index, (raw, data, extra) in enumerate(entries):
            placeholder = f"Q{index:0{len(raw) - 1}d}"
            info = zipfile.ZipInfo(placeholder)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.extra = extra
            archive.writestr(info, data)
            placeholders.append((placeholder.encode(), raw))
    out = buffer.getvalue()
    for placeholder, raw in placeholders:
        assert out.count(placeholder) == 2, placeholder  # the local and the central header
        out = out.replace(placeholder, raw)
    return out


LOEWE_NFC = unicodedata.normalize("NFC", "Löwe")
LOEWE_NFD = unicodedata.normalize("NFD", "Löwe")


def _corrupt_deflate() -> bytes:
    data = bytearray(_zip_bytes({"bad.png": encode(noise((48, 48), seed=7), "PNG"), "good.png": good_png(201)}))
    local = data.find(b"PK\x03\x04")
    name_len, extra_len = struct.unpack_from("<HH", data, local + 26)
    start = local + 30 + name_len + extra_len
    data[start:start + 40] = b"\xff" * 40  # not a deflate stream any more
    return bytes(data)


def zip_listing_one_entry_three_times() -> bytes:
    """One stored PNG; the central directory lists it three times (a "zip
    bomb" by overlapping entries: every record points at the same data)."""
    data = _zip_bytes({"a.png": good_png(310)}, zipfile.ZIP_STORED)
    start = zipfile.ZipFile(io.BytesIO(data)).start_dir
    end = data.rfind(b"PK\x05\x06")
    record, eocd = data[start:end], bytearray(data[end:])
    struct.pack_into("<HHI", eocd, 8, 3, 3, len(record) * 3)
    return data[:start] + record * 3 + bytes(eocd)


def zip_with_data_over_the_next_entry() -> bytes:
    """Two stored entries; the first's declared size runs into the second's local header."""
    data = bytearray(_zip_bytes({"a.png": good_png(311), "b.png": good_png(312)}, zipfile.ZIP_STORED))
    first = zipfile.ZipFile(io.BytesIO(bytes(data))).infolist()[0]
    central = data.find(b"PK\x01\x02")
    struct.pack_into("<II", data, central + 20, first.compress_size + 100, first.compress_size + 100)
    return bytes(data)


@dataclass(frozen=True)
class ZipCase:
    """A zip imported by search.ingest.import_zip (and the import job)."""

    kind: str
    make: Callable[[], bytes]
    imported: int | None  # images imported; None: the whole zip is refused
    words: str = ""  # in a rejection reason (or in the refusal)
    labels: tuple[str | None, ...] = ()  # the labels of the imported images, sorted (None first)


def zip_cases() -> list[ZipCase]:
    good = [good_png(300 + i) for i in range(4)]
    return [
        ZipCase("path traversal entries (../x.png, /abs/y.png, a/../../z.png)",
                lambda: _zip_bytes({"../x.png": good[0], "/abs/y.png": good[1], "a/../../z.png": good[2],
                                    "..\\..\\w.png": good[3]}),
                4, labels=(None, None, "a", "abs")),
        ZipCase("zip bomb: one entry over the file limit (real size)",
                lambda: _zip_bytes({"bomb.bmp": b"BM" + b"\0" * 200_000, "ok.png": good[0]}),
                1, "larger than the limit"),
        ZipCase("zip bomb: declared size small, real size large",
                lambda: _patch_entry(_zip_bytes({"liar.png": encode(PILImage.new("RGB", (200, 200)), "BMP"),
                                                 "ok.png": good[0]}), declared_size=1000),
                1, "cannot be read"),
        ZipCase("zip bomb: total over the limit (whole zip refused)",
                lambda: _zip_bytes({f"part{i}.bmp": b"BM" + bytes([i]) * 60_000 for i in range(20)} |
                                   {"ok.png": good[0]}),
                None, "unpacks to"),
        ZipCase("too many entries (whole zip refused)",
                lambda: _zip_bytes({f"e{i}.txt": b"x" for i in range(60)}), None, "the limit is"),
        ZipCase("nested folders, non-image files, __MACOSX and dot files",
                lambda: _zip_bytes({"mammals/cats/a.png": good[0], "mammals/dogs/deep/b.png": good[1],
                                    "birds/c.png": good[2], "birds/readme.txt": b"notes", "data.csv": b"1,2\n",
                                    "__MACOSX/mammals/._a.png": b"\0\5\26\7", ".DS_Store": b"\0\0\0\1Bud1",
                                    "mammals/empty/": b"", "nested.zip": _zip_bytes({"d.png": good[3]})}),
                3, "not an image", labels=("birds", "mammals/cats", "mammals/dogs/deep")),
        ZipCase("unicode, spaces and shell characters in entry names",
                lambda: _zip_bytes({f"dossier été/{UNICODE_NAME}": good[0], "$(reboot)/`id`;x.png": good[1]}),
                2, labels=("$(reboot)", "dossier été")),
        ZipCase("the same image twice", lambda: _zip_bytes({"a.png": good[0], "copy/a.png": good[0]}), 1),
        ZipCase("a corrupt compressed entry", _corrupt_deflate, 1, "cannot be read"),
        ZipCase("an encrypted entry",
                lambda: _patch_entry(_zip_bytes({"secret.png": good[0], "ok.png": good[1]}), flag_bits=0x1),
                1, "cannot be read"),
        ZipCase("an unsupported compression method",
                lambda: _patch_entry(_zip_bytes({"odd.png": good[0], "ok.png": good[1]}), method=99),
                1, "cannot be read"),
        ZipCase("an entry name that is not valid UTF-8",
                lambda: _patch_entry(_zip_bytes({"nameXX.png": good[0], "ok.png": good[1]}), flag_bits=0x800,
                                     name_from=b"nameXX", name_to=b"name\xff\xfe"),
                None, "not a readable zip"),
        ZipCase("bad images inside a good zip",
                lambda: _zip_bytes({"empty.png": b"", "cut.png": truncated(good_png(301)), "bomb.png": bomb_png(),
                                    "ok.png": good[0]}),
                1, "truncated"),
        ZipCase("Info-ZIP on Linux: UTF-8 names without the UTF-8 flag (reported)",
                lambda: (REAL_PHOTOS / "infozip_utf8_noflag.zip").read_bytes(), 1, labels=("été",)),
        ZipCase("UTF-8 names without the UTF-8 flag",
                lambda: zip_with_raw_names([("dossier été/☀.png".encode(), good[0], b""),
                                            ("日本/写真.png".encode(), good[1], b"")]),
                2, labels=("dossier été", "日本")),
        ZipCase("code page 437 names (an old Windows zip)",
                lambda: zip_with_raw_names([("Café/Übersicht.png".encode("cp437"), good[0], b"")]),
                1, labels=("Café",)),
        ZipCase("an Info-ZIP Unicode Path extra field (0x7075)",
                lambda: zip_with_raw_names([(b"caf_/a.png", good[0], unicode_path_extra(b"caf_/a.png", "café/a.png")),
                                            (b"old_/b.png", good[1], unicode_path_extra(b"x", "stale/b.png"))]),
                2, labels=("café", "old_")),
        ZipCase("the same folder name in NFC and NFD (macOS)",
                lambda: _zip_bytes({f"{LOEWE_NFC}/a.png": good[0], f"{LOEWE_NFD}/b.png": good[1]}),
                2, labels=(LOEWE_NFC, LOEWE_NFC)),
        ZipCase("the central directory lists one entry three times (overlapping entries)",
                zip_listing_one_entry_three_times, None, "overlap"),
        ZipCase("an entry's data run into the next entry's header (overlapping entries)",
                zip_with_data_over_the_next_entry, None, "overlap"),
        ZipCase("control characters and a bidi override in entry names",
                lambda: _zip_bytes({"dir\x1b[31mx/a.png": good[0], "rtl\u202egnp.exe/b.png": good[1],
                                    "line\nbreak/c.png": good[2]}),
                3, labels=("dir\ufffd[31mx", "line\ufffdbreak", "rtl\ufffdgnp.exe")),
        ZipCase("a stored (uncompressed) zip", lambda: _zip_bytes({"a.png": good[0]}, zipfile.ZIP_STORED), 1),
        ZipCase("an empty zip", lambda: _zip_bytes({}), 0),
        ZipCase("not a zip at all", lambda: b"PK\x03\x04 but nothing else", None, "not a readable zip"),
    ]


@dataclass(frozen=True)
class FolderCase:
    """A folder imported by search.ingest.import_folder; `build` fills it."""

    kind: str
    build: Callable[[Path], None]
    imported: int
    words: str = ""
    labels: tuple[str | None, ...] = ()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _symlink_loop(root: Path) -> None:
    _write(root / "a" / "one.png", good_png(400))
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)
    (root / "self").symlink_to(root / "self")  # a link to itself


def _symlinks(root: Path) -> None:
    outside = root.parent / f"{root.name}-private"
    _write(outside / "secret.png", good_png(411))
    _write(outside / "dir" / "inner.png", good_png(412))
    _write(root / "cats" / "ok.png", good_png(413))
    (root / "cats" / "out.png").symlink_to(outside / "secret.png")  # a file out of the root
    (root / "cats" / "into.png").symlink_to(root / "cats" / "ok.png")  # a file inside it
    (root / "cats" / "chain.png").symlink_to(root / "cats" / "out.png")  # a chain
    (root / "folder").symlink_to(outside / "dir", target_is_directory=True)  # a folder


def _odd_entries(root: Path) -> None:
    _write(root / "one.png", good_png(401))
    os.mkfifo(root / "pipe.png")  # reading it would block forever
    (root / "dangling.png").symlink_to(root / "nowhere.png")
    (root / "empty-folder").mkdir()


def _nested(root: Path) -> None:
    _write(root / "mammals" / "cats" / "a.png", good_png(402))
    _write(root / "mammals" / "dogs" / "deep" / "b.png", good_png(403))
    _write(root / "birds" / "c.png", good_png(404))
    _write(root / "birds" / "readme.txt", b"notes")
    _write(root / ".hidden" / "d.png", good_png(405))
    _write(root / "data.csv", b"1,2\n")


def _odd_names(root: Path) -> None:
    _write(root / "dossier été" / UNICODE_NAME, good_png(406))
    _write(root / "$(reboot)" / "`id`;x.png", good_png(407))
    # A name that is not valid UTF-8 (legal on Linux): bytes, not str.
    folder = os.fsencode(root / "latin1")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, b"caf\xe9.png"), "wb") as handle:
        handle.write(good_png(408))


def _nfc_and_nfd(root: Path) -> None:
    _write(root / LOEWE_NFC / "a.png", good_png(409))  # two different folders to Linux
    _write(root / LOEWE_NFD / "b.png", good_png(410))


def _bad_files(root: Path) -> None:
    for case in file_cases():
        if case.kind.startswith("unicode"):
            continue
        _write(root / "files" / f"{case.kind}{Path(case.name).suffix}".replace("/", "_"), case.make())


def folder_cases() -> list[FolderCase]:
    accepted = sum(1 for c in file_cases() if c.accept and not c.kind.startswith("unicode"))
    return [
        FolderCase("a symlink loop", _symlink_loop, 1),
        FolderCase("a FIFO, a dangling symlink, an empty folder", _odd_entries, 1),
        FolderCase("file symlinks (out of the root, into it, chained) and a folder symlink", _symlinks, 1,
                   "symbolic link", labels=("cats",)),
        FolderCase("nested folders, non-image files, hidden folders", _nested, 3, "not an image",
                   labels=("birds", "mammals/cats", "mammals/dogs/deep")),
        FolderCase("unicode, spaces, shell characters and non-UTF-8 bytes in names", _odd_names, 3,
                   labels=("$(reboot)", "dossier été", "latin1")),
        FolderCase("the same folder name in NFC and NFD", _nfc_and_nfd, 2, labels=(LOEWE_NFC, LOEWE_NFC)),
        FolderCase("every file case of the corpus in one folder", _bad_files, accepted, "truncated"),
    ]


# --- Running the cases against the surfaces ------------------------------------

@dataclass
class Outcome:
    """What one surface made of one input."""

    accepted: bool
    code: str  # "200", "400", "form error", "imported", "skipped", "refused", "succeeded", …
    message: str = ""
    problems: list[str] = field(default_factory=list)  # broken invariants: leftovers, wrong counts

    @property
    def cell(self) -> str:
        return self.code + ("" if not self.problems else " ✗ " + "; ".join(self.problems))


def media_files(root) -> set[Path]:
    return {p for p in Path(root).rglob("*") if p.is_file()}


class Snapshot:
    """Rows and files before an operation, to check what it left behind."""

    def __init__(self) -> None:
        from django.conf import settings

        from search.models import Image

        self.root = Path(settings.MEDIA_ROOT)
        self.rows = set(Image.objects.values_list("pk", flat=True))
        self.files = media_files(self.root)

    def new_rows(self):
        from search.models import Image

        return Image.objects.exclude(pk__in=self.rows)

    def problems(self, *, expect_rows: int | None = None) -> list[str]:
        """Every new file must belong to a new row (file or thumbnail), every new
        row must have both of its files, and no temporary file may remain."""
        problems = []
        rows = list(self.new_rows())
        if expect_rows is not None and len(rows) != expect_rows:
            problems.append(f"{len(rows)} new rows, expected {expect_rows}")
        owned = {self.root / r.file.name for r in rows} | {self.root / r.thumbnail.name for r in rows}
        new_files = media_files(self.root) - self.files
        if new_files - owned:
            problems.append(f"files left behind: {sorted(p.name for p in new_files - owned)[:3]}")
        if owned - new_files - self.files:
            problems.append("a row without its file")
        if any(p.name.startswith(".tmp-") for p in media_files(self.root)):
            problems.append("a .tmp- file remains")
        return problems


def _first_line(text: str) -> str:
    return " ".join(str(text).split())[:300]


def api_search(client, case: FileCase) -> Outcome:
    before = Snapshot()
    upload = io.BytesIO(case.make())
    upload.name = case.name
    response = client.post("/api/search", {"image": upload, "k": "5"})
    body = response.json()
    problems = before.problems(expect_rows=0)
    if response.status_code == 200:
        if len(body["results"]) != 5:
            problems.append(f"{len(body['results'])} results, expected 5")
        return Outcome(True, "200", "", problems)
    return Outcome(False, str(response.status_code), body.get("error", ""), problems)


def search_page(client, case: FileCase) -> Outcome:
    before = Snapshot()
    upload = io.BytesIO(case.make())
    upload.name = case.name
    response = client.post("/search/", {"image": upload, "k": "5"})
    html = response.content.decode()
    problems = before.problems(expect_rows=0)
    if response.status_code == 200:
        if html.count('class="hit"') != 5:
            problems.append("the results page does not show 5 results")
        return Outcome(True, "200", "", problems)
    if 'role="alert"' not in html:
        problems.append("no error shown on the page")
    import html as html_module
    import re

    shown = re.search(r'role="alert"[^>]*>(.*?)</', html, re.S)
    return Outcome(False, str(response.status_code), html_module.unescape(shown.group(1)) if shown else "", problems)


def admin_add(admin_client, dataset, case: FileCase) -> Outcome:
    from django.core.files.uploadedfile import SimpleUploadedFile

    before = Snapshot()
    upload = SimpleUploadedFile(case.name, case.make())
    response = admin_client.post("/admin/search/image/add/", {"dataset": dataset.pk, "upload": upload})
    if response.status_code == 302:
        problems = before.problems(expect_rows=1)
        new = before.new_rows().first()
        if new is not None and new.original_filename != case.name:
            problems.append(f"stored name {new.original_filename!r}")
        return Outcome(True, "302 added", "", problems)
    problems = before.problems(expect_rows=0)
    errors = response.context["adminform"].form.errors if response.context else {}
    message = " ".join(str(e) for field_errors in errors.values() for e in field_errors)
    if response.status_code != 200 or not message:
        problems.append(f"status {response.status_code} without a form error")
    return Outcome(False, "form error", message, problems)


def _import_outcome(report, before: Snapshot, expect_good: int, name: str) -> Outcome:
    reasons = dict(report.rejected)
    accepted = report.imported == expect_good + 1
    problems = before.problems(expect_rows=report.imported)
    if report.imported < expect_good:
        problems.append("the good file next to it was not imported")
    if accepted:
        return Outcome(True, "imported", "", problems)
    reason = reasons.get(name) or next(iter(reasons.values()), "")
    return Outcome(False, "skipped", reason, problems)


def folder_import(dataset, folder: Path, case: FileCase) -> Outcome:
    from search.ingest import import_folder

    folder.mkdir(parents=True)
    (folder / "good.png").write_bytes(good_png(9000))
    (folder / case.name).write_bytes(case.make())
    before = Snapshot()
    report = import_folder(folder, dataset)
    return _import_outcome(report, before, 1, case.name)


def zip_import(dataset, folder: Path, case: FileCase) -> Outcome:
    from search.ingest import import_zip

    folder.mkdir(parents=True)
    path = folder / "upload.zip"
    path.write_bytes(_zip_bytes({"good.png": good_png(9001), f"sub/{case.name}": case.make()}))
    before = Snapshot()
    report = import_zip(path, dataset, labels_from_folders=True)
    return _import_outcome(report, before, 1, f"sub/{case.name}")


def param_request(client, case: ParamCase, image_id: int) -> Outcome:
    before = Snapshot()
    data = dict(case.data)
    if data.get("image") is True:
        data["image"] = io.BytesIO(good_png(9002))
    data.update({f"field{i}": "x" for i in range(data.pop("_fields", 0))})
    data.update({f"file{i}": io.BytesIO(b"x") for i in range(data.pop("_files", 0))})
    path = case.path.replace("{image}", str(image_id))
    method = getattr(client, case.method.lower())
    if case.raw is not None:
        response = method(path, data=case.raw, content_type=case.content_type, **case.meta)
    else:
        response = method(path, data) if case.method in ("GET", "POST") else method(path)
    problems = before.problems(expect_rows=0)
    if response.status_code != case.status:
        problems.append(f"status {response.status_code}, expected {case.status}")
    if response.get("Content-Type", "").startswith("application/json"):
        message = response.json().get("error", "")
    else:
        import html as html_module
        import re

        shown = re.search(r'role="alert"[^>]*>(.*?)</', response.content.decode(), re.S)
        message = html_module.unescape(shown.group(1)) if shown else ""
    return Outcome(response.status_code < 300, str(response.status_code), _first_line(message), problems)


def zip_case_import(dataset, folder: Path, case: ZipCase) -> Outcome:
    from search.ingest import ZipRejected, import_zip

    folder.mkdir(parents=True)
    path = folder / "upload.zip"
    path.write_bytes(case.make())
    before = Snapshot()
    try:
        report = import_zip(path, dataset, labels_from_folders=True)
    except ZipRejected as exc:
        return Outcome(False, "refused", str(exc), before.problems(expect_rows=0))
    problems = before.problems(expect_rows=report.imported) + _escaped(folder)
    reasons = "; ".join(f"{name}: {reason}" for name, reason in report.rejected)
    labels = tuple(sorted(before.new_rows().values_list("label", flat=True), key=lambda x: (x is not None, x or "")))
    if case.labels and labels != case.labels:
        problems.append(f"labels {labels}")
    code = f"imported {report.imported}" + (f", skipped {report.rejected_count}" if report.rejected else "")
    return Outcome(True, code, reasons, problems)


def _escaped(folder: Path) -> list[str]:
    """Files a path-traversal entry would have written next to (or above) the zip."""
    names = {"x.png", "y.png", "z.png", "w.png"}
    found = [p for p in folder.parent.rglob("*") if p.name in names]
    return [f"written outside MEDIA_ROOT: {found}"] if found else []


def zip_case_job(dataset, folder: Path, case: ZipCase) -> Outcome:
    """The import job's task body (what a worker runs), in this process."""
    from search.import_jobs import run_import_job
    from search.models import Job

    folder.mkdir(parents=True)
    path = folder / "upload.zip"
    path.write_bytes(case.make())
    before = Snapshot()
    job = Job.objects.create(kind=Job.Kind.IMPORT, dataset=dataset, params={"zip_path": str(path),
                                                                             "labels_from_folders": True})
    run_import_job(job.pk)
    job.refresh_from_db()
    if job.status == "succeeded":
        return Outcome(True, f"succeeded, imported {job.result['imported']}", job.message,
                       before.problems(expect_rows=job.result["imported"]))
    return Outcome(False, job.status, job.error, before.problems(expect_rows=0))


def folder_case_import(dataset, root: Path, case: FolderCase) -> Outcome:
    # A FIFO or a loop that hung the walk would hit pytest's timeout.
    from search.ingest import import_folder

    root.mkdir(parents=True)
    case.build(root)
    before = Snapshot()
    report = import_folder(root, dataset, labels_from_folders=True)
    problems = before.problems(expect_rows=report.imported)
    labels = tuple(sorted(before.new_rows().values_list("label", flat=True), key=lambda x: (x is not None, x or "")))
    if case.labels and labels != case.labels:
        problems.append(f"labels {labels}")
    reasons = "; ".join(f"{name}: {reason}" for name, reason in report.rejected)
    code = f"imported {report.imported}" + (f", skipped {report.rejected_count}" if report.rejected else "")
    return Outcome(True, code, reasons, problems)


def _named(data: bytes, name: str) -> io.BytesIO:
    upload = io.BytesIO(data)
    upload.name = name
    return upload


def admin_zip_cases() -> dict[str, tuple[Callable[[], dict], str]]:
    """Form posts to the admin's "Import a zip" page that must be refused
    before any job starts: (fields, words of the message)."""
    return {
        "not a zip": (lambda: {"archive": _named(b"this is not a zip at all", "x.zip")}, "not a zip file"),
        "over the zip upload limit": (lambda: {"archive": _named(_zip_bytes(
            {"a.bmp": encode(noise((500, 500)), "BMP")}, zipfile.ZIP_STORED), "big.zip")}, "larger than the limit"),
        "missing archive field": (lambda: {}, "This field is required"),
        "a good zip while no broker answers": (lambda: {"archive": _named(_zip_bytes({"a.png": good_png(1)}),
                                                                          "ok.zip")}, "cannot be reached"),
    }


def admin_zip_import(admin_client, dataset, kind: str, no_broker_dir: Path) -> Outcome:
    """Post one of admin_zip_cases(); the broker points at a socket that does not exist."""
    from django.urls import reverse

    from cbirsite.celery import app
    from search.import_jobs import uploads_dir
    from search.models import Job

    make, _ = admin_zip_cases()[kind]
    uploads_before = media_files(uploads_dir())
    jobs_before = Job.objects.count()
    before = Snapshot()
    old = app.conf.broker_url
    app.conf.broker_url = f"redis+socket://{no_broker_dir}/no-redis.sock"
    try:
        response = admin_client.post(reverse("admin:search_dataset_import_zip", args=[dataset.pk]),
                                     {**make(), "labels_from_folders": "on", "apply": "1"})
    finally:
        app.conf.broker_url = old
    problems = before.problems(expect_rows=0)
    if Job.objects.count() != jobs_before:
        problems.append("a job was created")
    if media_files(uploads_dir()) != uploads_before:
        problems.append("the upload was left in the uploads folder")
    import html as html_module
    import re

    page = html_module.unescape(response.content.decode())
    shown = re.findall(r'class="(?:errorlist|error)[^"]*"[^>]*>(.*?)</(?:ul|li)>', page, re.S)
    message = " ".join(re.sub(r"<[^>]+>", " ", m) for m in shown)
    return Outcome(response.status_code == 302, str(response.status_code), _first_line(message), problems)


# --- The table ------------------------------------------------------------------

FILE_SURFACES = ("API", "page", "admin add", "folder import", "zip import")


@dataclass(frozen=True)
class AdminCase:
    """A request to an admin list or form, by a superuser."""

    kind: str
    method: str
    path: str
    data: dict = field(default_factory=dict)
    status: int = 200  # 200 here: the form shown again with its error
    words: str = ""


def admin_cases() -> list[AdminCase]:
    add = "/admin/search/dataset/add/"
    return [
        AdminCase("NUL in an admin search box", "GET", "/admin/search/image/", {"q": "a\x00b"}, 400, "NUL character"),
        AdminCase("NUL in an admin list filter", "GET", "/admin/search/image/", {"split": "\x00"}, 400,
                  "NUL character"),
        AdminCase("NUL in an admin lookup", "GET", "/admin/search/job/", {"dataset__id__exact": "1\x00"}, 400,
                  "NUL character"),
        AdminCase("dataset name empty", "POST", add, {"name": "", "description": ""}, 200, "required"),
        AdminCase("dataset name only spaces", "POST", add, {"name": "   ", "description": ""}, 200, "required"),
        AdminCase("dataset name of 101 characters", "POST", add, {"name": "x" * 101, "description": ""}, 200,
                  "at most 100"),
        AdminCase("dataset name with a line break", "POST", add, {"name": "line1\nline2", "description": ""}, 200,
                  "control characters"),
        AdminCase("dataset name with a bidi override", "POST", add, {"name": "rtl\u202eevil", "description": ""},
                  200, "control characters"),
    ]


def admin_request(admin_client, case: AdminCase) -> Outcome:
    """Send the case; a refusal must leave the datasets as they were."""
    from search.models import Dataset

    datasets = set(Dataset.objects.values_list("pk", flat=True))
    call = admin_client.get if case.method == "GET" else admin_client.post
    response = call(case.path, case.data)
    problems = [] if set(Dataset.objects.values_list("pk", flat=True)) == datasets else ["a dataset was created"]
    if response.status_code != case.status:
        problems.append(f"status {response.status_code}, expected {case.status}")
    if response.status_code == 200 and response.context and "adminform" in response.context:
        errors = response.context["adminform"].form.errors
        message = " ".join(str(e) for field_errors in errors.values() for e in field_errors)
    else:
        message = response.content.decode(errors="replace")
    return Outcome(response.status_code < 300 and not message, str(response.status_code), _first_line(message),
                   problems)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    def clean(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(clean(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def file_row(case: FileCase, outcomes: dict[str, Outcome]) -> list[str]:
    message = next((o.message for o in outcomes.values() if not o.accepted and o.message), "")
    return [case.kind, "accept" if case.accept else "reject"] + [outcomes[s].cell for s in FILE_SURFACES] + [
        _first_line(message)[:110]]


FILE_HEADERS = ["input", "expected", *FILE_SURFACES, "message (first surface that refused it)"]
PARAM_HEADERS = ["input", "request", "status", "message"]
ADMIN_HEADERS = ["input", "request", "status", "message"]
ZIP_HEADERS = ["zip", "import_zip", "import job", "reasons / message"]
FOLDER_HEADERS = ["folder", "import_folder", "reasons"]


def admin_row(case: AdminCase, outcome: Outcome) -> list[str]:
    return [case.kind, f"{case.method} {case.path}", outcome.cell, outcome.message[:160]]


def param_row(case: ParamCase, outcome: Outcome) -> list[str]:
    return [case.kind, f"{case.method} {case.path}", outcome.cell, outcome.message[:110]]


def zip_row(case: ZipCase, imported: Outcome, job: Outcome) -> list[str]:
    return [case.kind, imported.cell, job.cell, _first_line(imported.message)[:160]]


def folder_row(case: FolderCase, outcome: Outcome) -> list[str]:
    return [case.kind, outcome.cell, _first_line(outcome.message)[:160]]
