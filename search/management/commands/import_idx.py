from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path

import numpy as np
from django.core.management.base import BaseCommand, CommandError
from PIL import Image as PILImage

from search.idx import (
    CLASS_PRESETS,
    IdxError,
    label_names,
    parse_classes,
    read_images_and_labels,
)
from search.ingest import StorageError, import_blobs
from search.management.progress import progress_bar
from search.models import Dataset, DatasetNameError, Image, normalise_dataset_name


def png_bytes(pixels: np.ndarray) -> bytes:
    """One greyscale image (uint8, rows×cols) as PNG bytes. Deterministic for a
    given Pillow/zlib, so importing the same file again finds the duplicates."""
    out = io.BytesIO()
    PILImage.fromarray(pixels, "L").save(out, format="PNG", compress_level=6)
    return out.getvalue()


class Command(BaseCommand):
    help = ("Import an IDX image file and its label file (the MNIST / Fashion-MNIST format, gzipped or not) into a "
            "dataset (created if needed). Each image is stored as a PNG through the same checks as import_images: "
            "validation, SHA-256 duplicate check, thumbnails. Both files are read and checked before anything is "
            "stored. Labels are the class indices (0, 1, …) unless --classes names them; for Fashion-MNIST give "
            "--classes fashion-mnist.")

    def add_arguments(self, parser):
        parser.add_argument("images", help="IDX image file, e.g. train-images-idx3-ubyte.gz (magic 0x00000803)")
        parser.add_argument("labels", help="IDX label file, e.g. train-labels-idx1-ubyte.gz (magic 0x00000801)")
        parser.add_argument("--dataset", required=True, help="dataset name (created if it does not exist)")
        parser.add_argument("--classes", default=None,
                            help="class names in label order, comma-separated (label 0 first), or a preset: "
                                 + ", ".join(CLASS_PRESETS) + " (fashion-mnist = "
                                 + ",".join(CLASS_PRESETS["fashion-mnist"]) + "). Default: the class indices")
        parser.add_argument("--limit", type=int, default=None, help="import only the first N images of the file")
        parser.add_argument("--description", default="", help="description for a new dataset")
        parser.add_argument("--no-progress", action="store_true")

    def handle(self, *args, **options):
        try:
            options["dataset"] = normalise_dataset_name(options["dataset"])
        except DatasetNameError as exc:
            raise CommandError(str(exc)) from None
        limit = options["limit"]
        if limit is not None and limit < 1:
            raise CommandError("--limit must be at least 1")
        try:
            classes = parse_classes(options["classes"])
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        images_path, labels_path = Path(options["images"]), Path(options["labels"])
        # Everything is read and checked before the dataset or any image is created.
        try:
            images, labels = read_images_and_labels(images_path, labels_path)
            names = label_names(labels, classes)
        except IdxError as exc:
            raise CommandError(str(exc)) from None
        if classes is None and "fashion" in str(images_path).lower():
            self.stdout.write("note: labels will be class indices 0–9; for Fashion-MNIST's names give "
                              "--classes fashion-mnist")
        count = len(images) if limit is None else min(limit, len(images))

        dataset, created = Dataset.objects.get_or_create(name=options["dataset"],
                                                         defaults={"description": options["description"]})
        if created:
            self.stdout.write(f"created dataset {dataset.name!r}")
        width = len(str(len(images) - 1))
        start = time.perf_counter()
        # Images whose bytes the dataset already holds (same SHA-256: an import run
        # again) are counted as duplicates in one query instead of one per image;
        # add_image would find the same.
        known = set(Image.objects.filter(dataset=dataset).values_list("sha256", flat=True))
        blobs, already = [], 0
        for i in range(count):
            data = png_bytes(images[i])
            if known and hashlib.sha256(data).hexdigest() in known:
                already += 1
            else:
                blobs.append((f"{images_path.name}[{i:0{width}d}]", names[i], data))
        try:
            with progress_bar(f"importing into {dataset.name}", disable=options["no_progress"]) as progress:
                report = import_blobs(dataset, blobs, len(blobs), progress=progress)
                report.duplicates += already
        except StorageError as exc:
            done = exc.report.imported if exc.report else 0
            raise CommandError(f"{exc} (stopped there; {done} image(s) imported before it are complete)") from None
        seconds = time.perf_counter() - start
        for name, reason in report.rejected:
            self.stdout.write(f"  skipped {name}: {reason}")
        self.stdout.write(self.style.SUCCESS(
            f"{report.summary()}; {count:,} images of {len(images):,} in {images_path.name} "
            f"({images.shape[1]}×{images.shape[2]}) in {seconds:.1f} s, {count / seconds:.0f} images/s"))
