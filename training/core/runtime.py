"""The few settings the ML core reads, without Django.

The core (training/core/) imports neither Django nor `search`, so it cannot
read `django.conf.settings`. It reads a `Runtime` instead:

    from training.core import runtime
    runtime.current().weights_dir        # a Path

Who provides it:
- in a Django process (web, workers, commands, tests), training/apps.py
  installs a provider that reads the site's settings on every call, so
  `override_settings` and pytest-django's `settings` fixture take effect;
- in a distributed training rank (training/core/rank.py), rank 0's values
  travel in the spec file and are installed with `configure(Runtime(...))`;
- anywhere else (a notebook, a script), the defaults below, which are the
  documented defaults of the same settings (docs/configuration.md), with the
  environment variables of the same names applied.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Runtime:
    """device: CBIR_DEVICE, "auto" | "cpu" | "cuda".
    loader_workers: CBIR_LOADER_WORKERS, DataLoader processes (-1 = automatic).
    compile_min_images: CBIR_COMPILE_MIN_IMAGES, images from which a job compiles the network (0 = never).
    weights_dir: CBIR_WEIGHTS_DIR, where trained weights and the feature cache live.
    offline: CBIR_OFFLINE, never try to download pretrained weights.
    cpu_precision: CBIR_CPU_PRECISION, "auto" | "float32" | "bfloat16" (training.core.precision)."""

    device: str = "auto"
    loader_workers: int = -1
    compile_min_images: int = 10_000
    weights_dir: Path = Path("var") / "weights"
    offline: bool = False
    cpu_precision: str = "auto"

    def to_dict(self) -> dict:
        """JSON-ready (weights_dir as a string), for a rank's spec file."""
        return {**asdict(self), "weights_dir": str(self.weights_dir)}

    @classmethod
    def from_dict(cls, data: dict) -> Runtime:
        return cls(**{**data, "weights_dir": Path(data["weights_dir"])})


def from_environment() -> Runtime:
    """The defaults with the environment variables of the same names applied
    (no validation beyond int(); the Django settings module validates them)."""
    env = os.environ
    return Runtime(device=env.get("CBIR_DEVICE") or "auto",
                   loader_workers=int(env.get("CBIR_LOADER_WORKERS") or -1),
                   compile_min_images=int(env.get("CBIR_COMPILE_MIN_IMAGES") or 10_000),
                   weights_dir=Path(env.get("CBIR_WEIGHTS_DIR") or Path("var") / "weights"),
                   offline=(env.get("CBIR_OFFLINE") or "").strip().lower() in ("1", "true", "yes", "on"),
                   cpu_precision=(env.get("CBIR_CPU_PRECISION") or "auto").strip().lower())


_provider: Callable[[], Runtime] = from_environment


def configure(provider: Runtime | Callable[[], Runtime]) -> None:
    """Install what `current()` returns: a fixed Runtime, or a function called on every read."""
    global _provider
    _provider = provider if callable(provider) else (lambda: provider)


def current() -> Runtime:
    return _provider()
