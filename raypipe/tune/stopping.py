"""Early stopping that ends a trial's training run cleanly.

When a Tune scheduler stops a trial, Tune ends the trial's actor; the ``TorchTrainer`` running
inside it loses its controller abruptly, and its workers' placement group and data actors can
outlive it (Ray Train's own clean-up needs the dashboard's state API), starving the next trials.

So the scheduler here never stops a trial itself. :class:`BoardedASHA` takes ASHA's decision for
each reported epoch and posts it on a :class:`DecisionBoard`; inside the trainer,
:class:`ScheduledStopCallback` reads the decision for the epoch just reported and, on "stop",
raises :class:`ScheduledStop`, which ends the run through Ray Train's ordinary failure path
(workers shut down, placement group removed). The trial function then returns normally.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
from ray.train.v2.api.callback import UserCallback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

log = logging.getLogger(__name__)

STOP, CONTINUE = "stop", "continue"
MARKER = "stopped by the search scheduler"


class ScheduledStop(RuntimeError):
    """Raised inside the trainer to end a run the search scheduler has stopped."""


@ray.remote(num_cpus=0)
class DecisionBoard:
    """The scheduler's decision for each (trial id, epoch)."""

    def __init__(self) -> None:
        self.decisions: dict[tuple[str, int], str] = {}

    def post(self, trial_id: str, epoch: int, decision: str) -> None:
        self.decisions[(trial_id, int(epoch))] = decision

    def get(self, trial_id: str, epoch: int) -> str | None:
        return self.decisions.get((trial_id, int(epoch)))


_HELD: dict[str, Any] = {}


def board(name: str):
    """The search's :class:`DecisionBoard`, created on first use. Looked up by name, never held in
    pickled state, so a restored search gets a live one. The handle is kept for the life of the
    process: an actor whose last handle goes away is destroyed, named or not."""
    if name not in _HELD:
        _HELD[name] = DecisionBoard.options(name=name, get_if_exists=True).remote()
    return _HELD[name]


class BoardedASHA(ASHAScheduler):
    """ASHA whose decisions are posted on a :class:`DecisionBoard` instead of carried out by Tune."""

    def __init__(self, board_name: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.board_name = board_name
        self.stopped: set[str] = set()

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if "epoch" in result:
            posted = STOP if decision == TrialScheduler.STOP else CONTINUE
            if posted == STOP:
                self.stopped.add(trial.trial_id)
            board(self.board_name).post.remote(trial.trial_id, int(result["epoch"]), posted)
        # the trial ends itself (see the module docstring); Tune must not end its actor
        return TrialScheduler.CONTINUE


class ScheduledStopCallback(UserCallback):
    """Runs in the Ray Train controller after each report: waits for the scheduler's decision on
    that epoch and raises :class:`ScheduledStop` when it is "stop"."""

    def __init__(self, board_name: str, trial_id: str, last_epoch: int, timeout_s: float = 120.0):
        self.board_name = board_name
        self.trial_id = trial_id
        self.last_epoch = last_epoch
        self.timeout_s = timeout_s

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        epoch = metrics[0].get("epoch") if metrics else None
        if epoch is None or int(epoch) >= self.last_epoch:
            return  # the last epoch: the run ends by itself
        deadline = time.monotonic() + self.timeout_s
        decision, decisions = None, board(self.board_name)
        while decision is None and time.monotonic() < deadline:
            decision = ray.get(decisions.get.remote(self.trial_id, int(epoch)))
            if decision is None:
                time.sleep(0.2)
        if decision is None:
            log.warning("no scheduler decision for trial %s epoch %s within %.0f s; continuing",
                        self.trial_id, epoch, self.timeout_s)
        if decision == STOP:
            raise ScheduledStop(
                f"trial {self.trial_id} {MARKER} after epoch {epoch}")


def is_scheduled_stop(exc: BaseException) -> bool:
    """Whether ``exc`` (or anything in its cause chain) is a :class:`ScheduledStop`."""
    seen, todo = set(), [exc]
    while todo:
        cur = todo.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, ScheduledStop) or MARKER in str(cur):
            return True
        # Ray Train wraps a callback's exception as ControllerError(controller_failure)
        todo += [cur.__cause__, cur.__context__, getattr(cur, "controller_failure", None)]
    return False
