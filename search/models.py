from __future__ import annotations

import hashlib

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from pgvector.django import HalfVectorField

from training.models import ModelVersion

DATASET_NAME_MAX = 100  # characters, after normalising (Dataset.name's max_length)


class DatasetNameError(ValueError):
    """A dataset name that cannot be stored: empty, too long, or holding a control character."""


def normalise_dataset_name(raw: object) -> str:
    """The one spelling of a dataset name, used by every path that creates a
    dataset (import_images, import_idx, the admin) and every lookup by name
    (search, the API, the commands): Unicode NFC (macOS's decomposed "café" is
    the composed one), surrounding white space stripped. Raises
    DatasetNameError, with words, for a name that is empty or only spaces
    (it would look like "All datasets"), longer than 100 characters, or that
    holds a control character (C0, DEL, C1: a NUL, a line break, an escape)
    or a bidi control (U+202E and kin)."""
    import unicodedata

    from search.names import printable_name

    name = unicodedata.normalize("NFC", str(raw)).strip()
    if not name:
        raise DatasetNameError("a dataset name cannot be empty or only spaces")
    if printable_name(name) != name:
        raise DatasetNameError(f"a dataset name cannot hold control characters (line breaks, tabs, escapes, "
                               f"NUL or bidi controls); got {ascii(name)[:120]}")
    if len(name) > DATASET_NAME_MAX:
        raise DatasetNameError(f"a dataset name can be at most {DATASET_NAME_MAX} characters; "
                               f"this one has {len(name)}")
    return name


def dataset_named(raw: object) -> Dataset | None:
    """The dataset named exactly `raw`, else the one whose name is `raw` once
    normalised (normalise_dataset_name), or None, also for a name no dataset
    can have (empty, NUL, too long). The exact match keeps a dataset created
    before the normaliser (padded, decomposed, holding a tab) reachable by
    the name it is listed with."""
    text = str(raw)
    if "\x00" in text or len(text) > DATASET_NAME_MAX:  # PostgreSQL refuses a NUL in a query; no such name
        return None
    exact = Dataset.objects.filter(name=text).first()
    if exact is not None:
        return exact
    try:
        name = normalise_dataset_name(raw)
    except DatasetNameError:
        return None
    return Dataset.objects.filter(name=name).first()


class Dataset(models.Model):
    name = models.CharField(max_length=DATASET_NAME_MAX, unique=True)
    description = models.TextField(blank=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Split(models.TextChoices):
    TRAIN = "train", "train"
    VAL = "val", "validation"
    TEST = "test", "test"


def split_for(sha256: str, seed: str | None = None) -> str:
    """60/20/20 train/val/test, decided by a seeded hash of the image's content:
    the same image always lands in the same split, whatever the import order."""
    seed = settings.CBIR_SPLIT_SEED if seed is None else seed
    bucket = int.from_bytes(hashlib.sha256(f"{seed}:{sha256}".encode()).digest()[:8], "big") % 10_000
    if bucket < 6_000:
        return Split.TRAIN
    if bucket < 8_000:
        return Split.VAL
    return Split.TEST


class Image(models.Model):
    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="images")
    file = models.FileField(max_length=300)
    thumbnail = models.FileField(max_length=300)
    sha256 = models.CharField(max_length=64)
    label = models.CharField(max_length=200, null=True, blank=True, db_index=True)
    split = models.CharField(max_length=5, choices=Split.choices, db_index=True)
    width = models.PositiveIntegerField()
    height = models.PositiveIntegerField()
    original_filename = models.CharField(max_length=500)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        constraints = [models.UniqueConstraint(fields=["dataset", "sha256"], name="unique_image_per_dataset")]
        # Deleting finds the files no row references any more with one query
        # per 1,000 names (search.deletion.release_files), not a scan per image.
        indexes = [models.Index(fields=["file"], name="image_file"),
                   models.Index(fields=["thumbnail"], name="image_thumbnail")]

    def __str__(self) -> str:
        return f"{self.original_filename} ({self.dataset_id}:{self.pk})"


class Embedding(models.Model):
    """One image's vector under one model version. The column has no fixed
    dimension, so several versions' vectors share it; each version gets its own
    partial HNSW index on the cast to its dimension, and each large dataset of
    it one more (see search.indexing).

    `dataset` is the image's dataset, copied onto the row so that a partial
    index and a b-tree can name it (a partial index's predicate can only read
    its own table's columns). The writers in search.indexing set it; an image
    never changes dataset (the admin shows it read-only), so it stays in step."""

    image = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="embeddings")
    model_version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="embeddings")
    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="embeddings", editable=False,
                                db_index=False)  # the (dataset, model_version) b-tree below serves it
    vector = HalfVectorField()
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["image", "model_version"], name="unique_embedding_per_version")]
        indexes = [models.Index(fields=["model_version", "image"], name="embedding_version_image"),
                   models.Index(fields=["dataset", "model_version"], name="embedding_dataset_version")]


class Job(models.Model):
    """A long piece of work run by a Celery worker. This row, not the broker, is
    the truth about it: status, progress, log, result, error.

    Status changes go through `search.jobs.transition`, which enforces the
    allowed ones with a conditional UPDATE (so two workers cannot both claim it).
    """

    class Kind(models.TextChoices):
        IMPORT = "import", "import"
        EMBED = "embed", "embed"
        TRAIN = "train", "train"
        EVALUATE = "evaluate", "evaluate"
        DELETE = "delete", "delete"

    class Status(models.TextChoices):
        QUEUED = "queued", "queued"
        RUNNING = "running", "running"
        SUCCEEDED = "succeeded", "succeeded"
        FAILED = "failed", "failed"
        CANCELLED = "cancelled", "cancelled"

    kind = models.CharField(max_length=10, choices=Kind.choices)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED, db_index=True)
    dataset = models.ForeignKey(Dataset, null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs")
    model_version = models.ForeignKey(ModelVersion, null=True, blank=True, on_delete=models.SET_NULL,
                                      related_name="jobs")
    params = models.JSONField(default=dict, blank=True)
    result = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    progress_done = models.PositiveIntegerField(default=0)
    progress_total = models.PositiveIntegerField(default=0)
    message = models.CharField(max_length=300, blank=True)
    log = models.JSONField(default=list, blank=True)
    celery_task_id = models.CharField(max_length=64, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created = models.DateTimeField(auto_now_add=True)
    started = models.DateTimeField(null=True, blank=True)
    finished = models.DateTimeField(null=True, blank=True)
    heartbeat = models.DateTimeField(null=True, blank=True)
    # When the run now holding the job claimed it (search.runner.execute): a run
    # is identified by it. None while a split job's chunks run (their rows are
    # claimed instead), set once its finishing step has claimed the job.
    claimed = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created"]
        indexes = [models.Index(fields=["status", "heartbeat"], name="job_status_heartbeat")]

    def __str__(self) -> str:
        target = self.dataset or self.model_version or ""
        return f"{self.get_kind_display()} job #{self.pk} {target}".strip()

    @property
    def is_finished(self) -> bool:
        return self.status in (self.Status.SUCCEEDED, self.Status.FAILED, self.Status.CANCELLED)

    @property
    def duration(self):
        if not self.started:
            return None
        from django.utils import timezone

        return (self.finished or timezone.now()) - self.started

    @property
    def percent(self) -> float:
        return 100.0 * self.progress_done / self.progress_total if self.progress_total else (
            100.0 if self.status == self.Status.SUCCEEDED else 0.0)


class JobChunk(models.Model):
    """A slice of an embedding job's images, run as its own task so that every
    worker can take part. Writes are upserts, so a chunk run twice does no harm."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="chunks")
    index = models.PositiveIntegerField()
    image_ids = models.JSONField()
    status = models.CharField(max_length=10, choices=Job.Status.choices, default=Job.Status.QUEUED)
    done = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True)
    attempts = models.PositiveIntegerField(default=0)
    worker = models.CharField(max_length=200, blank=True)
    celery_task_id = models.CharField(max_length=64, blank=True)
    heartbeat = models.DateTimeField(null=True, blank=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["job", "index"]
        constraints = [models.UniqueConstraint(fields=["job", "index"], name="unique_chunk_index")]
        indexes = [models.Index(fields=["status", "heartbeat"], name="chunk_status_heartbeat")]


class NearDuplicate(models.Model):
    """Two images of one dataset whose embeddings are nearly the same direction
    (cosine similarity at or above CBIR_NEAR_DUPLICATE_THRESHOLD) under
    `model_version`: a re-encoded, resized or lightly edited copy. `image` is
    the newer of the two, `duplicate_of` the older one. Written by
    search.duplicates.flag_near_duplicates; nothing is deleted automatically."""

    image = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="near_duplicates")
    duplicate_of = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="near_copies")
    similarity = models.FloatField()
    model_version = models.ForeignKey(ModelVersion, null=True, blank=True, on_delete=models.SET_NULL,
                                      related_name="near_duplicates")
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-similarity", "id"]
        constraints = [
            models.UniqueConstraint(fields=["image", "duplicate_of"], name="unique_near_duplicate_pair"),
            models.CheckConstraint(condition=~models.Q(image=models.F("duplicate_of")),
                                   name="near_duplicate_not_itself"),
        ]

    def __str__(self) -> str:
        return f"image {self.image_id} ≈ image {self.duplicate_of_id} ({self.similarity:.3f})"


class ApiTokenQuerySet(models.QuerySet):
    """Bulk writes cannot un-revoke either: `update()` (and so `bulk_update()`,
    which goes through it) may set `revoked` only to True."""

    def update(self, **kwargs: object) -> int:
        if "revoked" in kwargs and kwargs["revoked"] is not True:
            raise ValidationError(ApiToken.REVOCATION_IS_FINAL + " (a bulk update may only set revoked=True)")
        return super().update(**kwargs)


class ApiToken(models.Model):
    """A key for the JSON search API (`Authorization: Bearer <key>`), created by
    a staff member in the admin. Only the SHA-256 of the key is stored: the key
    itself is shown once, on creation. A token works while it is not revoked and
    its owner is an active staff member; it opens the search API and /media/,
    never the admin or the job pages. Revocation is final: a revoked token is
    never un-revoked (clean and save refuse; the admin shows the field read-only)."""

    KEY_PREFIX = "cbir_"

    name = models.CharField(max_length=100, help_text="what the token is for, e.g. the client's name")
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    # The key's first characters, to tell tokens apart in lists and logs.
    prefix = models.CharField(max_length=12, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens",
                             help_text="the staff member who owns it")
    created = models.DateTimeField(auto_now_add=True)
    last_used = models.DateTimeField(null=True, blank=True)
    revoked = models.BooleanField(default=False)

    objects = ApiTokenQuerySet.as_manager()

    class Meta:
        ordering = ["-created"]
        verbose_name = "API token"

    REVOCATION_IS_FINAL = "this API token was revoked, and revocation is final: create a new token instead"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    def _unrevokes(self) -> bool:
        """True when this unsaved state would un-revoke a token revoked in the database."""
        return (not self.revoked and self.pk is not None
                and ApiToken.objects.filter(pk=self.pk, revoked=True).exists())

    def clean(self) -> None:
        super().clean()
        if self._unrevokes():
            raise ValidationError({"revoked": self.REVOCATION_IS_FINAL})

    def save(self, *args, **kwargs) -> None:
        """Raises ValidationError when it would un-revoke. Saving an existing,
        unrevoked token never writes `revoked`, so a token revoked by another
        request between that check and this UPDATE stays revoked."""
        if self._unrevokes():
            raise ValidationError(self.REVOCATION_IS_FINAL)
        if not self._state.adding and not self.revoked and not kwargs.get("force_insert"):
            fields = kwargs.get("update_fields")
            if fields is None:
                fields = [f.name for f in self._meta.concrete_fields if not f.primary_key]
            kwargs["update_fields"] = [name for name in fields if name != "revoked"]
        super().save(*args, **kwargs)

    @staticmethod
    def hash_key(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    def set_new_key(self) -> str:
        """Give this token a fresh random key; returns the key, which is not kept."""
        import secrets

        key = self.KEY_PREFIX + secrets.token_urlsafe(32)
        self.key_hash = self.hash_key(key)
        self.prefix = key[:12]
        return key


class RateCounter(models.Model):
    """Searches by one client (`key`: its token or IP address) in the fixed
    window that started at `window_start` (Unix seconds). Counted with one
    atomic upsert per search by search.access.count_search."""

    key = models.CharField(max_length=100, primary_key=True)
    window_start = models.BigIntegerField()
    count = models.PositiveIntegerField()


class QueryEmbedding(models.Model):
    """The embedding of an uploaded query image under one model version, kept
    so that relevance feedback on that search (a mark, a refined query) can
    name the upload by its SHA-256 instead of sending it again. The image
    itself is never stored; rows older than CBIR_QUERY_EMBEDDING_DAYS are
    removed as searches go (search.feedback.remember_upload)."""

    model_version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="query_embeddings")
    sha256 = models.CharField(max_length=64, help_text="SHA-256 of the uploaded bytes, lower-case hex")
    vector = HalfVectorField()
    last_seen = models.DateTimeField()
    # Who searched with the upload: a signed-in user (or an API token's owner),
    # else the anonymous session. Only they can name it afterwards, so a hash
    # tells nobody else whether the image was ever searched with.
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE,
                             related_name="+")
    session_key = models.CharField(max_length=40, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["model_version", "sha256", "user"], condition=models.Q(user__isnull=False),
                                    name="unique_query_per_user"),
            models.UniqueConstraint(fields=["model_version", "sha256", "session_key"],
                                    condition=models.Q(user__isnull=True), name="unique_query_per_session"),
        ]
        indexes = [models.Index(fields=["last_seen"], name="query_embedding_seen")]


class Feedback(models.Model):
    """One relevance mark (Rui et al. 1998): for a query, under the model
    version that ranked it, a result judged relevant ("right") or not
    ("wrong") by a user (or an anonymous session). The query is an indexed
    image (`query_image`) or an upload, named by its SHA-256 with its
    embedding copied here (`query_vector`), so the mark outlives the upload's
    QueryEmbedding row. Deleting either image deletes the mark."""

    class Verdict(models.TextChoices):
        RIGHT = "right", "right (relevant)"
        WRONG = "wrong", "wrong (not relevant)"

    model_version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="feedback")
    query_image = models.ForeignKey(Image, null=True, blank=True, on_delete=models.CASCADE,
                                    related_name="feedback_as_query")
    query_sha256 = models.CharField(max_length=64, blank=True)
    query_vector = HalfVectorField(null=True, blank=True)
    result = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="feedback")
    verdict = models.CharField(max_length=5, choices=Verdict.choices)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    session_key = models.CharField(max_length=40, blank=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created"]
        verbose_name = "relevance mark"
        constraints = [
            models.CheckConstraint(
                condition=(models.Q(query_image__isnull=False, query_sha256="", query_vector__isnull=True)
                           | models.Q(query_image__isnull=True, query_vector__isnull=False)
                           & ~models.Q(query_sha256="")),
                name="feedback_one_query"),
            # One mark per person, query and result (a double click stores one).
            # A mark whose user was deleted (no user, no session) is left out.
            models.UniqueConstraint(fields=["model_version", "query_image", "result", "user"],
                                    condition=models.Q(user__isnull=False, query_image__isnull=False),
                                    name="unique_mark_user_image"),
            models.UniqueConstraint(fields=["model_version", "query_sha256", "result", "user"],
                                    condition=models.Q(user__isnull=False, query_image__isnull=True),
                                    name="unique_mark_user_upload"),
            models.UniqueConstraint(fields=["model_version", "query_image", "result", "session_key"],
                                    condition=models.Q(user__isnull=True, query_image__isnull=False)
                                    & ~models.Q(session_key=""),
                                    name="unique_mark_session_image"),
            models.UniqueConstraint(fields=["model_version", "query_sha256", "result", "session_key"],
                                    condition=models.Q(user__isnull=True, query_image__isnull=True)
                                    & ~models.Q(session_key=""),
                                    name="unique_mark_session_upload"),
        ]
        indexes = [models.Index(fields=["model_version", "result"], name="feedback_version_result")]

    def __str__(self) -> str:
        query = f"image {self.query_image_id}" if self.query_image_id else f"upload {self.query_sha256[:12]}"
        return f"{self.verdict} for image {self.result_id}, query {query}"
