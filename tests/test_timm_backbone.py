"""Any timm model as a backbone ("timm:<name>"): weights through timm's own
loading from a Hugging Face cache laid out as the hub writes it, the model's
own preprocessing, the declared dimension, unit-norm embeddings, and a clear
error naming the model and the cache when the weights are missing offline.

The model is timm's `test_vit` (a 64-d ViT of ~0.5 M parameters): its weights
are made here, since no weights can be downloaded in the test environment."""

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import constants
from PIL import Image
from timm.data import create_transform, resolve_data_config

from training.core.config import TrainConfig
from training.core.networks.base import WeightsUnavailable
from training.core.networks.registry import UnknownArchitecture, build_network, get_architecture
from training.core.preprocessing import Preprocessing

NAME = "test_vit.r160_in1k"
ARCH = f"timm:{NAME}"
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "hub"


def cache_weights(hub) -> dict:
    """Save a random test_vit's weights where hf_hub_download finds them:
    models--timm--<name>/snapshots/<revision>/model.safetensors, refs/main → revision."""
    torch.manual_seed(1)
    model = timm.create_model(NAME, pretrained=False, num_classes=0)
    repo = hub / f"models--timm--{NAME}"
    (repo / "snapshots" / REVISION).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, str(repo / "snapshots" / REVISION / "model.safetensors"))
    return state


def test_a_timm_model_loads_its_cached_weights_through_timm(hub):
    state = cache_weights(hub)
    network = build_network(ARCH, weights="pretrained")
    assert network.architecture == ARCH and network.dimension == 64 == get_architecture(ARCH).default_dimension
    for key, value in network.model.state_dict().items():
        torch.testing.assert_close(value, state[key])
    assert network.weights_info.source == "timm" and str(hub) in network.weights_info.path
    assert len(network.weights_info.sha256) == 64
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        out = network.eval()(x)
    assert out.shape == (2, 64) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))


def test_the_preprocessing_is_the_models_own(hub):
    network = build_network(ARCH, weights="random")
    config = resolve_data_config({}, model=network.model)
    assert network.preprocessing == Preprocessing(size=160, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                                                  resample="bicubic", crop_pct=config["crop_pct"], crop_mode="center")
    # On a non-square image, the tensor equals timm's own eval transform.
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, size=(120, 200, 3), dtype=np.uint8), "RGB")
    ours = network.preprocessing(image)
    theirs = create_transform(**config)(image)
    assert ours.shape == theirs.shape == (3, 160, 160)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # The dict stored on a version gives the same preprocessing back; old dicts (no crop) keep squashing.
    assert Preprocessing.from_dict(network.preprocessing.to_dict()) == network.preprocessing
    assert Preprocessing().to_dict() == {"size": 224, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                                         "grayscale": False, "resample": "bilinear"}
    with pytest.raises(ValueError, match="unknown resample"):
        Preprocessing(resample="cubic-ish")


def test_missing_weights_offline_name_the_model_and_the_cache(hub):
    with pytest.raises(WeightsUnavailable, match=f"timm model {NAME}.*models--timm--{NAME}"):
        build_network(ARCH, weights="pretrained")
    with pytest.raises(WeightsUnavailable, match="not cached and the site is offline"):
        get_architecture(ARCH).pretrained.check()
    cache_weights(hub)
    get_architecture(ARCH).pretrained.check()  # cached now: no error


def test_timm_names_resolve_in_the_registry_and_the_config(hub):
    with pytest.raises(UnknownArchitecture, match="timm has no model 'no_such_net'"):
        get_architecture("timm:no_such_net")
    config = TrainConfig(ARCH, epochs=1)
    assert config.pretrained is True and config.objective == "classification"
    head = TrainConfig("head", backbone=ARCH, embedding_dim=32)
    network = build_network("head", weights="random", **head.build_kwargs())
    assert network.dimension == 32 and network.preprocessing.size == 160
    assert network.backbone.dimension == 64


def test_a_timm_model_over_the_index_limit_is_refused(hub):
    # timm's vgg16 keeps a 4096-d pre-logits layer: over pgvector's 4,000-d HNSW limit.
    with pytest.raises(UnknownArchitecture, match="4096-d features; the index holds 1..4000"):
        get_architecture("timm:vgg16.tv_in1k")
