"""Deleting images, datasets and model versions, at any scale.

- **Set-based, in batches.** Images go `CBIR_DELETE_BATCH_SIZE` rows at a
  time, each batch its own short transaction (rows locked, then Django's
  delete: one statement each for the images, their embeddings and their
  near-duplicate pairs), so search, which only reads, keeps answering and no
  lock is held for long.
- **Files after commit, in bulk.** search/signals.py collects the file and
  thumbnail names of the deleted rows and, once the transaction commits, calls
  `release_files` once: one indexed query per 1,000 names finds the ones no
  row references any more, and only those are unlinked. A rolled-back delete
  removes no file.
- **One rule while jobs run.** A dataset, an image or a model version is not
  deleted while a queued or running job works on it (the job's dataset or
  model version): `DeleteRefused` names the job, "cancel job #N first". The
  check locks the dataset and version rows (search.jobs.working_on), so no job
  can start on them until the delete commits, and a delete job is *exclusive*
  (search/delete_jobs.py): no job starts on its dataset while it runs.
  Jobs over every dataset (an activation) skip images deleted meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import Q

from search import jobs
from search.models import Dataset, Image
from training.models import ModelVersion

RELEASE_BATCH = 1000  # file names per "still referenced?" query
UNLINK_THREADS = 8  # unlinks wait on the filesystem (journal, discard), not the CPU: overlap them

Progress = Callable[[int, int], None]


class DeleteRefused(jobs.JobError):
    """A delete that may not happen now; the message says why and what to do. Nothing was deleted."""


def check_free(*, what: str, datasets: Iterable = (), versions: Iterable = (), exclude: int | None = None) -> None:
    """Raise DeleteRefused when a queued or running job (other than `exclude`)
    works on one of these datasets or model versions. Call it inside the
    transaction that deletes: the rows stay locked until it commits."""
    busy = jobs.working_on(datasets=datasets, versions=versions, exclude=exclude)
    if busy:
        job = busy[0]
        raise DeleteRefused(f"{what} cannot be deleted while {jobs.describe(job)} works on it: "
                            f"cancel job #{job.pk} first (Jobs page), then delete again")


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False


def release_files(names: Iterable[str]) -> int:
    """Unlink the files (names relative to MEDIA_ROOT) that no image row
    references any more, as file or thumbnail. One query per RELEASE_BATCH
    names, on the indexes of search_image.file and .thumbnail; the unlinks run
    on UNLINK_THREADS threads, since each waits on the filesystem (measured 5-10x
    faster than one after another, docs/benchmarks.md). Meant to run after the
    deleting transaction commits. Returns the number of files removed."""
    wanted = sorted({name for name in names if name})
    root = Path(settings.MEDIA_ROOT)
    removed = 0
    with ThreadPoolExecutor(UNLINK_THREADS, thread_name_prefix="cbir-unlink") as pool:
        for start in range(0, len(wanted), RELEASE_BATCH):
            part = wanted[start:start + RELEASE_BATCH]
            kept: set[str] = set()
            for file, thumbnail in Image.objects.filter(Q(file__in=part) | Q(thumbnail__in=part)).values_list(
                    "file", "thumbnail"):
                kept.update((file, thumbnail))
            gone = [root / name for name in part if name not in kept]
            removed += sum(pool.map(_unlink, gone, chunksize=64))
    return removed


def _delete_batch(ids: Sequence[int]) -> int:
    """In the caller's transaction: lock the rows (so no embedding or pair can
    be added to them meanwhile), then delete them with their embeddings and
    near-duplicate pairs. Returns the number of images deleted."""
    locked = list(Image.objects.select_for_update().filter(pk__in=list(ids)).values_list("pk", flat=True))
    if not locked:
        return 0
    return Image.objects.filter(pk__in=locked).delete()[1].get(Image._meta.label, 0)


def _id_batches(images: Iterable[int] | Dataset, size: int) -> Iterator[list[int]]:
    if isinstance(images, Dataset):
        last = 0
        while True:  # keyset pages: each one an index range scan, whatever was deleted before
            ids = list(Image.objects.filter(dataset=images, pk__gt=last).order_by("pk")
                       .values_list("pk", flat=True)[:size])
            if not ids:
                return
            last = ids[-1]
            yield ids
    else:
        ordered = list(images)
        for start in range(0, len(ordered), size):
            yield ordered[start:start + size]


def delete_images(images: Iterable[int] | Dataset, *, batch_size: int | None = None,
                  progress: Progress | None = None, should_stop: Callable[[], bool] | None = None) -> int:
    """Delete images (ids, or every image of a dataset) batch by batch, each
    batch of `batch_size` (default CBIR_DELETE_BATCH_SIZE) rows in its own
    transaction; files go after each commit (search/signals.py). Stops between
    batches when `should_stop()` is true: every batch is either wholly deleted
    or untouched. Returns the number of images deleted. Does not check jobs
    (see check_free and search/delete_jobs.py)."""
    size = batch_size or settings.CBIR_DELETE_BATCH_SIZE
    if not isinstance(images, Dataset):
        images = sorted(set(int(pk) for pk in images))
    total = images.images.count() if isinstance(images, Dataset) else len(images)
    done = 0
    for ids in _id_batches(images, size):
        if should_stop and should_stop():
            break
        with transaction.atomic():
            done += _delete_batch(ids)
        if progress:
            progress(done, max(total, done))
    return done


def delete_dataset(dataset: Dataset, *, batch_size: int | None = None, progress: Progress | None = None,
                   should_stop: Callable[[], bool] | None = None) -> tuple[int, bool]:
    """Delete a dataset's images in batches (as delete_images), then the dataset
    row itself, locked first so that no image can be added to it meanwhile.
    Returns (images deleted, whether the dataset row was deleted: False when
    stopped before the end)."""
    done = delete_images(dataset, batch_size=batch_size, progress=progress, should_stop=should_stop)
    if should_stop and should_stop():
        return done, False
    with transaction.atomic():
        row = Dataset.objects.select_for_update().filter(pk=dataset.pk).first()
        if row is None:
            return done, True
        late = row.images.count()  # added by hand meanwhile: few, deleted with the row
        row.delete()
    return done + late, True


def delete_now(*, dataset: Dataset | None = None, image_ids: Iterable[int] = ()) -> int:
    """A small delete within the request: one transaction that checks no job
    works on the dataset (or the images' datasets) and deletes. Raises
    DeleteRefused naming the job, and then deletes nothing. Returns the number
    of images deleted."""
    with transaction.atomic():
        if dataset is not None:
            # FOR UPDATE: an image added by hand meanwhile waits for this commit (then fails on the missing
            # dataset), so no row can appear between collecting the images and deleting the dataset.
            if not list(Dataset.objects.select_for_update().filter(pk=dataset.pk).values_list("pk")):
                return 0
            check_free(what=f"dataset {dataset.name}", datasets=[dataset])
            count = len(Image.objects.select_for_update().filter(dataset=dataset).values_list("pk"))
            Dataset.objects.filter(pk=dataset.pk).delete()
            return count
        ids = list(image_ids)
        dataset_ids = set(Image.objects.filter(pk__in=ids).values_list("dataset_id", flat=True))
        check_free(what=f"{len(ids)} image(s)", datasets=dataset_ids)
        return _delete_batch(ids)


def delete_versions(versions: Iterable[ModelVersion]) -> list[str]:
    """Delete model versions with their embeddings and HNSW indexes, in one
    transaction. Raises DeleteRefused (and deletes none) when one is the active
    version or a job works on one. Returns their names."""
    versions = list(versions)
    with transaction.atomic():
        for version in versions:
            if ModelVersion.objects.filter(pk=version.pk, is_active=True).exists():
                raise DeleteRefused(f"model version {version.name} is the active one and cannot be deleted; "
                                    "activate another first")
            check_free(what=f"model version {version.name}", versions=[version])
        for version in versions:
            version.delete()
    return [v.name for v in versions]
