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
