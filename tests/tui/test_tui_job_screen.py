"""The job screen: events, artifacts, error, loss curve and preview, kept live."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from textual.pilot import Pilot
from textual.widgets import RichLog, Sparkline

from dropkiln.store import EventStore
from dropkiln.store.events import ArtifactWritten, JobProgress, job_stream
from dropkiln.tui import DropkilnApp
from dropkiln.tui.screens import JobScreen

from .conftest import loaded, log_lines, text_of, wait_for
from .history import GENERATE_FAILED, TRAIN, training_loss

MakeApp = Callable[..., DropkilnApp]


async def open_job(pilot: Pilot[None], job_id: str) -> JobScreen:
    await loaded(pilot)
    app = pilot.app
    assert isinstance(app, DropkilnApp)
    app.open_job(job_id)
    await wait_for(pilot, lambda: isinstance(app.screen, JobScreen) and app.screen.detail)
    await pilot.pause()
    assert isinstance(app.screen, JobScreen)
    return app.screen


async def test_training_job_shows_loss_curve_rung_and_lifecycle(make_app: MakeApp) -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_job(pilot, TRAIN)
        assert text_of(screen.query_one("#job-title")).split() == [
            "train",
            "cats",
            "running",
            TRAIN,
        ]
        facts = text_of(screen.query_one("#job-facts"))
        assert facts.startswith("attempt 2 · rung 1 gradient_checkpointing · submitted 12:01:41")
        losses = screen.query_one("#loss-sparkline", Sparkline).data
        assert list(losses or []) == [
            training_loss(s) for s in [*range(25, 175, 25), *range(175, 625, 25)]
        ]
        assert "now 0.1880" in text_of(screen.query_one("#loss-label"))
        assert not screen.query_one("#job-error").display
        assert not screen.query_one("#job-preview").display
        events = [line.split()[1] for line in log_lines(screen.query_one("#job-events", RichLog))]
        assert events == [
            "JobSubmitted", "JobQueued", "JobStarted", "OutOfMemory", "RetryScheduled",
            "JobStarted", "CheckpointSaved", "CheckpointSaved",
        ]  # fmt: skip
        assert "loss 0.1880 · 24 updates" in text_of(screen.query_one("#job-progress"))


async def test_failed_generation_shows_error_and_newest_preview(make_app: MakeApp) -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_job(pilot, GENERATE_FAILED)
        error = text_of(screen.query_one("#job-error"))
        assert error.startswith("Error: out of memory on the last memory rung allowed")
        preview = text_of(screen.query_one("#job-preview"))
        assert preview == "preview /srv/dk/outputs/images/spacecats/preview-0008.png"
        assert text_of(screen.query_one("#artifact-list")).splitlines() == [
            "preview    20 KiB outputs/images/spacecats/preview-0004.png",
            "preview    20 KiB outputs/images/spacecats/preview-0008.png",
        ]
        assert not screen.query_one("#job-loss").display


async def test_job_screen_follows_new_events(make_app: MakeApp, history_db: Path) -> None:
    app = make_app(poll_interval=0.05)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_job(pilot, TRAIN)
        async with await EventStore.open(history_db) as daemon:
            metrics = {"loss": 0.05, "it_s": 3.0, "eta_s": 10.0}
            await daemon.append(
                job_stream(TRAIN),
                [
                    JobProgress(done=650, total=2000, metrics=metrics),
                    ArtifactWritten(
                        path="/srv/dk/outputs/loras/cats/cats.safetensors", kind="lora"
                    ),
                ],
            )
        await wait_for(
            pilot, lambda: "cats.safetensors" in text_of(screen.query_one("#artifact-list"))
        )
        assert "650/2000" in text_of(screen.query_one("#job-progress"))
        assert (screen.query_one("#loss-sparkline", Sparkline).data or [])[-1] == 0.05
        artifacts = text_of(screen.query_one("#artifact-list")).splitlines()
        assert artifacts == ["lora           outputs/loras/cats/cats.safetensors"]
        last = log_lines(screen.query_one("#job-events", RichLog))[-1]
        assert last.endswith("ArtifactWritten lora outputs/loras/cats/cats.safetensors")


async def test_job_screen_keys_act_on_its_job(make_app: MakeApp) -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await open_job(pilot, GENERATE_FAILED)
        await pilot.press("r")
        assert "Retry generate job “spacecats” (g5f0d1e8, failed)?" in app.screen.question  # type: ignore[attr-defined]
        await pilot.press("escape")
        assert isinstance(app.screen, JobScreen)
