"""Control images through the tiny ControlNet, and latent-walk frames, on the tiny models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from dropkiln.config import Settings
from dropkiln.stages.base import StageError
from dropkiln.stages.generate import GenerateSpec, run_generate
from dropkiln.stages.generation.controlnet import ensure_tiny_controlnet
from dropkiln.stages.generation.latent_walk import WalkFrame, slerp, walk_plan
from dropkiln.stages.generation.prompt_file import (
    ImageEntry,
    PromptFile,
    VideoOptions,
)
from dropkiln.stages.generation.prompt_loading import load_prompt_file
from dropkiln.stages.testing import LocalContext

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """One torch thread: on a busy 2-core box two threads make these tiny models 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def gen_root(models_dir: Path) -> Path:
    """The same ROOT as test_generate's, so the warm pipelines are shared."""
    root = models_dir.parent / "generate-root"
    (root / "state").mkdir(parents=True, exist_ok=True)
    link = root / "state" / "models"
    if not link.exists():
        link.symlink_to(models_dir, target_is_directory=True)
    return root


def pixels(path: Path | str) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def pose_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pose = np.zeros((64, 64, 3), np.uint8)
    pose[10:54, 20:44] = 255
    Image.fromarray(pose).save(folder / "pose.png")
    return folder


def run(root: Path, out: Path, prompt_file: PromptFile, model: str = "tiny-sdxl") -> dict:
    spec = GenerateSpec(name="job", model=model, prompt_file=prompt_file, output_dir=str(out))
    return run_generate(spec, LocalContext(root=root, work_dir=out.parent / "work"))


CONTROL_TOML = """\
[defaults]
steps = 2
width = 64
height = 64
[[image]]
prompt = "a cat"
control = { image = "pose.png", scale = 0.9 }
[[image]]
prompt = "a cat"
"""


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-sd15"])
def test_control_image_steers_and_matches_the_diffusers_controlnet_pipeline(
    gen_root: Path, models_dir: Path, tmp_path: Path, model: str
) -> None:
    from diffusers import (
        ControlNetModel,
        StableDiffusionControlNetPipeline,
        StableDiffusionXLControlNetPipeline,
    )

    from dropkiln.stages.models import load_pipeline, resolve_model

    folder = pose_folder(tmp_path / "drop")
    (folder / "p.toml").write_text(CONTROL_TOML)
    prompt_file = load_prompt_file(folder / "p.toml", Settings(root=gen_root).generate)
    result = run(gen_root, tmp_path / "out", prompt_file, model)
    controlled, free = (pixels(p) for p in result["images"])
    assert not np.array_equal(controlled, free)

    ref = resolve_model(model, models_dir)
    controlnet = ControlNetModel.from_pretrained(ensure_tiny_controlnet(ref, models_dir))
    cls = (
        StableDiffusionXLControlNetPipeline
        if ref.kind == "sdxl"
        else StableDiffusionControlNetPipeline
    )
    pipe = cls.from_pipe(load_pipeline(ref, "cpu", torch.float32), controlnet=controlnet)
    with Image.open(folder / "pose.png") as pose:
        direct = pipe(prompt="a cat", image=pose.convert("RGB"), controlnet_conditioning_scale=0.9,
                      num_inference_steps=2, guidance_scale=5.0, width=64, height=64,
                      generator=torch.Generator().manual_seed(1)).images[0]  # fmt: skip
    assert np.array_equal(controlled, np.asarray(direct))
    parameters = Image.open(result["images"][0]).text["parameters"]  # type: ignore[attr-defined]
    assert 'ControlNet: "tiny: 0.9"' in parameters


def test_tiny_controlnet_is_built_once_and_reproducibly(models_dir: Path, tmp_path: Path) -> None:
    from dropkiln.stages.models import resolve_model

    ref = resolve_model("tiny-sd15", models_dir)
    first = ensure_tiny_controlnet(ref, tmp_path / "a")
    second = ensure_tiny_controlnet(ref, tmp_path / "b")
    weights = "diffusion_pytorch_model.safetensors"
    assert (first / weights).read_bytes() == (second / weights).read_bytes()
    stamp = (first / weights).stat().st_mtime_ns
    assert ensure_tiny_controlnet(ref, tmp_path / "a") == first
    assert (first / weights).stat().st_mtime_ns == stamp
    assert not list(first.rglob("*.bin"))


def test_control_image_gone_after_validation_is_an_entry_error(
    gen_root: Path, tmp_path: Path
) -> None:
    folder = pose_folder(tmp_path / "drop")
    (folder / "p.toml").write_text(CONTROL_TOML)
    prompt_file = load_prompt_file(folder / "p.toml", Settings(root=gen_root).generate)
    (folder / "pose.png").write_bytes(b"truncated")
    with pytest.raises(StageError, match=r"image\[0\]: control image pose.png cannot be read"):
        run(gen_root, tmp_path / "out", prompt_file)


def test_unknown_control_model_folder(gen_root: Path, tmp_path: Path) -> None:
    folder = pose_folder(tmp_path / "drop")
    (folder / "p.toml").write_text(CONTROL_TOML.replace("scale = 0.9", 'model = "nowhere"'))
    prompt_file = load_prompt_file(folder / "p.toml", Settings(root=gen_root).generate)
    with pytest.raises(StageError, match="control model 'nowhere': no ControlNet folder"):
        run(gen_root, tmp_path / "out", prompt_file)


def test_walk_plan_open_and_loop() -> None:
    open_walk = walk_plan(3, 5, loop=False)
    assert [(f.first, f.second, f.mix) for f in open_walk] == [
        (0, 1, 0.0), (0, 1, 0.5), (1, 2, 0.0), (1, 2, 0.5), (1, 2, 1.0)
    ]  # fmt: skip
    loop = walk_plan(2, 4, loop=True)
    assert loop == [WalkFrame(0, 0, 1, 0.0), WalkFrame(1, 0, 1, 0.5),
                    WalkFrame(2, 1, 0, 0.0), WalkFrame(3, 1, 0, 0.5)]  # fmt: skip


def test_slerp_keeps_the_ends_and_the_norm() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(4, 8, 8, generator=generator)
    b = torch.randn(4, 8, 8, generator=generator)
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    middle = slerp(a, b, 0.5)
    linear = (a + b) / 2
    low, high = sorted((float(a.norm()), float(b.norm())))
    assert 0.97 * low < float(middle.norm()) < 1.03 * high
    assert float(linear.norm()) < 0.85 * low  # a straight mix of noise loses energy


@pytest.mark.slow
def test_latent_walk_frames_start_and_end_on_the_images(gen_root: Path, tmp_path: Path) -> None:
    images = [
        ImageEntry(prompt="a cat", seed=1, steps=2, width=64, height=64),
        ImageEntry(prompt="a dog", seed=7, steps=2, width=64, height=64),
    ]
    video = VideoOptions(kind="latent-walk", frames=4)
    result = run(gen_root, tmp_path / "out", PromptFile(images=images, video=video))
    frames = result["walk_frames"]
    assert [Path(f).name for f in frames] == ["0000.png", "0001.png", "0002.png", "0003.png"]
    assert np.array_equal(pixels(frames[0]), pixels(result["images"][0]))
    assert np.array_equal(pixels(frames[-1]), pixels(result["images"][1]))
    assert not np.array_equal(pixels(frames[1]), pixels(frames[0]))
    assert result["video"]["kind"] == "latent-walk"
    again = run(gen_root, tmp_path / "out", PromptFile(images=images, video=video))
    assert (again["rendered"], again["skipped"]) == (0, 6)

    # the video stage encodes the walk's frames, one video frame each
    from dropkiln.stages.video import VideoSpec, run_video, video_path

    spec = VideoSpec(name="job", options=video, output=str(video_path(tmp_path, "job", video)))
    ctx = LocalContext(
        root=gen_root, work_dir=tmp_path / "video", upstream_results={"generate": again}
    )
    encoded = run_video(spec, ctx)
    assert (encoded["frames"], encoded["width"], encoded["height"]) == (4, 64, 64)
    assert Path(encoded["video"]) == tmp_path / "job.mp4" and Path(encoded["video"]).stat().st_size


def test_an_oom_during_the_walk_resumes_at_the_frame(gen_root: Path, tmp_path: Path) -> None:
    from dropkiln.stages.faults import FaultInjector

    images = [
        ImageEntry(prompt=p, seed=s, steps=2, width=64, height=64) for p, s in (("a", 1), ("b", 2))
    ]
    prompt_file = PromptFile(images=images, video=VideoOptions(kind="latent-walk", frames=3))
    spec = GenerateSpec(
        name="w", model="tiny-sdxl", prompt_file=prompt_file, output_dir=str(tmp_path / "out")
    )
    # 2 images x 2 steps, then frame 0 (steps 5, 6) and frame 1 (steps 7, 8): fail in frame 1
    ctx = LocalContext(
        root=gen_root, work_dir=tmp_path / "work", faults=FaultInjector("oom@generate.step:8")
    )
    with pytest.raises(torch.OutOfMemoryError):
        run_generate(spec, ctx)
    assert ctx.saved == {"phase": "walk", "done": 1, "last": "0000.png"}
    ctx.memory_rung = 1
    result = run_generate(spec, ctx)
    assert (result["rendered"], result["skipped"]) == (2, 3)
    assert len(result["walk_frames"]) == 3
