"""Reading IDX files: the format of MNIST, Fashion-MNIST, EMNIST, KMNIST.

Format (yann.lecun.com/exdb/mnist, "FILE FORMATS FOR THE MNIST DATABASE"):
a 4-byte magic number ``0x00 0x00 T D``, where T is the element type
(0x08 unsigned byte, 0x09 signed byte, 0x0B int16, 0x0C int32, 0x0D float32,
0x0E float64) and D the number of dimensions; then D sizes as big-endian
unsigned 32-bit integers; then the elements, big-endian, in C (row-major)
order, nothing after them. Image files are ``0x00000803`` (uint8, N×rows×cols),
label files ``0x00000801`` (uint8, N). Files are often distributed gzipped;
gzip is recognised by its magic bytes (1f 8b), never by the file name.

Everything here is pure NumPy and reads the whole file: a file that is
truncated, has bytes after its data, a bad magic number or (gzip) a bad
checksum raises IdxError, so a caller can validate both files of a pair before
it stores anything.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

# Element type code → big-endian NumPy dtype.
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
GZIP_MAGIC = b"\x1f\x8b"
# Refuse headers that announce more data than this (a typo'd or hostile header
# would otherwise make us try to read gigabytes). Fashion-MNIST's training
# images are 47 MB.
DEFAULT_MAX_BYTES = 2 * 1024**3


class IdxError(ValueError):
    """The file is not a readable IDX file of the expected kind; str(exc) says
    why and names the file."""


def read_idx(path: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Read one IDX file (gzipped or not) into an array.

    Returns an array of shape given by the header's sizes and the header's
    dtype converted to native byte order (uint8 for MNIST-style files).
    Raises IdxError for: a file that cannot be read, a bad gzip stream or
    checksum, a magic number that is not ``00 00 T D`` with a known T and
    D ≥ 1, a header announcing more than `max_bytes` of data, fewer data bytes
    than the header announces (truncated) or more (trailing bytes).
    """
    path = Path(path)
    try:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == GZIP_MAGIC
        opener = gzip.open if compressed else open
        with opener(path, "rb") as handle:
            magic = handle.read(4)
            if len(magic) < 4:
                raise IdxError(f"{path}: too short to be an IDX file ({len(magic)} bytes)")
            if magic[0] != 0 or magic[1] != 0 or magic[2] not in IDX_DTYPES or magic[3] == 0:
                raise IdxError(f"{path}: not an IDX file (magic number 0x{magic.hex()}; expected 0x0000TTDD "
                               f"with TT one of {', '.join(f'{t:02x}' for t in IDX_DTYPES)})")
            ndim = magic[3]
            header = handle.read(4 * ndim)
            if len(header) < 4 * ndim:
                raise IdxError(f"{path}: truncated header ({ndim} dimension sizes announced)")
            shape = tuple(int(x) for x in np.frombuffer(header, dtype=">u4"))
            dtype = np.dtype(IDX_DTYPES[magic[2]])
            expected = int(np.prod(shape, dtype=object)) * dtype.itemsize
            if expected > max_bytes:
                raise IdxError(f"{path}: the header announces {'×'.join(map(str, shape))} elements "
                               f"({expected:,} bytes), more than the limit of {max_bytes:,}")
            data = handle.read(expected)
            if len(data) < expected:
                raise IdxError(f"{path}: truncated: the header announces {'×'.join(map(str, shape))} elements "
                               f"({expected:,} bytes) but the file holds {len(data):,}")
            if handle.read(1):
                raise IdxError(f"{path}: unexpected bytes after the {'×'.join(map(str, shape))} elements "
                               f"the header announces")
    except IdxError:
        raise
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise IdxError(f"{path}: corrupt gzip data ({exc or type(exc).__name__})") from None
    except OSError as exc:
        raise IdxError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def read_images_and_labels(images_path: str | Path, labels_path: str | Path, *,
                           max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """Read and check an MNIST-style pair of files.

    Returns (images, labels): images uint8 of shape (N, rows, cols), grey
    levels 0–255 as stored (the format's page calls 0 background and 255
    foreground; read as ordinary greyscale, the background shows black, as
    Fashion-MNIST is usually displayed); labels uint8 of shape (N,), class
    indices.
    Raises IdxError when either file is unreadable (see read_idx), when the
    images are not a 3-dimensional uint8 array (magic 0x00000803) or the labels
    not a 1-dimensional uint8 array (0x00000801), when the file holds no image
    or an image has no pixels, or when the two counts differ.
    """
    images = read_idx(images_path, max_bytes=max_bytes)
    labels = read_idx(labels_path, max_bytes=max_bytes)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise IdxError(f"{images_path}: not an IDX image file: expected uint8 images N×rows×cols "
                       f"(magic 0x00000803), found {images.dtype} of shape {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise IdxError(f"{labels_path}: not an IDX label file: expected N uint8 labels (magic 0x00000801), "
                       f"found {labels.dtype} of shape {labels.shape}")
    if images.shape[0] == 0:
        raise IdxError(f"{images_path}: holds no images")
    if images.shape[1] == 0 or images.shape[2] == 0:
        raise IdxError(f"{images_path}: images of {images.shape[1]}×{images.shape[2]} pixels")
    if images.shape[0] != labels.shape[0]:
        raise IdxError(f"{images_path} holds {images.shape[0]:,} images but {labels_path} holds "
                       f"{labels.shape[0]:,} labels; give the label file that goes with the images")
    return images, labels


# Class names in label order, for --classes presets. Fashion-MNIST: Xiao, Rasul
# and Vollgraf (2017), github.com/zalandoresearch/fashion-mnist.
CLASS_PRESETS = {
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
    "mnist": [str(d) for d in range(10)],
}


def parse_classes(text: str | None) -> list[str] | None:
    """`--classes`: a preset name (see CLASS_PRESETS) or comma-separated class
    names, in label order (label 0 first). None or "" gives None (labels stay
    the class indices as text). Raises ValueError for an empty or repeated name."""
    if not text:
        return None
    if text.strip().lower() in CLASS_PRESETS:
        return list(CLASS_PRESETS[text.strip().lower()])
    names = [name.strip() for name in text.split(",")]
    if any(not name for name in names):
        raise ValueError(f"--classes {text!r} has an empty class name")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"--classes names {', '.join(repeated)} more than once")
    return names


def label_names(labels: np.ndarray, classes: list[str] | None) -> list[str]:
    """The text label of each class index in `labels` (uint8, shape (N,)):
    classes[i] when `classes` is given, else str(i). Raises IdxError when a
    label has no name (the list is shorter than the largest label + 1)."""
    if classes is None:
        return [str(int(value)) for value in labels]
    top = int(labels.max())
    if top >= len(classes):
        raise IdxError(f"the label file has labels 0–{top} ({top + 1} classes) but --classes names "
                       f"{len(classes)}: {', '.join(classes)}")
    return [classes[int(value)] for value in labels]
