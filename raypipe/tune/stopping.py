"""Early stopping that ends a trial's training run cleanly, before it trains on.

When a Tune scheduler stops a trial, Tune ends the trial's actor; the ``TorchTrainer`` running
inside it loses its controller abruptly, and its workers' placement group and data actors can
outlive it (Ray Train's own clean-up needs the dashboard's state API), starving the next trials.

So the scheduler here never stops a trial itself. :class:`BoardedASHA` takes ASHA's decision for
each reported epoch and posts it on a :class:`DecisionBoard`. The training workers hold a
:class:`StopGate`: after reporting an epoch, rank 0 waits for the decision on it and every
worker follows, either into the next epoch or out of the loop, so the run ends as a finished one
(workers shut down, placement group removed) and a stopped trial never trains past the epoch it
was stopped at. Workers do not wait on Ray Train's controller after a report; a check there
(after the report reaches the driver) would let them train an epoch or more past the stop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

log = logging.getLogger(__name__)

STOP, CONTINUE = "stop", "continue"


@ray.remote(num_cpus=0)
class DecisionBoard:
    """The scheduler's decision for each (trial id, epoch)."""

    def __init__(self) -> None:
        self.decisions: dict[tuple[str, int], str] = {}

    def post(self, trial_id: str, epoch: int, decision: str) -> None:
        self.decisions[(trial_id, int(epoch))] = decision

    def get(self, trial_id: str, epoch: int) -> str | None:
        return self.decisions.get((trial_id, int(epoch)))

    def stopped_before(self, trial_id: str, last_epoch: int) -> bool:
        """Whether the trial was stopped after an epoch before its last one (at its last
        epoch ASHA answers "stop" to every trial: that one ends by itself)."""
        return any(t == trial_id and e < last_epoch and d == STOP
                   for (t, e), d in self.decisions.items())


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


@dataclass(frozen=True)
class StopGate:
    """Carried to the training workers: the scheduler's decision on an epoch, waited for."""

    board_name: str
    trial_id: str
    timeout_s: float = 120.0

    def should_stop(self, epoch: int) -> bool:
        deadline = time.monotonic() + self.timeout_s
        decisions = board(self.board_name)
        while (decision := ray.get(decisions.get.remote(self.trial_id, int(epoch)))) is None \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        if decision is None:
            log.warning("no scheduler decision for trial %s epoch %s within %.0f s; continuing",
                        self.trial_id, epoch, self.timeout_s)
        return decision == STOP

    def stopped(self, last_epoch: int) -> bool:
        """Whether the scheduler stopped the trial before ``last_epoch`` (read by the trial)."""
        return bool(ray.get(board(self.board_name).stopped_before.remote(self.trial_id, last_epoch)))
