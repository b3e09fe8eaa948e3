"""The generate stage on the tiny models: outputs, determinism, diffusers parity, resuming,
every rung of the memory ladder, stopping, previews and LoRAs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from dropkiln.stages.base import StageError, StageStopped
from dropkiln.stages.faults import FaultInjector
from dropkiln.stages.generate import STAGE, GenerateSpec, LoraFile, resolution, run_generate
from dropkiln.stages.generation.memory_ladder import GENERATE_LADDER
from dropkiln.stages.generation.png_files import read_dropkiln_record, read_png_text
from dropkiln.stages.generation.prompt_file import ImageEntry, PromptFile
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
    """A ROOT whose state/models is the session's tiny models (one fixed path: one warm load)."""
    root = models_dir.parent / "generate-root"
    (root / "state").mkdir(parents=True, exist_ok=True)
    link = root / "state" / "models"
    if not link.exists():
        link.symlink_to(models_dir, target_is_directory=True)
    return root


@pytest.fixture(scope="session")
def lora_file(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers-format LoRA for tiny-sdxl with random (non-zero) weights."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(models_dir / "tiny-sdxl", subfolder="unet")
    config = LoraConfig(
        r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v"]
    )
    unet.add_adapter(config)
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionXLPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True
    )
    (path,) = folder.glob("*.safetensors")
    return path


def entries(*prompts: str, **fields: Any) -> PromptFile:
    options = {"steps": 2, "width": 64, "height": 64, **fields}
    return PromptFile(images=[ImageEntry(prompt=p, **options) for p in prompts])


def spec_for(out: Path, prompt_file: PromptFile, **fields: Any) -> GenerateSpec:
    options: dict[str, Any] = {"name": "job", "model": "tiny-sdxl", **fields}
    return GenerateSpec(prompt_file=prompt_file, output_dir=str(out), **options)


def local(root: Path, tmp_path: Path, **options: Any) -> LocalContext:
    return LocalContext(root=root, work_dir=tmp_path / "work", **options)


def pixels(path: Path | str) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


_direct: dict[str, Any] = {}


def direct_pipeline(models_dir: Path, model: str) -> Any:
    """A pipeline loaded on its own, not the stage's warm one (loaded once per session)."""
    from dropkiln.stages.models import load_pipeline, resolve_model

    if model not in _direct:
        _direct[model] = load_pipeline(resolve_model(model, models_dir), "cpu", torch.float32)
    return _direct[model]


def test_stage_definition() -> None:
    assert (STAGE.name, STAGE.lane, STAGE.priority) == ("generate", "gpu", 10)
    assert [rung.name for rung in STAGE.ladder] == [
        "default",
        "attention-vae-slicing",
        "vae-tiling",
        "model-cpu-offload",
        "sequential-cpu-offload",
    ]


def test_outputs_metadata_and_artifacts(gen_root: Path, tmp_path: Path) -> None:
    prompt_file = PromptFile(
        images=[
            ImageEntry(
                prompt="a cat",
                negative="blurry",
                count=2,
                seed=5,
                steps=2,
                width=64,
                height=64,
                scheduler="dpm++ 2m karras",
                name="cat",
            ),
            ImageEntry(prompt="a dog", steps=3, width=64, height=128, seed=9, guidance=3.0),
        ]
    )
    ctx = local(gen_root, tmp_path)
    spec = spec_for(tmp_path / "out", prompt_file)
    assert resolution(spec) == "64x128"
    result = run_generate(spec, ctx)
    names = [Path(p).name for p in result["images"]]
    assert names == ["000-5-cat.png", "001-6-cat.png", "002-9.png"]
    assert pixels(result["images"][2]).shape == (128, 64, 3)
    assert ctx.artifacts == [
        *[(Path(p), "image") for p in result["images"]],
        (tmp_path / "out" / "contact-sheet.png", "contact-sheet"),
    ]
    parameters = read_png_text(Path(result["images"][1]))["parameters"]
    assert parameters.splitlines()[:2] == ["a cat", "Negative prompt: blurry"]
    assert "Steps: 2, Sampler: DPM++ 2M Karras, CFG scale: 5, Seed: 6, Size: 64x64" in parameters
    # AutoV2: the checkpoint file's sha256, first 10 hex (a tiny model's is its UNet file)
    unet = (
        gen_root / "state" / "models" / "tiny-sdxl" / "unet" / "diffusion_pytorch_model.safetensors"
    )
    autov2 = hashlib.sha256(unet.read_bytes()).hexdigest()[:10]
    assert f"Model hash: {autov2}, Model: tiny-sdxl" in parameters
    record = read_dropkiln_record(Path(result["images"][1]))
    assert record is not None
    assert record["image"]["seed"] == 6 and record["image"]["scheduler"] == "dpm++ 2m karras"
    assert record["model"]["fingerprint"] == result["model"]["fingerprint"]
    assert record["model_name"] == "tiny-sdxl"
    assert record["memory_rung"] == "default"
    # progress: every denoising step of every image, in order, up to the total
    assert [done for done, _, _ in ctx.progress_log] == list(range(1, 8))
    assert ctx.progress_log[-1] == (7, 7, {"image": 2, "step": 3})
    assert [c["done"] for c in ctx.checkpoints] == [1, 2, 3]
    with Image.open(result["contact_sheet"]) as sheet:
        assert sheet.width >= 2 * 64


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-sd15"])
def test_same_file_same_bytes_and_equal_to_a_direct_diffusers_call(
    gen_root: Path, models_dir: Path, tmp_path: Path, model: str
) -> None:
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    prompt_file = PromptFile(
        images=[
            ImageEntry(prompt="a red fox", seed=3, steps=3, width=64, height=64),
            ImageEntry(
                prompt="a ship",
                negative="fog",
                seed=4,
                steps=3,
                width=64,
                height=64,
                scheduler="dpm++ 2m karras",
                guidance=7.0,
                count=2,
            ),
        ]
    )
    first = run_generate(
        spec_for(tmp_path / "a", prompt_file, model=model), local(gen_root, tmp_path)
    )
    second = run_generate(
        spec_for(tmp_path / "b", prompt_file, model=model), local(gen_root, tmp_path / "2")
    )
    for one, two in zip(first["images"], second["images"], strict=True):
        assert Path(one).read_bytes() == Path(two).read_bytes()

    pipe = direct_pipeline(models_dir, model)
    original = pipe.scheduler
    config = original.config
    pipe.scheduler = EulerDiscreteScheduler.from_config(config)
    fox = pipe(
        prompt="a red fox",
        num_inference_steps=3,
        guidance_scale=5.0,
        width=64,
        height=64,
        generator=torch.Generator().manual_seed(3),
    ).images[0]
    ships = []
    for seed in (4, 5):  # the stage reuses its scheduler for the second ship: no difference
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True)
        ship = pipe(
            prompt="a ship",
            negative_prompt="fog",
            num_inference_steps=3,
            guidance_scale=7.0,
            width=64,
            height=64,
            generator=torch.Generator().manual_seed(seed),
        ).images[0]
        ships.append(np.asarray(ship))
    pipe.scheduler = original
    assert np.array_equal(pixels(first["images"][0]), np.asarray(fox))
    assert np.array_equal(pixels(first["images"][1]), ships[0])
    assert np.array_equal(pixels(first["images"][2]), ships[1])


@pytest.mark.slow
def test_lora_matches_diffusers_and_is_unloaded_after(
    gen_root: Path, models_dir: Path, tmp_path: Path, lora_file: Path
) -> None:
    prompt_file = entries("a cat", seed=2, steps=3)
    lora = LoraFile(name="cats", path=str(lora_file), weight=0.7)
    with_lora = run_generate(
        spec_for(tmp_path / "lora", prompt_file, loras=[lora]), local(gen_root, tmp_path)
    )
    without = run_generate(spec_for(tmp_path / "plain", prompt_file), local(gen_root, tmp_path))

    pipe = direct_pipeline(models_dir, "tiny-sdxl")
    kwargs = dict(prompt="a cat", num_inference_steps=3, guidance_scale=5.0, width=64, height=64)
    plain = pipe(generator=torch.Generator().manual_seed(2), **kwargs).images[0]
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name="c")
    try:
        pipe.set_adapters(["c"], adapter_weights=[0.7])
        lora_image = pipe(generator=torch.Generator().manual_seed(2), **kwargs).images[0]
    finally:
        pipe.unload_lora_weights()

    assert not np.array_equal(np.asarray(plain), np.asarray(lora_image))
    assert np.array_equal(pixels(with_lora["images"][0]), np.asarray(lora_image))
    assert np.array_equal(pixels(without["images"][0]), np.asarray(plain))
    parameters = read_png_text(Path(with_lora["images"][0]))["parameters"]
    assert parameters.startswith("a cat <lora:cats:0.7>")
    assert f'Lora hashes: "cats: {with_lora["loras"][0]["sha256"][:12]}"' in parameters


def test_a_lora_that_does_not_exist_fails_clearly(gen_root: Path, tmp_path: Path) -> None:
    lora = LoraFile(name="ghost", path=str(tmp_path / "ghost.safetensors"))
    with pytest.raises(StageError, match=r"LoRA ghost: file .* is missing"):
        run_generate(spec_for(tmp_path, entries("x"), loras=[lora]), local(gen_root, tmp_path))


@pytest.mark.parametrize("rung", range(len(GENERATE_LADDER)))
def test_oom_at_every_rung_resumes_one_rung_down_without_redoing_images(
    gen_root: Path, tmp_path: Path, rung: int
) -> None:
    spec = spec_for(tmp_path / "out", entries("a", "b", "c"))
    # two steps an image: the third step is the first of image 1
    ctx = local(gen_root, tmp_path, memory_rung=rung, faults=FaultInjector("oom@generate.step:3"))
    with pytest.raises(torch.OutOfMemoryError):
        run_generate(spec, ctx)
    done = tmp_path / "out" / "000-1.png"
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [done.name]
    assert ctx.saved == {"phase": "images", "done": 1, "last": done.name}
    stamp = done.stat().st_mtime_ns

    ctx.memory_rung = min(rung + 1, len(GENERATE_LADDER) - 1)
    result = run_generate(spec, ctx)
    assert (result["rendered"], result["skipped"]) == (2, 1)
    assert done.stat().st_mtime_ns == stamp
    assert result["memory_rung"] == GENERATE_LADDER[ctx.memory_rung].name
    record = read_dropkiln_record(Path(result["images"][2]))
    assert record is not None and record["memory_rung"] == result["memory_rung"]


def test_rungs_leave_the_warm_pipeline_as_loaded(gen_root: Path, tmp_path: Path) -> None:
    from dropkiln.stages.models import resolve_model, shared_pipelines

    spec = spec_for(tmp_path / "before", entries("a"))
    before = run_generate(spec, local(gen_root, tmp_path))
    for rung in (4, 3, 2, 1):
        run_generate(
            spec_for(tmp_path / f"r{rung}", entries("a")),
            local(gen_root, tmp_path, memory_rung=rung),
        )
    after = run_generate(spec_for(tmp_path / "after", entries("a")), local(gen_root, tmp_path))
    assert Path(after["images"][0]).read_bytes() == Path(before["images"][0]).read_bytes()
    pipe = shared_pipelines().get(
        resolve_model("tiny-sdxl", gen_root / "state" / "models"), "cpu", torch.float32
    )
    modules = [
        m for c in pipe.components.values() if isinstance(c, torch.nn.Module) for m in c.modules()
    ]
    assert not any(hasattr(m, "_hf_hook") for m in modules)
    assert pipe.unet.device.type == "cpu" and not pipe.vae.use_tiling and not pipe.vae.use_slicing


@pytest.mark.parametrize("point", ["generate.decode", "generate.image"])
def test_faults_before_decode_and_before_writing(
    gen_root: Path, tmp_path: Path, point: str
) -> None:
    spec = spec_for(tmp_path / "out", entries("a", "b"))
    ctx = local(gen_root, tmp_path, faults=FaultInjector(f"oom@{point}:2"))
    with pytest.raises(torch.OutOfMemoryError):
        run_generate(spec, ctx)
    assert [p.name for p in (tmp_path / "out").glob("*.png")] == ["000-1.png"]
    ctx.memory_rung = 1
    assert run_generate(spec, ctx)["rendered"] == 1


def test_stop_during_denoising_writes_no_partial_image(gen_root: Path, tmp_path: Path) -> None:
    spec = spec_for(tmp_path / "out", entries("a", "b", "c"))
    # should_stop calls: before image 0, its 2 steps, before image 1, then its first step
    ctx = local(gen_root, tmp_path, stop_after=5)
    with pytest.raises(StageStopped):
        run_generate(spec, ctx)
    assert [p.name for p in (tmp_path / "out").glob("*.png")] == ["000-1.png"]
    assert ctx.saved == {"phase": "images", "done": 1}
    ctx.stop_after = None
    result = run_generate(spec, ctx)
    assert (result["rendered"], result["skipped"]) == (2, 1)


def test_stop_between_images_checkpoints_first(gen_root: Path, tmp_path: Path) -> None:
    spec = spec_for(tmp_path / "out", entries("a", "b"))
    ctx = local(gen_root, tmp_path, stop_after=4)  # the check before image 1
    with pytest.raises(StageStopped):
        run_generate(spec, ctx)
    assert ctx.saved == {"phase": "images", "done": 1}


def test_after_a_kill_finished_images_are_recognised_by_content(
    gen_root: Path, tmp_path: Path
) -> None:
    spec = spec_for(tmp_path / "out", entries("a", "b"))
    first = run_generate(spec, local(gen_root, tmp_path))
    kept, stale = (Path(p) for p in first["images"])
    # an image of other content under the same name (an older file, a half-done job)
    other = run_generate(spec_for(tmp_path / "other", entries("x", "y")), local(gen_root, tmp_path))
    os.replace(other["images"][1], stale)
    stamp = kept.stat().st_mtime_ns
    again = run_generate(spec, local(gen_root, tmp_path / "fresh"))  # no checkpoint at all
    assert (again["rendered"], again["skipped"]) == (1, 1)
    assert kept.stat().st_mtime_ns == stamp
    assert stale.read_bytes() == Path(first["images"][1]).read_bytes() != b""


def test_preview_every_n_steps(gen_root: Path, tmp_path: Path) -> None:
    ctx = local(gen_root, tmp_path)
    run_generate(spec_for(tmp_path / "out", entries("a", steps=4), preview_every=2), ctx)
    previews = [path for path, kind in ctx.artifacts if kind == "preview"]
    assert previews == [tmp_path / "out" / "preview.png"] * 2
    with Image.open(previews[0]) as preview:
        assert preview.size == (128, 128)  # 8x8 latent, scaled up


def test_clip_skip_matches_diffusers_counting(
    gen_root: Path, models_dir: Path, tmp_path: Path
) -> None:
    skipped = run_generate(
        spec_for(tmp_path / "skip", entries("a cat", clip_skip=2)), local(gen_root, tmp_path)
    )
    plain = run_generate(spec_for(tmp_path / "plain", entries("a cat")), local(gen_root, tmp_path))
    assert not np.array_equal(pixels(skipped["images"][0]), pixels(plain["images"][0]))
    pipe = direct_pipeline(models_dir, "tiny-sdxl")
    direct = pipe(
        prompt="a cat",
        num_inference_steps=2,
        width=64,
        height=64,
        guidance_scale=5.0,
        clip_skip=1,
        generator=torch.Generator().manual_seed(1),
    ).images[0]
    assert np.array_equal(pixels(skipped["images"][0]), np.asarray(direct))
    with pytest.raises(StageError, match="clip_skip 9 is more than"):
        run_generate(spec_for(tmp_path / "x", entries("a", clip_skip=9)), local(gen_root, tmp_path))


@pytest.mark.parametrize("kind", ["oom", "oom-cuda-error", "oom-cudnn"])
def test_generate_decode_fires_inside_the_vae_decode(
    gen_root: Path, tmp_path: Path, kind: str
) -> None:
    import traceback

    from dropkiln.stages.device import is_out_of_memory

    spec = spec_for(tmp_path / "out", entries("a", "b"))
    ctx = local(gen_root, tmp_path, faults=FaultInjector(f"{kind}@generate.decode:2"))
    with pytest.raises(Exception) as raised:
        run_generate(spec, ctx)
    assert is_out_of_memory(raised.value), raised.value
    frames = [frame.name for frame in traceback.extract_tb(raised.value.__traceback__)]
    # raised by the VAE's decoder, called from the pipeline's decode, mid-image
    assert "decode" in frames and frames.index("decode") > frames.index("render_batch")
    assert [p.name for p in (tmp_path / "out").glob("*.png")] == ["000-1.png"]
    ctx.memory_rung = 1
    assert run_generate(spec, ctx)["rendered"] == 1


@pytest.mark.parametrize(("kind", "text"), [("eio", "Input/output error"),
                                            ("enospc", "No space left on device")])  # fmt: skip
def test_a_torn_png_write_fails_the_image_and_leaves_nothing_half_written(
    gen_root: Path, tmp_path: Path, kind: str, text: str
) -> None:
    spec = spec_for(tmp_path / "out", entries("a", "b"))
    ctx = local(gen_root, tmp_path, faults=FaultInjector(f"{kind}@generate.image:2"))
    with pytest.raises(OSError, match=text):
        run_generate(spec, ctx)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["000-1.png"]
    result = run_generate(spec, ctx)
    assert (result["rendered"], result["skipped"]) == (1, 1)
