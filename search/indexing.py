"""Embedding images with a model version and keeping its HNSW index.

Plain functions: the build_index command, the Celery embedding jobs and the
tests all call these."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from django.conf import settings
from django.db import connection, transaction
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from search.models import Dataset, Embedding, Image
from training.inference import embed_batch, loader_workers, network_for, preprocessing_for
from training.models import ModelVersion
from training.networks.base import sha256_of
from training.networks.registry import build_network
from training.preprocessing import Preprocessing, load_rgb

logger = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]

# HNSW build parameters (pgvector defaults; see docs/architecture.md).
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 64


def _noop(done: int, total: int, message: str) -> None:
    pass


# --- Model versions -----------------------------------------------------------

def pretrained_version_name(architecture: str) -> str:
    return f"{architecture}-imagenet"


@transaction.atomic
def get_or_create_version(architecture: str, *, random_weights: bool = False, config: dict | None = None,
                          name: str | None = None) -> ModelVersion:
    """The ModelVersion for a registered architecture's pretrained weights, made
    on first use; with random_weights=True (only when asked) a new version whose
    random initial weights are saved, so queries and index agree."""
    config = config or {}
    if name is None:
        name = pretrained_version_name(architecture) if not random_weights else None
    if name:
        existing = ModelVersion.objects.filter(name=name).first()
        if existing:
            return existing
    model = build_network(architecture, weights="random" if random_weights else "pretrained", **config)
    info = model.weights_info
    version = ModelVersion(
        architecture=architecture, config=model.config or config, dimension=model.dimension,
        preprocessing=model.preprocessing.to_dict(), weights_source=info.source,
        weights_path=info.path, weights_sha256=info.sha256, notes=info.detail,
    )
    if random_weights:
        count = ModelVersion.objects.filter(architecture=architecture, weights_source="random").count()
        version.name = name or f"{architecture}-random-{count + 1}"
        weights_dir = Path(settings.CBIR_WEIGHTS_DIR)
        weights_dir.mkdir(parents=True, exist_ok=True)
        path = weights_dir / f"{version.name}.pt"
        torch.save({"model": model.state_dict(), "architecture": architecture, "config": version.config}, path)
        version.weights_source = ModelVersion.WeightsSource.RANDOM
        version.weights_path = str(path)
        version.weights_sha256 = sha256_of(path)
    else:
        version.name = name
    version.save()
    return version


def resolve_version(name_or_architecture: str | None, *, random_weights: bool = False) -> ModelVersion:
    """A model version by name; an architecture name gives its pretrained version
    (created on first use); None gives the active version, else the default."""
    from training.networks.registry import ARCHITECTURES, UnknownArchitecture

    if not name_or_architecture:
        active = ModelVersion.active()
        if active:
            return active
        name_or_architecture = settings.CBIR_DEFAULT_ARCHITECTURE
    version = ModelVersion.objects.filter(name=name_or_architecture).first()
    if version:
        return version
    if name_or_architecture in ARCHITECTURES:
        return get_or_create_version(name_or_architecture, random_weights=random_weights)
    known = ", ".join(ModelVersion.objects.values_list("name", flat=True)) or "none yet"
    raise UnknownArchitecture(
        f"{name_or_architecture!r} is neither a model version (existing: {known}) nor an architecture "
        f"(known: {', '.join(sorted(ARCHITECTURES))})"
    )


# --- HNSW index ---------------------------------------------------------------

def vector_expression(version: ModelVersion) -> str:
    return f"(vector::halfvec({int(version.dimension)}))"


def ensure_hnsw_index(version: ModelVersion) -> bool:
    """Create the version's partial HNSW cosine index if missing; True if created."""
    if version.index_exists():
        return False
    with connection.cursor() as cursor:
        if connection.in_atomic_block:
            # Django's foreign keys are deferred; PostgreSQL refuses CREATE INDEX
            # on a table with pending checks, so run them now.
            cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
        cursor.execute(
            f"CREATE INDEX IF NOT EXISTS {version.index_name} ON search_embedding "
            f"USING hnsw ({vector_expression(version)} halfvec_cosine_ops) "
            f"WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION}) "
            f"WHERE model_version_id = {int(version.pk)}"
        )
    return True


def drop_hnsw_index(version: ModelVersion) -> None:
    with connection.cursor() as cursor:
        cursor.execute(f"DROP INDEX IF EXISTS {version.index_name}")


# --- Embedding ----------------------------------------------------------------

class _FileImages(TorchDataset):
    """(tensor, image id) for each stored file; an unreadable file gives (None, id)."""

    def __init__(self, items: Sequence[tuple[int, str]], preprocessing: Preprocessing) -> None:
        self.items = list(items)
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        image_id, path = self.items[index]
        try:
            return self.preprocessing(load_rgb(path, draft_size=self.preprocessing.size)), image_id, ""
        except Exception as exc:  # noqa: BLE001 - reported per file, never aborts the batch
            return None, image_id, f"{type(exc).__name__}: {exc}"


def _collate(samples):
    good = [(t, i) for t, i, _ in samples if t is not None]
    bad = [(i, err) for t, i, err in samples if t is None]
    tensors = torch.stack([t for t, _ in good]) if good else None
    return tensors, [i for _, i in good], bad


@dataclass
class EmbedReport:
    embedded: int = 0
    failed: list[tuple[int, str]] = field(default_factory=list)  # (image id, reason)
    index_created: bool = False
    near_duplicates: int = 0  # pairs flagged

    def as_dict(self) -> dict:
        return {"embedded": self.embedded, "failed": len(self.failed),
                "failures": [{"image_id": i, "reason": r} for i, r in self.failed]}


def write_embeddings(version: ModelVersion, image_ids: Sequence[int], vectors: np.ndarray) -> int:
    """Upsert keyed on (image, model version): writing the same chunk twice is harmless.
    Images deleted meanwhile are skipped."""
    live = set(Image.objects.filter(pk__in=list(image_ids)).values_list("pk", flat=True))
    rows = [Embedding(image_id=i, model_version=version, vector=v) for i, v in zip(image_ids, vectors) if i in live]
    Embedding.objects.bulk_create(rows, update_conflicts=True, unique_fields=["image", "model_version"],
                                  update_fields=["vector"])
    return len(rows)


def embed_images(version: ModelVersion, image_ids: Sequence[int], *, batch_size: int | None = None,
                 progress: Progress = _noop, should_stop: Callable[[], bool] | None = None) -> EmbedReport:
    """Embed the given images with `version` and upsert their vectors."""
    batch_size = batch_size or settings.CBIR_EMBED_BATCH_SIZE
    items = list(Image.objects.filter(pk__in=list(image_ids)).order_by("pk").values_list("pk", "file"))
    media = Path(settings.MEDIA_ROOT)
    items = [(pk, str(media / f)) for pk, f in items]
    report = EmbedReport()
    if not items:
        return report
    model, device = network_for(version)
    workers = loader_workers(device) if len(items) > batch_size else 0
    loader = DataLoader(_FileImages(items, preprocessing_for(version)), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=_collate, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if workers else None)
    done = 0
    for tensors, ids, bad in loader:
        report.failed.extend(bad)
        if tensors is not None:
            vectors = embed_batch(model, device, tensors)
            report.embedded += write_embeddings(version, ids, vectors)
        done += len(ids) + len(bad)
        progress(done, len(items), f"embedded {done}/{len(items)}")
        if should_stop and should_stop():
            break
    return report


def missing_image_ids(dataset: Dataset | None, version: ModelVersion) -> list[int]:
    images = Image.objects.all() if dataset is None else Image.objects.filter(dataset=dataset)
    return list(images.exclude(embeddings__model_version=version).order_by("pk").values_list("pk", flat=True))


def build_index(dataset: Dataset, version: ModelVersion, *, batch_size: int | None = None,
                progress: Progress = _noop) -> EmbedReport:
    """Embed what is missing for (dataset, version), then make sure the HNSW index
    exists. Running it again embeds nothing new."""
    from search.jobs import flag_new_near_duplicates

    missing = missing_image_ids(dataset, version)
    report = embed_images(version, missing, batch_size=batch_size, progress=progress)
    report.index_created = ensure_hnsw_index(version)
    failed = {image_id for image_id, _ in report.failed}
    report.near_duplicates = flag_new_near_duplicates(version, [i for i in missing if i not in failed])
    if ModelVersion.active() is None:
        # The first version ever indexed becomes the one search uses.
        version.activate()
    return report


def coverage(dataset: Dataset) -> list[tuple[ModelVersion, int]]:
    """For each model version, how many of the dataset's images it has embedded."""
    from django.db.models import Count, Q

    versions = ModelVersion.objects.annotate(
        n=Count("embeddings", filter=Q(embeddings__image__dataset=dataset))
    ).order_by("-is_active", "name")
    return [(v, v.n) for v in versions]
