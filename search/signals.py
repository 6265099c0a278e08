"""File and index clean-up when rows go away.

Deleting an image (one, in bulk, or with its dataset) removes its file and
thumbnail once the transaction commits; its embeddings go by cascade.
Deleting a model version drops its HNSW index."""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models.signals import post_delete, pre_delete
from django.dispatch import receiver

from search.models import Image
from training.models import ModelVersion


def _delete_files(names: list[str]) -> None:
    root = Path(settings.MEDIA_ROOT)
    for name in names:
        if not name:
            continue
        path = root / name
        # The same bytes may still be referenced by a row of another dataset.
        if Image.objects.filter(file=name).exists() or Image.objects.filter(thumbnail=name).exists():
            continue
        path.unlink(missing_ok=True)


@receiver(post_delete, sender=Image)
def remove_image_files(sender, instance: Image, **kwargs) -> None:
    names = [instance.file.name, instance.thumbnail.name]
    transaction.on_commit(lambda: _delete_files(names))


@receiver(pre_delete, sender=ModelVersion)
def drop_version_index(sender, instance: ModelVersion, **kwargs) -> None:
    from search.indexing import drop_hnsw_index

    drop_hnsw_index(instance)
