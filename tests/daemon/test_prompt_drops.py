"""Prompt files through a real daemon: planning, LoRA dependencies, control folders, rejects."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from dropkiln.config import Settings
from dropkiln.store import list_jobs
from tests.daemon.harness import ended, running_daemon, wait_job
from tests.daemon.test_ingest import SMALL, drop_dataset, wait_drops

pytestmark = pytest.mark.slow

TINY = """
[defaults]
steps = 2
width = 64
height = 64
"""


@pytest.fixture
def small(settings: Settings) -> Settings:
    settings.train.steps = 2
    settings.train.checkpoint_every = 1
    settings.train.rank = 2
    return settings


def place(settings: Settings, name: str, text: str) -> None:
    staging = settings.root / f".{name}.part"
    staging.write_text(text)
    staging.rename(settings.paths.prompts / name)


async def test_bad_prompt_files_are_rejected_with_the_field_named(small: Settings) -> None:
    async with running_daemon(small) as daemon:
        place(small, "typo.toml", TINY + '[[image]]\nprompt = "x"\nstpes = 3\n')
        place(small, "nolora.toml", 'loras = ["ghost"]\n' + TINY + '[[image]]\nprompt = "x"\n')
        place(
            small, "nomodel.toml", 'model = "/nowhere/model"\n' + TINY + '[[image]]\nprompt = "x"\n'
        )
        place(small, "escape.toml", TINY + '[[image]]\nprompt = "x"\nname = "../up"\n')
        drops = {d["name"]: d for d in await wait_drops(daemon.store, 4)}
        assert {d["state"] for d in drops.values()} == {"failed"}
        assert "stpes" in str(drops["typo"]["reason"])
        assert "ghost" in str(drops["nolora"]["reason"])
        assert "/nowhere/model" in str(drops["nomodel"]["reason"])
        assert "name" in str(drops["escape"]["reason"])
        for name in ("typo", "nolora", "nomodel", "escape"):
            assert (small.paths.failed / f"{name}.toml").is_file()
            assert (small.paths.failed / f"{name}.toml.error.txt").is_file()
        assert await list_jobs(daemon.store) == []


async def test_a_prompt_using_a_lora_in_training_waits_for_it_then_renders(
    small: Settings,
) -> None:
    async with running_daemon(small) as daemon:
        drop_dataset(small, "shapes", toml=SMALL)
        await wait_drops(daemon.store, 1)
        prompt = 'loras = [{ name = "shapes", weight = 0.7 }]\n' + TINY
        prompt += (
            '[[image]]\nprompt = "shape"\ncount = 2\n[video]\nfps = 4\nseconds_per_image = 0.5\n'
        )
        place(small, "use.toml", prompt)
        await wait_drops(daemon.store, 2)
        jobs = {j.stage: j for j in await list_jobs(daemon.store)}
        assert jobs["generate"].depends_on == [jobs["train"].id]
        assert jobs["video"].depends_on == [jobs["generate"].id]
        video = await wait_job(daemon.store, jobs["video"].id, ended, timeout=180)
        assert video.state == "succeeded", video.error
        generate = await wait_job(daemon.store, jobs["generate"].id, ended)
        assert generate.result is not None
        assert [Path(p).name for p in generate.result["images"]] == ["000-1.png", "001-2.png"]
        assert generate.result["loras"][0]["name"] == "shapes"
        assert (small.paths.videos / "use.mp4").is_file()


async def test_a_prompt_folder_with_a_control_image_renders_from_processed(
    small: Settings,
) -> None:
    folder = small.root / "staging" / "posed"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64), "white").save(folder / "pose.png")
    (folder / "prompts.toml").write_text(
        TINY + '[[image]]\nprompt = "x"\ncontrol = { image = "pose.png", scale = 0.5 }\n'
    )
    async with running_daemon(small) as daemon:
        folder.rename(small.paths.prompts / "posed")
        (drop,) = await wait_drops(daemon.store, 1)
        assert drop["state"] == "ingested", drop["reason"]
        (job,) = await list_jobs(daemon.store)
        control = job.spec["prompt_file"]["images"][0]["control"][0]["image"]
        assert control.startswith(str(small.paths.processed))
        job = await wait_job(daemon.store, job.id, ended, timeout=120)
        assert job.state == "succeeded", job.error


async def test_a_prompt_folder_with_init_image_and_mask_renders_from_processed(
    small: Settings,
) -> None:
    folder = small.root / "staging" / "repaint"
    (folder / "in").mkdir(parents=True)
    Image.new("RGB", (64, 64), "white").save(folder / "in" / "start.png")
    Image.new("L", (64, 64), 255).save(folder / "in" / "mask.png")
    (folder / "prompts.toml").write_text(
        TINY + '[[image]]\nprompt = "x"\ninit_image = "in/start.png"\nmask = "in/mask.png"\n'
    )
    async with running_daemon(small) as daemon:
        folder.rename(small.paths.prompts / "repaint")
        (drop,) = await wait_drops(daemon.store, 1)
        assert drop["state"] == "ingested", drop["reason"]
        (job,) = await list_jobs(daemon.store)
        entry = job.spec["prompt_file"]["images"][0]
        for field in ("init_image", "mask"):
            assert entry[field].startswith(str(small.paths.processed)), entry[field]
            assert Path(entry[field]).is_file()
        job = await wait_job(daemon.store, job.id, ended, timeout=120)
        assert job.state == "succeeded", job.error


async def test_a_prompt_folder_with_reference_images_renders_from_processed(
    small: Settings,
) -> None:
    folder = small.root / "staging" / "referenced"
    folder.mkdir(parents=True)
    Image.new("RGB", (40, 40), "red").save(folder / "face.png")
    (folder / "prompts.toml").write_text(
        TINY + '[[image]]\nprompt = "x"\nreference = { image = "face.png", weight = 0.7 }\n'
    )
    async with running_daemon(small) as daemon:
        folder.rename(small.paths.prompts / "referenced")
        (drop,) = await wait_drops(daemon.store, 1)
        assert drop["state"] == "ingested", drop["reason"]
        (job,) = await list_jobs(daemon.store)
        (reference,) = job.spec["prompt_file"]["images"][0]["reference"]
        assert reference["image"].startswith(str(small.paths.processed)), reference
        assert Path(reference["image"]).is_file()
        job = await wait_job(daemon.store, job.id, ended, timeout=120)
        assert job.state == "succeeded", job.error


async def test_a_prompt_folder_with_an_audio_track_makes_a_video_with_sound(
    small: Settings,
) -> None:
    import wave

    folder = small.root / "staging" / "tune"
    folder.mkdir(parents=True)
    with wave.open(str(folder / "tone.wav"), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(b"\x00\x10" * 8000)
    (folder / "prompts.toml").write_text(
        TINY + '[[image]]\nprompt = "x"\n[video]\naudio = "tone.wav"\naudio_fit = "loop"\n'
    )
    async with running_daemon(small) as daemon:
        folder.rename(small.paths.prompts / "tune")
        (drop,) = await wait_drops(daemon.store, 1)
        assert drop["state"] == "ingested", drop["reason"]
        (video,) = [job for job in await list_jobs(daemon.store) if job.stage == "video"]
        assert video.spec["options"]["audio"].startswith(str(small.paths.processed))
        video = await wait_job(daemon.store, video.id, ended, timeout=120)
        assert video.state == "succeeded", video.error


async def test_a_vae_file_is_checked_at_drop_time_and_used_by_the_render(
    small: Settings,
) -> None:
    from dropkiln.stages.models import ensure_tiny_model

    # The tiny model's own VAE as a standalone file: it fits, so the render succeeds.
    tiny = ensure_tiny_model("tiny-sdxl", small.paths.models)
    own_vae = tiny / "vae" / "diffusion_pytorch_model.safetensors"
    pickled = small.root / "vae.pt"
    pickled.write_bytes(b"\x80\x04not loaded")
    async with running_daemon(small) as daemon:
        place(small, "novae.toml", 'vae = "/nowhere/vae.safetensors"\n' + TINY + IMAGE)
        place(small, "pickled.toml", f'vae = "{pickled}"\n' + TINY + IMAGE)
        place(small, "withvae.toml", f'vae = "{own_vae}"\n' + TINY + IMAGE)
        drops = {d["name"]: d for d in await wait_drops(daemon.store, 3)}
        assert "vae '/nowhere/vae.safetensors'" in str(drops["novae"]["reason"])
        assert "does not exist" in str(drops["novae"]["reason"])
        assert "never loaded" in str(drops["pickled"]["reason"])
        assert (small.paths.failed / "pickled.toml.error.txt").is_file()
        assert drops["withvae"]["state"] == "ingested", drops["withvae"]["reason"]
        (job,) = await list_jobs(daemon.store)
        assert job.spec["vae"] == str(own_vae)
        job = await wait_job(daemon.store, job.id, ended, timeout=120)
        assert job.state == "succeeded", job.error


IMAGE = '[[image]]\nprompt = "x"\n'


def test_the_first_drop_after_start_imports_nothing(tmp_path: Path) -> None:
    # Issue 16: reading a drop imported the prompt-file models, the dataset reader and each
    # stage's spec on first use: a third of a second (busy 2-core box) in the pickup of the
    # first drop after the daemon started. The daemon's planner loads them when it is made.
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from pathlib import Path\n"
        "from dropkiln.config import Settings\n"
        "from dropkiln.daemon.drops import PROMPTS, parse_drop\n"
        "from dropkiln.daemon.planner import Planner\n"
        f"root = Path({str(tmp_path)!r})\n"
        "settings = Settings.load(root=root)\n"
        "settings.paths.create()\n"
        "Planner(settings, None)\n"
        "before = set(sys.modules)\n"
        "entry = settings.paths.prompts / 'p.toml'\n"
        "entry.write_text('[[image]]\\nprompt = \"a cat\"\\n')\n"
        "parse_drop(settings, entry, PROMPTS, 'd1')\n"
        "from dropkiln.stages.generate import GenerateSpec\n"
        "from dropkiln.stages.video import VideoSpec\n"
        "from dropkiln.stages.train import TrainSpec\n"
        "late = sorted(m for m in set(sys.modules) - before if m.startswith('dropkiln'))\n"
        "assert not late, late\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
