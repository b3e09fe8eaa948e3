"""``dropkiln bench``: the report files and their shape (speed is never asserted)."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from dropkiln.bench.cli import parse_sizes
from dropkiln.bench.record import SuiteRecord
from dropkiln.bench.report import compare_text, results_document
from dropkiln.cli import main

MACHINE_KEYS = {
    "cpu",
    "cores_logical",
    "ram_gb",
    "gpu",
    "device",
    "dtype",
    "versions",
    "dropkiln",
    "git_commit",
    "date",
}
RECORD_KEYS = {
    "suite",
    "config",
    "metrics",
    "latency",
    "samples",
    "phases",
    "baseline",
    "sweep",
    "series",
    "memory",
    "profile",
    "notes",
    "raw",
    "seconds",
}


def _bench(root: Path, *args: str) -> tuple[int, Path]:
    out = root / "report"
    code = main(["bench", *args, "--root", str(root), "--out", str(out)])
    return code, out


def _check_report(out: Path, suites: list[str]) -> dict:
    document = json.loads((out / "results.json").read_text())
    assert document["format"] == "dropkiln-bench/1"
    assert set(document["machine"]) >= MACHINE_KEYS
    assert set(document["machine"]["versions"]) >= {"torch", "diffusers", "transformers", "peft"}
    assert list(document["suites"]) == suites
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    report = (out / "report.md").read_text()
    for suite in suites:
        record = document["suites"][suite]
        assert set(record) == RECORD_KEYS
        assert not any(note.startswith("failed") for note in record["notes"]), record["notes"]
        assert record["baseline"]["ratio"] > 0 and record["baseline"]["name"]
        assert record["metrics"]["baseline_ratio"]["value"] == record["baseline"]["ratio"]
        assert record["memory"]["rss_peak_bytes"] >= record["memory"]["rss_start_bytes"] > 0
        for summary in record["latency"].values():
            if summary["n"]:
                assert summary["p50"] <= summary["p95"] <= summary["p99"] <= summary["max"]
        assert {row["metric"] for row in rows if row["suite"] == suite} == set(record["metrics"])
        assert f"## {suite}" in report
        assert (out / f"{suite}-latency.png").read_bytes()[:4] == b"\x89PNG"
    return document


@pytest.mark.slow
def test_store_and_video_quick_write_every_report_file(tmp_path: Path, capsys) -> None:
    code, out = _bench(tmp_path / "home", "store", "--quick", "--events", "2000")
    assert code == 0
    store = _check_report(out, ["store"])["suites"]["store"]
    assert {"single_commits_per_s", "batched_events_per_s", "tail_p95_ms", "status_s"} <= set(
        store["metrics"]
    )
    assert store["latency"]["commit"]["n"] == 300
    assert "store" in capsys.readouterr().out

    code, out = _bench(tmp_path / "again", "video", "--quick", "--repeats", "2")
    assert code == 0
    video = _check_report(out, ["video"])["suites"]["video"]
    assert video["latency"]["stage"]["n"] == 2


def test_light_suites_never_import_torch(tmp_path: Path) -> None:
    script = (
        "import sys; from dropkiln.cli import main; "
        f"code = main(['bench', 'video', '--quick', '--root', {str(tmp_path)!r}]); "
        "print(code, 'torch' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
    )
    assert done.stdout.strip().splitlines()[-1] == "0 False"
    assert (tmp_path / "outputs" / "bench").is_dir()


@pytest.mark.slow
def test_train_quick_reports_phases_sweep_and_loss(bench_home: Path) -> None:
    code, out = _bench(
        bench_home,
        "train",
        "--quick",
        "--steps",
        "6",
        "--batch-sizes",
        "1,2",
        "--json",
        str(bench_home / "copy.json"),
    )
    assert code == 0
    document = _check_report(out, ["train"])
    train = document["suites"]["train"]
    assert set(train["phases"]) == {"stage", "minimal_loop"}
    for phases in train["phases"].values():
        assert set(phases["mean_s"]) == {"data", "forward", "backward", "optimizer"}
    assert [row["batch_size"] for row in train["sweep"]["rows"]] == [1, 2]
    assert len(train["series"]["stage_loss"]) == 6
    assert (out / "train-loss.png").is_file() and (out / "train-throughput.png").is_file()
    assert json.loads((bench_home / "copy.json").read_text()) == document


@pytest.mark.slow
def test_profile_writes_a_chrome_trace_with_events(bench_home: Path) -> None:
    code, out = _bench(
        bench_home, "cache", "--quick", "--profile", "--batch-sizes", "4", "--repeats", "1"
    )
    assert code == 0
    profile = _check_report(out, ["cache"])["suites"]["cache"]["profile"]
    trace = json.loads(Path(profile["trace"]).read_text())
    assert any(event.get("name", "").startswith("aten::") for event in trace["traceEvents"])
    assert 0 <= profile["python_overhead_share"] <= 1
    assert 0 < profile["torch_ops_s"] <= profile["wall_s"] * 1.05
    assert profile["top_operators"][0]["self_cpu_s"] > 0
    assert "Python overhead share" in (out / "report.md").read_text()


def _document(rate: float, p95: float) -> dict:
    record = SuiteRecord("train")
    record.metric("steps_per_s", rate, "steps/s", "higher", headline=True)
    record.latencies("step", [p95 / 2, p95], "one step")
    record.compared("minimal loop", 0.9, "stage ÷ loop")
    machine = {"cpu": "test", "device": "cpu"}
    return results_document([record], machine, {}, 1.0)


def test_compare_prints_a_ratio_per_metric(tmp_path: Path, capsys) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_document(10.0, 0.2)))
    b.write_text(json.dumps(_document(20.0, 0.2)))
    assert main(["bench", "compare", str(a), str(b)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rate = next(line for line in lines if line.startswith("train.steps_per_s"))
    assert rate.split()[-2:] == ["2.000", "better"]
    p95 = next(line for line in lines if line.startswith("train.step_p95_ms"))
    assert p95.split()[-2:] == ["1.000", "same"]
    text = compare_text(_document(20.0, 0.4), _document(10.0, 0.2), "A", "B")
    assert "0.500  worse" in text


def test_bench_refuses_bad_arguments(tmp_path: Path, capsys) -> None:
    root = str(tmp_path)
    assert main(["bench", "compare", str(tmp_path / "one.json"), "--root", root]) == 1
    assert "two results files" in capsys.readouterr().err
    (tmp_path / "x.json").write_text("{}")
    assert main(["bench", "compare", str(tmp_path / "x.json"), str(tmp_path / "x.json")]) == 1
    assert "not a dropkiln bench results file" in capsys.readouterr().err
    assert main(["bench", "nonsense", "--root", root]) == 1
    assert "unknown suite 'nonsense'" in capsys.readouterr().err
    assert main(["bench", "store", "--repeats", "0", "--root", root]) == 1
    assert parse_sizes("1, 2,4") == (1, 2, 4)
    for text in ("1,x", "0,2", ","):
        with pytest.raises(ValueError, match="--batch-sizes"):
            parse_sizes(text)


@pytest.mark.slow
def test_generate_quick_reports_phases_and_images_per_call(bench_home: Path) -> None:
    code, out = _bench(bench_home, "generate", "--quick", "--batch-sizes", "1,2")
    assert code == 0
    generate = _check_report(out, ["generate"])["suites"]["generate"]
    for side in ("stage", "direct"):
        phases = generate["phases"][side]
        assert set(phases["mean_s"]) == {"text_encode", "denoise", "vae_decode", "other"}
        assert phases["mean_s"]["denoise"] > 0
    assert generate["metrics"]["same_images"]["value"] == 1
    assert [row["images_per_call"] for row in generate["sweep"]["rows"]] == [1, 2]


@pytest.mark.slow
def test_daemon_benchmark_drops_into_a_daemon_process_against_a_clean_process(
    tiny_models: Path,
) -> None:
    from dropkiln.bench.daemon import bench_daemon

    figures = bench_daemon(
        images=2,
        size=32,
        steps=2,
        repeat=2,
        files=2,
        file_images=1,
        models_dir=tiny_models,
        processes=False,
        settle_seconds=0.2,
        batch=2,
    )
    warm, row = figures["warm"], figures["row"]
    assert len(warm["run_s"]) == len(warm["clean_s"]) == len(warm["pickup_s"]) == 2
    assert all(pickup >= 0.2 for pickup in warm["pickup_s"])  # the settle time is waited
    assert warm["same_images"] is True  # the clean process drew the same pixels
    # the median of each turn's daemon ÷ clean (the two back to back), with its spread
    per_turn = [run / clean for run, clean in zip(warm["run_s"], warm["clean_s"], strict=True)]
    assert warm["ratio"] == pytest.approx(statistics.median(per_turn), abs=0.002)
    assert warm["ratio_spread"] == pytest.approx([min(per_turn), max(per_turn)], abs=0.002)
    # two turns are too few to narrow the median's 95% interval: it is their whole range
    assert warm["ratio_ci95"] == warm["ratio_spread"]
    assert len(row["daemon_file_s"]) == 2 and row["daemon_s"] == pytest.approx(
        max(row["daemon_file_s"]), abs=0.001
    )
    assert figures["settle_seconds"] == 0.2
    from dropkiln.daemon.device_thread import cpu_threads

    threads = figures["torch_threads"]  # the daemon's default count, stated as a number
    assert threads["daemon"] == (cpu_threads(0) or threads["clean"])
    batched = warm["batched"]
    assert batched["batch"] == 2 and len(batched["run_s"]) == len(batched["clean_s"]) == 2
    # a batch_size = 2 prompt file draws what one diffusers call with two generators draws
    assert batched["same_images"] is True
    # dropkiln's own time per drop, outside diffusers' calls, on each side
    for figures_of in (warm, batched):
        outside = figures_of["outside_pipeline_ms"]
        assert 0 < outside["daemon"] < 1000 * min(figures_of["run_s"])
        assert 0 < outside["clean"] < 1000 * max(figures_of["clean_s"])
        # inside them: the calling thread's CPU, at most its wall time plus rounding
        for side in figures_of["inside_pipeline_ms"].values():
            assert 0 < side["cpu"] <= side["wall"] + 0.1 and side["wall_less_cpu"] >= -0.1
    # a second clean process at the daemon's own count, when that is not torch's default:
    # the thread policy's share of the ratio, apart from the daemon's own cost
    for figures_of, runs in ((warm, warm["run_s"]), (batched, batched["run_s"])):
        alike = figures_of["same_threads"]
        if threads["daemon"] == threads["clean"]:
            assert alike is None
            continue
        per_turn = [run / clean for run, clean in zip(runs, alike["clean_s"], strict=True)]
        assert alike["ratio"] == pytest.approx(statistics.median(per_turn), abs=0.002)
        assert alike["clean_s"] != figures_of["clean_s"]  # its own process, its own times


@pytest.mark.slow
def test_preempt_quick_reports_p50_and_max_latency(bench_home: Path) -> None:
    code, out = _bench(bench_home, "preempt", "--quick", "--repeats", "2")
    assert code == 0
    document = _check_report(out, ["preempt"])
    record = document["suites"]["preempt"]
    samples = record["samples"]["taken_to_first_step"]
    assert len(samples) == 2 and all(value > 0 for value in samples)
    assert record["metrics"]["preempt_max_s"]["value"] == round(max(samples), 3)
    assert record["metrics"]["preempt_p50_s"]["headline"]


@pytest.mark.slow
def test_api_benchmark_serves_a_big_store_and_times_sse_against_the_cli(tmp_path: Path) -> None:
    code, out = _bench(tmp_path / "home", "api", "--quick", "--events", "300", "--repeats", "20")
    assert code == 0
    api = _check_report(out, ["api"])["suites"]["api"]
    assert api["config"] == {"jobs": 300, "requests": 20, "events": 40}
    assert api["latency"]["list_jobs"]["n"] == 20
    assert api["latency"]["sse"]["n"] == api["latency"]["cli_follow"]["n"] == 40
    assert {"list_jobs_p50_ms", "list_jobs_p99_ms", "sse_p95_ms", "sse_minus_cli_p95_ms"} <= set(
        api["metrics"]
    )
    assert api["raw"] == {} or "store_events" in api["metrics"]


def test_cli_start_benchmark_times_the_quick_commands_in_fresh_processes(tmp_path: Path) -> None:
    # Issue 16: status, events and cancel must answer in a quarter of a second; the figure is
    # best-of-N wall-clock of real processes beside a bare interpreter, with the load.
    code, out = _bench(tmp_path / "home", "cli", "--quick", "--repeats", "2")
    assert code == 0
    record = _check_report(out, ["cli"])["suites"]["cli"]
    for name in ("status", "events", "cancel"):
        assert record["metrics"][f"{name}_s"]["goal"] == "<= 0.25"
        assert record["latency"][name]["n"] == 2
    assert record["raw"]["python_s"] > 0
    assert any(note.startswith("load average before") for note in record["notes"])


def test_cli_start_benchmark_times_commands_from_their_bytecode_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A shell with PYTHONDONTWRITEBYTECODE=1 (this box's, some CI images') made every start
    # compile dropkiln's modules again: 0.21 s where a user's second `status` takes 0.12 s.
    import importlib.util

    import dropkiln.cli.read
    from dropkiln.bench.cli_start import bench_cli_start

    cached = Path(importlib.util.cache_from_source(dropkiln.cli.read.__file__))
    cached.unlink(missing_ok=True)
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    figures = bench_cli_start(runs=1)
    assert cached.is_file()
    assert figures["status_s"] > figures["python_s"] > 0


@pytest.mark.slow
def test_threads_benchmark_times_one_clean_process_per_thread_count(tiny_models: Path) -> None:
    from dropkiln.bench.threads import bench_threads

    figures = bench_threads(
        (1, 2), busy=1, turns=2, size=32, models_dir=tiny_models, inference_mode=True
    )
    assert set(figures["seconds"]) == {"1", "2", "1 inference", "2 inference"}
    assert set(figures["inference_mode_ratio"]) == {"1", "2"}
    assert all(paired["ratio"] > 0 for paired in figures["inference_mode_ratio"].values())
    assert all(len(values) == 2 and min(values) > 0 for values in figures["seconds"].values())
    assert figures["busy_loops"] == 1 and len(figures["load_average_after"]) == 3
