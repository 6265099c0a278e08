"""Near-duplicate images: copies that differ in bytes (so the importer's
SHA-256 check lets them in) but hardly in content: re-encoded, resized, a few
pixels changed.

After images are embedded, `flag_near_duplicates` asks the version's HNSW
index for each new image's few nearest neighbours in its dataset (one "more
like this" query each, never an all-pairs matrix) and records every pair at or
above the similarity threshold as a NearDuplicate row. `near_duplicate_groups`
joins the pairs into groups for the admin, where the extras can be deleted."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction

from search.models import Dataset, Image, NearDuplicate
from search.neighbours import nearest
from training.models import ModelVersion

DEFAULT_THRESHOLD = 0.95
# Neighbours looked at per image. A group larger than this is still found
# whole, because its members are linked to one another pair by pair.
NEIGHBOURS = 5


def near_duplicate_threshold() -> float:
    """The cosine similarity at or above which two images count as near-duplicates."""
    value = float(getattr(settings, "CBIR_NEAR_DUPLICATE_THRESHOLD", DEFAULT_THRESHOLD))
    if not 0.0 < value <= 1.0:
        raise ImproperlyConfigured(f"CBIR_NEAR_DUPLICATE_THRESHOLD must be in (0, 1], not {value}")
    return value


def flag_near_duplicates(version: ModelVersion, dataset: Dataset, image_ids: Iterable[int] | None = None,
                         threshold: float | None = None) -> int:
    """Record the near-duplicates of `image_ids` (all of the dataset's images
    when None) within `dataset`, as seen by `version`.

    A pair is flagged when its cosine similarity is >= `threshold` (default:
    settings.CBIR_NEAR_DUPLICATE_THRESHOLD, else 0.95). In each pair `image`
    is the newer image (later `created`, then higher id) and `duplicate_of`
    the older, so a new import points at what was already there. Rows are
    upserted on (image, duplicate_of): running it again changes nothing.
    Images not embedded by `version`, or not in `dataset`, are skipped.
    Returns the number of pairs flagged.
    """
    threshold = near_duplicate_threshold() if threshold is None else float(threshold)
    queries = Image.objects.filter(dataset=dataset, embeddings__model_version=version)
    if image_ids is not None:
        queries = queries.filter(pk__in=list(image_ids))
    found: dict[tuple[int, int], float] = {}
    for image_id in queries.order_by("pk").values_list("pk", flat=True):
        for hit in nearest(version, image_id=image_id, k=NEIGHBOURS, dataset=dataset, exclude_image_id=image_id):
            if hit.score < threshold:
                break  # results come most similar first
            key = (min(image_id, hit.image_id), max(image_id, hit.image_id))
            found[key] = max(found.get(key, -1.0), hit.score)
    if not found:
        return 0
    ages = _ages({i for pair in found for i in pair})
    rows = []
    for (a, b), similarity in found.items():
        newer, older = (a, b) if ages[a] > ages[b] else (b, a)
        rows.append(NearDuplicate(image_id=newer, duplicate_of_id=older, similarity=min(similarity, 1.0),
                                  model_version=version))
    NearDuplicate.objects.bulk_create(rows, update_conflicts=True, unique_fields=["image", "duplicate_of"],
                                      update_fields=["similarity", "model_version"])
    return len(rows)


def flag_new_near_duplicates(version: ModelVersion, image_ids: Iterable[int]) -> int:
    """Flag newly embedded images that nearly duplicate an image of their own
    dataset, dataset by dataset. Run after the index exists, so each lookup is
    an index query. Returns the number of pairs flagged."""
    by_dataset: dict[int, list[int]] = {}
    for image_id, dataset_id in Image.objects.filter(pk__in=list(image_ids)).values_list("pk", "dataset_id"):
        by_dataset.setdefault(dataset_id, []).append(image_id)
    flagged = 0
    for dataset in Dataset.objects.filter(pk__in=by_dataset):
        flagged += flag_near_duplicates(version, dataset, by_dataset[dataset.pk])
    return flagged


def _ages(ids: set[int]) -> dict[int, tuple]:
    """A sort key per image: later `created` (then higher id) is newer."""
    return {pk: (created, pk) for pk, created in Image.objects.filter(pk__in=ids).values_list("pk", "created")}


def near_duplicate_groups(dataset: Dataset) -> list[list[Image]]:
    """The dataset's flagged pairs joined into groups (connected components).

    Each group is a list of Image rows, the oldest first (by `created`, then
    id): the one to keep. Groups are ordered by their oldest image.
    """
    pairs = list(NearDuplicate.objects.filter(image__dataset=dataset).values_list("image_id", "duplicate_of_id"))
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        root_a, root_b = find(a), find(b)
        if root_a != root_b:
            parent[max(root_a, root_b)] = min(root_a, root_b)
    members: dict[int, list[int]] = {}
    for pk in list(parent):
        members.setdefault(find(pk), []).append(pk)
    images = Image.objects.in_bulk(list(parent))
    groups = [sorted((images[pk] for pk in ids if pk in images), key=lambda im: (im.created, im.pk))
              for ids in members.values()]
    groups = [group for group in groups if len(group) > 1]
    return sorted(groups, key=lambda group: (group[0].created, group[0].pk))


@transaction.atomic
def delete_extras(dataset: Dataset, keep_ids: Sequence[int]) -> list[int]:
    """For each group whose first (kept) image id is in `keep_ids`, delete the
    group's other images (their files go once the transaction commits, see
    search.signals). Returns the ids deleted. Groups are recomputed here, so a
    stale page cannot delete an image that is no longer a duplicate."""
    wanted = set(int(pk) for pk in keep_ids)
    extras = [image.pk for group in near_duplicate_groups(dataset) if group[0].pk in wanted for image in group[1:]]
    for image in Image.objects.filter(pk__in=extras):
        image.delete()
    return extras
