"""Near-duplicate images: copies that differ in bytes (so the importer's
SHA-256 check lets them in) but hardly in content: re-encoded, resized, a few
pixels changed.

After images are embedded, `flag_near_duplicates` asks the version's HNSW
index for each new image's few nearest neighbours in its dataset (one "more
like this" query each, never an all-pairs matrix: time linear in the images
added) and records every pair at or above the similarity threshold as a
NearDuplicate row. `group_ids` joins a dataset's pairs into groups (connected
components, union-find over one query's pairs) for the admin, which pages
through them and deletes the extras.

One version flags. A cosine threshold means something only for the model it
was calibrated for (0.95 suits the ImageNet networks, docs/evaluation.md; a
weak autoencoder puts far more unrelated pairs above it), so only the
version named by CBIR_NEAR_DUPLICATE_VERSION, by default the active one,
flags; embedding with any other version flags nothing (`flagging_version`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from search.models import Dataset, Image, NearDuplicate
from search.neighbours import nearest
from training.models import ModelVersion

DEFAULT_THRESHOLD = 0.95
# Neighbours looked at per image. A group larger than this is still found
# whole, because its members are linked to one another pair by pair.
NEIGHBOURS = 5
SLICE = 1000  # images looked up (and pairs written) per step, with progress after each

Progress = Callable[[int, int], None]


def flagging_version() -> ModelVersion | None:
    """The model version near-duplicates are flagged with: the one named by
    CBIR_NEAR_DUPLICATE_VERSION, else the active one (None when neither
    exists). Raises ImproperlyConfigured when the named version does not exist."""
    name = getattr(settings, "CBIR_NEAR_DUPLICATE_VERSION", "") or ""
    if name:
        version = ModelVersion.objects.filter(name=name).first()
        if version is None:
            raise ImproperlyConfigured(f"CBIR_NEAR_DUPLICATE_VERSION names no model version: {name!r}")
        return version
    return ModelVersion.active()


def flags_with(version: ModelVersion) -> bool:
    """Whether embedding with `version` flags near-duplicates: it is the
    flagging version, or no version is active yet and none is named (the first
    version indexed, which becomes the active one)."""
    chosen = flagging_version()
    return version.pk == chosen.pk if chosen is not None else True


def near_duplicate_threshold() -> float:
    """The cosine similarity at or above which two images count as near-duplicates."""
    value = float(getattr(settings, "CBIR_NEAR_DUPLICATE_THRESHOLD", DEFAULT_THRESHOLD))
    if not 0.0 < value <= 1.0:
        raise ImproperlyConfigured(f"CBIR_NEAR_DUPLICATE_THRESHOLD must be in (0, 1], not {value}")
    return value


def flag_near_duplicates(version: ModelVersion, dataset: Dataset, image_ids: Iterable[int] | None = None,
                         threshold: float | None = None, progress: Progress | None = None) -> int:
    """Record the near-duplicates of `image_ids` (all of the dataset's images
    when None) within `dataset`, as seen by `version` (whichever it is: the
    choice of version is flag_new_near_duplicates').

    A pair is flagged when its cosine similarity is >= `threshold` (default:
    settings.CBIR_NEAR_DUPLICATE_THRESHOLD, else 0.95). In each pair `image`
    is the newer image (later `created`, then higher id) and `duplicate_of`
    the older, so a new import points at what was already there. Rows are
    upserted on (image, duplicate_of): running it again changes nothing.
    Images not embedded by `version`, or not in `dataset`, are skipped.
    Cost: one HNSW query per image (NEIGHBOURS results), in slices of SLICE
    images, each followed by one upsert and `progress(done, total)`.
    Returns the number of pairs flagged.
    """
    threshold = near_duplicate_threshold() if threshold is None else float(threshold)
    queries = Image.objects.filter(dataset=dataset, embeddings__model_version=version)
    if image_ids is not None:
        wanted = sorted(set(int(pk) for pk in image_ids))
        ids = [pk for start in range(0, len(wanted), SLICE)
               for pk in queries.filter(pk__in=wanted[start:start + SLICE]).order_by("pk").values_list("pk", flat=True)]
    else:
        ids = list(queries.order_by("pk").values_list("pk", flat=True))
    flagged = 0
    for start in range(0, len(ids), SLICE):
        flagged += _flag_slice(version, dataset, ids[start:start + SLICE], threshold)
        if progress:
            progress(min(start + SLICE, len(ids)), len(ids))
    return flagged


def _flag_slice(version: ModelVersion, dataset: Dataset, ids: Sequence[int], threshold: float) -> int:
    found: dict[tuple[int, int], float] = {}
    for image_id in ids:
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


def flag_new_near_duplicates(version: ModelVersion, image_ids: Iterable[int],
                             progress: Progress | None = None) -> int:
    """Flag newly embedded images that nearly duplicate an image of their own
    dataset, dataset by dataset, when `version` is the flagging version
    (flags_with); otherwise flag nothing and return 0. Run after the index
    exists, so each lookup is an index query. `progress(done, total)` counts
    images over all datasets. Returns the number of pairs flagged."""
    if not flags_with(version):
        return 0
    by_dataset: dict[int, list[int]] = {}
    wanted = sorted(set(int(pk) for pk in image_ids))
    for start in range(0, len(wanted), SLICE):
        for image_id, dataset_id in Image.objects.filter(pk__in=wanted[start:start + SLICE]).values_list(
                "pk", "dataset_id"):
            by_dataset.setdefault(dataset_id, []).append(image_id)
    total = sum(len(ids) for ids in by_dataset.values())
    flagged = before = 0
    for dataset in Dataset.objects.filter(pk__in=by_dataset):
        ids = by_dataset[dataset.pk]

        def step(done: int, _total: int, base: int = before) -> None:
            if progress:
                progress(base + done, total)

        flagged += flag_near_duplicates(version, dataset, ids, progress=step)
        before += len(ids)
    return flagged


def _ages(ids: set[int]) -> dict[int, tuple]:
    """A sort key per image: later `created` (then higher id) is newer."""
    return {pk: (created, pk) for pk, created in Image.objects.filter(pk__in=ids).values_list("pk", "created")}


def group_ids(dataset: Dataset, version: ModelVersion | None = None) -> list[list[int]]:
    """The dataset's flagged pairs (those of `version` when given) joined into
    groups: connected components, by union-find over the pairs read in one
    query (with both images' ages). Each group is a list of image ids, the
    oldest first (by `created`, then id): the one to keep. Groups are ordered
    by their oldest image."""
    pairs = NearDuplicate.objects.filter(image__dataset=dataset)
    if version is not None:
        pairs = pairs.filter(model_version=version)
    parent: dict[int, int] = {}
    age: dict[int, tuple] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, a_created, b, b_created in pairs.values_list("image_id", "image__created", "duplicate_of_id",
                                                        "duplicate_of__created"):
        age[a], age[b] = (a_created, a), (b_created, b)
        root_a, root_b = find(a), find(b)
        if root_a != root_b:
            parent[max(root_a, root_b)] = min(root_a, root_b)
    members: dict[int, list[int]] = {}
    for pk in parent:
        members.setdefault(find(pk), []).append(pk)
    groups = [sorted(ids, key=age.__getitem__) for ids in members.values() if len(ids) > 1]
    return sorted(groups, key=lambda ids: age[ids[0]])


def with_images(groups: Sequence[Sequence[int]]) -> list[list[Image]]:
    """Groups of ids as groups of Image rows, in one query (for one page of groups)."""
    images = Image.objects.in_bulk([pk for ids in groups for pk in ids])
    return [[images[pk] for pk in ids if pk in images] for ids in groups]


def delete_extras(dataset: Dataset, keep_ids: Sequence[int], version: ModelVersion | None = None) -> list[int]:
    """For each group whose first (kept) image id is in `keep_ids`, delete the
    group's other images, in one transaction (files go once it commits, see
    search.deletion). Groups are recomputed here, so a stale page cannot delete
    an image that is no longer a duplicate. Raises DeleteRefused (nothing
    deleted) while a job works on the dataset. Returns the ids deleted."""
    from search.deletion import delete_now

    wanted = set(int(pk) for pk in keep_ids)
    extras = [pk for ids in group_ids(dataset, version) if ids[0] in wanted for pk in ids[1:]]
    if extras:
        delete_now(image_ids=extras)
    return extras
