"""Every named fault-injection point in the stages, found in the source like a reader would."""

from __future__ import annotations

import re
from pathlib import Path

import dropkiln.stages

_CALL = re.compile(r"""\bctx\.fault\(\s*["']([a-z_]+)\.([a-z_]+)["']\s*\)""")


def fault_points() -> dict[str, str]:
    """``stage.point`` → stage, for every ``ctx.fault("stage.point")`` under dropkiln/stages."""
    points: dict[str, str] = {}
    for source in Path(dropkiln.stages.__file__).parent.rglob("*.py"):
        for stage, point in _CALL.findall(source.read_text()):
            points[f"{stage}.{point}"] = stage
    return dict(sorted(points.items()))
