"""Training with DistributedDataParallel over 2 CPU processes (gloo): the same
global batches as one process, so the same loss curve within float tolerance;
one model version, written by rank 0 only; a cancel on rank 0 stops every rank.

Kept small: the tiny network (no BatchNorm, so per-process batch statistics
cannot differ), 32 px images, 16 training images, 2 epochs."""

import io

import pytest
import torch
from django.core.management import call_command

from search.models import Image, Split
from tests.test_training_jobs import make_dataset
from training.core.config import TrainConfig
from training.core.trainer import TrainingStopped, train
from training.models import ModelVersion
from training.rows import training_data

SETTINGS = {"architecture": "tiny", "epochs": 2, "batch_size": 8, "learning_rate": 3e-3, "image_size": 32,
            "augment": False, "num_workers": 0}


@pytest.fixture
def labelled(transactional_db, tmp_path):
    dataset = make_dataset(tmp_path)
    # 16 train, 8 val, 6 test: 16 divides evenly by 2 processes × 4 images, so no sampler padding.
    for i, image in enumerate(Image.objects.filter(dataset=dataset).order_by("pk")):
        image.split = Split.TRAIN if i % 15 < 8 else Split.VAL if i % 15 < 12 else Split.TEST
        image.save(update_fields=["split"])
    assert Image.objects.filter(dataset=dataset, split=Split.TRAIN).count() == 16
    return dataset


def test_two_processes_give_the_loss_curve_of_one_and_one_version(labelled, tmp_path):
    single = train(training_data(labelled), TrainConfig(**SETTINGS), checkpoint_dir=tmp_path / "one")
    out = io.StringIO()
    call_command("train", "--dataset", "colours", "--arch", "tiny", "--epochs", "2", "--batch-size", "8",
                 "--lr", "0.003", "--image-size", "32", "--no-augment", "--num-workers", "0", "--processes", "2",
                 "--no-progress", "--checkpoint-dir", str(tmp_path / "two"), stdout=out)
    assert ModelVersion.objects.filter(name__startswith="tiny-colours-ft-").count() == 1
    version = ModelVersion.objects.get(name="tiny-colours-ft-1")
    history = version.metrics["training"]["history"]
    assert version.metrics["training"]["n_train"] == 16 and len(history) == 2
    for one, two in zip(single.history, history):
        assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4)
        assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-4)
    assert history[1]["train_loss"] != pytest.approx(history[0]["train_loss"], rel=1e-4)  # it did train
    one_state = torch.load(single.best_path, weights_only=True)["model"]
    two_state = torch.load(tmp_path / "two" / "best.pt", weights_only=True)["model"]
    for key, value in one_state.items():
        torch.testing.assert_close(two_state[key], value, rtol=1e-4, atol=1e-5)
    assert version.embeddings.count() == 30


def test_a_cancel_on_rank_0_stops_every_process(labelled, tmp_path):
    config = TrainConfig(**{**SETTINGS, "processes": 2})
    with pytest.raises(TrainingStopped):
        train(training_data(labelled), config, checkpoint_dir=tmp_path / "stop", should_stop=lambda: True)
    assert not (tmp_path / "stop" / "last.pt").exists()


def test_distributed_settings_are_checked():
    with pytest.raises(ValueError, match="must divide evenly among 3 processes"):
        TrainConfig(**{**SETTINGS, "processes": 3})
    with pytest.raises(ValueError, match="triplet"):
        TrainConfig(**{**SETTINGS, "processes": 2, "objective": "triplet"})
    with pytest.raises(ValueError, match="processes must be"):
        TrainConfig(**{**SETTINGS, "processes": 0})
