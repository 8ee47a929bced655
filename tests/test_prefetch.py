"""A block already in the consumer's prefetch window is handed over at once
(``pipeline.prefetch_ready_blocks``), not after the block behind it arrives."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import ray
from conftest import wait_for_full_share
from ray.data._internal.block_batching import iter_batches as ray_iter_batches

from raypipe.data import pipeline

SLOW_S = 1.5
ROWS = 4  # per block


@pytest.fixture
def ray_window(monkeypatch):
    """Ray Data's own window in this process for the test (``torch_batches`` installs the
    prompt one for good), put back as the test found it afterwards."""
    monkeypatch.setattr(ray_iter_batches, "prefetch_batches_locally", pipeline._ray_prefetch)


def _dataset(blocks: int = 2, fail_block: int | None = None) -> ray.data.Dataset:
    """``blocks`` blocks of ``ROWS`` ids; the first is ready at once, every other after SLOW_S."""

    def _work(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # a closure: sent by value
        block = int(batch["id"][0]) // ROWS
        if block == fail_block:
            raise ValueError(f"bad block {block}")
        if block:
            time.sleep(SLOW_S)
        return {"id": batch["id"], "image": np.zeros((len(batch["id"]), 1), np.float32)}

    return ray.data.range(blocks * ROWS, override_num_blocks=blocks).map_batches(
        _work, batch_size=None, num_cpus=1, compute=ray.data.TaskPoolStrategy(size=1))


def _first_batch_s(batches) -> tuple[float, list[int]]:
    t0, first, ids = time.perf_counter(), None, []
    for b in batches:
        if first is None:
            first = time.perf_counter() - t0
        ids += [int(i) for i in b["id"]]
    return first, ids


def test_the_first_block_is_yielded_before_the_next_one_arrives(ray_cluster, ray_window) -> None:
    wait_for_full_share()
    _first_batch_s(_dataset(1).iter_torch_batches(batch_size=ROWS))  # lane process up

    # Ray's window (2 batches of 4 rows) waits for a second block before it yields the first
    plain, plain_ids = _first_batch_s(
        _dataset().iter_torch_batches(batch_size=ROWS, prefetch_batches=2))
    assert plain > SLOW_S * 0.9, plain

    prompt, prompt_ids = _first_batch_s(
        pipeline.torch_batches(_dataset(), batch_size=ROWS, prefetch_batches=2))
    assert prompt < SLOW_S * 0.5, prompt
    # every row once (which of two executions' blocks comes first is Ray Data's to choose)
    assert sorted(prompt_ids) == sorted(plain_ids) == list(range(2 * ROWS))


def test_rows_are_the_same_whatever_the_batch_and_window_sizes(ray_cluster, ray_window) -> None:
    pipeline.install_prompt_prefetch()
    for batch_size, window in [(3, 1), (5, 2), (ROWS * 3, 4), (7, 0)]:
        ds = ray.data.range(40, override_num_blocks=6)
        batches = list(pipeline.torch_batches(ds, batch_size=batch_size, prefetch_batches=window))
        ids = [int(i) for b in batches for i in b["id"]]
        assert sorted(ids) == list(range(40)), (batch_size, window)
        assert all(len(b["id"]) == batch_size for b in batches[:-1]), (batch_size, window)


def test_an_error_in_the_stage_reaches_the_consumer(ray_cluster, ray_window) -> None:
    with pytest.raises(Exception, match="bad block 1"):
        _first_batch_s(pipeline.torch_batches(_dataset(3, fail_block=1), batch_size=ROWS,
                                              prefetch_batches=2))


def test_a_consumer_that_stops_early_leaves_no_thread_behind(ray_cluster, ray_window) -> None:
    batches = pipeline.torch_batches(_dataset(4), batch_size=ROWS, prefetch_batches=2)
    for _ in batches:
        break
    del batches
    deadline = time.monotonic() + 3 * SLOW_S
    while time.monotonic() < deadline and any(
            t.name == "raypipe-prefetch" for t in threading.enumerate()):
        time.sleep(0.05)
    assert not [t for t in threading.enumerate() if t.name == "raypipe-prefetch"]


def test_it_replaces_this_rays_window(ray_window) -> None:
    """A Ray upgrade that renames or reshapes the window fails here, not silently."""
    assert pipeline.install_prompt_prefetch()
    assert ray_iter_batches.prefetch_batches_locally is pipeline.prefetch_ready_blocks
    assert pipeline.install_prompt_prefetch()  # a second time changes nothing
    assert ray_iter_batches.prefetch_batches_locally is pipeline.prefetch_ready_blocks
