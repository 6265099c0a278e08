"""training.core.data.read_ahead: the next item is made in a thread while the
caller works on this one; order, errors and an early stop behave as a plain loop."""

import threading
import time

import pytest

from training.core.data import read_ahead


def test_items_come_in_order_and_depth_zero_is_a_plain_loop():
    assert list(read_ahead(iter(range(50)))) == list(range(50))
    assert list(read_ahead(range(5), depth=0)) == [0, 1, 2, 3, 4]
    assert list(read_ahead(iter([]))) == []


def test_the_next_item_is_made_while_the_caller_works():
    made = []

    def slow():
        for i in range(3):
            time.sleep(0.2)
            made.append((i, threading.current_thread().name))
            yield i

    start = time.perf_counter()
    for _ in read_ahead(slow()):
        time.sleep(0.2)  # the caller's work on this item
    elapsed = time.perf_counter() - start
    assert all(name == "cbir-read-ahead" for _, name in made)
    assert elapsed < 1.1  # 3 × (0.2 + 0.2) = 1.2 s in a plain loop


def test_an_error_of_the_iterable_is_raised_at_its_place():
    def failing():
        yield 1
        raise OSError("disk gone")

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for item in read_ahead(failing()):
            got.append(item)
    assert got == [1]


def test_stopping_early_leaves_no_thread_behind():
    before = threading.active_count()
    for item in read_ahead(iter(range(1000))):
        if item == 3:
            break
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before
