"""A checkpoint is trusted only when raypipe says it is complete; nothing is ever deleted."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from raypipe.training import checkpoints as ck


def _write(run: Path, epoch: int, metrics: dict | None = None, complete: bool = True) -> Path:
    """A checkpoint folder as a run writes it: model.pt and meta.json, then the marker."""
    folder = run / ck.checkpoint_name(epoch)
    folder.mkdir(parents=True)
    torch.save({"model": {"w": torch.full((3,), float(epoch))}, "epoch": epoch}, folder / ck.MODEL_FILE)
    (folder / ck.META_FILE).write_text(json.dumps({"epoch": epoch, "metrics": metrics or {}}))
    if complete:
        ck.mark_complete(str(folder), epoch)
    return folder


def _everything(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*")}


def test_a_marked_checkpoint_is_complete_until_a_file_changes(tmp_path: Path) -> None:
    folder = _write(tmp_path, 3)
    assert ck.is_complete(str(folder))
    state, meta = ck.read_checkpoint(str(folder))
    assert state["epoch"] == 3 and meta["epoch"] == 3
    model = folder / ck.MODEL_FILE
    model.write_bytes(model.read_bytes()[:100])  # truncated after it was written
    assert "model.pt has 100 bytes" in ck.incomplete_reason(str(folder))
    (folder / ck.MARKER_FILE).write_text("{not json")
    assert "cannot be read" in ck.incomplete_reason(str(folder))
    (folder / ck.MARKER_FILE).unlink()
    assert "no complete.json" in ck.incomplete_reason(str(folder))
    assert ck.epoch_of(str(folder)) == 3


def test_resume_takes_the_latest_complete_checkpoint_and_deletes_nothing(tmp_path: Path, caplog) -> None:
    for epoch in (0, 1):
        _write(tmp_path, epoch)
    _write(tmp_path, 2, complete=False)       # the run stopped while epoch 2 was written
    truncated = _write(tmp_path, 3)
    (truncated / ck.MODEL_FILE).write_bytes(b"PK\x03\x04 truncated")
    # Ray Train's own record of its checkpoints plays no part: unreadable, or with renamed keys
    (tmp_path / "checkpoint_manager_snapshot.json").write_text('{"checkpoint_res')
    before = _everything(tmp_path)
    with caplog.at_level(logging.WARNING, logger="raypipe"):
        assert ck.latest_complete(str(tmp_path)) == str(tmp_path / "checkpoint_epoch0001")
    named = caplog.text
    assert "checkpoint_epoch0003" in named and "checkpoint_epoch0002" in named
    assert "left as it is" in named
    (tmp_path / "checkpoint_manager_snapshot.json").write_text(json.dumps({"renamed_results": []}))
    assert ck.latest_complete(str(tmp_path)) == str(tmp_path / "checkpoint_epoch0001")
    assert _everything(tmp_path) == before | set()  # nothing deleted, nothing new
    assert ck.latest_complete(str(tmp_path / "no-such-run")) is None


def test_the_best_checkpoint_is_the_best_complete_one(tmp_path: Path) -> None:
    _write(tmp_path, 0, {"val_auc": 0.7, "val_loss": 0.9})
    _write(tmp_path, 1, {"val_auc": 0.9, "val_loss": 0.5})
    _write(tmp_path, 2, {"val_auc": 0.95, "val_loss": 0.4}, complete=False)  # better, unfinished
    _write(tmp_path, 3, {"val_auc": float("nan"), "val_loss": 0.3})
    best, metrics = ck.best_complete(str(tmp_path), "val_auc", "max")
    assert best == str(tmp_path / "checkpoint_epoch0001") and metrics["val_auc"] == 0.9
    assert ck.best_complete(str(tmp_path), "val_loss", "min")[0] == str(tmp_path / "checkpoint_epoch0003")
    assert ck.best_complete(str(tmp_path / "none"), "val_auc", "max") == (None, {})


def test_unmark_makes_a_folder_being_rewritten_incomplete(tmp_path: Path) -> None:
    folder = _write(tmp_path, 5)
    ck.unmark(str(folder))
    assert not ck.is_complete(str(folder)) and (folder / ck.MODEL_FILE).exists()
    ck.unmark(str(folder))  # no marker: nothing to do
    with pytest.raises(OSError, match="lacks"):
        ck.mark_complete(str(tmp_path / "checkpoint_epoch0009"), 9)


def test_evaluate_refuses_an_incomplete_checkpoint_and_takes_a_runs_best_complete(tmp_path: Path) -> None:
    from raypipe.evaluate import EvaluationError, resolve_checkpoint

    _write(tmp_path, 0, {"val_auc": 0.8})
    unfinished = _write(tmp_path, 1, {"val_auc": 0.99}, complete=False)
    with pytest.raises(EvaluationError, match="not complete: no complete.json"):
        resolve_checkpoint(str(unfinished))
    assert resolve_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint_epoch0000")
