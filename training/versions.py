"""Model versions: the only place a `ModelVersion` row is created.

- `get_or_create_version(arch)`: a registered architecture's pretrained
  weights (made on first use), or, only when asked, random initial weights
  saved to a file.
- `create_version_from_checkpoint` / `create_initial_version`: a trained
  network (best epoch) or the untrained network a run starts from.
- `resolve_version(name)`: a version by name, or an architecture's pretrained one.

Every weights file is written atomically (training.core.loop.save_atomically), and
a version's config rebuilds exactly its network (training.core.inference.build_for_version).
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from dataclasses import asdict
from pathlib import Path

import torch
from django.conf import settings
from django.db import IntegrityError, transaction

from search.models import Dataset
from training.core.config import TrainConfig, apply_image_size
from training.core.loop import save_atomically
from training.core.networks.base import sha256_of
from training.core.networks.registry import ARCHITECTURES, UnknownArchitecture, build_network
from training.core.trainer import best_epoch
from training.models import ModelVersion


def pretrained_version_name(architecture: str) -> str:
    return f"{architecture}-imagenet"


@transaction.atomic
def get_or_create_version(architecture: str, *, random_weights: bool = False, config: dict | None = None,
                          name: str | None = None) -> ModelVersion:
    """The ModelVersion for a registered architecture's pretrained weights, made
    on first use; with random_weights=True (only when asked) a new version whose
    random initial weights are saved, so queries and index agree."""
    config = config or {}
    if name is None:
        name = pretrained_version_name(architecture) if not random_weights else None
    if name:
        existing = ModelVersion.objects.filter(name=name).first()
        if existing:
            return existing
    model = build_network(architecture, weights="random" if random_weights else "pretrained", **config)
    info = model.weights_info
    version = ModelVersion(
        architecture=architecture, config=model.config or config, dimension=model.dimension,
        preprocessing=model.preprocessing.to_dict(), weights_source=info.source,
        weights_path=info.path, weights_sha256=info.sha256, notes=info.detail,
    )
    if random_weights:
        count = ModelVersion.objects.filter(architecture=architecture, weights_source="random").count()
        version.name = name or f"{architecture}-random-{count + 1}"
        weights_dir = Path(settings.CBIR_WEIGHTS_DIR)
        weights_dir.mkdir(parents=True, exist_ok=True)
        path = weights_dir / f"{version.name}.pt"
        save_atomically({"model": model.state_dict(), "architecture": architecture, "config": version.config}, path)
        version.weights_source = ModelVersion.WeightsSource.RANDOM
        version.weights_path = str(path)
        version.weights_sha256 = sha256_of(path)
    else:
        version.name = name or pretrained_version_name(architecture)
    version.save()
    return version


def resolve_version(name_or_architecture: str | None, *, random_weights: bool = False) -> ModelVersion:
    """A model version by name; an architecture name gives its pretrained version
    (created on first use); None gives the active version, else the default."""
    if not name_or_architecture:
        active = ModelVersion.active()
        if active:
            return active
        name_or_architecture = settings.CBIR_DEFAULT_ARCHITECTURE
    version = ModelVersion.objects.filter(name=name_or_architecture).first()
    if version:
        return version
    if name_or_architecture in ARCHITECTURES:
        return get_or_create_version(name_or_architecture, random_weights=random_weights)
    known = ", ".join(ModelVersion.objects.values_list("name", flat=True)) or "none yet"
    raise UnknownArchitecture(
        f"{name_or_architecture!r} is neither a model version (existing: {known}) nor an architecture "
        f"(known: {', '.join(sorted(ARCHITECTURES))})"
    )



def copy_version(source: ModelVersion, name: str, *, notes: str = "") -> ModelVersion:
    """A new, inactive version with `source`'s network and weights file under
    another name (benchmarks embed with it without touching `source`'s index)."""
    fields = {f: getattr(source, f) for f in ("architecture", "config", "weights_source", "weights_path",
                                              "weights_sha256", "dimension", "preprocessing")}
    return ModelVersion.objects.create(name=name, is_active=False, notes=notes, **fields)


def _file_safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "dataset"


def create_version_from_checkpoint(config: TrainConfig, best_path: str | os.PathLike[str], dataset: Dataset,
                                   history: list[dict], training_seconds: float, *,
                                   extra_metrics: dict | None = None, notes: str = "") -> ModelVersion:
    """A new, inactive ModelVersion "<arch>-<dataset>-ft-<n>" holding the best
    checkpoint's embedding network (only: a classification head lives in the
    objective, so it is not in the file), saved under CBIR_WEIGHTS_DIR/trained/.
    Head-only runs ("<backbone>-head-<dataset>-ft-<n>") save the pretrained
    backbone and the trained head together.

    Its config is the build settings, so training.core.inference.build_for_version
    rebuilds exactly this network (weights="random", then the saved state)."""
    checkpoint = torch.load(best_path, map_location="cpu", weights_only=True)
    best, best_val_loss = best_epoch(history)
    training = {
        "history": history, "best_epoch": best, "best_val_loss": best_val_loss,
        "seconds": round(float(training_seconds), 3),
        "seconds_per_epoch": round(float(training_seconds) / len(history), 3) if history else None,
        "pretrained": bool(config.pretrained), "objective": objective_label(config), "dataset": dataset.name,
        "config": asdict(config),
    }
    training.update(extra_metrics or {})
    state = checkpoint["model"]
    if config.head_only:  # the checkpoint holds the head; the version holds backbone + head
        from training.core.head_training import full_state_dict

        state = full_state_dict(config, state)
    return _publish(config, state, f"{_run_label(config)}-{dataset.name}"[:90] + "-ft-",
                    ModelVersion.WeightsSource.CHECKPOINT, {"training": training},
                    notes or (f"{config.architecture} trained on {dataset.name} ({objective_label(config)}, "
                              f"{len(history)} epoch(s), from {'pretrained' if config.pretrained else 'random'} "
                              f"weights)"))


def objective_label(config: TrainConfig) -> str:
    """What a run learned with: its objective, or for a head trained on relevance
    marks the contrastive loss on them (training.core.mark_training)."""
    if config.marks == "none":
        return config.objective
    return "contrastive on marks" + (" + labels" if config.marks == "with_labels" else "")


def _run_label(config: TrainConfig) -> str:
    """The start of a trained version's name: the architecture, or "<backbone>-head" for head-only training."""
    return f"{_file_safe(config.backbone or '')}-head" if config.head_only else config.architecture


def create_initial_version(config: TrainConfig, dataset: Dataset) -> ModelVersion:
    """A new, inactive ModelVersion "<arch>-<dataset>-init-<n>" of the very
    network a run with `config` starts from (same seed, same input size,
    pretrained or random weights), to measure what training changed."""
    model = config.build_model()
    source = ModelVersion.WeightsSource.CHECKPOINT if config.pretrained else ModelVersion.WeightsSource.RANDOM
    return _publish(config, model.state_dict(), f"{_run_label(config)}-{dataset.name}"[:88] + "-init-", source,
                    {"baseline": {"config": asdict(config), "pretrained": bool(config.pretrained),
                                  "dataset": dataset.name}},
                    f"the untrained starting point of {config.architecture} runs on {dataset.name} "
                    f"({'pretrained' if config.pretrained else 'random'} weights, seed {config.seed})")


def _publish(config: TrainConfig, state_dict: dict, prefix: str, source: str, metrics: dict,
             notes: str) -> ModelVersion:
    """Save the embedding network's weights under CBIR_WEIGHTS_DIR/trained/ and
    make an inactive version "<prefix><n>" (the next free n) that rebuilds it."""
    model = build_network(config.architecture, weights="random", **config.build_kwargs())
    model = apply_image_size(model, config.image_size)
    model.load_state_dict(state_dict)  # strict: proves the file rebuilds this network
    folder = Path(settings.CBIR_WEIGHTS_DIR) / "trained"
    for _attempt in range(20):
        n = ModelVersion.objects.filter(name__startswith=prefix).count() + 1
        while ModelVersion.objects.filter(name=f"{prefix}{n}").exists():
            n += 1
        name = f"{prefix}{n}"
        # A file name no other publisher can pick (the version name alone is
        # only reserved when the row commits): the loser of a race for `name`
        # deletes its own file below, never the one the winner's row points to.
        path = folder / f"{_file_safe(name)}-{secrets.token_hex(4)}.pt"
        save_atomically({"model": state_dict, "architecture": config.architecture, "config": model.config}, path)
        try:
            with transaction.atomic():
                return ModelVersion.objects.create(
                    name=name, architecture=config.architecture, config=model.config, weights_source=source,
                    weights_path=str(path.resolve()), weights_sha256=sha256_of(path), dimension=model.dimension,
                    preprocessing=model.preprocessing.to_dict(), metrics=json_safe(metrics), notes=notes)
        except IntegrityError:  # another run took the name meanwhile: next number
            path.unlink(missing_ok=True)
    raise RuntimeError(f"could not find a free model version name starting {prefix!r}")


def json_safe(value):
    """Plain JSON (inf/NaN become null), so the JSONField and the job page can hold it."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.loads(json.dumps(clean(value), default=str))


