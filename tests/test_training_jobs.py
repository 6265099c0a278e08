"""Training as a plain function, as a job on a real worker, and as a command:
settings validation, learning, checkpoints and resuming, publishing a model
version that rebuilds exactly, and refusing bad jobs before any row exists."""

import io
import math

import numpy as np
import pytest
import torch
from django.core.management import CommandError, call_command
from PIL import Image as PILImage

from search import hnsw
from search.ingest import import_folder
from search.jobs import S
from search.models import Dataset, Embedding, Image, Job
from tests.helpers import wait_for
from training.core.config import TrainConfig
from training.core.inference import build_for_version
from training.core.trainer import TrainingStopped, train
from training.forms import TrainForm
from training.models import ModelVersion
from training.pipeline import index_and_evaluate
from training.rows import training_data
from training.train_job import checkpoint_dir_for, run_training_job, start_training_job
from training.versions import create_initial_version, create_version_from_checkpoint

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 220)}


def write_colour_folder(root, per_class: int = 10, seed: int = 0):
    """32x32 PNGs: each class a noisy solid colour, so a tiny network can learn them in a few epochs."""
    rng = np.random.default_rng(seed)
    for label, colour in COLOURS.items():
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 40, size=(32, 32, 3)), 0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            PILImage.fromarray(pixels, "RGB").save(buffer, format="PNG")
            (root / label / f"{label}-{i}.png").write_bytes(buffer.getvalue())
    return root


def make_dataset(tmp_path, name="colours", labels=True, per_class=10):
    dataset = Dataset.objects.create(name=name)
    report = import_folder(write_colour_folder(tmp_path / name, per_class), dataset, labels_from_folders=labels)
    assert report.imported == per_class * len(COLOURS)
    return dataset


@pytest.fixture
def labelled(db, tmp_path):
    return make_dataset(tmp_path)


@pytest.fixture
def unlabelled(db, tmp_path):
    return make_dataset(tmp_path, name="unlabelled", labels=False)


def tiny(**overrides) -> TrainConfig:
    settings = {"architecture": "tiny", "epochs": 2, "batch_size": 8, "learning_rate": 3e-3, "image_size": 32,
                "augment": False}
    settings.update(overrides)
    return TrainConfig(**settings)


def losses(history):
    return [value for h in history for value in (h["epoch"], h["train_loss"], h["val_loss"])]


# --- Settings -----------------------------------------------------------------

@pytest.mark.parametrize("fields, message", [
    ({"architecture": "nope"}, "unknown architecture 'nope'"),
    ({"architecture": "tiny", "epochs": 0}, "epochs must be between 1"),
    ({"architecture": "tiny", "batch_size": 1}, "batch_size must be between 2"),
    ({"architecture": "tiny", "learning_rate": 0}, "learning_rate must be a number above 0"),
    ({"architecture": "tiny", "learning_rate": float("nan")}, "learning_rate"),
    ({"architecture": "vgg16", "embedding_dim": 128}, "vgg16 has a fixed 512-d embedding"),
    ({"architecture": "autoencoder", "pretrained": True}, "autoencoder has no pretrained weights"),
    ({"architecture": "tiny", "objective": "reconstruction"}, "needs a network with a decoder"),
    ({"architecture": "tiny", "objective": "magic"}, "unknown objective 'magic'"),
    ({"architecture": "autoencoder", "image_size": 40}, "multiple of 16"),
    ({"architecture": "siamese", "image_size": 16}, "too small for the siamese network"),
    ({"architecture": "tiny", "image_size": 8}, "image_size must be between 16"),
    ({"architecture": "tiny", "scheduler": "step"}, "unknown scheduler"),
    ({"architecture": "tiny", "epochs": True}, "epochs must be a whole number"),
    ({"architecture": "tiny", "time_limit_s": -1}, "time_limit_s"),
])
def test_bad_settings_are_refused_with_a_clear_message(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**fields)


def test_unknown_job_params_are_refused():
    with pytest.raises(ValueError, match="unknown training setting.*colour"):
        TrainConfig.from_params({"architecture": "tiny", "colour": "red"})


def test_auto_settings_resolve_per_architecture():
    assert (TrainConfig("autoencoder").objective, TrainConfig("autoencoder").pretrained) == ("reconstruction", False)
    assert (TrainConfig("siamese").objective, TrainConfig("siamese").pretrained) == ("contrastive", False)
    vgg = TrainConfig("vgg16")
    assert (vgg.objective, vgg.pretrained) == ("classification", True)
    assert TrainConfig("resnet50", pretrained=False, objective="triplet").pretrained is False
    assert TrainConfig("autoencoder", embedding_dim=16, image_size=32).build_kwargs() == {"dimension": 16, "size": 32}
    assert TrainConfig("vgg16", image_size=64).build_kwargs() == {}  # pooled: only the preprocessing changes


# --- Training -----------------------------------------------------------------

def test_training_lowers_the_validation_loss_and_keeps_the_best_epoch(labelled, tmp_path):
    calls = []
    result = train(training_data(labelled), tiny(epochs=4), checkpoint_dir=tmp_path / "run",
                   progress=lambda *args: calls.append(args[:4]))
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert set(result.history[0]) >= {"epoch", "train_loss", "val_loss", "seconds", "lr"}
    assert result.best_val_loss < result.history[0]["val_loss"] and result.best_epoch > 1
    assert result.classes == ["blue", "green", "red"] and result.objective == "classification"
    best = torch.load(result.best_path, weights_only=True)
    assert best["epoch"] == result.best_epoch and best["best_val_loss"] == result.best_val_loss
    assert torch.load(result.last_path, weights_only=True)["epoch"] == 4
    assert "head.weight" in best["objective"] and not any(k.startswith("head") for k in best["model"])
    assert calls[0][:3] == (1, 4, 1)
    assert calls[-1][:2] == (4, 4) and calls[-1][2] == calls[-1][3]


def test_the_autoencoder_trains_on_unlabelled_images(unlabelled, tmp_path):
    config = TrainConfig("autoencoder", epochs=2, batch_size=8, learning_rate=1e-3, image_size=32, embedding_dim=16)
    result = train(training_data(unlabelled), config, checkpoint_dir=tmp_path / "ae")
    assert result.objective == "reconstruction" and len(result.history) == 2
    assert all(math.isfinite(h["val_loss"]) for h in result.history)


def test_an_unlabelled_dataset_is_indexed_but_its_evaluation_skipped(unlabelled, tmp_path):
    config = TrainConfig("autoencoder", epochs=1, batch_size=8, image_size=32, embedding_dim=16)
    result = train(training_data(unlabelled), config, checkpoint_dir=tmp_path / "ae")
    version = create_version_from_checkpoint(config, result.best_path, unlabelled, result.history, result.seconds)
    report, evaluation = index_and_evaluate(version, unlabelled)
    assert report.embedded == 30 and "no labels" in evaluation["skipped"]


def test_the_siamese_network_trains_on_augmented_pairs_without_labels(unlabelled, tmp_path):
    config = TrainConfig("siamese", epochs=1, batch_size=8, learning_rate=1e-4, image_size=32, embedding_dim=16)
    result = train(training_data(unlabelled), config, checkpoint_dir=tmp_path / "siamese")
    assert result.pairs == "augmented" and result.objective == "contrastive"
    assert math.isfinite(result.best_val_loss)


def test_the_siamese_network_makes_pairs_from_labels_when_it_can(labelled, tmp_path):
    config = TrainConfig("siamese", epochs=1, batch_size=8, image_size=32, embedding_dim=16, augment=False)
    assert train(training_data(labelled), config, checkpoint_dir=tmp_path / "pairs").pairs == "labels"


def test_labelled_objectives_refuse_a_dataset_without_labels(unlabelled, tmp_path):
    with pytest.raises(ValueError, match="has 0 labelled class"):
        train(training_data(unlabelled), tiny(), checkpoint_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="triplet training needs at least 2 classes"):
        train(training_data(unlabelled), tiny(objective="triplet"), checkpoint_dir=tmp_path / "y")


def test_triplet_training_runs_on_pk_batches(labelled, tmp_path):
    result = train(training_data(labelled), tiny(objective="triplet", epochs=1), checkpoint_dir=tmp_path / "triplet")
    assert math.isfinite(result.history[0]["train_loss"])


def test_without_validation_images_some_training_images_validate(labelled, unlabelled, tmp_path):
    Image.objects.filter(dataset__in=[labelled, unlabelled]).update(split="train")
    result = train(training_data(labelled), tiny(epochs=1), checkpoint_dir=tmp_path / "holdout")
    assert (result.n_train, result.n_val) == (24, 6)
    assert any("validate instead" in warning for warning in result.warnings)
    pairs = TrainConfig("siamese", epochs=1, batch_size=8, image_size=32, embedding_dim=16)
    assert train(training_data(unlabelled), pairs, checkpoint_dir=tmp_path / "pairs").n_val == 6


def test_a_resumed_run_continues_from_its_last_epoch_as_if_never_stopped(labelled, tmp_path):
    first = train(training_data(labelled), tiny(epochs=1), checkpoint_dir=tmp_path / "resumed")
    second = train(training_data(labelled), tiny(epochs=2), checkpoint_dir=tmp_path / "resumed")
    assert second.resumed_from_epoch == 1 and len(second.history) == 2
    assert second.history[0] == first.history[0]
    straight = train(training_data(labelled), tiny(epochs=2), checkpoint_dir=tmp_path / "straight")
    assert losses(second.history) == pytest.approx(losses(straight.history))
    fresh = train(training_data(labelled), tiny(epochs=1), checkpoint_dir=tmp_path / "resumed", resume=False)
    assert fresh.resumed_from_epoch == 0 and len(fresh.history) == 1


def test_resuming_with_other_network_settings_is_refused(labelled, tmp_path):
    train(training_data(labelled), tiny(epochs=1), checkpoint_dir=tmp_path / "run")
    with pytest.raises(ValueError, match="other settings.*image_size"):
        train(training_data(labelled), tiny(epochs=2, image_size=48), checkpoint_dir=tmp_path / "run")


def test_early_stopping_and_the_time_limit_end_training(labelled, tmp_path):
    result = train(training_data(labelled), tiny(epochs=50, learning_rate=1.0, early_stopping_patience=1),
                   checkpoint_dir=tmp_path / "early")
    assert result.stop_reason == "early_stopping" and len(result.history) < 50
    assert len(result.history) - result.best_epoch == 1
    timed = train(training_data(labelled), tiny(epochs=50, time_limit_s=1e-6), checkpoint_dir=tmp_path / "timed")
    assert timed.stop_reason == "time_limit" and len(timed.history) == 1


def test_should_stop_stops_between_batches_and_keeps_the_last_epoch(labelled, tmp_path):
    with pytest.raises(TrainingStopped):
        train(training_data(labelled), tiny(), checkpoint_dir=tmp_path / "stop", should_stop=lambda: True)
    assert not (tmp_path / "stop" / "last.pt").exists()


def test_a_published_version_rebuilds_the_trained_network_exactly(labelled, tmp_path, settings):
    config = tiny()
    result = train(training_data(labelled), config, checkpoint_dir=tmp_path / "run")
    version = create_version_from_checkpoint(config, result.best_path, labelled, result.history, result.seconds)
    assert version.name == "tiny-colours-ft-1" and not version.is_active
    assert version.weights_source == "checkpoint" and version.dimension == 32
    assert version.weights_path.startswith(str(settings.CBIR_WEIGHTS_DIR)) and "/trained/" in version.weights_path
    training = version.metrics["training"]
    assert training["best_epoch"] == result.best_epoch and len(training["history"]) == 2
    assert training["pretrained"] is False and training["objective"] == "classification"
    assert version.preprocessing["size"] == 32

    rebuilt = build_for_version(version.architecture, version.weights_source, version.weights_path,
                                version.config).eval()
    trained = config.build_model()
    trained.load_state_dict(torch.load(result.best_path, weights_only=True)["model"])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), trained.eval()(x))
    again = create_version_from_checkpoint(config, result.best_path, labelled, result.history, result.seconds)
    assert again.name == "tiny-colours-ft-2"


def test_the_baseline_version_holds_the_untrained_starting_network(labelled):
    config = tiny(embedding_dim=8, seed=3)
    version = create_initial_version(config, labelled)
    assert version.name == "tiny-colours-init-1" and version.weights_source == "random" and version.dimension == 8
    rebuilt = build_for_version(version.architecture, version.weights_source, version.weights_path, version.config)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), config.build_model().eval()(x))


def test_the_image_size_of_a_pooled_network_is_kept_in_its_preprocessing(labelled, tmp_path):
    config = TrainConfig("efficientnet_lite0", pretrained=False, epochs=1, batch_size=16, image_size=32,
                         augment=False)
    result = train(training_data(labelled), config, checkpoint_dir=tmp_path / "eff")
    version = create_version_from_checkpoint(config, result.best_path, labelled, result.history, result.seconds)
    assert version.preprocessing["size"] == 32 and version.config == {}
    assert version.metrics["training"]["pretrained"] is False


# --- Jobs -----------------------------------------------------------------------

def test_a_job_with_bad_settings_is_refused_before_any_row_exists(labelled, unlabelled):
    with pytest.raises(ValueError, match="epochs"):
        start_training_job(labelled, check=False, architecture="tiny", epochs=0)
    with pytest.raises(ValueError, match="unknown training setting"):
        start_training_job(labelled, check=False, architecture="tiny", colour="red")
    with pytest.raises(ValueError, match="labelled class"):
        start_training_job(unlabelled, check=False, architecture="tiny")
    assert not Job.objects.exists()


def test_a_training_job_resumes_from_its_checkpoint_and_publishes_a_version(labelled, tmp_path):
    params = {"architecture": "tiny", "epochs": 2, "batch_size": 8, "learning_rate": 3e-3, "image_size": 32,
              "augment": False}
    job = Job.objects.create(kind=Job.Kind.TRAIN, dataset=labelled, params=params)
    # As if a worker had died after the first epoch.
    train(training_data(labelled), TrainConfig(**{**params, "epochs": 1}), checkpoint_dir=checkpoint_dir_for(job.pk))
    assert run_training_job(job.pk) == "done"
    job.refresh_from_db()
    assert job.status == S.SUCCEEDED, job.error
    assert job.result["resumed_from_epoch"] == 1 and len(job.result["history"]) == 2
    assert job.model_version.name == job.result["version"] == "tiny-colours-ft-1"
    assert Embedding.objects.filter(model_version=job.model_version).count() == Image.objects.count()
    assert any("resuming" in line["msg"] for line in job.log)
    assert 0 <= job.result["evaluation"]["precision_at_k"] <= 1 and job.result["evaluation"]["k"] == 10
    assert job.model_version.metrics["evaluation"]["colours"]["precision_at_k"] == \
        job.result["evaluation"]["precision_at_k"]
    assert run_training_job(job.pk) == "not claimed"


def test_a_training_job_that_cannot_train_fails_with_the_reason(unlabelled):
    job = Job.objects.create(kind=Job.Kind.TRAIN, dataset=unlabelled, params={"architecture": "tiny", "epochs": 1})
    with pytest.raises(ValueError):
        run_training_job(job.pk)
    job.refresh_from_db()
    assert job.status == S.FAILED and "labelled class" in job.error
    assert not ModelVersion.objects.exists()


@pytest.mark.worker
@pytest.mark.timeout(180)
def test_a_training_job_runs_on_a_worker_end_to_end(live_worker, tmp_path):
    dataset = make_dataset(tmp_path, name="worker-colours")
    job = start_training_job(dataset, architecture="tiny", epochs=2, batch_size=8, learning_rate=3e-3,
                             image_size=32, augment=False)
    job = wait_for(lambda: Job.objects.filter(pk=job.pk, status__in=[S.SUCCEEDED, S.FAILED]).first(),
                   timeout=120, message="the training job")
    assert job.status == S.SUCCEEDED, (job.error, job.log)
    version = job.model_version
    assert version.weights_source == "checkpoint" and len(job.result["history"]) == 2
    assert Embedding.objects.filter(model_version=version).count() == dataset.images.count()
    assert hnsw.is_ready(version)
    assert any(line["msg"].startswith("epoch 2:") for line in job.log)


# --- Form and command -------------------------------------------------------------

def test_the_form_reports_settings_errors_on_their_fields(unlabelled):
    form = TrainForm({"architecture": "autoencoder", "objective": "auto", "epochs": 2, "batch_size": 8,
                      "learning_rate": 1e-3, "image_size": 40, "scheduler": "none", "early_stopping_patience": 3})
    assert not form.is_valid() and "multiple of 16" in form.errors["image_size"][0]
    form = TrainForm({"architecture": "tiny", "objective": "auto", "epochs": 2, "batch_size": 8,
                      "learning_rate": 1e-3, "scheduler": "none", "early_stopping_patience": 3}, dataset=unlabelled)
    assert not form.is_valid() and "labelled class" in str(form.errors)
    form = TrainForm({"architecture": "autoencoder", "objective": "auto", "epochs": 2, "batch_size": 8,
                      "learning_rate": 1e-3, "pretrained": "on", "image_size": 32, "scheduler": "cosine",
                      "early_stopping_patience": 3}, dataset=unlabelled)
    assert form.is_valid(), form.errors
    fields = form.config_fields()
    assert fields["pretrained"] is False and fields["objective"] == "reconstruction"  # no pretrained autoencoder


def test_the_train_command_trains_in_process_and_names_the_version(labelled, tmp_path):
    out = io.StringIO()
    call_command("train", "--dataset", "colours", "--arch", "tiny", "--epochs", "2", "--batch-size", "8",
                 "--lr", "0.003", "--image-size", "32", "--no-augment", "--no-progress",
                 "--checkpoint-dir", str(tmp_path / "cmd"), "--baseline", stdout=out)
    text = out.getvalue()
    assert "epoch   1: train loss" in text and "epoch   2:" in text
    assert "before training: model version tiny-colours-init-1" in text
    assert "model version tiny-colours-ft-1" in text and "precision@10 on the test split" in text
    assert ModelVersion.objects.get(name="tiny-colours-ft-1").embeddings.count() == 30


def test_the_train_command_explains_bad_input(labelled):
    with pytest.raises(CommandError, match="unknown dataset 'nope'"):
        call_command("train", "--dataset", "nope", "--arch", "tiny")
    with pytest.raises(CommandError, match="unknown architecture"):
        call_command("train", "--dataset", "colours", "--arch", "resnet")
    with pytest.raises(CommandError, match="vgg16 has a fixed"):
        call_command("train", "--dataset", "colours", "--arch", "vgg16", "--embedding-dim", "64")
