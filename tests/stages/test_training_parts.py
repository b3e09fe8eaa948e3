"""Captions, data order, checkpoint serialisation and loss weights, each on its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dropkiln.config import TrainSettings
from dropkiln.stages.training.captions import (
    augment_caption,
    needs_text_encoder,
    tag_frequency,
    tag_loss_weight,
)
from dropkiln.stages.training.data import DataOrder

CAPTION = "sks cat, red hair, smiling, outdoors, photo"


def _rng(seed: int = 0) -> Any:
    import numpy as np

    return np.random.Generator(np.random.PCG64(seed))


def test_plain_captions_are_left_exactly_as_written() -> None:
    options = TrainSettings()
    assert augment_caption("sks cat,red  hair", _rng(), options) == "sks cat,red  hair"
    assert not needs_text_encoder(options)


def test_shuffle_keeps_the_first_tags_in_place() -> None:
    options = TrainSettings(shuffle_tags=True, keep_tokens=1)
    assert needs_text_encoder(options)
    rng = _rng()
    seen = {augment_caption(CAPTION, rng, options) for _ in range(40)}
    assert len(seen) > 5
    for caption in seen:
        tags = caption.split(", ")
        assert tags[0] == "sks cat"
        assert sorted(tags) == sorted(CAPTION.split(", "))


def test_tag_and_caption_dropout() -> None:
    rng = _rng(1)
    dropped = [
        augment_caption(CAPTION, rng, TrainSettings(tag_dropout=0.5, keep_tokens=2))
        for _ in range(200)
    ]
    assert all(c.startswith("sks cat, red hair") for c in dropped)
    lengths = [len(c.split(", ")) for c in dropped]
    assert min(lengths) == 2 and max(lengths) == 5
    assert 2.9 < sum(lengths) / len(lengths) < 4.1  # about half of the three free tags
    empty = [augment_caption(CAPTION, rng, TrainSettings(caption_dropout=0.3)) for _ in range(400)]
    assert 0.2 < empty.count("") / len(empty) < 0.4
    assert set(empty) == {"", CAPTION}


def test_same_seed_same_augmentation() -> None:
    options = TrainSettings(shuffle_tags=True, tag_dropout=0.2, caption_dropout=0.1)
    first = [augment_caption(CAPTION, rng, options) for rng in [_rng(7)] for _ in range(20)]
    again = [augment_caption(CAPTION, rng, options) for rng in [_rng(7)] for _ in range(20)]
    assert first == again


def test_tag_weights_multiply_and_ignore_case() -> None:
    weights = {"Red Hair": 2.0, "outdoors": 1.5, "absent": 10.0}
    assert tag_loss_weight(CAPTION, weights) == 3.0
    assert tag_loss_weight("plain", weights) == 1.0
    assert tag_loss_weight(CAPTION, {}) == 1.0
    assert tag_frequency(["a, b", "b, c", "b"]) == {"b": 3, "a": 1, "c": 1}


def test_data_order_is_a_function_of_seed_and_position() -> None:
    buckets = {(64, 64): [0, 2, 4, 6, 8], (96, 64): [1, 3, 5, 7]}
    order = DataOrder(buckets, batch_size=2, seed=3)
    assert order.batches_per_epoch == 5
    epoch = [order.batch(p) for p in range(5)]
    assert sorted(i for batch in epoch for i in batch) == list(range(9))
    for batch in epoch:
        assert len({0 if i % 2 == 0 else 1 for i in batch}) == 1  # one bucket per batch
    next_epoch = [order.batch(p) for p in range(5, 10)]
    assert next_epoch != epoch
    fresh = DataOrder(buckets, batch_size=2, seed=3)
    assert [fresh.batch(p) for p in range(7, 10)] == next_epoch[2:]
    assert [DataOrder(buckets, 2, seed=4).batch(p) for p in range(5)] != epoch


def test_checkpoint_round_trip_without_pickle(tmp_path: Path) -> None:
    import numpy as np
    import torch

    from dropkiln.stages.training.checkpoint import (
        capture_global_rng,
        read_checkpoint,
        write_checkpoint,
    )

    state = {
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 2)}}},
        "groups": [{"betas": (0.9, 0.999), "lr": 1e-4, "params": [0, 1]}],
        "rng": capture_global_rng("cpu"),
        "array": np.arange(5, dtype=np.uint32),
        "nothing": None,
    }
    folder = write_checkpoint(tmp_path / "step-1", state)
    assert sorted(p.name for p in folder.iterdir()) == ["state.json", "tensors.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["step-1"]
    back = read_checkpoint(folder)
    assert back["optimizer"]["state"][0]["exp_avg"].equal(torch.ones(2, 2))
    assert back["groups"][0]["betas"] == (0.9, 0.999)
    assert back["rng"]["python"] == state["rng"]["python"]
    assert back["rng"]["torch"].equal(state["rng"]["torch"])
    assert (back["rng"]["numpy"]["state"]["key"] == state["rng"]["numpy"]["state"]["key"]).all()
    assert back["array"].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(TypeError, match="cannot checkpoint"):
        write_checkpoint(tmp_path / "bad", {"x": object()})


def test_min_snr_weights() -> None:
    import torch
    from diffusers import DDPMScheduler

    from dropkiln.stages.training.losses import min_snr_weights

    epsilon = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    timesteps = torch.tensor([0, 500, 999])
    weights = min_snr_weights(epsilon, timesteps, 5.0)
    assert weights[0] < 0.01  # high SNR at small t is capped at γ
    assert weights[2] == 1.0  # SNR below γ: full weight
    assert min_snr_weights(epsilon, timesteps, None).tolist() == [1.0, 1.0, 1.0]
    zero_snr = DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        rescale_betas_zero_snr=True,
    )
    assert torch.isfinite(min_snr_weights(zero_snr, timesteps, 5.0)).all()


def test_looking_stages_up_leaves_the_training_modules_unimported() -> None:
    """The training modules import torch at their top; the stage entry (train.py) imports
    them only when the stage runs, so the daemon's planner and the CLI stay light."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from dropkiln.stages import STAGE_NAMES, get_stage\n"
        "import dropkiln.daemon.planner\n"
        "for name in STAGE_NAMES:\n"
        "    get_stage(name)\n"
        "heavy = ('torch', 'diffusers', 'transformers', 'peft')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "print(sorted(m for m in sys.modules if m.startswith('dropkiln.stages.training.')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    heavy, training = done.stdout.splitlines()
    assert heavy == "[]"
    assert training == "[]"


def test_the_models_a_step_does_not_use_wait_off_the_device() -> None:
    from dropkiln.stages.training.phases import idle_while_stepping

    # captions from the cache: only the UNet steps
    assert idle_while_stepping(TrainSettings()) == ["vae", "text_encoder", "text_encoder_2"]
    # captions that change per step are encoded on the fly; trained encoders step too
    for options in (TrainSettings(shuffle_tags=True), TrainSettings(train_text_encoder=True)):
        assert idle_while_stepping(options) == ["vae"]
