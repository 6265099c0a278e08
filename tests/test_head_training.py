"""Head-only training: the frozen backbone's features cached on disk (reused,
re-embedded only for new or changed images), a projection head trained on
them with pytorch-metric-learning losses, published as one backbone + head
model version that rebuilds, embeds and evaluates like any other."""

import io

import pytest
import torch
from django.core.management import CommandError, call_command

from search.models import Embedding, Image
from tests.test_training_jobs import make_dataset
from training.core.config import TrainConfig
from training.core.features import FeatureCache
from training.core.inference import build_for_version
from training.core.objectives import METRIC_LOSSES, MetricLossObjective
from training.core.trainer import train
from training.forms import TrainForm
from training.models import ModelVersion
from training.pipeline import index_and_evaluate
from training.rows import training_data
from training.versions import create_version_from_checkpoint


@pytest.fixture
def labelled(db, tmp_path):
    return make_dataset(tmp_path)


def head_config(**overrides) -> TrainConfig:
    fields = {"architecture": "head", "epochs": 4, "batch_size": 8, "learning_rate": 1e-2, "image_size": 32,
              "embedding_dim": 16}
    fields.update(overrides)
    return TrainConfig(**fields)


def test_head_settings_resolve_and_bad_ones_are_refused():
    config = head_config()
    assert (config.backbone, config.head, config.objective, config.augment, config.pretrained) == \
        ("efficientnet_lite0", "linear", "normalized_softmax", False, True)
    assert config.build_kwargs() == {"dimension": 16, "backbone": "efficientnet_lite0", "head": "linear"}
    for bad, message in [({"backbone": "tiny"}, "no pretrained weights"), ({"head": "deep"}, "head must be"),
                         ({"objective": "reconstruction"}, "does not apply to head-only"),
                         ({"augment": True}, "augment does not apply"), ({"backbone": "nope"}, "unknown architecture"),
                         ({"processes": 2}, "one process"), ({"select_by": "val_p10"}, "select_by must be one of")]:
        with pytest.raises(ValueError, match=message):
            head_config(**bad)
    with pytest.raises(ValueError, match="apply to head-only"):
        TrainConfig("tiny", backbone="efficientnet_lite0")
    with pytest.raises(ValueError, match="select_by val_precision_at_10 applies to head-only"):
        TrainConfig("tiny", select_by="val_precision_at_10")


def test_feature_precision_at_k_matches_the_retrieval_metric_on_ranked_lists():
    from training.core.head_training import feature_precision_at_k
    from training.evaluation.metrics import precision_at_k as ranked_precision
    from training.evaluation.metrics import rank_with_ties

    generator = torch.Generator().manual_seed(0)
    database_labels, query_labels = torch.randint(0, 3, (40,), generator=generator), torch.tensor([0, 1, 2, 1, 0])
    database = torch.randn(40, 6, generator=generator) + database_labels[:, None] * 1.5
    queries = torch.randn(5, 6, generator=generator) + query_labels[:, None] * 1.5
    expected = []
    for query, label in zip(queries, query_labels):
        scores = torch.nn.functional.cosine_similarity(query[None], database).tolist()
        ranking = rank_with_ties(scores, list(range(40)))
        expected.append(ranked_precision([int(database_labels[i]) == int(label) for i in ranking], 10))
    value = feature_precision_at_k(queries, query_labels, database, database_labels, k=10, chunk=2)
    assert value == pytest.approx(sum(expected) / 5) and 0 < value < 1
    # Scaling a feature does not change cosine ranks.
    assert feature_precision_at_k(queries * 3, query_labels, database, database_labels) == pytest.approx(value)
    with pytest.raises(ValueError, match="at least one query and 10 database rows"):
        feature_precision_at_k(queries, query_labels, database[:9], database_labels[:9])


@pytest.mark.parametrize("name", sorted(METRIC_LOSSES))
def test_each_metric_loss_objective_learns_separable_classes(name):
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(8, 4))
    head.dimension = 4
    objective = MetricLossObjective(name, num_classes=3, dimension=4)
    x = torch.randn(48, 8) + torch.arange(3).repeat(16)[:, None] * 3.0
    labels = torch.arange(3).repeat(16)

    def model(features):
        return torch.nn.functional.normalize(head(features), dim=1)

    optimizer = torch.optim.Adam(list(head.parameters()) + list(objective.parameters()), lr=0.05)
    first = float(objective(model, (x, labels), torch.device("cpu")).detach())
    for _ in range(30):
        optimizer.zero_grad()
        objective(model, (x, labels), torch.device("cpu")).backward()
        optimizer.step()
    assert float(objective(model, (x, labels), torch.device("cpu")).detach()) < first
    with pytest.raises(ValueError, match="needs labelled images"):
        objective(model, (x, -torch.ones(48, dtype=torch.int64)), torch.device("cpu"))


def test_head_training_caches_features_and_publishes_backbone_plus_head(labelled, tmp_path, settings):
    config = head_config()
    result = train(training_data(labelled), config, checkpoint_dir=tmp_path / "run")
    n = result.n_train + result.n_val
    assert result.features["embedded"] == n and result.features["cached"] == 0
    assert str(settings.CBIR_WEIGHTS_DIR) in result.features["path"]
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]

    again = train(training_data(labelled), config, checkpoint_dir=tmp_path / "again", resume=False)
    assert again.features == {**again.features, "cached": n, "embedded": 0}
    assert [h["train_loss"] for h in again.history] == pytest.approx([h["train_loss"] for h in result.history])

    version = create_version_from_checkpoint(config, result.best_path, labelled, result.history, result.seconds)
    assert version.name == "efficientnet_lite0-head-colours-ft-1" and version.architecture == "head"
    assert version.dimension == 16 and version.preprocessing["size"] == 32
    assert version.config == {"backbone": "efficientnet_lite0", "head": "linear", "dimension": 16}
    rebuilt = build_for_version(version.architecture, version.weights_source, version.weights_path,
                                version.config).eval()
    expected = config.build_model().eval()
    expected.head.load_state_dict(torch.load(result.best_path, weights_only=True)["model"])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = rebuilt(x)
        torch.testing.assert_close(out, expected(x))
    assert out.shape == (3, 16) and torch.allclose(out.norm(dim=1), torch.ones(3))

    report, evaluation = index_and_evaluate(version, labelled)
    assert Embedding.objects.filter(model_version=version).count() == labelled.images.count() == report.embedded
    assert evaluation is not None and 0 <= evaluation["precision_at_k"] <= 1


def test_head_training_can_keep_the_epoch_with_the_best_validation_precision(labelled, tmp_path):
    from training.core.head_training import feature_precision_at_k
    from training.core.loop import VAL_PRECISION

    result = train(training_data(labelled), head_config(epochs=3, select_by="val_precision_at_10", early_stopping_patience=0),
                   checkpoint_dir=tmp_path / "p10")
    precisions = [h[VAL_PRECISION] for h in result.history]
    assert len(precisions) == 3 and all(0 <= p <= 1 for p in precisions)
    assert result.best_epoch == 1 + precisions.index(max(precisions))
    kept = torch.load(result.best_path, weights_only=True)
    assert kept["epoch"] == result.best_epoch
    # The recorded figure is the kept head's own: recompute it from the cached features.
    network = head_config(select_by="val_precision_at_10").build_model()
    network.head.load_state_dict(kept["model"])
    cache = FeatureCache("efficientnet_lite0", network.backbone, network.preprocessing)
    rows = {split: list(Image.objects.filter(dataset=labelled, split=split).order_by("pk")) for split in ("train", "val")}
    classes = sorted({image.label for image in rows["train"]})
    features = {}
    for split, images in rows.items():
        x, _ = cache.features_for([(i.pk, i.file.path, i.sha256) for i in images], torch.device("cpu"))
        features[split] = (network.head.eval()(x).detach(), torch.tensor([classes.index(i.label) for i in images]))
    assert feature_precision_at_k(*features["val"], *features["train"]) == pytest.approx(max(precisions))


def test_the_cache_re_embeds_only_new_or_changed_images(labelled, tmp_path):
    config = head_config()
    network = config.build_model()
    cache = FeatureCache("efficientnet_lite0", network.backbone, network.preprocessing)
    rows = [(image.pk, image.file.path, image.sha256) for image in Image.objects.filter(dataset=labelled)]
    first, stats = cache.features_for(rows[:20], torch.device("cpu"))
    assert stats["embedded"] == 20 and first.shape == (20, 1280)
    both, stats = cache.features_for(rows, torch.device("cpu"))
    assert (stats["cached"], stats["embedded"]) == (20, 10)
    torch.testing.assert_close(both[:20], first)

    # An image whose content changed (other hash) is embedded again: copy another image's file over it.
    changed, donor = Image.objects.filter(dataset=labelled).order_by("pk")[0], rows[-1]
    with open(donor[1], "rb") as source, open(changed.file.path, "wb") as target:
        target.write(source.read())
    rows[0] = (changed.pk, changed.file.path, "changed-content-hash")
    after, stats = cache.features_for(rows, torch.device("cpu"))
    assert (stats["cached"], stats["embedded"]) == (29, 1)
    torch.testing.assert_close(after[0], both[-1])
    torch.testing.assert_close(after[1:], both[1:])

    # Another preprocessing is another cache file.
    other = FeatureCache("efficientnet_lite0", network.backbone, head_config(image_size=40).build_model().preprocessing)
    assert other.path != cache.path and other.cached_hashes() == {}


def test_the_train_command_and_the_form_start_head_only_training(labelled, tmp_path):
    out = io.StringIO()
    call_command("train", "--dataset", "colours", "--head-only", "--epochs", "2", "--batch-size", "8",
                 "--lr", "0.01", "--image-size", "32", "--embedding-dim", "8", "--no-progress",
                 "--checkpoint-dir", str(tmp_path / "cmd"), "--baseline", stdout=out)
    text = out.getvalue()
    assert "before training: model version efficientnet_lite0-colours-init-1" in text  # the frozen backbone
    assert "model version efficientnet_lite0-head-colours-ft-1" in text
    assert "backbone features: 0 from the cache" in text
    version = ModelVersion.objects.get(name="efficientnet_lite0-head-colours-ft-1")
    assert version.dimension == 8 and version.embeddings.count() == 30
    assert version.metrics["training"]["features"]["embedded"] > 0
    out = io.StringIO()
    call_command("train", "--dataset", "colours", "--head-only", "--epochs", "2", "--batch-size", "8",
                 "--lr", "0.01", "--image-size", "32", "--embedding-dim", "8", "--no-progress",
                 "--select-by", "val_precision_at_10", "--checkpoint-dir", str(tmp_path / "p10"), stdout=out)
    assert "val P@10" in out.getvalue() and "by val_precision_at_10" in out.getvalue()
    with pytest.raises(CommandError, match="applies to head-only"):
        call_command("train", "--dataset", "colours", "--arch", "tiny", "--select-by", "val_precision_at_10")
    with pytest.raises(CommandError, match="--arch is required"):
        call_command("train", "--dataset", "colours")
    with pytest.raises(CommandError, match="no pretrained weights"):
        call_command("train", "--dataset", "colours", "--head-only", "--arch", "autoencoder")

    form = TrainForm({"architecture": "efficientnet_lite0", "head_only": "on", "head": "mlp", "objective": "auto",
                      "epochs": 5, "batch_size": 64, "learning_rate": 1e-3, "embedding_dim": 128, "augment": "on",
                      "scheduler": "none", "early_stopping_patience": 3, "processes": 1,
                      "select_by": "val_precision_at_10"}, dataset=labelled)
    assert form.is_valid(), form.errors
    fields = form.config_fields()
    assert (fields["architecture"], fields["backbone"], fields["head"], fields["objective"], fields["augment"],
            fields["select_by"]) == ("head", "efficientnet_lite0", "mlp", "normalized_softmax", False,
                                     "val_precision_at_10")
    refused = TrainForm({"architecture": "tiny", "objective": "auto", "epochs": 5, "batch_size": 8,
                         "learning_rate": 1e-3, "scheduler": "none", "early_stopping_patience": 3, "processes": 1,
                         "select_by": "val_precision_at_10"}, dataset=labelled)
    assert not refused.is_valid() and "applies to head-only" in str(refused.errors["select_by"])


def test_a_head_only_training_job_caches_trains_and_publishes(labelled):
    from search.jobs import S
    from search.models import Job
    from training.train_job import run_training_job

    params = {"architecture": "head", "epochs": 2, "batch_size": 8, "learning_rate": 1e-2, "image_size": 32,
              "embedding_dim": 8}
    job = Job.objects.create(kind=Job.Kind.TRAIN, dataset=labelled, params=params)
    assert run_training_job(job.pk) == "done"
    job.refresh_from_db()
    assert job.status == S.SUCCEEDED, job.error
    assert job.model_version.name == "efficientnet_lite0-head-colours-ft-1"
    assert job.result["features"]["embedded"] == job.result["n_train"] + job.result["n_val"]
    assert Embedding.objects.filter(model_version=job.model_version).count() == labelled.images.count()
    assert 0 <= job.result["evaluation"]["precision_at_k"] <= 1


def test_a_run_does_not_resume_under_the_other_selection_rule(labelled, tmp_path):
    train(training_data(labelled), head_config(epochs=1), checkpoint_dir=tmp_path / "run")
    with pytest.raises(ValueError, match="select_by: checkpoint 'val_loss', now 'val_precision_at_10'"):
        train(training_data(labelled), head_config(epochs=2, select_by="val_precision_at_10"), checkpoint_dir=tmp_path / "run",
              resume=True)
    resumed = train(training_data(labelled), head_config(epochs=2), checkpoint_dir=tmp_path / "run", resume=True)
    assert resumed.resumed_from_epoch == 1 and len(resumed.history) == 2


def test_publishing_a_head_reuses_the_cached_backbone_features(labelled, tmp_path, settings):
    # The published version's metrics name the cache its training filled
    # (training.pipeline keeps result.features): indexing runs only the head over
    # those features, so the cached images' files are not even opened.
    import numpy as np

    from search.indexing import build_index
    from training.core.inference import embed_query
    from training.core.preprocessing import load_rgb

    config = head_config()
    result = train(training_data(labelled), config, checkpoint_dir=tmp_path / "run")
    version = create_version_from_checkpoint(config, result.best_path, labelled, result.history, result.seconds,
                                             extra_metrics={"features": result.features})
    cached = set(torch.load(result.features["path"], weights_only=True)["ids"].tolist())
    images = list(labelled.images.all())
    assert cached and len(cached) < len(images)  # the test split was not cached: it goes through the backbone
    expected = {image.pk: embed_query(version, load_rgb(image.file.path)) for image in images}
    for image in images:
        if image.pk in cached:
            image.file.storage.delete(image.file.name)

    report = build_index(labelled, version)
    assert report.failed == [] and report.embedded == len(images)
    for embedding in Embedding.objects.filter(model_version=version):
        stored = np.asarray(embedding.vector, dtype=np.float32)
        assert float(stored @ expected[embedding.image_id]) > 0.999, embedding.image_id
    # An image whose content changed since the features were cached is not taken from the cache.
    from training.core.inference import embed_from_feature_cache

    some = next(iter(cached))
    sha = Image.objects.get(pk=some).sha256
    assert embed_from_feature_cache(version, [(some, sha)])[0] == [0]
    assert embed_from_feature_cache(version, [(some, "0" * 64)])[0] == []
