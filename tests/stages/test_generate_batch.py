"""Batched generation: images of the same settings share a pipeline call, each from its own
seed, and come out pixel-identical to the same image rendered alone or by diffusers."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_generate import direct_pipeline, gen_root, local, one_thread, pixels, spec_for

from dropkiln.stages.base import Artifact
from dropkiln.stages.faults import FaultInjector
from dropkiln.stages.generate import run_generate
from dropkiln.stages.generation.memory_ladder import GENERATE_LADDER, batch_limit
from dropkiln.stages.generation.png_files import read_dropkiln_record
from dropkiln.stages.generation.prompt_file import ImageEntry, PromptFile
from dropkiln.stages.testing import LocalContext

torch = pytest.importorskip("torch")


__all__ = ["gen_root", "one_thread"]  # test_generate's fixtures: one warm pipeline for both


def three_and_one(batch_size: int | None) -> PromptFile:
    """Three images of one setting (two entries), then one of another size."""
    options = {"steps": 2, "width": 64, "height": 64, "batch_size": batch_size}
    return PromptFile(
        images=[
            ImageEntry(prompt="a red fox", seed=3, count=2, **options),
            ImageEntry(prompt="a blue ship", seed=11, **options),
            ImageEntry(prompt="a tree", seed=5, **{**options, "height": 128}),
        ]
    )


def steps_per_call(progress_log: list[tuple[int, int, dict]]) -> list[int]:
    done = [0] + [d for d, _, _ in progress_log]
    return [b - a for a, b in itertools.pairwise(done)]


def test_the_rung_chooses_the_batch_and_the_first_step_down_halves_it() -> None:
    asked = [batch_limit(8, rung, "cuda") for rung in GENERATE_LADDER]
    assert asked == [8, 4, 4, 1, 1]
    assert [batch_limit(None, rung, "cuda") for rung in GENERATE_LADDER] == [4, 2, 2, 1, 1]
    assert [batch_limit(None, rung, "cpu") for rung in GENERATE_LADDER] == [1] * 5
    assert batch_limit(1, GENERATE_LADDER[1], "cuda") == 1


def test_a_batch_equals_diffusers_batched_call_and_is_within_one_level_of_each_image_alone(
    gen_root: Path, models_dir: Path, tmp_path: Path
) -> None:
    batched_ctx = local(gen_root, tmp_path / "b")
    batched = run_generate(spec_for(tmp_path / "batched", three_and_one(4)), batched_ctx)
    alone_ctx = local(gen_root, tmp_path / "a")
    alone = run_generate(spec_for(tmp_path / "alone", three_and_one(1)), alone_ctx)
    # one call for the three 64x64 images (two steps, three images a step), one for the tree
    assert steps_per_call(batched_ctx.progress_log) == [3, 3, 1, 1]
    assert steps_per_call(alone_ctx.progress_log) == [1] * 8

    pipe = direct_pipeline(models_dir, "tiny-sdxl")
    direct = pipe(
        prompt=["a red fox", "a red fox", "a blue ship"],
        num_inference_steps=2,
        guidance_scale=5.0,
        width=64,
        height=64,
        generator=[torch.Generator().manual_seed(seed) for seed in (3, 4, 11)],
    ).images
    for path, image in zip(batched["images"], direct, strict=False):
        assert np.array_equal(pixels(path), np.asarray(image))

    for one, two in zip(batched["images"], alone["images"], strict=True):
        assert Path(one).name == Path(two).name
        # The CPU's matrix products round differently for 6 rows than for 2 (measured:
        # latents differ by ~1e-5), so an image in a batch can differ from the image alone
        # by one level in a few pixels; the same batch gives the same bytes every time.
        difference = np.abs(pixels(one).astype(int) - pixels(two).astype(int))
        assert difference.max() <= 1, Path(one).name
        first, second = read_dropkiln_record(Path(one)), read_dropkiln_record(Path(two))
        assert first is not None and second is not None
        assert first["digest"] == second["digest"]


def test_a_kill_between_the_writes_of_a_batch_renders_it_again_and_writes_the_rest(
    gen_root: Path, tmp_path: Path
) -> None:
    prompt_file = PromptFile(
        images=[ImageEntry(prompt="a", count=3, steps=2, width=64, height=64, batch_size=3)]
    )
    whole = run_generate(spec_for(tmp_path / "whole", prompt_file), local(gen_root, tmp_path / "w"))
    spec = spec_for(tmp_path / "out", prompt_file)
    ctx = local(gen_root, tmp_path, faults=FaultInjector("oom@generate.image:2"))
    with pytest.raises(torch.OutOfMemoryError):
        run_generate(spec, ctx)
    written = tmp_path / "out" / "000-1.png"
    assert [p.name for p in (tmp_path / "out").glob("*.png")] == [written.name]
    stamp = written.stat().st_mtime_ns
    resumed = run_generate(spec, local(gen_root, tmp_path / "again"))  # same rung, same batch
    assert (resumed["rendered"], resumed["skipped"]) == (2, 1)
    assert written.stat().st_mtime_ns == stamp
    for one, two in zip(resumed["images"], whole["images"], strict=True):
        assert Path(one).read_bytes() == Path(two).read_bytes()


def test_an_oom_inside_a_batch_resumes_with_half_the_batch_and_nothing_twice(
    gen_root: Path, tmp_path: Path
) -> None:
    prompt_file = PromptFile(
        images=[ImageEntry(prompt="a", count=4, steps=2, width=64, height=64, batch_size=2)]
    )
    spec = spec_for(tmp_path / "out", prompt_file)
    # two steps a call: the third step is the first of the second batch
    ctx = local(gen_root, tmp_path, faults=FaultInjector("oom@generate.step:3"))
    with pytest.raises(torch.OutOfMemoryError):
        run_generate(spec, ctx)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["000-1.png", "001-2.png"]
    assert ctx.saved == {"phase": "images", "done": 2, "last": "001-2.png"}
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.png")}

    retry = local(gen_root, tmp_path / "retry", memory_rung=1)  # batch 2 → 1
    result = run_generate(spec, retry)
    assert (result["rendered"], result["skipped"]) == (2, 2)
    assert steps_per_call(retry.progress_log) == [2, 2, 1, 1, 1, 1]  # two kept, two alone
    for name, stamp in stamps.items():
        assert (tmp_path / "out" / name).stat().st_mtime_ns == stamp


def test_a_job_reports_the_seconds_it_spent_inside_diffusers_calls(
    gen_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The time inside the pipeline's calls, measured where diffusers is entered, is in the
    result; the rest of the job (set-up, PNGs, records, contact sheet) is dropkiln's own. The
    calling thread's CPU seconds in them leave out the time it slept."""
    import time

    from diffusers import StableDiffusionXLPipeline

    calls: list[float] = []
    real_call = StableDiffusionXLPipeline.__call__

    def slow_call(pipe: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        time.sleep(0.2)  # a call that takes a known time at least
        try:
            return real_call(pipe, *args, **kwargs)
        finally:
            calls.append(time.perf_counter() - started)

    monkeypatch.setattr(StableDiffusionXLPipeline, "__call__", slow_call)
    prompt_file = PromptFile(
        images=[ImageEntry(prompt="a", count=3, steps=2, width=64, height=64, batch_size=2)]
    )
    started = time.perf_counter()
    result = run_generate(spec_for(tmp_path / "out", prompt_file), local(gen_root, tmp_path))
    wall = time.perf_counter() - started
    assert len(calls) == 2  # a batch of two, then one
    assert sum(calls) <= result["pipeline_seconds"] <= sum(calls) + 0.01
    assert result["pipeline_seconds"] < wall
    # one torch thread: the thread's CPU time is at most the wall time less the two sleeps
    assert 0 < result["pipeline_cpu_seconds"] <= result["pipeline_seconds"] - 0.4


def test_the_contact_sheet_is_built_from_memory_not_by_reading_the_images_again(
    gen_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    from dropkiln.stages.generation.png_files import contact_sheet

    opened: list[str] = []
    real_open = Image.open

    def spying_open(source: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(Path(source).name if isinstance(source, str | Path) else "<stream>")
        return real_open(source, *args, **kwargs)

    monkeypatch.setattr(Image, "open", spying_open)
    prompt_file = PromptFile(
        images=[ImageEntry(prompt="a", count=3, steps=2, width=64, height=96, batch_size=2)]
    )
    result = run_generate(spec_for(tmp_path / "out", prompt_file), local(gen_root, tmp_path))
    images = [Path(p) for p in result["images"]]
    assert not [name for name in opened if name.endswith(".png")]
    monkeypatch.setattr(Image, "open", real_open)
    # the same sheet, byte for byte, as one made by reading the written files
    again = contact_sheet(images, [p.stem for p in images], tmp_path / "from-files.png")
    assert Path(result["contact_sheet"]).read_bytes() == again.read_bytes()


def test_a_resumed_job_puts_the_images_it_kept_on_its_contact_sheet(
    gen_root: Path, tmp_path: Path
) -> None:
    from dropkiln.stages.generation.png_files import contact_sheet

    prompt_file = PromptFile(
        images=[ImageEntry(prompt="a", count=3, steps=2, width=64, height=64, batch_size=1)]
    )
    spec = spec_for(tmp_path / "out", prompt_file)
    with pytest.raises(torch.OutOfMemoryError):
        run_generate(spec, local(gen_root, tmp_path, faults=FaultInjector("oom@generate.image:2")))
    result = run_generate(spec, local(gen_root, tmp_path / "again"))
    assert (result["rendered"], result["skipped"]) == (2, 1)
    images = [Path(p) for p in result["images"]]
    again = contact_sheet(images, [p.stem for p in images], tmp_path / "from-files.png")
    assert Path(result["contact_sheet"]).read_bytes() == again.read_bytes()


@dataclass
class WriteCounter(LocalContext):
    """Logs each durable write a stage asks for (a commit each in the daemon), and the image
    records that came without the hash of the bytes written (the daemon reads those back)."""

    writes: list[tuple[str, ...]] = field(default_factory=list)
    unhashed: list[str] = field(default_factory=list)
    _inside: bool = False

    def checkpoint(self, state: dict[str, Any], artifacts: Sequence[Artifact] = ()) -> None:
        self.writes.append(("checkpoint", *(Path(a.path).name for a in artifacts)))
        self.unhashed += [Path(a.path).name for a in artifacts if a.sha256 is None]
        self._inside = True
        try:
            super().checkpoint(state, artifacts)
        finally:
            self._inside = False

    def artifact(self, path: Path, kind: str, sha256: str | None = None) -> None:
        if not self._inside:
            self.writes.append(("artifact", Path(path).name))
            if sha256 is None and kind == "image":
                self.unhashed.append(Path(path).name)
        super().artifact(path, kind, sha256)


def test_a_batch_is_recorded_in_one_write_with_its_checkpoint_hashed_as_it_was_written(
    gen_root: Path, tmp_path: Path
) -> None:
    prompt_file = PromptFile(
        images=[ImageEntry(prompt="a", count=5, steps=2, width=64, height=64, batch_size=3)]
    )
    ctx = WriteCounter(root=gen_root, work_dir=tmp_path / "work")
    result = run_generate(spec_for(tmp_path / "out", prompt_file), ctx)
    images = [Path(p).name for p in result["images"]]
    # a write per batch, its checkpoint and its images together; no write per image
    image_writes = [write for write in ctx.writes if set(write[1:]) & set(images)]
    assert image_writes == [("checkpoint", *images[:3]), ("checkpoint", *images[3:])]
    assert ctx.unhashed == []
    # the hashes handed over are those of the files on disk
    assert [a[0] for a in ctx.artifacts if a[1] == "image"] == [Path(p) for p in result["images"]]
    for path, digest in ctx._recorded.items():
        assert digest == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_failed_write_in_a_batch_records_the_images_before_it_without_the_checkpoint(
    gen_root: Path, tmp_path: Path
) -> None:
    prompt_file = PromptFile(
        images=[ImageEntry(prompt="a", count=4, steps=2, width=64, height=64, batch_size=4)]
    )
    faults = FaultInjector("enospc@generate.image:3")  # the third image's write is torn
    ctx = WriteCounter(root=gen_root, work_dir=tmp_path / "work", faults=faults)
    with pytest.raises(OSError, match="No space"):
        run_generate(spec_for(tmp_path / "out", prompt_file), ctx)
    names = sorted(p.name for p in (tmp_path / "out").glob("0*.png"))
    assert len(names) == 3  # the fourth was written too: a rerun finds it by its content
    assert ctx.writes == [("artifact", names[0]), ("artifact", names[1])]
    assert ctx.saved is None and ctx.unhashed == []


@dataclass
class SlowCommits(LocalContext):
    """A context whose checkpoint takes as long as a commit on a busy disk: it returns once
    the stage has reported a step after it began (or after 3 s)."""

    overlapped: list[bool] = field(default_factory=list)
    steps_reported: int = 0

    def progress(self, done: int, total: int, **metrics: Any) -> None:
        self.steps_reported += 1
        super().progress(done, total, **metrics)

    def checkpoint(self, state: dict[str, Any], artifacts: Sequence[Artifact] = ()) -> None:
        import time

        seen, deadline = self.steps_reported, time.monotonic() + 3
        while self.steps_reported == seen and time.monotonic() < deadline:
            time.sleep(0.005)
        self.overlapped.append(self.steps_reported > seen)
        super().checkpoint(state, artifacts)


def test_a_batch_checkpoint_is_committed_while_the_next_batch_denoises(
    gen_root: Path, tmp_path: Path
) -> None:
    """The device thread does not wait for a batch's commit (a round trip to the event loop
    and an fsync, 8-36 ms a batch in the daemon): the next batch renders meanwhile, and the
    records stay in order."""
    ctx = SlowCommits(root=gen_root, work_dir=tmp_path / "work")
    entry = ImageEntry(prompt="a lighthouse", seed=1, count=4, steps=2, width=64, height=64)
    result = run_generate(spec_for(tmp_path / "out", PromptFile(images=[entry])), ctx)
    # One image a batch on the CPU. Batch k's images are written while batch k+1 denoises,
    # and recorded (with k's checkpoint) after it, so the first two of the four checkpoints
    # have a later image to denoise beside them (the last two: the last writes and the
    # contact sheet). Waited for on the device thread, none had.
    assert ctx.overlapped[:2] == [True, True], ctx.overlapped
    assert [state["done"] for state in ctx.checkpoints] == [1, 2, 3, 4]
    images = [path for path, kind in ctx.artifacts if kind == "image"]
    assert images == [Path(path) for path in result["images"]]
