"""Bulk embedding through torch.compile (training/core/inference.py): the same
vectors as the eager network, one compiled shape (short batches padded), a
failed compile falls back to the eager network, and jobs decide by size."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from search.indexing import embed_images
from search.models import Embedding
from training.core import inference
from training.core.inference import compile_for, embed_batch, network_for


@pytest.fixture
def batch(tiny_version):
    size = inference.preprocessing_for(tiny_version).size
    return torch.rand(5, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_padding_a_batch_changes_none_of_its_rows(tiny_version, batch):
    model, device = network_for(tiny_version)
    plain = embed_batch(model, device, batch)
    padded = embed_batch(model, device, batch, pad_to=8)
    assert plain.shape == padded.shape == (5, 32)
    np.testing.assert_allclose(padded, plain, rtol=0, atol=1e-6)


def test_the_compiled_network_gives_the_eager_vectors(tiny_version, batch):
    eager, device = network_for(tiny_version)
    compiled, _ = network_for(tiny_version, compiled_batch=8)
    assert compiled is not eager and isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    assert network_for(tiny_version, compiled_batch=8)[0] is compiled  # compiled once per process
    expected = embed_batch(eager, device, batch)
    np.testing.assert_allclose(embed_batch(compiled, device, batch, pad_to=8), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(embed_batch(compiled, device, batch[:2], pad_to=8), expected[:2], rtol=0, atol=1e-5)


def test_a_failed_compile_falls_back_to_the_eager_network(tiny_version, monkeypatch, caplog):
    def refuse(model, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", refuse)
    inference._compiled_network.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="training.core.inference"):
            model, _ = network_for(tiny_version, compiled_batch=4)
    finally:
        inference._compiled_network.cache_clear()
    assert model is network_for(tiny_version)[0]
    assert "torch.compile failed" in caplog.text and "no C++ compiler" in caplog.text


def test_embed_images_compiled_writes_the_eager_vectors(indexed, tiny_version):
    ids = list(Embedding.objects.filter(model_version=tiny_version).order_by("image_id")
               .values_list("image_id", flat=True))
    before = {i: np.asarray(v, dtype=np.float32) for i, v in
              Embedding.objects.filter(model_version=tiny_version).values_list("image_id", "vector")}
    assert len(ids) >= 3
    report = embed_images(tiny_version, ids, batch_size=len(ids) - 1, compiled=True)  # the last batch: one image
    assert report.embedded == len(ids) and not report.failed
    for image_id, vector in Embedding.objects.filter(model_version=tiny_version).values_list("image_id", "vector"):
        np.testing.assert_allclose(np.asarray(vector, dtype=np.float32), before[image_id], rtol=0, atol=2e-3)


def test_jobs_compile_from_the_threshold(settings):
    settings.CBIR_COMPILE_MIN_IMAGES = 100
    assert not compile_for(99) and compile_for(100)
    settings.CBIR_COMPILE_MIN_IMAGES = 0
    assert not compile_for(10**9)


@pytest.mark.django_db
def test_a_grayscale_network_compiles_for_one_channel():
    """The study's Siamese network reads 1-channel input: the warm-up batch follows the preprocessing."""
    from training.versions import get_or_create_version

    version = get_or_create_version("siamese", random_weights=True, config={"dimension": 16, "size": 32})
    assert inference.preprocessing_for(version).grayscale
    compiled, device = network_for(version, compiled_batch=4)
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    images = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(embed_batch(compiled, device, images, pad_to=4),
                               embed_batch(network_for(version)[0], device, images), rtol=0, atol=1e-5)
