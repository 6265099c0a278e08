from __future__ import annotations

from collections.abc import Callable

from django.conf import settings
from django.db import models, transaction
from django.db.models import Q


class ModelVersion(models.Model):
    """One set of network weights that embeddings are made with.

    Fields that determine the vectors (architecture, weights, dimension,
    preprocessing, config) are read-only once embeddings exist: changing them
    would make the stored vectors lie. Exactly one version is active for search.
    """

    class WeightsSource(models.TextChoices):
        PACKAGE = "package", "Python package"
        TORCHVISION = "torchvision", "torchvision weight cache"
        TIMM = "timm", "timm (Hugging Face or torch hub cache)"
        CHECKPOINT = "checkpoint", "checkpoint file"
        RANDOM = "random", "random initial weights"

    name = models.CharField(max_length=100, unique=True)
    architecture = models.CharField(max_length=50)
    config = models.JSONField(default=dict, blank=True, help_text="Settings the network was built with.")
    weights_source = models.CharField(max_length=20, choices=WeightsSource.choices)
    weights_path = models.CharField(max_length=500, blank=True)
    weights_sha256 = models.CharField(max_length=64, blank=True)
    dimension = models.PositiveIntegerField()
    preprocessing = models.JSONField(default=dict)
    is_active = models.BooleanField(default=False)
    metrics = models.JSONField(default=dict, blank=True)
    notes = models.TextField(blank=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created"]
        constraints = [
            models.UniqueConstraint(fields=["is_active"], condition=Q(is_active=True), name="one_active_model_version"),
            models.CheckConstraint(condition=Q(dimension__gte=1) & Q(dimension__lte=4000), name="dimension_indexable"),
        ]

    def __str__(self) -> str:
        return self.name

    @classmethod
    def active(cls) -> ModelVersion | None:
        return cls.objects.filter(is_active=True).first()

    @transaction.atomic
    def update_metrics(self, change: Callable[[dict], None]) -> None:
        """Apply change(metrics) to the stored metrics and save them, keeping
        every key it leaves alone. The row is locked, so two writers finishing
        together (an evaluation, a search calibration) do not lose each other."""
        locked = ModelVersion.objects.select_for_update().get(pk=self.pk)
        metrics = dict(locked.metrics or {})
        change(metrics)
        ModelVersion.objects.filter(pk=self.pk).update(metrics=metrics)
        self.metrics = metrics

    @transaction.atomic
    def activate(self, *, user=None, reason: str = "") -> None:
        """Make this the one version search uses, in one transaction, and log it
        (an Activation row: who, when, which version was active before). A
        version already active is left as it is and not logged again."""
        previous = ModelVersion.objects.select_for_update().filter(is_active=True).first()
        if previous is not None and previous.pk == self.pk:
            self.is_active = True
            return
        ModelVersion.objects.filter(is_active=True).exclude(pk=self.pk).update(is_active=False)
        ModelVersion.objects.filter(pk=self.pk).update(is_active=True)
        self.is_active = True
        Activation.objects.create(version=self, version_name=self.name, previous=previous,
                                  previous_name=previous.name if previous else "", user=user, reason=reason[:200])


class Activation(models.Model):
    """One switch of the version search uses: to which, from which, by whom
    (None: a job or command with no user), why ("admin", "rollback", "first
    index", ...), when. Names are kept so the log outlives deleted versions."""

    version = models.ForeignKey(ModelVersion, null=True, on_delete=models.SET_NULL, related_name="activations")
    version_name = models.CharField(max_length=100)
    previous = models.ForeignKey(ModelVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    previous_name = models.CharField(max_length=100, blank=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    reason = models.CharField(max_length=200, blank=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created", "-pk"]

    def __str__(self) -> str:
        return f"{self.version_name} (from {self.previous_name or 'none'})"
