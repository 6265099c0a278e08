"""bfloat16 on the CPU (training/core/precision.py): detected from the CPU's
flags, chosen by CBIR_CPU_PRECISION, used by inference, the feature cache and
training, and recorded on the model version. The float32 path is tested as
such: a CPU without the instructions keeps it, and the setting forces it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from training.core import precision
from training.core.precision import autocast_dtype, cpu_autocast_dtype, cpu_bfloat16_support, cpu_flags

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
XEON = "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
EPYC = "processor : 0\nflags : fpu sse2 avx2 avx512f avx512_vnni avx512_bf16\n"
OLD = "flags : fpu sse2 avx2 fma\n"


def test_the_capability_is_read_from_the_cpu_flags():
    assert cpu_bfloat16_support(cpu_flags(XEON)) == "amx_bf16"
    assert cpu_bfloat16_support(cpu_flags(EPYC)) == "avx512_bf16"
    assert cpu_bfloat16_support(cpu_flags(OLD)) is None
    assert cpu_flags("no flags line here") == frozenset()


@pytest.mark.parametrize("cpuinfo, setting, expected", [
    (XEON, "auto", torch.bfloat16), (EPYC, "auto", torch.bfloat16), (OLD, "auto", None),
    (XEON, "float32", None), (OLD, "bfloat16", torch.bfloat16), (EPYC, " BFloat16 ", torch.bfloat16),
])
def test_the_setting_chooses_the_cpu_precision(cpuinfo, setting, expected):
    assert cpu_autocast_dtype(setting, cpu_flags(cpuinfo)) == expected


def test_an_unknown_setting_is_refused_in_words():
    with pytest.raises(ValueError, match="CBIR_CPU_PRECISION must be one of auto, float32, bfloat16"):
        cpu_autocast_dtype("half")
    env = {**os.environ, "CBIR_CPU_PRECISION": "half", "DJANGO_SETTINGS_MODULE": "cbirsite.settings"}
    out = subprocess.run([sys.executable, "-c", "import django; django.setup()"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "CBIR_CPU_PRECISION='half' must be one of auto, float32, bfloat16" in out.stderr


def test_auto_follows_this_machines_cpu(settings):
    settings.CBIR_CPU_PRECISION = "auto"
    has_it = cpu_bfloat16_support() is not None
    assert autocast_dtype(CPU) == (torch.bfloat16 if has_it else None)
    settings.CBIR_CPU_PRECISION = "float32"
    assert autocast_dtype(CPU) is None and precision.precision_name(autocast_dtype(CPU)) == "float32"


PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "retina.jpg")


def _lite0_embeddings(settings, setting: str) -> np.ndarray:
    # Real photographs (scikit-image's samples) at the default 224 × 224 preprocessing.
    import skimage

    from training.core.inference import embed_batch
    from training.core.networks.registry import build_network
    from training.core.preprocessing import load_rgb

    settings.CBIR_CPU_PRECISION = setting
    model = build_network("efficientnet_lite0", weights="pretrained").eval()
    folder = Path(skimage.data.__file__).parent
    batch = torch.stack([model.preprocessing(load_rgb(str(folder / name))) for name in PHOTOS])
    return embed_batch(model, CPU, batch)


def test_bfloat16_embeddings_agree_with_float32_and_float32_is_exact(settings):
    # bfloat16 forced, so this runs on any CPU (emulated where it has no instructions).
    reference = _lite0_embeddings(settings, "float32")
    again = _lite0_embeddings(settings, "float32")
    mixed = _lite0_embeddings(settings, "bfloat16")
    assert reference.dtype == mixed.dtype == np.float32 and mixed.shape == reference.shape == (6, 1280)
    np.testing.assert_array_equal(reference, again)
    cosine = (reference * mixed).sum(axis=1)
    assert not np.array_equal(reference, mixed)  # autocast really ran
    # Measured on these photos: 0.9986-0.9997 (docs/benchmarks.md, "bfloat16 on the CPU").
    assert cosine.min() > 0.998, cosine
    np.testing.assert_allclose(np.linalg.norm(mixed, axis=1), 1, atol=1e-5)


def test_an_index_records_the_precision_it_was_embedded_in(settings, dataset, image_folder, tiny_version):
    from search.indexing import build_index, embed_images
    from search.ingest import import_folder

    import_folder(image_folder, dataset, labels_from_folders=True)
    settings.CBIR_CPU_PRECISION = "float32"
    build_index(dataset, tiny_version)
    tiny_version.refresh_from_db()
    assert tiny_version.metrics["embedding_precision"] == ["float32"]
    settings.CBIR_CPU_PRECISION = "bfloat16"
    embed_images(tiny_version, list(dataset.images.values_list("pk", flat=True))[:2])
    tiny_version.refresh_from_db()
    assert tiny_version.metrics["embedding_precision"] == ["bfloat16", "float32"]


def test_training_in_bfloat16_tracks_float32_and_says_so(settings, db, tmp_path):
    from tests.test_training_jobs import make_dataset, tiny
    from training.core.trainer import train
    from training.rows import training_data

    dataset = make_dataset(tmp_path)
    runs = {}
    for setting in ("float32", "bfloat16"):
        settings.CBIR_CPU_PRECISION = setting
        runs[setting] = train(training_data(dataset), tiny(epochs=3), checkpoint_dir=tmp_path / setting)
    assert runs["float32"].precision == "float32" and runs["bfloat16"].precision == "bfloat16"
    assert runs["bfloat16"].summary()["precision"] == "bfloat16"
    ours = [h["train_loss"] for h in runs["bfloat16"].history]
    theirs = [h["train_loss"] for h in runs["float32"].history]
    assert ours != theirs  # not the same computation
    # Same seed, same batches: each epoch's mean loss within 5 % of float32's.
    assert ours == pytest.approx(theirs, rel=0.05)
