"""The data stage's executions use all their lanes from the start (``pipeline.PromptScheduling``),
whether the driver runs them or Ray Train's split coordinator does."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import ray

from raypipe.config import load_config
from raypipe.data import pipeline

TASK_S = 1.0


def _task_starts(prompt: bool, consumer: str) -> list[float]:
    """Start times of the 4 one-block tasks of a 2-lane task pool, from the first's."""

    def _slow(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # a closure: sent by value
        start = time.time()
        time.sleep(TASK_S)
        n = len(batch["id"])
        return {"start": np.full(n, start), "pid": np.full(n, os.getpid())}

    ds = ray.data.from_items([{"id": i} for i in range(4)], override_num_blocks=4)
    if prompt:
        ds = pipeline._bounded(ds, load_config(None, []))
    ds = ds.map_batches(_slow, batch_size=None, num_cpus=1,
                        compute=ray.data.TaskPoolStrategy(size=2))
    if consumer == "driver":
        rows = list(ds.iter_rows())
    else:  # as Ray Train consumes it: the execution runs in the split coordinator actor
        (split,) = ds.streaming_split(1)
        rows = list(split.iter_rows())
    starts = sorted({float(r["start"]) for r in rows})
    assert len(starts) == 4, rows
    return [s - starts[0] for s in starts]


@pytest.mark.parametrize("consumer", ["driver", "split"])
def test_both_lanes_start_together(ray_cluster, consumer: str) -> None:
    _task_starts(True, consumer)  # Ray Data's cluster-wide actors and both lanes' processes up
    assert pipeline.PromptScheduling in pipeline._bounded(
        ray.data.range(1), load_config(None, [])).context.custom_execution_callback_classes

    prompt = _task_starts(True, consumer)
    # both lanes at once, and each next task sent as soon as a lane is free
    assert prompt[1] < 0.5 * TASK_S, prompt
    assert prompt[3] < 1.5 * TASK_S, prompt

    # without it, Ray Data runs one task at a time until a task ends or its resource limits,
    # kept for 1 s from the execution's start, are asked for again
    plain = _task_starts(False, consumer)
    assert plain[1] > 0.6 * TASK_S, plain


def test_the_ray_internals_it_adjusts_exist(ray_cluster) -> None:
    """A Ray upgrade that renames them fails here, not silently in every short epoch."""
    from ray.data._internal.execution import resource_manager, streaming_executor_state

    assert isinstance(streaming_executor_state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S, (int, float))
    manager = resource_manager.ResourceManager
    assert hasattr(manager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S")
    ds = pipeline._bounded(ray.data.range(8, override_num_blocks=2), load_config(None, []))
    ds.materialize()
    assert streaming_executor_state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S == pipeline.TASK_WAIT_S
