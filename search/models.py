from __future__ import annotations

import hashlib

from django.conf import settings
from django.db import models
from pgvector.django import HalfVectorField

from training.models import ModelVersion


class Dataset(models.Model):
    name = models.CharField(max_length=100, unique=True)
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

    def __str__(self) -> str:
        return f"{self.original_filename} ({self.dataset_id}:{self.pk})"


class Embedding(models.Model):
    """One image's vector under one model version. The column has no fixed
    dimension, so several versions' vectors share it; each version gets its own
    partial HNSW index on the cast to its dimension (see search.indexing)."""

    image = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="embeddings")
    model_version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="embeddings")
    vector = HalfVectorField()
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["image", "model_version"], name="unique_embedding_per_version")]
        indexes = [models.Index(fields=["model_version", "image"], name="embedding_version_image")]
