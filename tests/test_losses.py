"""Metric-learning losses against naive per-pair / per-triplet loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from training.core.losses import contrastive_loss, pairwise_distances, triplet_loss


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b)))


def naive_contrastive(a, b, same, margin):
    total = 0.0
    for i in range(a.shape[0]):
        d = distance(a[i], b[i])
        total += d**2 if same[i] else max(0.0, margin - d) ** 2
    return total / a.shape[0]


def naive_triplet(embeddings, labels, margin, mining):
    n = embeddings.shape[0]
    d = [[distance(embeddings[i], embeddings[j]) for j in range(n)] for i in range(n)]
    terms = []
    for a in range(n):
        positives = [p for p in range(n) if p != a and labels[p] == labels[a]]
        negatives = [q for q in range(n) if labels[q] != labels[a]]
        if mining == "batch_hard":
            if positives and negatives:
                terms.append(max(0.0, margin + max(d[a][p] for p in positives) - min(d[a][q] for q in negatives)))
        else:
            terms += [max(0.0, margin + d[a][p] - d[a][q]) for p in positives for q in negatives]
    return sum(terms) / len(terms)


def test_contrastive_loss_matches_a_per_pair_loop():
    generator = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(20, 8, generator=generator), dim=1)
    b = F.normalize(torch.randn(20, 8, generator=generator), dim=1)
    b[:3] = a[:3]  # identical pairs: distance 0
    same = torch.rand(20, generator=generator) > 0.5
    for margin in (0.5, 1.5):
        expected = naive_contrastive(a, b, same.tolist(), margin)
        torch.testing.assert_close(contrastive_loss(a, b, same, margin=margin), torch.tensor(expected))
        torch.testing.assert_close(contrastive_loss(a, b, same.float(), margin=margin), torch.tensor(expected))


def test_contrastive_loss_has_finite_gradients_for_identical_embeddings():
    a = F.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    loss = contrastive_loss(a, a.detach().clone(), torch.tensor([True, False, True, False]))
    loss.backward()
    assert torch.isfinite(a.grad).all()


@pytest.mark.parametrize("mining", ["batch_hard", "batch_all"])
def test_triplet_loss_matches_a_per_triplet_loop(mining):
    generator = torch.Generator().manual_seed(1)
    embeddings = F.normalize(torch.randn(12, 6, generator=generator), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4])  # class 4 has no positive
    for margin in (0.2, 1.0):
        expected = naive_triplet(embeddings, labels.tolist(), margin, mining)
        torch.testing.assert_close(triplet_loss(embeddings, labels, margin=margin, mining=mining),
                                   torch.tensor(expected))


def test_triplet_loss_is_zero_and_differentiable_without_valid_triplets():
    embeddings = torch.randn(3, 4, requires_grad=True)
    loss = triplet_loss(embeddings, torch.tensor([0, 1, 2]))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.isfinite(embeddings.grad).all()


def test_triplet_loss_rejects_unknown_mining():
    with pytest.raises(ValueError, match="mining"):
        triplet_loss(torch.randn(4, 2), torch.tensor([0, 0, 1, 1]), mining="semi_hard")


def test_pairwise_distances_match_cdist():
    x = torch.randn(7, 5)
    torch.testing.assert_close(pairwise_distances(x), torch.cdist(x, x), atol=1e-5, rtol=1e-5)
