"""Publishing a head over cached backbone features: seconds to fill its embeddings and finish its index.

    .venv/bin/python bench/head_publish.py [--images 10000] [--features 1280] [--dimension 256] [--json]

Makes a scratch dataset of --images image rows (all pointing at one small
PNG, each with its own content hash), a feature cache holding a random
(--images, --features) float32 feature for each of them (the file head-only
training writes, training/core/features.py), and a head version (the
efficientnet_lite0 backbone with a random linear head) whose training
metrics name that cache, as training.pipeline publishes it. Then it times
what publishing runs (search.indexing.build_index): the embedding
(embed_images: the head over the cached features, upsert into PostgreSQL)
and the index (build_hnsw_indexes: the HNSW index and the ef_search
calibration). Left out: the near-duplicate pass, which runs only for the
version that flags near-duplicates (the active one, or the first version
ever indexed), not for a newly published one while another is active. The scratch rows, files and
version are deleted at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

from _common import emit, machine_info, setup_django


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--features", type=int, default=1280, help="the backbone's feature size (Lite0: 1280)")
    parser.add_argument("--dimension", type=int, default=256)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_django()
    import torch
    from django.conf import settings
    from django.core.files.base import ContentFile

    from search.models import Dataset, Image
    from training.core.config import TrainConfig
    from training.core.features import FORMAT, cache_key, cache_path
    from training.core.loop import save_atomically
    from training.versions import create_version_from_checkpoint

    stamp = int(time.time())
    dataset = Dataset.objects.create(name=f"bench-head-publish-{stamp}")
    version = None
    cache = None
    try:
        import io

        from PIL import Image as PILImage

        buffer = io.BytesIO()
        PILImage.new("RGB", (32, 32), (120, 60, 30)).save(buffer, format="PNG")
        first = Image(dataset=dataset, sha256=hashlib.sha256(b"0").hexdigest(), width=32, height=32,
                      original_filename="0.png")
        first.file.save(f"bench-head-publish-{stamp}.png", ContentFile(buffer.getvalue()), save=False)
        rows = [first] + [Image(dataset=dataset, file=first.file.name, width=32, height=32,
                                sha256=hashlib.sha256(str(i).encode()).hexdigest(), original_filename=f"{i}.png")
                          for i in range(1, args.images)]
        Image.objects.bulk_create(rows, batch_size=5000)
        ids_hashes = list(dataset.images.order_by("pk").values_list("pk", "sha256"))

        config = TrainConfig(architecture="head", embedding_dim=args.dimension, epochs=1)
        network = config.build_model()
        key = cache_key(config.backbone or "", network.backbone, network.preprocessing)
        cache = cache_path(key)
        torch.manual_seed(0)
        save_atomically({"format": FORMAT, "key": key, "ids": torch.tensor([i for i, _ in ids_hashes]),
                         "sha256": [h for _, h in ids_hashes],
                         "features": torch.randn(len(ids_hashes), network.backbone.dimension)}, cache)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = Path(tmp) / "best.pt"
            torch.save({"model": network.head.state_dict()}, checkpoint)
            version = create_version_from_checkpoint(
                config, checkpoint, dataset, [], 0.0,
                extra_metrics={"features": {"cached": len(ids_hashes), "embedded": 0, "path": str(cache)}})
        from search.indexing import build_hnsw_indexes, embed_images, missing_image_ids

        start = time.perf_counter()
        missing = missing_image_ids(dataset, version)
        report = embed_images(version, missing)
        embedded_at = time.perf_counter()
        build_hnsw_indexes(version)  # finish_index's first step; see the module docstring
        seconds = time.perf_counter() - start
        embed_seconds = embedded_at - start
        result = {"machine": machine_info(), "images": len(ids_hashes), "embedded": report.embedded,
                  "failed": len(report.failed), "seconds": round(seconds, 2),
                  "embed_seconds": round(embed_seconds, 2), "finish_seconds": round(seconds - embed_seconds, 2),
                  "weights_dir": str(settings.CBIR_WEIGHTS_DIR)}
    finally:
        if version is not None:
            Path(version.weights_path).unlink(missing_ok=True)
            version.delete()
        names = set(dataset.images.values_list("file", flat=True))
        dataset.delete()
        from django.core.files.storage import default_storage

        for name in names:
            default_storage.delete(name)
        if cache is not None:
            cache.unlink(missing_ok=True)
    return emit(result, args.json, lambda r: print(
        f"published a head over {r['images']} cached images: {r['embedded']} embedded, {r['failed']} failed, "
        f"in {r['seconds']} s: {r['embed_seconds']} s head + upsert, {r['finish_seconds']} s HNSW index "
        f"and ef_search calibration; "
        f"{r['machine']['cpu_count']} cores, load average {r['machine']['load_average']}"))


if __name__ == "__main__":
    sys.exit(main())
