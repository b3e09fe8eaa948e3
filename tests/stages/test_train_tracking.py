"""What a training step writes to TensorBoard, as TensorBoard's own readers see it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dropkiln.stages.training.tracking import RunTracker

STEP_TAGS = {"loss/train", "loss/train_smoothed", "lr", "grad_norm"}


def test_a_steps_scalars_are_one_tensorboard_event(tmp_path: Path) -> None:
    """Issue 16: one record a step, not one per scalar (each is serialised and handed to the
    writer thread on its own); TensorBoard still reads every series."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    tracker = RunTracker(tmp_path / "tb", 0, {"rank": 4})
    losses: list[tuple[int, float, float]] = []
    for step in (1, 2, 3):
        losses.append((step, 1.0 / step, 1e-4))
        tracker.step(step, losses, 1e-4, 0.5 * step)
    tracker.close()
    (events_file,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    with_values = [e for e in EventFileLoader(str(events_file)).Load() if e.summary.value]
    assert [e.step for e in with_values] == [1, 2, 3]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == STEP_TAGS
    assert [(e.step, e.value) for e in events.Scalars("grad_norm")] == [
        (1, 0.5),
        (2, 1.0),
        (3, 1.5),
    ]
    assert [e.value for e in events.Scalars("loss/train")] == pytest.approx([1.0, 0.5, 1 / 3])
    assert events.Scalars("loss/train_smoothed")[-1].value == pytest.approx((1 + 0.5 + 1 / 3) / 3)


def test_step_scalars_reach_the_writer_thread_in_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 16: each event handed to the writer wakes its thread, which then takes the GIL
    from the training thread; the steps' events go over together, at the latest at each
    checkpoint (which flushes the file) and when the run closes."""
    from torch.utils.tensorboard.writer import FileWriter

    handed: list[int] = []
    add_event = FileWriter.add_event

    def counted(self: FileWriter, event: Any, step: int | None = None, *rest: Any) -> None:
        handed.append(event.step if step is None else step)
        add_event(self, event, step, *rest)

    tracker = RunTracker(tmp_path / "tb", 0, {"rank": 4})
    monkeypatch.setattr(FileWriter, "add_event", counted)
    losses: list[tuple[int, float, float]] = []
    for step in (1, 2, 3):
        losses.append((step, 1.0, 1e-4))
        tracker.step(step, losses, 1e-4, 0.5)
    assert handed == []
    tracker.checkpoint(3, 0.25, [])
    assert handed == [1, 2, 3, 3]  # the steps' scalars first, then the validation loss
    losses.append((4, 1.0, 1e-4))
    tracker.step(4, losses, 1e-4, 0.5)
    tracker.close()
    assert handed[4:] == [4]
