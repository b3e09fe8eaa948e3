"""The bench report says of every goal whether it was met, as a reader would check it."""

from __future__ import annotations

from dropkiln.bench.record import Metric, SuiteRecord
from dropkiln.bench.report import goals_table, results_document, summary_table


def test_a_goal_is_judged_by_its_operator_and_number() -> None:
    assert Metric(1.04, "x", goal="<= 1.05").verdict() == "met"
    assert Metric(1.06, "x", goal="<= 1.05").verdict() == "not met"
    assert Metric(1.7, "x", goal=">= 1.7 on 2 cores").verdict() == "met"
    assert Metric(99.0, "ms", goal="< 100").verdict() == "met"
    assert Metric(100.0, "ms", goal="< 100").verdict() == "not met"


def test_no_value_or_free_text_goal_gives_no_verdict() -> None:
    assert Metric(None, "x", goal="<= 1.05").verdict() == ""
    assert Metric(1.0, "x", goal="as fast as the other tool").verdict() == ""
    assert Metric(1.0, "x").verdict() == ""


def test_the_report_lists_each_goal_with_its_verdict() -> None:
    record = SuiteRecord("daemon")
    record.compared("a clean process", 1.2, "daemon ÷ clean", "<= 1.05")
    record.metric("pickup_p95_beyond_settle_ms", 12.0, "ms", "lower", "<= 50", True)
    document = results_document([record], {}, {}, 1.0)
    rows = goals_table(document)
    assert any("baseline_ratio" in row and "not met" in row for row in rows)
    assert any("pickup_p95_beyond_settle_ms" in row and "| met |" in row for row in rows)
    assert "<= 1.05: not met" in summary_table(document)
