"""Datasets, objectives and the training loop on a tiny synthetic image set."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from training.core.data import ImageListDataset, PairDataset, UnreadableImage, build_augmentation
from training.core.loop import (
    NonFiniteLoss,
    evaluate,
    fit,
    load_checkpoint,
    save_checkpoint,
    train_one_epoch,
)
from training.core.networks.registry import build_network
from training.core.objectives import (
    ClassificationObjective,
    ContrastiveObjective,
    ReconstructionObjective,
    TripletObjective,
)
from training.core.precision import mixed_precision
from training.core.preprocessing import Preprocessing
from training.core.samplers import PKSampler, make_augmented_pairs, make_pairs

CPU = torch.device("cpu")
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


def square_images(folder, per_class: int, seed: int) -> list[tuple[str, str]]:
    """32x32 PNGs: a coloured square of random size and place on a noisy grey background."""
    rng = np.random.default_rng(seed)
    items = []
    for label, colour in COLOURS.items():
        for n in range(per_class):
            pixels = rng.integers(100, 156, size=(32, 32, 3)).astype(np.uint8)
            side = int(rng.integers(10, 20))
            top, left = rng.integers(0, 32 - side, size=2)
            pixels[top:top + side, left:left + side] = colour
            path = folder / f"{label}-{seed}-{n}.png"
            Image.fromarray(pixels).save(path)
            items.append((str(path), label))
    return items


@pytest.fixture
def squares(tmp_path):
    return square_images(tmp_path, per_class=12, seed=0), square_images(tmp_path, per_class=4, seed=1)


def test_image_list_dataset_gives_tensors_and_class_indices(squares, tmp_path):
    train, _ = squares
    dataset = ImageListDataset(train + [(train[0][0], None)], Preprocessing(size=32))
    assert dataset.label_to_index == {"blue": 0, "red": 1}
    image, label = dataset[0]
    assert image.shape == (3, 32, 32) and label == 1
    assert dataset[len(dataset) - 1][1] == -1  # unlabelled
    with pytest.raises(ValueError, match="green"):
        ImageListDataset([(train[0][0], "green")], Preprocessing(size=32), label_to_index=dataset.label_to_index)


def test_augmentation_keeps_the_model_input_shape(squares):
    train, _ = squares
    preprocessing = Preprocessing(size=32, grayscale=True)
    dataset = ImageListDataset(train, preprocessing, augment=True)
    assert dataset[0][0].shape == (1, 32, 32)
    assert build_augmentation(preprocessing)(Image.new("RGB", (50, 70))).size == (32, 32)


def test_an_unreadable_file_raises_an_error_naming_it(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(UnreadableImage, match="broken.jpg"):
        ImageListDataset([(str(broken), "x")], Preprocessing(size=32))[0]


def test_pair_dataset_gives_two_views_and_a_flag(squares):
    train, _ = squares
    pairs = make_pairs([label for _, label in train], n_pairs=4, seed=0)
    x1, x2, same = PairDataset(train, pairs, Preprocessing(size=32))[0]
    assert x1.shape == x2.shape == (3, 32, 32) and same.dtype == torch.float32 and float(same) == pairs[0][2]
    with pytest.raises(ValueError, match="augment=True"):
        PairDataset(train, [(0, 0, True)], Preprocessing(size=32))
    x1, x2, same = PairDataset(train, [(3, 3, True)], Preprocessing(size=32), augment=True)[0]
    assert float(same) == 1.0 and not torch.equal(x1, x2)


def test_autoencoder_training_lowers_validation_loss_and_keeps_the_best_checkpoint(squares, tmp_path):
    train, val = squares
    torch.manual_seed(0)
    model = build_network("autoencoder", weights="random", size=32, dimension=16, width=8)
    objective = ReconstructionObjective()
    train_loader = DataLoader(ImageListDataset(train, model.preprocessing), batch_size=4, shuffle=True)
    val_loader = DataLoader(ImageListDataset(val, model.preprocessing), batch_size=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    initial = evaluate(model, objective, val_loader, CPU)
    progress = []
    history = fit(model, objective, optimizer, train_loader, val_loader, CPU, epochs=2,
                  checkpoint_dir=tmp_path / "run", config={"architecture": "autoencoder", **model.config},
                  on_batch=lambda i, n, loss: progress.append((i, n)))
    assert [entry["epoch"] for entry in history] == [1, 2]
    assert progress[-1] == (5, 6) and len(progress) == 12
    best = min(entry["val_loss"] for entry in history)
    assert best < initial
    assert history[0]["best"] and history[1]["best"] == (history[1]["val_loss"] < history[0]["val_loss"])

    restored = build_network("autoencoder", weights="random", size=32, dimension=16, width=8)
    checkpoint = load_checkpoint(tmp_path / "run" / "best.pt", restored)
    assert checkpoint["best_val_loss"] == best
    assert checkpoint["epoch"] == 1 + [entry["val_loss"] for entry in history].index(best)
    assert evaluate(restored, objective, val_loader, CPU) == pytest.approx(best, rel=1e-5)
    assert load_checkpoint(tmp_path / "run" / "last.pt", restored)["epoch"] == 2
    assert sorted(os.listdir(tmp_path / "run")) == ["best.pt", "last.pt"]  # no temporary files left


def test_classification_training_lowers_validation_loss(squares):
    train, val = squares
    torch.manual_seed(0)
    model = build_network("tiny", weights="random", size=32, dimension=8)
    train_set = ImageListDataset(train, model.preprocessing)
    objective = ClassificationObjective(model, num_classes=len(train_set.label_to_index))
    val_loader = DataLoader(ImageListDataset(val, model.preprocessing, label_to_index=train_set.label_to_index),
                            batch_size=8)
    train_loader = DataLoader(train_set, batch_size=4, shuffle=True)
    optimizer = torch.optim.Adam([*model.parameters(), *objective.parameters()], lr=1e-2)
    initial = evaluate(model, objective, val_loader, CPU)
    for _ in range(2):
        train_one_epoch(model, objective, optimizer, train_loader, CPU)
    assert evaluate(model, objective, val_loader, CPU) < initial


def test_triplet_and_contrastive_objectives_take_a_training_step(squares):
    train, _ = squares
    torch.manual_seed(0)
    model = build_network("siamese", weights="random", size=32, dimension=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    dataset = ImageListDataset(train, model.preprocessing)
    triplet_loader = DataLoader(dataset, batch_sampler=PKSampler(dataset.labels, p=2, k=4, seed=0))
    assert train_one_epoch(model, TripletObjective(margin=0.2), optimizer, triplet_loader, CPU) > 0
    pairs = PairDataset(train, make_augmented_pairs(len(train), seed=0, n_pairs=8), model.preprocessing, augment=True)
    loss = train_one_epoch(model, ContrastiveObjective(margin=0.5), optimizer, DataLoader(pairs, batch_size=4), CPU)
    assert np.isfinite(loss)


def test_triplet_objective_refuses_unlabelled_images():
    model = build_network("tiny", weights="random")
    with pytest.raises(ValueError, match="labelled"):
        TripletObjective()(model, (torch.randn(4, 3, 32, 32), torch.tensor([0, 0, -1, 1])), CPU)


def test_checkpoint_round_trip_restores_everything(tmp_path):
    torch.manual_seed(0)
    model = build_network("tiny", weights="random", seed=1)
    objective = ClassificationObjective(model, num_classes=3)
    optimizer = torch.optim.Adam([*model.parameters(), *objective.parameters()], lr=1e-3)
    batch = (torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2]))
    train_one_epoch(model, objective, optimizer, [batch], CPU)  # gives the optimizer some state
    config = {"architecture": "tiny", "lr": 1e-3, "sizes": [32, 32]}
    history = [{"epoch": 1, "train_loss": 1.5, "val_loss": 1.25, "best": True}]
    save_checkpoint(tmp_path / "c.pt", model, optimizer, 3, config, 1.25, history, objective=objective)

    other = build_network("tiny", weights="random", seed=2)
    other_objective = ClassificationObjective(other, num_classes=3)
    other_optimizer = torch.optim.Adam([*other.parameters(), *other_objective.parameters()], lr=5.0)
    checkpoint = load_checkpoint(tmp_path / "c.pt", other, other_optimizer, objective=other_objective)

    assert (checkpoint["epoch"], checkpoint["config"], checkpoint["history"]) == (3, config, history)
    assert checkpoint["best_val_loss"] == 1.25
    for mine, theirs in ((model, other), (objective, other_objective)):
        for (name, a), (_, b) in zip(mine.state_dict().items(), theirs.state_dict().items()):
            assert torch.equal(a, b), name
    expected, restored = optimizer.state_dict(), other_optimizer.state_dict()
    assert expected["param_groups"] == restored["param_groups"]
    assert expected["state"].keys() == restored["state"].keys()
    for key, state in expected["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(restored["state"][key][name])), name


def test_the_gradient_scaler_path_steps_the_optimizer():
    # Off CUDA no autocast happens, but the GradScaler branch (used with float16 on GPUs) still runs.
    assert mixed_precision(CPU) == (None, None)
    torch.manual_seed(0)
    model = build_network("tiny", weights="random")
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = (torch.randn(4, 3, 32, 32), torch.tensor([0, 0, 1, 1]))
    train_one_epoch(model, TripletObjective(), optimizer, [batch], CPU, scaler=torch.amp.GradScaler("cpu"),
                    autocast_dtype=torch.float16)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_non_finite_loss_stops_training():
    model = build_network("tiny", weights="random")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NonFiniteLoss, match="batch 1 of 1"):
        train_one_epoch(model, lambda m, b, d: m(b).sum() * float("nan"), optimizer, [torch.randn(2, 3, 32, 32)], CPU)


def _scripted_fit(tmp_path, name, losses, precisions=None):
    """fit() on a one-weight model whose validation loss (and P@10) are scripted per epoch."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    x = torch.randn(8, 2)

    def loss_fn(m, batch, device):
        return m(batch[0]).pow(2).mean()

    loader = DataLoader(torch.utils.data.TensorDataset(x), batch_size=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    epoch_losses, epoch_precisions = iter(losses), iter(precisions or [])
    return fit(model, loss_fn, optimizer, loader, None, CPU, epochs=len(losses), checkpoint_dir=tmp_path / name,
               config={}, validate=lambda: next(epoch_losses),
               val_precision=(lambda: next(epoch_precisions)) if precisions else None)


def test_fit_keeps_the_lowest_validation_loss_or_with_val_precision_the_best_retrieval(tmp_path):
    from training.core.loop import VAL_PRECISION, best_epoch

    losses = [1.0, 0.5, 0.7, 0.6]
    by_loss = _scripted_fit(tmp_path, "loss", losses)
    assert [h["best"] for h in by_loss] == [True, True, False, False]
    assert VAL_PRECISION not in by_loss[0] and best_epoch(by_loss) == (2, 0.5)
    assert torch.load(tmp_path / "loss" / "best.pt", weights_only=True)["epoch"] == 2

    # The loss's epoch (2) is not the one that retrieves best (3): with val_precision, 3 is kept.
    by_p10 = _scripted_fit(tmp_path, "p10", losses, precisions=[0.2, 0.3, 0.9, 0.9])
    assert [h[VAL_PRECISION] for h in by_p10] == [0.2, 0.3, 0.9, 0.9]
    assert [h["best"] for h in by_p10] == [True, True, True, False]  # ties keep the earlier epoch
    assert best_epoch(by_p10) == (3, 0.7)
    checkpoint = torch.load(tmp_path / "p10" / "best.pt", weights_only=True)
    assert checkpoint["epoch"] == 3 and checkpoint["best_val_loss"] == 0.7
    last = torch.load(tmp_path / "p10" / "last.pt", weights_only=True)
    assert last["epoch"] == 4 and last["best_val_loss"] == 0.7

    # An epoch whose P@10 or loss is not finite is never kept.
    nan = float("nan")
    assert best_epoch([{"epoch": 1, "val_loss": 0.4, VAL_PRECISION: nan},
                       {"epoch": 2, "val_loss": nan, VAL_PRECISION: 0.9},
                       {"epoch": 3, "val_loss": 0.8, VAL_PRECISION: 0.1}]) == (3, 0.8)
    assert best_epoch([{"epoch": 1, "val_loss": nan, VAL_PRECISION: 0.5}])[0] == 0
