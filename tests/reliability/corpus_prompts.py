"""Bad prompt-file drops: syntax, unknown keys, absurd values, escaping names, missing
LoRAs and models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.reliability import corpus_files as f
from tests.reliability.corpus import DropCase, Rejected


def _prompt(text: str | bytes, suffix: str = ".toml") -> Callable[[Path], Path]:
    def build(staging: Path) -> Path:
        path = staging.with_name(staging.name + suffix)
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        return path

    return build


def _prompt_image(**fields: str) -> str:
    """A prompt file with one [[image]] entry holding ``fields`` (TOML values as written)."""
    lines = "".join(f"{key} = {value}\n" for key, value in fields.items())
    return f'[defaults]\nsteps = 1\nwidth = 64\nheight = 64\n\n[[image]]\nprompt = "x"\n{lines}'


def _prompt_with_model(keys: list[str]) -> Callable[[Path], Path]:
    """A prompt file naming a checkpoint (written beside it) that holds only ``keys``."""

    def build(staging: Path) -> Path:
        import numpy as np
        from safetensors.numpy import save_file

        checkpoint = staging.parent / "sd2.safetensors"
        save_file({key: np.zeros(1, dtype=np.float32) for key in keys}, str(checkpoint))
        return _prompt(f'model = "{checkpoint}"\n' + _prompt_image())(staging)

    return build


def _prompt_link_out(staging: Path) -> Path:
    link = staging.with_name(staging.name + ".toml")
    link.symlink_to("/etc/hostname")
    return link


def _two_prompt_files(staging: Path) -> Path:
    staging.mkdir()
    (staging / "one.toml").write_text(_prompt_image())
    (staging / "two.txt").write_text("a red circle\n")
    return staging


BIG_PROMPT = "# padding\n" * 500_000 + '[[image]]\nprompt = "x"\n'

PROMPT_CASES = [
    DropCase(
        "prompt-link", "prompts", _prompt_link_out, Rejected(r"prompt-link.toml is a symlink")
    ),
    DropCase(
        "prompt-malformed-toml",
        "prompts",
        _prompt('[[image]\nprompt = "x"\n'),
        Rejected(r"not valid TOML"),
    ),
    DropCase(
        "prompt-malformed-json",
        "prompts",
        _prompt('{"image": [{"prompt": "x"}', ".json"),
        Rejected(r"not valid JSON"),
    ),
    DropCase(
        "prompt-json-list",
        "prompts",
        _prompt('[{"prompt": "x"}]', ".json"),
        Rejected(r"the top level must be a table/object"),
    ),
    DropCase(
        "prompt-unknown-key",
        "prompts",
        _prompt(_prompt_image(stepz="3")),
        Rejected(r"image\[0\]\.stepz: unknown key \(did you mean 'steps'\?\)"),
    ),
    DropCase(
        "prompt-negative-steps",
        "prompts",
        _prompt(_prompt_image(steps="-1")),
        Rejected(r"image\[0\]\.steps: Input should be greater than or equal to 1"),
    ),
    DropCase(
        "prompt-absurd-size",
        "prompts",
        _prompt(_prompt_image(width="1000000")),
        Rejected(r"image\[0\]\.width: Input should be less than or equal to 16384"),
    ),
    DropCase(
        "prompt-over-max-pixels",
        "prompts",
        _prompt(_prompt_image(width="16384", height="16384")),
        Rejected(r"size 16384x16384 is over max_pixels"),
    ),
    DropCase(
        "prompt-odd-size",
        "prompts",
        _prompt(_prompt_image(width="65")),
        Rejected(r"must be a multiple of 8 \(got 65\)"),
    ),
    DropCase(
        "prompt-absurd-count",
        "prompts",
        _prompt(_prompt_image(count="100000")),
        Rejected(r"image\[0\]\.count: Input should be less than or equal to 1000"),
    ),
    DropCase(
        "prompt-negative-seed",
        "prompts",
        _prompt(_prompt_image(seed="-3")),
        Rejected(r"image\[0\]\.seed: Input should be greater than or equal to 0"),
    ),
    DropCase(
        "prompt-name-escapes",
        "prompts",
        _prompt(_prompt_image(name='"../../etc/cron.d/x"')),
        Rejected(r"would leave the output folder"),
    ),
    DropCase(
        "prompt-name-absolute",
        "prompts",
        _prompt(_prompt_image(name='"/tmp/x"')),
        Rejected(r"would leave the output folder"),
    ),
    DropCase(
        "prompt-missing-lora",
        "prompts",
        _prompt('loras = ["ghost"]\n' + _prompt_image()),
        Rejected(r"LoRA 'ghost' does not exist"),
    ),
    DropCase(
        "prompt-missing-lora-file",
        "prompts",
        _prompt('loras = [{ name = "/nowhere/ghost.safetensors" }]\n' + _prompt_image()),
        Rejected(r"LoRA '/nowhere/ghost\.safetensors': no such \.safetensors file"),
    ),
    DropCase(
        "prompt-unknown-scheduler",
        "prompts",
        _prompt(_prompt_image(scheduler='"warp"')),
        Rejected(r"unknown scheduler 'warp'"),
    ),
    DropCase(
        "prompt-unknown-model",
        "prompts",
        _prompt('model = "no-such-model"\n' + _prompt_image()),
        Rejected(r"model 'no-such-model' is neither tiny-shapes nor tiny-sdxl nor tiny-sd15"),
    ),
    DropCase(
        "prompt-sd2-checkpoint",
        "prompts",
        _prompt_with_model(["cond_stage_model.model.ln_final.weight"]),
        Rejected(r"model '.*sd2\.safetensors': sd2\.safetensors is an SD 2\.x checkpoint"),
    ),
    DropCase(
        "prompt-missing-vae",
        "prompts",
        _prompt('vae = "/nowhere/vae.safetensors"\n' + _prompt_image()),
        Rejected(r"vae '/nowhere/vae\.safetensors': /nowhere/vae\.safetensors does not exist"),
    ),
    DropCase(
        "prompt-pickled-vae",
        "prompts",
        _prompt('vae = "/nowhere/vae.ckpt"\n' + _prompt_image()),
        Rejected(r"vae '/nowhere/vae\.ckpt': vae\.ckpt is not a \.safetensors VAE"),
    ),
    DropCase(
        "prompt-control-escapes",
        "prompts",
        _prompt(_prompt_image(control='{ image = "../../../etc/passwd" }')),
        Rejected(r"leaves the prompt file's folder"),
    ),
    DropCase(
        "prompt-walk-one-image",
        "prompts",
        _prompt(_prompt_image() + '\n[video]\nkind = "latent-walk"\n'),
        Rejected(r"a latent walk needs at least two images"),
    ),
    DropCase(
        "prompt-no-images",
        "prompts",
        _prompt("[defaults]\nsteps = 3\n"),
        Rejected(r"no \[\[image\]\] entries"),
    ),
    DropCase("prompt-empty", "prompts", _prompt(""), Rejected(r"no \[\[image\]\] entries")),
    DropCase(
        "prompt-only-comments",
        "prompts",
        _prompt("# one prompt a line\n\n# none yet\n", ".txt"),
        Rejected(r"no prompts \(one prompt a line; # starts a comment\)"),
    ),
    DropCase(
        "prompt-latin1",
        "prompts",
        _prompt('[[image]]\nprompt = "café"\n'.encode("latin-1")),
        Rejected(r"cannot be read"),
    ),
    DropCase("prompt-binary", "prompts", _prompt(f.png_bytes()), Rejected(r"cannot be read")),
    DropCase(
        "prompt-huge", "prompts", _prompt(BIG_PROMPT), Rejected(r"larger than 4,000,000 bytes")
    ),
    DropCase(
        "prompt-two-files",
        "prompts",
        _two_prompt_files,
        Rejected(r"holds exactly one \.toml, \.json or \.txt prompt file \(found 2\)"),
    ),
    DropCase(
        "prompt-wrong-suffix",
        "prompts",
        _prompt("prompt: x\n", ".yaml"),
        Rejected(r"not a prompt file \(expected \.toml, \.json or \.txt\)"),
    ),
]
