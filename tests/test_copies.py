"""Modified copies for copy detection: deterministic, real, and as documented."""

import random

import numpy as np
import pytest
from PIL import Image, ImageOps

from training.evaluation.copies import KINDS, generate_queries, make_copy

SIZE = 64


def noise_image(seed: int, size: tuple[int, int] = (SIZE, SIZE)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


@pytest.fixture
def items(tmp_path):
    paths = []
    for i in range(6):
        path = tmp_path / f"image{i}.png"
        noise_image(i).save(path)
        paths.append((i, path))
    return paths


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def query_key(query):
    return query.original_id, query.kind


def test_same_seed_gives_byte_identical_queries(items):
    first = list(generate_queries(items, per_kind=3, seed=7))
    second = list(generate_queries(items, per_kind=3, seed=7))
    assert [query_key(q) for q in first] == [query_key(q) for q in second]
    assert len(first) == 3 * len(KINDS)
    for a, b in zip(first, second):
        assert np.array_equal(as_array(a.image), as_array(b.image))


def test_different_seed_gives_different_queries(items):
    first = list(generate_queries(items, per_kind=3, seed=7))
    second = list(generate_queries(items, per_kind=3, seed=8))
    assert any(
        query_key(a) != query_key(b) or not np.array_equal(as_array(a.image), as_array(b.image))
        for a, b in zip(first, second)
    )


def test_a_query_does_not_depend_on_the_kinds_subset_or_item_order(items):
    everything = {(q.original_id, q.kind): q for q in generate_queries(items, per_kind=4, seed=3)}
    rotations = list(generate_queries(items[::-1], kinds=("rotate", "crop"), per_kind=4, seed=3))
    assert len(rotations) == 8
    for query in rotations:
        assert np.array_equal(as_array(query.image), as_array(everything[query_key(query)].image))


def test_every_kind_uses_the_same_distinct_originals(items):
    queries = list(generate_queries(items, per_kind=4, seed=1))
    by_kind = {kind: [q.original_id for q in queries if q.kind == kind] for kind in KINDS}
    originals = by_kind["crop"]
    assert len(set(originals)) == 4
    assert all(ids == originals for ids in by_kind.values())


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_makes_a_real_rgb_change_and_leaves_the_input_alone(kind):
    original = noise_image(0)
    before = as_array(original).copy()
    copy = make_copy(original, kind, random.Random(0))
    assert copy.mode == "RGB"
    assert np.array_equal(as_array(original), before)
    if copy.size == original.size:
        assert not np.array_equal(as_array(copy), before)
    # Same rng seed, same copy.
    assert np.array_equal(as_array(copy), as_array(make_copy(original, kind, random.Random(0))))


def test_crop_keeps_70_to_90_percent_of_the_area_as_a_window_of_the_original():
    original = noise_image(1)
    pixels = as_array(original)
    for seed in range(20):
        copy = make_copy(original, "crop", random.Random(seed))
        w, h = copy.size
        assert 0.70 <= w * h / (SIZE * SIZE) <= 0.90
        window = as_array(copy)
        assert any(
            np.array_equal(pixels[top:top + h, left:left + w], window)
            for top in range(SIZE - h + 1)
            for left in range(SIZE - w + 1)
        )


def test_resize_scales_both_sides_by_30_to_70_percent():
    original = noise_image(2, size=(100, 50))
    sizes = set()
    for seed in range(20):
        w, h = make_copy(original, "resize", random.Random(seed)).size
        assert 30 <= w <= 70
        assert abs(h - w / 2) <= 1  # aspect ratio kept
        sizes.add(w)
    assert len(sizes) > 1


def test_jpeg_and_rotate_keep_the_size():
    original = noise_image(3)
    assert make_copy(original, "jpeg", random.Random(0)).size == original.size
    rotated = make_copy(original, "rotate", random.Random(0))
    assert rotated.size == original.size
    pixels = as_array(rotated)
    for corner in (pixels[0, 0], pixels[0, -1], pixels[-1, 0], pixels[-1, -1]):
        assert tuple(corner) == (255, 255, 255)


def test_brightness_contrast_factors_are_in_the_documented_ranges():
    # On a uniform image the contrast step leaves the value alone, so the
    # value shows the brightness factor.
    grey = Image.new("RGB", (16, 16), (100, 100, 100))
    for seed in range(20):
        value = int(as_array(make_copy(grey, "brightness_contrast", random.Random(seed)))[0, 0, 0])
        factor = value / 100
        assert 0.59 <= factor <= 0.81 or 1.19 <= factor <= 1.41


def test_flip_is_a_horizontal_mirror():
    original = noise_image(4)
    assert np.array_equal(as_array(make_copy(original, "flip", random.Random(0))), as_array(ImageOps.mirror(original)))


def test_grayscale_has_equal_channels():
    pixels = as_array(make_copy(noise_image(5), "grayscale", random.Random(0)))
    assert np.array_equal(pixels[..., 0], pixels[..., 1])
    assert np.array_equal(pixels[..., 1], pixels[..., 2])


def test_overlay_changes_part_of_the_image_only():
    original = noise_image(6)
    changed = np.any(as_array(make_copy(original, "overlay", random.Random(0))) != as_array(original), axis=2)
    assert 0 < changed.mean() < 0.5


def test_non_rgb_input_gives_rgb_output():
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 128))
    assert make_copy(rgba, "flip", random.Random(0)).mode == "RGB"


def test_unknown_kind_raises_with_the_known_kinds(items):
    with pytest.raises(ValueError, match="known kinds: crop, resize"):
        make_copy(noise_image(0), "blur", random.Random(0))
    # Checked when called, before anything is iterated.
    with pytest.raises(ValueError, match="blur"):
        generate_queries(items, kinds=("flip", "blur"), per_kind=1, seed=0)


def test_more_originals_than_items_raises(items):
    with pytest.raises(ValueError, match="per_kind"):
        generate_queries(items, per_kind=len(items) + 1, seed=0)
