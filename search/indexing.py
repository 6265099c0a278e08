"""Embedding images with a model version and keeping its HNSW index.

Plain functions: the build_index command, the Celery embedding jobs and the
tests all call these."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from django.conf import settings
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from search import calibration, hnsw
from search.duplicates import flag_new_near_duplicates, flags_with
from search.models import Dataset, Embedding, Image
from search.neighbours import ef_search_for
from training.core.inference import (
    embed_batch,
    embed_from_feature_cache,
    embedding_precision,
    loader_workers,
    network_for,
    preprocessing_for,
)
from training.core.preprocessing import Preprocessing, load_rgb
from training.models import ModelVersion

logger = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]


def _noop(done: int, total: int, message: str) -> None:
    pass


# --- HNSW index ---------------------------------------------------------------

def build_hnsw_index(version: ModelVersion, *, progress: Progress | None = None,
                     dataset: Dataset | None = None) -> hnsw.BuildReport:
    """Create the version's partial HNSW cosine index (with `dataset`: its
    index of that dataset's rows) if there is no valid one (m = CBIR_HNSW_M,
    ef_construction = CBIR_HNSW_EF_CONSTRUCTION), sized and run as
    search/hnsw.py says: CONCURRENTLY outside a transaction, memory from the
    rows, progress(done, total, message) from pg_stat_progress_create_index."""
    return hnsw.ensure_index(version, m=settings.CBIR_HNSW_M,
                             ef_construction=settings.CBIR_HNSW_EF_CONSTRUCTION, progress=progress,
                             dataset=dataset)


def datasets_to_index(version: ModelVersion) -> list[tuple[Dataset, int]]:
    """(dataset, rows) for each dataset of `version` that gets an HNSW index of
    its own: more rows than CBIR_EXACT_SEARCH_MAX_ROWS (smaller subsets are
    scanned exactly) and at most CBIR_DATASET_INDEX_MAX_SHARE of the version's
    rows (a larger share is found by the version's walk with the filter about
    as well as unfiltered: measured in docs/scaling.md). Largest first."""
    from django.db.models import Count

    counts = dict(Embedding.objects.filter(model_version=version).order_by().values_list("dataset")
                  .annotate(n=Count("pk")))
    total = sum(counts.values())
    wanted = {pk: n for pk, n in counts.items()
              if n > settings.CBIR_EXACT_SEARCH_MAX_ROWS and n <= settings.CBIR_DATASET_INDEX_MAX_SHARE * total}
    datasets = Dataset.objects.in_bulk(list(wanted))
    return sorted(((datasets[pk], n) for pk, n in wanted.items() if pk in datasets), key=lambda p: (-p[1], p[0].pk))


def build_hnsw_indexes(version: ModelVersion, *, progress: Progress | None = None,
                       log: Callable[[str], None] | None = None) -> list[hnsw.BuildReport]:
    """The version's index, then the index of each dataset datasets_to_index
    names, each built only when missing; one report each, in that order. Then
    the version's search breadth is calibrated (calibrate_search) when its
    index was just built or its calibration is stale.

    Raises hnsw.IndexBuildError when the version's index fails. A dataset's
    index failing is only reported (its report's `error`, and a warning):
    that dataset's searches then walk the version's index, as before."""
    reports = [build_hnsw_index(version, progress=progress)]
    for dataset, _ in datasets_to_index(version):
        try:
            reports.append(build_hnsw_index(version, progress=progress, dataset=dataset))
        except hnsw.IndexBuildError as exc:
            logger.warning("%s", exc)
            reports.append(hnsw.BuildReport(name=hnsw.index_name(version, dataset), error=str(exc)))
    hnsw.drop_orphan_indexes(version)  # datasets deleted before or during these builds
    calibrate_search(version, force=reports[0].created, progress=progress, log=log)
    return reports


def calibrate_search(version: ModelVersion, *, force: bool = False, progress: Progress | None = None,
                     log: Callable[[str], None] | None = None) -> calibration.Calibration | None:
    """Choose and store the version's ef_search (search/calibration.py) when
    `force`, or when it has none or its row count has doubled or halved since
    (checked at each build, so after a large delete at the next one); skipped
    when CBIR_HNSW_CALIBRATION_QUERIES is 0 or CBIR_HNSW_EF_SEARCH fixes the
    breadth. log(message) gets the outcome. Any error is logged and returns
    None, never raised: the index is built and usable, and searches keep the
    breadth they had."""
    if settings.CBIR_HNSW_CALIBRATION_QUERIES <= 0 or settings.CBIR_HNSW_EF_SEARCH is not None:
        return None
    log = log or (lambda message: None)
    try:
        if not force and not calibration.is_stale(version, Embedding.objects.filter(model_version=version).count()):
            return None
        result = calibration.calibrate(version, progress=progress)
        if result is not None:
            calibration.save(version, result)
    except Exception as exc:  # noqa: BLE001 - a measurement must not fail the job that built the index
        logger.warning("calibrating the search breadth of %s failed: %r", version.name, exc)
        log(f"search breadth not calibrated ({exc!r}); searches keep ef_search {ef_search_for(10, version)}")
        return None
    if result is not None:
        log(f"search calibrated: {result.describe()}")
    return result


def ensure_hnsw_index(version: ModelVersion, *, progress: Progress | None = None) -> bool:
    """build_hnsw_indexes; True if it created the version's index."""
    return build_hnsw_indexes(version, progress=progress)[0].created


def drop_hnsw_index(version: ModelVersion) -> None:
    hnsw.drop_index(version)


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


def _datasets_of(image_ids: Sequence[int]) -> dict[int, int]:
    """{image id: dataset id} of the images that exist (the embedding row's copy)."""
    return dict(Image.objects.filter(pk__in=[int(i) for i in image_ids]).values_list("pk", "dataset_id"))


def write_embeddings(version: ModelVersion, image_ids: Sequence[int], vectors: np.ndarray) -> int:
    """Upsert keyed on (image, model version): image_ids (n,) int, vectors
    (n, D) float, stored as halfvec. Writing the same chunk twice is harmless;
    images deleted meanwhile are skipped. Returns the rows written."""
    live = _datasets_of(image_ids)
    rows = [Embedding(image_id=int(i), model_version=version, dataset_id=live[int(i)], vector=v)
            for i, v in zip(image_ids, vectors) if int(i) in live]
    Embedding.objects.bulk_create(rows, update_conflicts=True, unique_fields=["image", "model_version"],
                                  update_fields=["vector"])
    return len(rows)


def copy_embeddings(version: ModelVersion, image_ids: Sequence[int], vectors: np.ndarray) -> int:
    """Insert new embeddings in bulk with one binary COPY: image_ids (n,) int,
    vectors (n, D) float, stored as halfvec through pgvector's psycopg
    dumper (2 bytes a dimension on the wire instead of ~10 as text).

    For loading many rows at once (bench/scale.py loads 100,000 this way at
    tens of thousands of rows/s, where bulk_create formats every number as
    text). Unlike write_embeddings it does not upsert: an (image, version)
    already stored, or an image that does not exist, raises
    psycopg.IntegrityError and nothing is written. Raises ValueError when the
    shapes disagree with each other or with the version."""
    from django.db import transaction
    from django.utils import timezone
    from pgvector import HalfVector

    from search.neighbours import adapted_connection

    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != int(version.dimension) or len(vectors) != len(image_ids):
        raise ValueError(f"expected {len(image_ids)} vectors of {version.dimension} dimensions, got shape "
                         f"{vectors.shape}")
    now = timezone.now()
    datasets = _datasets_of(image_ids)
    with transaction.atomic():
        raw = adapted_connection()
        with raw.cursor() as cursor, cursor.copy(
                "COPY search_embedding (image_id, model_version_id, dataset_id, vector, created) "
                "FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["int8", "int8", "int8", "halfvec", "timestamptz"])
            for image_id, vector in zip(image_ids, vectors):
                # An unknown image: NULL, which the NOT NULL column refuses (IntegrityError).
                copy.write_row((int(image_id), int(version.pk), datasets.get(int(image_id)), HalfVector(vector), now))
    return len(vectors)


def embed_images(version: ModelVersion, image_ids: Sequence[int], *, batch_size: int | None = None,
                 progress: Progress = _noop, should_stop: Callable[[], bool] | None = None,
                 compiled: bool = False) -> EmbedReport:
    """Embed the given images with `version` and upsert their vectors.
    compiled: run the network through torch.compile (training.core.inference;
    compiled once per process for batches of `batch_size`).

    A head version (training.core.networks.head) first takes the images whose
    backbone features its training cached: the head runs over those
    (training.core.inference.embed_from_feature_cache, about 10,000 images a
    second) and only the rest go through backbone and head. The precision the
    network ran in is added to the version's metrics["embedding_precision"]
    (a sorted list: two entries when workers of two kinds embedded it)."""
    batch_size = batch_size or settings.CBIR_EMBED_BATCH_SIZE
    rows = list(Image.objects.filter(pk__in=list(image_ids)).order_by("pk").values_list("pk", "file", "sha256"))
    media = Path(settings.MEDIA_ROOT)
    report = EmbedReport()
    if not rows:
        return report
    total, done = len(rows), 0
    positions, cached_vectors = embed_from_feature_cache(version, [(pk, sha) for pk, _, sha in rows])
    if positions:
        cached_ids = [rows[p][0] for p in positions]
        for lo in range(0, len(cached_ids), 1000):
            report.embedded += write_embeddings(version, cached_ids[lo:lo + 1000], cached_vectors[lo:lo + 1000])
            done += len(cached_ids[lo:lo + 1000])
            progress(done, total, f"embedded {done}/{total} (cached backbone features)")
        found = set(positions)
        rows = [row for p, row in enumerate(rows) if p not in found]
    items = [(pk, str(media / f)) for pk, f, _ in rows]
    if not items:
        return report
    model, device = network_for(version, compiled_batch=batch_size if compiled else 0)
    workers = loader_workers(device) if len(items) > batch_size else 0
    loader = DataLoader(_FileImages(items, preprocessing_for(version)), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=_collate, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if workers else None)
    for tensors, ids, bad in loader:
        report.failed.extend(bad)
        if tensors is not None:
            vectors = embed_batch(model, device, tensors, pad_to=batch_size if compiled else 0)
            report.embedded += write_embeddings(version, ids, vectors)
        done += len(ids) + len(bad)
        progress(done, total, f"embedded {done}/{total}")
        if should_stop and should_stop():
            break
    record_embedding_precision(version, embedding_precision(device))
    return report


def record_embedding_precision(version: ModelVersion, precision: str) -> None:
    """Add `precision` ("bfloat16", "float32", ...) to the version's
    metrics["embedding_precision"] (a sorted list) unless it is there."""
    if precision in (version.metrics or {}).get("embedding_precision", []):
        return

    def add(metrics: dict) -> None:
        metrics["embedding_precision"] = sorted({*metrics.get("embedding_precision", []), precision})

    version.update_metrics(add)


def missing_image_ids(dataset: Dataset | None, version: ModelVersion) -> list[int]:
    images = Image.objects.all() if dataset is None else Image.objects.filter(dataset=dataset)
    return list(images.exclude(embeddings__model_version=version).order_by("pk").values_list("pk", flat=True))


def build_index(dataset: Dataset, version: ModelVersion, *, batch_size: int | None = None,
                progress: Progress = _noop) -> EmbedReport:
    """Embed what is missing for (dataset, version), then finish its index
    (finish_index: indexes, calibration, activation when no version is active,
    near-duplicates). Running it again embeds nothing new."""
    missing = missing_image_ids(dataset, version)
    report = embed_images(version, missing, batch_size=batch_size, progress=progress)
    failed = {image_id for image_id, _ in report.failed}
    finished = finish_index(version, [i for i in missing if i not in failed], activate=False)
    report.index_created, report.near_duplicates = finished.index_created, finished.near_duplicates or 0
    return report


@dataclass
class FinishReport:
    """What finish_index did: one hnsw.BuildReport per index (the version's
    first), whether it activated the version, the near-duplicate pairs flagged
    (None when this version does not flag them: search.duplicates.flags_with)."""

    builds: list[hnsw.BuildReport]
    activated: bool
    near_duplicates: int | None

    @property
    def index_created(self) -> bool:
        return self.builds[0].created


def finish_index(version: ModelVersion, new_image_ids: Sequence[int], *, activate: bool,
                 progress: Progress | None = None, log: Callable[[str], None] | None = None,
                 check_stop: Callable[[], None] | None = None,
                 near_duplicate_progress: Callable[[int, int], None] | None = None,
                 activated_by=None) -> FinishReport:
    """What follows an embedding, written once (build_index and the embed job's
    finishing step call it):

    1. the version's HNSW indexes, built where missing, and its search breadth
       calibrated when stale (build_hnsw_indexes);
    2. activation: with `activate`, or when no version is active yet (the
       first version ever indexed becomes the one search uses);
    3. near-duplicates of `new_image_ids` flagged (search.duplicates), when
       this version is the one that flags them.

    progress(done, total, message) follows the index build; log(message) gets
    each step's outcome; check_stop() is called before activating and before
    the near-duplicate pass (it raises to stop: a cancelled job does not
    activate). `activated_by`: the user the activation is logged for (a job's
    creator). Raises hnsw.IndexBuildError when the version's index fails."""
    log = log or (lambda message: None)
    builds = build_hnsw_indexes(version, progress=progress, log=log)
    for report in builds:
        if report.created or report.error:
            log(f"index {report.describe()}")
    if check_stop is not None:
        check_stop()
    activated = False
    if activate or ModelVersion.active() is None:
        version.activate(user=activated_by, reason="activation job" if activate else "first version indexed")
        activated = True
        log(f"{version.name} is now active for search")
    if check_stop is not None:
        check_stop()
    near_duplicates = None
    if flags_with(version):
        log(f"near-duplicates: looking up {len(new_image_ids):,} image(s) with {version.name}")
        near_duplicates = flag_new_near_duplicates(version, list(new_image_ids), progress=near_duplicate_progress)
        log(f"{near_duplicates} near-duplicate pair(s) flagged (see admin: Near duplicates)")
    else:
        log(f"near-duplicates not flagged: {version.name} is not the version they are flagged with "
            "(CBIR_NEAR_DUPLICATE_VERSION, default the active one)")
    return FinishReport(builds, activated, near_duplicates)


def coverage(dataset: Dataset) -> list[tuple[ModelVersion, int]]:
    """For each model version, how many of the dataset's images it has embedded."""
    from django.db.models import Count, Q

    versions = ModelVersion.objects.annotate(
        n=Count("embeddings", filter=Q(embeddings__dataset=dataset))
    ).order_by("-is_active", "name")
    return [(v, v.n) for v in versions]
