"""File and index clean-up when rows go away.

Deleting images (one, in bulk, with their dataset, or by a delete job) removes
their files and thumbnails once the transaction commits: the receiver only
collects the names, and one callback per transaction hands them all to
`search.deletion.release_files` (one indexed query per 1,000 names), instead
of a query per image. Embeddings and near-duplicate pairs go by cascade.
Deleting a model version drops its HNSW indexes; deleting a dataset drops
every version's HNSW index of that dataset once the delete has committed.
Deleting a dataset or an import job removes the job's uploaded zip (which a
failed or cancelled import keeps for Run again) after commit."""

from __future__ import annotations

import threading

from django.db import connection, transaction
from django.db.models.signals import post_delete, pre_delete
from django.dispatch import receiver

from search.models import Dataset, Image, Job
from training.models import ModelVersion

_state = threading.local()


def _flush() -> None:
    from search.deletion import release_files

    names, _state.pending = getattr(_state, "pending", None) or [], None
    release_files(names)


def _flush_is_pending() -> bool:
    # Django drops on-commit callbacks on rollback; then names collected for a
    # rolled-back delete are forgotten (release_files would keep them anyway:
    # their rows still exist).
    return any(callback is _flush for _, callback, *_ in connection.run_on_commit)


@receiver(post_delete, sender=Image)
def remove_image_files(sender, instance: Image, **kwargs) -> None:
    names = [instance.file.name, instance.thumbnail.name]
    if not connection.in_atomic_block:
        from search.deletion import release_files

        release_files(names)
        return
    if getattr(_state, "pending", None) is None or not _flush_is_pending():
        _state.pending = []
        transaction.on_commit(_flush)
    _state.pending.extend(names)


@receiver(pre_delete, sender=ModelVersion)
def drop_version_index(sender, instance: ModelVersion, **kwargs) -> None:
    from search.indexing import drop_hnsw_index

    drop_hnsw_index(instance)


@receiver(post_delete, sender=Dataset)
def drop_dataset_indexes(sender, instance: Dataset, **kwargs) -> None:
    """After the delete commits: DROP INDEX CONCURRENTLY (search.hnsw), so
    searches on the table never wait behind it."""
    from search.hnsw import drop_dataset_indexes as drop

    pk = instance.pk
    transaction.on_commit(lambda: drop(pk))


@receiver(pre_delete, sender=Dataset)
def discard_dataset_uploads(sender, instance: Dataset, **kwargs) -> None:
    """Its import jobs can no longer be re-run (their dataset is gone): their zips go."""
    from search.import_jobs import KIND, discard_uploads

    discard_uploads(list(Job.objects.filter(dataset=instance, kind=KIND)))


@receiver(post_delete, sender=Job)
def discard_job_upload(sender, instance: Job, **kwargs) -> None:
    from search.import_jobs import discard_uploads

    discard_uploads([instance])
