"""The forms behind the admin actions "Train a model…" and "Build index…" on datasets.

    form = TrainForm(request.POST, dataset=dataset)
    if form.is_valid():
        job = start_training_job(dataset, user=request.user, **form.config_fields())
"""

from __future__ import annotations

from dataclasses import asdict

from django import forms

from training.core.config import (
    MARKS,
    MARKS_FROM,
    MAX_IMAGE_SIZE,
    MAX_PROCESSES,
    MIN_IMAGE_SIZE,
    OBJECTIVES,
    SCHEDULERS,
    SELECT_BY,
    TrainConfig,
    check_pretrained_available,
)
from training.core.networks.base import WeightsUnavailable
from training.core.networks.head import HEADS
from training.core.networks.registry import (
    ARCHITECTURES,
    get_architecture,
    pretrained_architectures,
    sizable_architectures,
)
from training.core.objectives import OBJECTIVES as REGISTERED_OBJECTIVES
from training.models import ModelVersion
from training.rows import check_dataset
from training.versions import get_or_create_version

DEFAULTS = TrainConfig.defaults()
OBJECTIVE_LABELS = {"auto": "automatic (autoencoder: reconstruction; siamese: pairs; others: classification over "
                           "the labels)",
                    **{name: objective.description for name, objective in REGISTERED_OBJECTIVES.items()}}


MARKS_FROM_LABELS = {"everyone": "everyone (anonymous sessions too)", "signed-in": "signed-in users only"}
MARKS_LABELS = {"none": "labels", "only": "relevance marks alone", "with_labels": "relevance marks and labels"}
SELECT_BY_LABELS = {"val_loss": "lowest validation loss (the study's protocol)",
                    "val_precision_at_10": "highest validation P@10 (head only)"}


def _architecture_choices() -> list[tuple[str, str]]:
    return [(name, f"{name}: {arch.description}") for name, arch in sorted(ARCHITECTURES.items())]


class TrainForm(forms.Form):
    """The settings of a training run; clean() builds a TrainConfig, so every
    check it makes shows here as a form error. Give `dataset` to also check
    that its labels suit the objective."""

    architecture = forms.ChoiceField(choices=_architecture_choices,
                                     help_text="with “head only”: the frozen backbone")
    timm_model = forms.CharField(
        required=False, max_length=45, label="or a timm model",
        help_text="any timm model name (e.g. convnext_tiny.fb_in22k, vit_small_patch14_dinov2.lvd142m): used instead "
                  "of the architecture above, with timm's pretrained weights and preprocessing")
    head_only = forms.BooleanField(
        required=False, initial=False, label="Head only (cached backbone features)",
        help_text="embed the dataset once with the frozen, pretrained backbone (features cached on disk) and train "
                  "only a projection head on them: seconds instead of hours; augmentation is off")
    head = forms.ChoiceField(choices=[(h, h) for h in HEADS], initial="linear", required=False,
                             help_text="head-only training: linear projection, or a small MLP")
    marks = forms.ChoiceField(
        choices=[(m, MARKS_LABELS[m]) for m in MARKS], initial=DEFAULTS["marks"], required=False,
        label="Learn from", help_text="head-only training: the labels, the dataset's relevance marks (pairs of a query "
                                      "and a result users marked right or wrong), or both")
    marks_from = forms.ChoiceField(
        choices=[(m, MARKS_FROM_LABELS[m]) for m in MARKS_FROM],
        initial=DEFAULTS["marks_from"], required=False, label="Marks from",
        help_text="training on marks: whose marks; everyone's lets anyone who can search steer the head")
    objective = forms.ChoiceField(choices=[(o, OBJECTIVE_LABELS[o]) for o in OBJECTIVES], initial=DEFAULTS["objective"])
    epochs = forms.IntegerField(min_value=1, max_value=10_000, initial=DEFAULTS["epochs"])
    batch_size = forms.IntegerField(min_value=2, max_value=4096, initial=DEFAULTS["batch_size"],
                                    help_text="images per batch (pairs for the contrastive objective)")
    learning_rate = forms.FloatField(min_value=1e-8, max_value=1.0, initial=DEFAULTS["learning_rate"])
    embedding_dim = forms.IntegerField(
        required=False, min_value=1, max_value=4000, label="Embedding size",
        help_text=f"only for networks with a settable size ({', '.join(sizable_architectures('dimension'))}); "
                  "empty: the network's default")
    pretrained = forms.BooleanField(
        required=False, initial=True, label="Start from pretrained weights",
        help_text=f"where the architecture has them ({', '.join(pretrained_architectures())}); "
                  "unticked, or for the others, training starts from random weights")
    image_size = forms.IntegerField(required=False, min_value=MIN_IMAGE_SIZE, max_value=MAX_IMAGE_SIZE,
                                    help_text="input side in pixels; empty: the network's default (224)")
    scheduler = forms.ChoiceField(choices=[(s, s) for s in SCHEDULERS], initial=DEFAULTS["scheduler"],
                                  help_text="cosine: the learning rate decays to 0 over the epochs")
    early_stopping_patience = forms.IntegerField(min_value=0, initial=DEFAULTS["early_stopping_patience"],
                                                 help_text="stop after this many epochs without a better one "
                                                           "by the rule below (0: never)")
    select_by = forms.ChoiceField(
        choices=[(s, SELECT_BY_LABELS[s]) for s in SELECT_BY],
        initial=DEFAULTS["select_by"], required=False, label="Keep the epoch with",
        help_text="head-only training can rank the cached validation features against the train features after "
                  "every epoch (a few seconds for 14,000 against 42,000 images on 2 CPU cores) and keep the epoch "
                  "that retrieves best")
    augment = forms.BooleanField(required=False, initial=True, label="Augment training images")
    processes = forms.IntegerField(min_value=1, max_value=MAX_PROCESSES, initial=DEFAULTS["processes"], required=False,
                                   help_text="training processes on the worker's host (DistributedDataParallel, one "
                                             "per GPU); the batch size is the global batch")

    def __init__(self, *args, dataset=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.dataset = dataset
        self.config: TrainConfig | None = None

    def clean(self):
        cleaned = super().clean()
        if self.errors:
            return cleaned
        architecture = cleaned["architecture"]
        timm_model = (cleaned.get("timm_model") or "").strip()
        fields = {name: cleaned.get(name) for name in (
            "architecture", "objective", "epochs", "batch_size", "learning_rate", "embedding_dim", "image_size",
            "scheduler", "early_stopping_patience", "augment")}
        fields["processes"] = cleaned.get("processes") or 1
        fields["select_by"] = cleaned.get("select_by") or "val_loss"
        fields["marks"] = cleaned.get("marks") or "none"
        fields["marks_from"] = cleaned.get("marks_from") or "everyone"
        try:
            if timm_model:
                architecture = timm_model if timm_model.startswith("timm:") else f"timm:{timm_model}"
                fields["architecture"] = architecture
            # The checkbox reads "where the architecture has them": for the others it means random weights.
            fields["pretrained"] = bool(cleaned.get("pretrained")) and \
                get_architecture(architecture).pretrained is not None
            if cleaned.get("head_only"):
                fields.update(architecture="head", backbone=architecture, head=cleaned.get("head") or "linear",
                              augment=False, pretrained=True)
            config = TrainConfig(**fields)
            check_pretrained_available(config)
            if self.dataset is not None:
                check_dataset(self.dataset, config)
        except (ValueError, WeightsUnavailable) as exc:
            self._add_config_error(str(exc))
            return cleaned
        self.config = config
        cleaned["config"] = config
        return cleaned

    def _add_config_error(self, message: str) -> None:
        """Put a TrainConfig message on the field it names, else on the form."""
        if "timm" in message:
            self.add_error("timm_model", message)
            return
        for name in ("embedding_dim", "image_size", "batch_size", "learning_rate", "epochs", "objective",
                     "scheduler", "early_stopping_patience", "pretrained", "processes", "augment", "head", "select_by", "marks_from", "marks"):
            if message.startswith(name) or f" {name} " in message:
                self.add_error(name, message)
                return
        if "input size" in message:
            self.add_error("image_size", message)
            return
        self.add_error(None, message)

    def config_fields(self) -> dict:
        """Keyword arguments for training.train_job.start_training_job (after is_valid())."""
        if self.config is None:
            raise ValueError("the form is not valid")
        return asdict(self.config)


def _version_choices() -> list[tuple[str, str]]:
    versions = [(f"version:{v.pk}", f"{v.name}{' (active)' if v.is_active else ''}")
                for v in ModelVersion.objects.order_by("-is_active", "name")]
    existing = set(ModelVersion.objects.values_list("name", flat=True))
    pretrained = [(f"arch:{name}", f"{name} — pretrained ImageNet weights (new version)")
                  for name in sorted(ARCHITECTURES) if name != "tiny" and f"{name}-imagenet" not in existing
                  and name in ("efficientnet_lite0", "resnet50", "vgg16")]
    return versions + pretrained


class BuildIndexForm(forms.Form):
    model = forms.ChoiceField(label="Model version", choices=())

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["model"].choices = _version_choices()

    def clean_model(self):
        value = self.cleaned_data["model"]
        kind, _, ident = value.partition(":")
        if kind == "version":
            version = ModelVersion.objects.filter(pk=ident).first()
            if version is None:
                raise forms.ValidationError("That model version no longer exists.")
            return version
        try:
            return get_or_create_version(ident)
        except (WeightsUnavailable, ValueError) as exc:
            raise forms.ValidationError(str(exc)) from None
