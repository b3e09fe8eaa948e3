"""The daemon's start clears what unfinished writes of a killed daemon left behind."""

from __future__ import annotations

from dropkiln.config import Settings
from dropkiln.daemon.sweep import sweep_leftovers


def test_sweep_removes_temporaries_and_nothing_else(settings: Settings) -> None:
    paths = settings.paths
    images = paths.images / "cats"
    images.mkdir(parents=True)
    keep = [
        images / "000-1.png",
        paths.cache / "latents" / "ab" / "ab12.safetensors",
        paths.work / "job1" / "manifest.json",
        paths.models / "my-model" / ".gitattributes",
        paths.bench / "2026-01-01" / ".report.md.x1.part",
        paths.datasets / ".cats.part" / "a.png",
    ]
    leftovers = [
        images / ".000-2.png.k3j4.part",
        paths.videos / ".cats.mp4.zz9.part",
        paths.loras / "cats" / "diffusers" / ".lora.q1w2" / "pytorch_lora_weights.safetensors",
        paths.cache / "text" / "cd" / ".cd34.safetensors.a1.part",
        paths.work / "job1" / "frames" / ".0003.png.b2.part",
        paths.work / "drops" / "d1" / ".cats.x1.unzip" / "a.png",
        paths.models / ".tiny-sdxl.h7" / "unet" / "config.json",
    ]
    for path in keep + leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")

    removed = sweep_leftovers(paths)

    assert all(path.exists() for path in keep)
    assert not any(path.exists() for path in leftovers)
    assert len(removed) == len(leftovers)
    assert sweep_leftovers(paths) == []


def test_defect01_a_leftover_that_cannot_be_removed_does_not_stop_the_start(
    settings: Settings,
) -> None:
    from tests.daemon.test_ingest_moves import immutable

    folder = settings.paths.images / "cats"
    folder.mkdir(parents=True)
    stuck = folder / ".000-1.png.x1.part"
    stuck.write_bytes(b"half")
    gone = settings.paths.outputs / ".sheet.png.x2.part"
    gone.write_bytes(b"half")
    with immutable(folder):
        removed = sweep_leftovers(settings.paths)
    assert stuck.exists() and stuck not in removed
    assert not gone.exists() and gone in removed


def test_a_daemon_starting_beside_others_sweeps_only_stale_leftovers(settings: Settings) -> None:
    """On a shared root another daemon may be writing right now: its temporaries change as it
    writes, so only those untouched for ``STALE_LEFTOVER_S`` are a dead writer's."""
    import os
    import time

    from dropkiln.daemon.sweep import STALE_LEFTOVER_S

    paths = settings.paths
    old = time.time() - STALE_LEFTOVER_S - 60
    stale_file = paths.videos / ".cats.mp4.zz9.part"
    stale_dir = paths.loras / "cats" / "diffusers" / ".lora.q1w2"
    live_file = paths.images / "dogs" / ".000-2.png.k3j4.part"
    live_dir = paths.loras / "dogs" / "diffusers" / ".lora.x9y8"
    for path in (stale_file, stale_dir / "a.safetensors", live_file, live_dir / "b.safetensors"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    os.utime(stale_file, (old, old))
    os.utime(stale_dir / "a.safetensors", (old, old))
    os.utime(stale_dir, (old, old))
    os.utime(live_dir, (old, old))  # an old folder whose file is still being written

    removed = sweep_leftovers(paths, older_than_s=STALE_LEFTOVER_S)

    assert set(removed) == {stale_file, stale_dir}
    assert live_file.exists() and (live_dir / "b.safetensors").exists()
