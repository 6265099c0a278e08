"""Loading torchvision's ImageNet weights from the local torch cache.

With internet the file is downloaded once into the cache; offline (or with
CBIR_OFFLINE=1) the error names the file expected, where to put it and where to
get it."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from training.core import runtime
from training.core.networks.base import WeightsInfo, WeightsUnavailable, sha256_of


def cache_path(weights) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def offline() -> bool:
    """CBIR_OFFLINE (training.core.runtime)."""
    return runtime.current().offline


def _missing_hint(weights, model_name: str, path: Path) -> str:
    return (f"{model_name} ImageNet weights are not in the torch cache: expected {path}. "
            f"Download {weights.url} and save it at that path (or set TORCH_HOME to a folder whose "
            f"hub/checkpoints/ holds it), or ask for random initial weights explicitly "
            f"(--random-weights).")


def availability_check(weights, model_name: str):
    """A Pretrained.check for a torchvision weights enum member: raises
    WeightsUnavailable when the file is not cached and the site is offline
    (CBIR_OFFLINE); with internet, loading downloads it once."""

    def check() -> None:
        path = cache_path(weights)
        if not path.exists() and offline():
            raise WeightsUnavailable(_missing_hint(weights, model_name, path) + " The site is offline (CBIR_OFFLINE).")

    return check


def load_state_dict(weights, model_name: str) -> tuple[dict, WeightsInfo]:
    """The state dict of a torchvision `WeightsEnum` member, from the cache or downloaded."""
    path = cache_path(weights)
    if not path.exists():
        hint = _missing_hint(weights, model_name, path)
        if offline():
            raise WeightsUnavailable(hint)
        try:
            torch.hub.download_url_to_file(weights.url, str(path), progress=True)
        except Exception as exc:  # noqa: BLE001 - any network failure means the same to the user
            path.unlink(missing_ok=True)
            raise WeightsUnavailable(f"{hint} (download failed: {exc})") from exc
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state, WeightsInfo(source="torchvision", path=str(path), sha256=sha256_of(path), detail=str(weights))
