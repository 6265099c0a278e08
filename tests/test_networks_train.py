"""The trainable architectures: siamese, siamese_pretrained, autoencoder."""

import pytest
import torch

from training.core.networks.autoencoder import ConvAutoencoder
from training.core.networks.registry import ARCHITECTURES, build_network
from training.core.networks.siamese import SiameseNet
from training.core.objectives import OBJECTIVES_NEEDING_LABELS


def assert_unit_norm(embeddings: torch.Tensor) -> None:
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(embeddings.shape[0]))


def test_siamese_gives_unit_norm_embeddings_from_grayscale_input():
    model = build_network("siamese", weights="random", size=64, dimension=12).eval()
    assert model.preprocessing.grayscale and model.preprocessing.size == 64
    with torch.no_grad():
        out = model(torch.randn(3, 1, 64, 64))
    assert out.shape == (3, 12) and model.dimension == 12
    assert_unit_norm(out)
    assert model.config == {"dimension": 12, "size": 64}


def test_siamese_fully_connected_layer_has_80000_inputs_at_224():
    model = SiameseNet(size=224)
    assert model.fc.in_features == 80_000  # 128 maps of 25 x 25
    assert model.fc.out_features == 500 == model.dimension


def test_siamese_has_no_pretrained_weights():
    with pytest.raises(ValueError, match="weights='random'"):
        build_network("siamese", weights="pretrained")


def test_siamese_rejects_too_small_input_and_unknown_settings():
    with pytest.raises(ValueError, match="too small"):
        build_network("siamese", weights="random", size=16)
    with pytest.raises(ValueError, match="unknown"):
        build_network("siamese", weights="random", colour=True)


def test_siamese_pretrained_projects_backbone_features():
    model = build_network("siamese_pretrained", weights="random", size=64, dimension=24, hidden=32).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 24)
    assert_unit_norm(out)
    assert not model.preprocessing.grayscale


def test_siamese_pretrained_loads_the_packaged_backbone_weights():
    model = build_network("siamese_pretrained", weights="pretrained")
    assert model.dimension == 256
    assert model.weights_info.source == "package"


def test_autoencoder_embeds_and_reconstructs_its_input_shape():
    model = build_network("autoencoder", weights="random", size=32, dimension=16, width=8).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        reconstruction = model.reconstruct(x)
    assert out.shape == (2, 16)
    assert_unit_norm(out)
    assert reconstruction.shape == x.shape


def test_autoencoder_defaults_and_size_check():
    model = ConvAutoencoder()
    assert model.dimension == 256 and model.preprocessing.size == 224
    with pytest.raises(ValueError, match="multiple of 16"):
        ConvAutoencoder(size=40)
    with pytest.raises(ValueError, match="pretrained"):
        build_network("autoencoder", weights="pretrained")


@pytest.mark.parametrize("name", ["siamese", "siamese_pretrained", "autoencoder"])
def test_trainable_architectures_are_registered_as_label_free(name):
    architecture = ARCHITECTURES[name]
    assert architecture.default_objective not in OBJECTIVES_NEEDING_LABELS
    assert architecture.defaults["dimension"] == architecture.default_dimension


def test_the_registry_records_decide_what_the_config_and_the_form_offer():
    """Adding a network is one module plus one registration: TrainConfig, the
    admin form and the train command read the record."""
    from training.core.config import TrainConfig
    from training.core.networks.registry import pretrained_architectures, sizable_architectures
    from training.forms import TrainForm

    for name, architecture in ARCHITECTURES.items():
        if name == "head":  # a frozen backbone must be pretrained: the one architecture that refuses random weights
            with pytest.raises(ValueError, match="needs its pretrained weights"):
                TrainConfig(name, pretrained=False)
            assert TrainConfig(name).objective == architecture.default_objective
            continue
        config = TrainConfig(name, pretrained=False)
        assert config.objective == architecture.default_objective
        assert TrainConfig(name).pretrained is (architecture.pretrained is not None)
    form = TrainForm()
    assert {value for value, _ in form.fields["architecture"].choices} == set(ARCHITECTURES)
    assert ", ".join(sizable_architectures("dimension")) in form.fields["embedding_dim"].help_text
    assert ", ".join(pretrained_architectures()) in form.fields["pretrained"].help_text


def test_every_registered_architecture_is_in_the_readme():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("## Models", 1)[1].split("##", 1)[0]
    missing = [name for name in ARCHITECTURES if name != "tiny" and f"`{name}`" not in table]
    assert missing == []
