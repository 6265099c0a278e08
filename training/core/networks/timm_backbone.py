"""Any timm model as a backbone: the architecture name "timm:<model name>",
e.g. "timm:vit_small_patch14_dinov2.lvd142m", "timm:convnext_tiny.fb_in22k".

- The network is `timm.create_model(name, pretrained=..., num_classes=0)`: its
  forward gives the pooled pre-logits features, (N, dimension) with
  dimension = the model's `head_hidden_size` (= `num_features` for nearly
  every model), which the embedding L2-normalises.
- Pretrained weights come through timm's own loading (timm.models.load_pretrained):
  from the Hugging Face hub cache (`HF_HUB_CACHE`, by default
  ~/.cache/huggingface/hub/models--timm--<model>/) or, for weights hosted at a
  URL only, the torch hub cache ($TORCH_HOME/hub/checkpoints/). With internet
  they are downloaded once; afterwards (HF_HUB_OFFLINE=1 if you like) the
  cache is read. Offline without them: WeightsUnavailable naming the model and
  the paths.
- Preprocessing comes from the model's own pretrained config
  (timm.data.resolve_data_config): input size, mean/std, interpolation,
  crop_pct and crop_mode.

Sources: timm docs, "Feature Extraction" (num_classes=0 gives pooled
features) and "Data" (resolve_data_config, create_transform);
https://huggingface.co/docs/timm.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import resolve_data_config

from training.core import runtime
from training.core.networks.base import EmbeddingNet, WeightsInfo, WeightsUnavailable, sha256_of
from training.core.preprocessing import Preprocessing

PREFIX = "timm:"


def model_name(architecture: str) -> str:
    """"timm:<name>" → "<name>"; ValueError for an empty or unknown timm model name."""
    name = architecture[len(PREFIX):] if architecture.startswith(PREFIX) else architecture
    if not name:
        raise ValueError("give a timm model name after 'timm:', e.g. timm:convnext_tiny.fb_in22k")
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:8]
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise ValueError(f"timm has no model {name!r} (timm {timm.__version__}){hint}")
    return name


def preprocessing_from_config(data_config: dict) -> Preprocessing:
    """A Preprocessing from timm's resolved data config (input_size, mean, std,
    interpolation, crop_pct, crop_mode). ValueError for non-square inputs or a
    crop mode this project does not implement ("border")."""
    _, height, width = data_config["input_size"]
    if height != width:
        raise ValueError(f"non-square model inputs ({height}x{width}) are not supported")
    crop_mode = data_config.get("crop_mode") or "center"
    if crop_mode not in ("center", "squash"):
        raise ValueError(f"timm crop_mode {crop_mode!r} is not supported (center and squash are)")
    interpolation = data_config.get("interpolation") or "bilinear"
    return Preprocessing(size=int(width), mean=tuple(float(v) for v in data_config["mean"]),  # type: ignore[arg-type]
                         std=tuple(float(v) for v in data_config["std"]),  # type: ignore[arg-type]
                         resample=interpolation, crop_pct=float(data_config.get("crop_pct") or 1.0),
                         crop_mode=crop_mode)


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def expected_locations(name: str, pretrained_cfg: dict) -> str:
    """Where timm looks for `name`'s weights, in words, for error messages."""
    places = []
    hub_id = pretrained_cfg.get("hf_hub_id")
    if hub_id:
        places.append(f"the Hugging Face cache {hub_cache_dir() / ('models--' + hub_id.split('@')[0].replace('/', '--'))}"
                      f" (repository {hub_id}; HF_HOME / HF_HUB_CACHE move it)")
    url = pretrained_cfg.get("url")
    if url:
        places.append(f"the torch hub cache {Path(torch.hub.get_dir()) / 'checkpoints' / os.path.basename(url)} "
                      f"(from {url}; TORCH_HOME moves it)")
    return " or ".join(places) or "nowhere: timm lists no pretrained weights for it"


def cached_weights_file(pretrained_cfg: dict) -> Path | None:
    """The weights file timm would read, when it is already cached locally; else None."""
    hub_id = pretrained_cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = hub_id.partition("@")
        for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str):
                return Path(found)
    url = pretrained_cfg.get("url")
    if url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if path.exists():
            return path
    return None


def offline() -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    return runtime.current().offline


def availability_check(architecture: str):
    """A Pretrained.check: WeightsUnavailable when offline (CBIR_OFFLINE or
    HF_HUB_OFFLINE) and the weights are not cached; online, loading downloads them."""

    def check() -> None:
        name = model_name(architecture)
        with torch.device("meta"):
            model: Any = timm.create_model(name, pretrained=False, num_classes=0)
        cfg: dict = getattr(model, "pretrained_cfg", None) or {}
        if offline() and cached_weights_file(cfg) is None:
            raise WeightsUnavailable(f"pretrained weights of timm model {name} are not cached and the site is "
                                     f"offline; expected in {expected_locations(name, cfg)}")

    return check


class TimmBackbone(EmbeddingNet):
    """A timm model without classifier. Input (N, 3, size, size) float32,
    preprocessed with `self.preprocessing` (the model's pretrained config);
    output (N, dimension) float32 unit vectors."""

    def __init__(self, architecture: str, weights: str = "pretrained") -> None:
        super().__init__()
        if weights not in ("pretrained", "random"):
            raise ValueError(f"weights must be 'pretrained' or 'random', not {weights!r}")
        name = model_name(architecture)
        self.architecture = PREFIX + name
        self.model: Any
        if weights == "pretrained":
            try:
                self.model = timm.create_model(name, pretrained=True, num_classes=0)
            except Exception as exc:  # noqa: BLE001 - hub, network and file errors all mean "not available"
                with torch.device("meta"):
                    cfg = getattr(timm.create_model(name, pretrained=False, num_classes=0), "pretrained_cfg", {})
                raise WeightsUnavailable(
                    f"could not load the pretrained weights of timm model {name}: {type(exc).__name__}: {exc}. "
                    f"timm reads them from {expected_locations(name, cfg)}; with internet they are downloaded "
                    f"once, offline put them there first (or ask for random weights explicitly)") from exc
            path = cached_weights_file(self.model.pretrained_cfg)
            self.weights_info = WeightsInfo(source="timm", path=str(path or ""),
                                            sha256=sha256_of(path) if path else "",
                                            detail=f"timm {name} ({self.model.pretrained_cfg.get('tag') or 'default'})")
        else:
            self.model = timm.create_model(name, pretrained=False, num_classes=0)
        self.dimension = int(getattr(self.model, "head_hidden_size", None) or self.model.num_features)
        self.preprocessing = preprocessing_from_config(resolve_data_config({}, model=self.model))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def build(architecture: str, weights: str = "pretrained", **config) -> TimmBackbone:
    if config:
        raise ValueError(f"{architecture} takes no settings, got {sorted(config)}")
    return TimmBackbone(architecture, weights)


def dimension_of(architecture: str) -> int:
    """The embedding size of a timm model, from a weightless build on the meta device."""
    with torch.device("meta"):
        model: Any = timm.create_model(model_name(architecture), pretrained=False, num_classes=0)
    return int(getattr(model, "head_hidden_size", None) or model.num_features)
