"""All torch work of a daemon runs on its one device thread.

Each thread that calls into torch gets its own OpenMP pool, and several pools fighting
over the cores made every call about 3x slower; CUDA's current device is per thread too.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from dropkiln.config import Settings
from dropkiln.daemon.device_thread import DeviceThread
from dropkiln.store import list_jobs
from tests.daemon.harness import ended, running_daemon, wait_job
from tests.daemon.test_ingest import SMALL, drop_dataset, wait_drops
from tests.daemon.test_prompt_drops import TINY, place


async def test_device_thread_runs_calls_in_order_on_one_thread() -> None:
    device = DeviceThread("cpu")
    try:
        threads = {await device.run(threading.get_ident) for _ in range(5)}
        assert threads == {device.ident}
        assert device.ident != threading.get_ident()
        with pytest.raises(ZeroDivisionError):
            await device.run(lambda: 1 / 0)
        assert await device.run(threading.get_ident) == device.ident  # still serving
    finally:
        device.close()


async def test_a_cpu_device_thread_leaves_one_core_to_the_rest_of_the_daemon(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torch's default, one OpenMP thread per physical core, leaves no core for the event
    loop, the store's threads or anything else on the box: each time one of them runs, it
    takes a core from an OpenMP thread and every barrier waits for it. On a busy 2-core box
    a tiny-model training step took 0.04 s with 1 thread and 0.04 to 1.9 s with 2."""
    import psutil
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = psutil.cpu_count(logical=False) or 1
    before = torch.get_num_threads()
    device = DeviceThread("cpu")
    try:
        await device.run(device.prepare_torch)
        assert await device.run(torch.get_num_threads) == max(1, cores - 1)
    finally:
        device.close()
        torch.set_num_threads(before)
    explicit = DeviceThread("cpu", threads=3)  # the knob wins
    try:
        await explicit.run(explicit.prepare_torch)
        assert await explicit.run(torch.get_num_threads) == 3
    finally:
        explicit.close()
        torch.set_num_threads(before)


async def test_omp_num_threads_in_the_environment_is_obeyed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # what torch made of the variable at its start
    device = DeviceThread("cpu")
    try:
        await device.run(device.prepare_torch)
        assert await device.run(torch.get_num_threads) == 2
    finally:
        device.close()
        torch.set_num_threads(before)


@pytest.mark.slow
async def test_every_module_forward_of_a_pipeline_runs_on_the_device_thread(
    settings: Settings,
) -> None:
    import torch

    settings.train.steps = 2
    settings.train.checkpoint_every = 1
    settings.train.rank = 2
    callers: dict[tuple[int, str], set[str]] = {}

    def record(module: torch.nn.Module, _: Any) -> None:
        thread = threading.current_thread()
        callers.setdefault((thread.ident or 0, thread.name), set()).add(type(module).__name__)

    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        async with running_daemon(settings) as daemon:
            drop_dataset(settings, "shapes", toml=SMALL)
            await wait_drops(daemon.store, 1)
            place(settings, "use.toml", 'loras = ["shapes"]\n' + TINY + '[[image]]\nprompt = "x"\n')
            await wait_drops(daemon.store, 2)
            for job in await list_jobs(daemon.store):
                done = await wait_job(daemon.store, job.id, ended, timeout=180)
                assert done.state == "succeeded", (done.stage, done.error)
    finally:
        hook.remove()
    # one thread, the daemon's long-lived device thread (not an anyio worker, not the loop)
    assert len(callers) == 1, {t: sorted(m)[:5] for t, m in callers.items()}
    ((_, name), modules), *_ = callers.items()
    assert name.startswith("dropkiln-device"), name
    # cache (VAE, text encoders), train (UNet forward and backward) and generate all ran there
    assert {"Encoder", "Decoder", "UNet2DConditionModel", "CLIPTextModel"} <= modules
