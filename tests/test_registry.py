import pytest
import torch

from training.core.networks.base import WeightsUnavailable
from training.core.networks.registry import ARCHITECTURES, UnknownArchitecture, build_network, get_architecture


@pytest.mark.parametrize("name,dimension,size", [
    ("tiny", 32, 32), ("efficientnet_lite0", 1280, 64), ("resnet50", 2048, 64), ("vgg16", 512, 64),
])
def test_networks_output_unit_vectors_of_their_declared_dimension(name, dimension, size):
    model = build_network(name, weights="random").eval()
    assert model.dimension == dimension == get_architecture(name).default_dimension
    with torch.inference_mode():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, dimension)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(UnknownArchitecture, match="unknown architecture 'alexnet'.*efficientnet_lite0"):
        build_network("alexnet")


def test_every_registered_dimension_is_indexable():
    assert all(1 <= a.default_dimension <= 4000 for a in ARCHITECTURES.values())


def test_unknown_settings_are_refused():
    with pytest.raises(ValueError, match="takes no settings"):
        build_network("resnet50", weights="random", width=3)


@pytest.mark.parametrize("name,filename", [("resnet50", "resnet50-11ad3fa6.pth"), ("vgg16", "vgg16-397923af.pth")])
def test_missing_torchvision_weights_offline_name_the_file_and_place(name, filename, settings, tmp_path, monkeypatch):
    settings.CBIR_OFFLINE = True
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsUnavailable) as excinfo:
        build_network(name)
    message = str(excinfo.value)
    assert str(tmp_path / "hub" / "checkpoints" / filename) in message
    assert "https://download.pytorch.org/models/" + filename in message
    assert "--random-weights" in message


def test_pretrained_weights_are_not_replaced_by_random_ones_silently(settings, tmp_path, monkeypatch):
    settings.CBIR_OFFLINE = True
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsUnavailable):
        build_network("resnet50", weights="pretrained")


def test_objectives_are_registered_once_and_read_by_the_config_form_command_and_docs():
    from pathlib import Path

    from training.core.config import HEAD_OBJECTIVES, LABELLED_OBJECTIVES, OBJECTIVES, TrainConfig
    from training.core.objectives import OBJECTIVES as REGISTERED
    from training.core.objectives import get_objective
    from training.forms import TrainForm
    from training.management.commands.train import Command

    assert OBJECTIVES == ("auto", *REGISTERED)
    assert set(LABELLED_OBJECTIVES) == {name for name, o in REGISTERED.items() if o.needs_labels}
    assert set(HEAD_OBJECTIVES) <= set(LABELLED_OBJECTIVES)
    form_choices = [value for value, _ in TrainForm().fields["objective"].choices]
    assert form_choices == list(OBJECTIVES)
    parser = Command().create_parser("manage.py", "train")
    objective_action = next(a for a in parser._actions if "--objective" in a.option_strings)
    assert list(objective_action.choices) == list(OBJECTIVES)
    docs = (Path(__file__).resolve().parent.parent / "docs" / "training.md").read_text()
    assert all(name in docs for name in REGISTERED)
    for name, objective in REGISTERED.items():
        assert objective.plan in ("pairs", "pk", "images")
        built = objective.build(_Dimensioned(), 3)
        assert isinstance(built, torch.nn.Module), name
    with pytest.raises(ValueError, match="unknown objective 'nope'"):
        get_objective("nope")
    with pytest.raises(ValueError, match="unknown objective"):
        TrainConfig("tiny", objective="nope")


class _Dimensioned(torch.nn.Module):
    dimension = 8


def test_the_form_and_the_command_read_the_train_config_defaults():
    from training.core.config import TrainConfig
    from training.forms import TrainForm
    from training.management.commands.train import Command

    defaults = TrainConfig.defaults()
    form = TrainForm()
    for name in ("objective", "epochs", "batch_size", "learning_rate", "scheduler", "early_stopping_patience",
                 "select_by", "processes"):
        assert form.fields[name].initial == defaults[name], name
    parsed = Command().create_parser("manage.py", "train").parse_args(["--dataset", "d"])
    assert (parsed.epochs, parsed.batch_size, parsed.lr, parsed.objective, parsed.scheduler, parsed.patience,
            parsed.select_by, parsed.seed, parsed.processes) == (
        defaults["epochs"], defaults["batch_size"], defaults["learning_rate"], defaults["objective"],
        defaults["scheduler"], defaults["early_stopping_patience"], defaults["select_by"], defaults["seed"],
        defaults["processes"])
