"""What the layout leaves visible: the running job's step, speed and ETA fit at 80×24, and
taller terminals get the memory graphs' extra rows. Checked on the composited screen, not on
widgets that may be hidden."""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path

from dropkiln.tui import DropkilnApp

from .conftest import loaded, screen_lines

MakeApp = Callable[..., DropkilnApp]


async def test_80x24_shows_the_running_jobs_step_speed_and_eta(make_app: MakeApp) -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        # The history's training job: step 600 of 2000 at 3.2 it/s, (2000-600)/3.2 s left.
        # One row has all three (the event log's JobProgress lines have the step, no ETA).
        rows = [
            line
            for line in screen_lines(app)
            if "600/2000" in line and "3.2 it/s" in line and "ETA 7m18s" in line
        ]
        assert len(rows) == 1, screen_lines(app)


async def test_a_tall_terminal_gives_the_memory_sparkline_three_rows(make_app: MakeApp) -> None:
    for size, rows in (((80, 24), 1), ((80, 40), 3), ((130, 40), 3)):
        app = make_app()
        async with app.run_test(size=size) as pilot:
            await loaded(pilot)
            sparkline = app.screen.query_one("#memory-sparkline")
            visible = app.screen._compositor.visible_widgets
            assert sparkline in visible, size
            assert sparkline.size.height == rows, size
            # The bar and its label stay on screen above the sparkline's rows.
            assert app.screen.query_one("#memory-bar") in visible, size
            assert any("peak" in line for line in screen_lines(app)), size


def test_the_readme_screenshot_is_the_80x24_snapshot() -> None:
    # The README shows docs/dashboard-80x24.svg; the snapshot test keeps the other copy true.
    root = Path(__file__).parents[2]
    snapshot = Path(__file__).parent / "__snapshots__/test_tui_snapshots/test_overview[80x24].svg"
    shown = root / "docs/dashboard-80x24.svg"
    assert "(docs/dashboard-80x24.svg)" in (root / "README.md").read_text(encoding="utf-8")
    assert shown.read_text(encoding="utf-8") == snapshot.read_text(encoding="utf-8"), (
        "copy the updated snapshot to docs/dashboard-80x24.svg"
    )
    text = html.unescape(shown.read_text(encoding="utf-8")).replace("\xa0", " ")
    assert "600/2000 · 3.2 it/s · ETA 7m18s" in text
