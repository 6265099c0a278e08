"""PK batches and contrastive pairs."""

from collections import Counter

import pytest

from training.core.samplers import PKSampler, make_augmented_pairs, make_pairs

# 5 classes of varied sizes, one singleton class "e", two unlabelled items.
LABELS = ["a"] * 7 + ["b"] * 3 + ["c"] * 5 + ["d"] * 2 + ["e"] + [None, -1] + ["c"] * 4


def test_pk_batches_hold_exactly_p_classes_of_k_images():
    sampler = PKSampler(LABELS, p=3, k=4, seed=0, batches_per_epoch=20)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 20
    for batch in batches:
        counts = Counter(LABELS[i] for i in batch)
        assert len(counts) == 3 and set(counts.values()) == {4}
        assert None not in counts and -1 not in counts and "e" not in counts  # unlabelled and singletons skipped


def test_pk_batches_use_every_image_of_a_small_class():
    sampler = PKSampler(LABELS, p=4, k=4, seed=3, batches_per_epoch=5)
    d_images = {i for i, label in enumerate(LABELS) if label == "d"}
    for batch in sampler:  # with 4 of 4 eligible classes, "d" (2 images) is in every batch
        assert {i for i in batch if LABELS[i] == "d"} == d_images


def test_pk_sampler_is_deterministic_for_a_seed_and_epoch():
    first, second = PKSampler(LABELS, p=2, k=3, seed=7), PKSampler(LABELS, p=2, k=3, seed=7)
    assert list(first) == list(second)
    epoch_0 = list(first)
    first.set_epoch(1)
    assert list(first) != epoch_0
    assert list(PKSampler(LABELS, p=2, k=3, seed=8)) != epoch_0
    assert len(first) == 21 // 6  # eligible images (a 7, b 3, c 9, d 2) // (P*K)


def test_pk_sampler_needs_p_classes_with_two_images():
    with pytest.raises(ValueError, match="only 4 classes"):
        PKSampler(LABELS, p=5, k=2)


def test_make_pairs_is_balanced_and_correct():
    pairs = make_pairs(LABELS, n_pairs=101, seed=0)
    assert len(pairs) == 101
    positives = [(i, j) for i, j, same in pairs if same]
    assert len(positives) == round(101 * 0.5)
    for i, j, same in pairs:
        assert LABELS[i] not in (None, -1) and LABELS[j] not in (None, -1)
        assert (LABELS[i] == LABELS[j]) is same
        if same:
            assert i != j
    assert make_pairs(LABELS, 101, seed=0) == pairs
    assert make_pairs(LABELS, 101, seed=1) != pairs
    assert sum(same for *_, same in make_pairs(LABELS, 40, seed=0, positive_fraction=0.25)) == 10


def test_make_pairs_explains_impossible_requests():
    with pytest.raises(ValueError, match="two images"):
        make_pairs(["a", "b", "c"], 4)
    with pytest.raises(ValueError, match="two classes"):
        make_pairs(["a", "a"], 4)


def test_make_augmented_pairs_pairs_an_image_with_itself_for_positives():
    pairs = make_augmented_pairs(10, seed=0, n_pairs=30)
    assert len(pairs) == 30 and sum(same for *_, same in pairs) == 15
    for i, j, same in pairs:
        assert 0 <= i < 10 and 0 <= j < 10
        assert (i == j) is same
    assert make_augmented_pairs(10, seed=0, n_pairs=30) == pairs
    assert len(make_augmented_pairs(10, seed=0)) == 10
