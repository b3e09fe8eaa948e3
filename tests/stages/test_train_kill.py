"""A training process killed with SIGKILL resumes from its checkpoint to the same LoRA."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from dataset_fixtures import make_dataset, mixed_images

from dropkiln.config import TrainSettings
from dropkiln.stages.bucket import BucketResult
from dropkiln.stages.cache import STAGE as CACHE
from dropkiln.stages.cache import CacheResult, CacheSpec
from dropkiln.stages.testing import LocalContext
from dropkiln.stages.train import STAGE, TrainSpec, lora_path
from dropkiln.stages.training.exports import step_lora_path

# The stage in a fresh process, with a context whose checkpoint record survives a kill.
WORKER = """
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from dropkiln.stages.base import write_atomic
from dropkiln.stages.faults import FaultInjector
from dropkiln.stages.testing import LocalContext
from dropkiln.stages.train import STAGE, TrainSpec

class DurableContext(LocalContext):
    def checkpoint(self, state):
        write_atomic(self.work_dir / "resume.json", json.dumps(state))
        super().checkpoint(state)

    def resume_state(self):
        record = self.work_dir / "resume.json"
        return json.loads(record.read_text()) if record.exists() else None

args = json.loads(sys.argv[1])
ctx = DurableContext(
    root=Path(args["root"]),
    work_dir=Path(args["work_dir"]),
    upstream_results={"cache": args["cache"]},
    faults=FaultInjector(args["faults"]),
)
STAGE.run(TrainSpec.model_validate(args["spec"]), ctx)
"""

OPTIONS = {
    "steps": 6,
    "checkpoint_every": 2,
    "batch_size": 2,
    "rank": 4,
    "learning_rate": 5e-3,
    "ema_decay": 0.9,
    "shuffle_tags": True,
    "flip_augment": True,
    "noise_offset": 0.05,
}


def _spec(root: Path, run: str) -> TrainSpec:
    return TrainSpec(
        name="cats",
        model="tiny-sdxl",
        options=TrainSettings(**OPTIONS),
        output_dir=str(root / "outputs" / "loras" / run),
    )


def _worker(root: Path, cache: CacheResult, spec: TrainSpec, faults: str) -> int:
    args = {
        "root": str(root),
        "work_dir": str(root / "state" / "work" / "killed"),
        "cache": cache.model_dump(mode="json"),
        "spec": spec.model_dump(mode="json"),
        "faults": faults,
    }
    done = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(args)],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode in (0, -signal.SIGKILL), done.stderr
    return done.returncode


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_lora(dropkiln_root: Path) -> None:
    from safetensors.torch import load_file

    manifest = make_dataset(dropkiln_root, "cats", mixed_images(4))
    cache = CACHE.run(
        CacheSpec(name="cats", flip_augment=True),
        LocalContext(
            root=dropkiln_root,
            work_dir=dropkiln_root / "state" / "work" / "cache",
            upstream_results={"bucket": BucketResult.of(manifest)},
        ),
    )
    reference = _spec(dropkiln_root, "reference")
    ctx = LocalContext(
        root=dropkiln_root,
        work_dir=dropkiln_root / "state" / "work" / "reference",
        upstream_results={"cache": cache},
    )
    STAGE.run(reference, ctx)

    killed = _spec(dropkiln_root, "killed")
    assert _worker(dropkiln_root, cache, killed, "kill@train.step:5") == -signal.SIGKILL
    record = json.loads((dropkiln_root / "state" / "work" / "killed" / "resume.json").read_text())
    assert record["step"] == 4
    assert not lora_path(killed.output_dir, "cats").exists()
    assert _worker(dropkiln_root, cache, killed, "") == 0

    expected = load_file(str(lora_path(reference.output_dir, "cats")))
    resumed = load_file(str(lora_path(killed.output_dir, "cats")))
    assert sorted(resumed) == sorted(expected)
    assert [k for k in expected if not expected[k].equal(resumed[k])] == []
    # the per-checkpoint LoRAs, one written before the kill and one after, match too
    for step in (2, 4):
        expected = load_file(str(step_lora_path(reference.output_dir, "cats", step)))
        resumed = load_file(str(step_lora_path(killed.output_dir, "cats", step)))
        assert [k for k in expected if not expected[k].equal(resumed[k])] == [], step
    leftovers = [p.name for p in Path(killed.output_dir).iterdir() if p.name.endswith(".part")]
    assert leftovers == []
