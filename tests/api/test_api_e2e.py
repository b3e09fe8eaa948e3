"""The whole pipeline through the HTTP API alone: a real daemon and a real `dropkiln serve`
on one ROOT; the test only speaks HTTP to the server (and never touches ROOT)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from PIL import Image

from tests.api.server import Server, serving
from tests.api.test_uploads import dataset_zip
from tests.reliability.home import Home

Event = dict[str, Any]


async def wait_on_sse(
    client: httpx.AsyncClient, after: int, done: Callable[[list[Event]], bool], timeout: float
) -> list[Event]:
    """Events from /v1/events after ``after`` until ``done`` says so."""
    seen: list[Event] = []
    with anyio.fail_after(timeout):
        async with client.stream("GET", "/v1/events", params={"since": after}) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
                    if done(seen):
                        return seen
    raise AssertionError("the event stream ended")


def jobs_of_drop(events: list[Event], source: str) -> dict[str, str]:
    """stage → job id for the drop that was taken from ``source``."""
    drops = [
        e["data"]["drop_id"]
        for e in events
        if e["type"] == "Dropped" and e["data"]["source"] == source
    ]
    return {
        e["data"]["stage"]: e["data"]["job_id"]
        for e in events
        if e["type"] == "JobSubmitted" and drops and e["data"]["drop_id"] == drops[0]
    }


def finished(events: list[Event], source: str, stages: tuple[str, ...]) -> bool:
    jobs = jobs_of_drop(events, source)
    ended = {
        e["stream"][4:]: e["type"]
        for e in events
        if e["type"] in ("JobSucceeded", "JobFailed", "JobCancelled")
    }
    if any(t != "JobSucceeded" for t in ended.values()):
        raise AssertionError(f"a job did not succeed: {ended}")
    return set(stages) <= jobs.keys() and all(jobs[s] in ended for s in stages)


@pytest.mark.slow
async def test_dataset_to_lora_to_images_and_video_through_the_api(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    home.start()
    try:
        home.wait_serving()
        with serving(home.root, home.env) as server:
            await drive(server, tmp_path)
    finally:
        home.stop()


async def drive(server: Server, tmp_path: Path) -> None:
    async with server.client(timeout=30) as api:
        start = 0
        upload = await api.post(
            "/v1/datasets",
            params={"name": "shapes"},
            content=dataset_zip(tmp_path, "shapes"),
            headers={"Content-Type": "application/zip"},
        )
        assert upload.status_code == 202, upload.text
        source = upload.json()["source"]
        events = await wait_on_sse(
            api, start, lambda seen: finished(seen, source, ("bucket", "cache", "train")), 300
        )
        [lora] = (await api.get("/v1/loras")).json()["loras"]
        assert lora["name"] == "shapes" and lora["metadata"]["ss_network_dim"] == "4"

        prompt_file = (
            'loras = [{ name = "shapes", weight = 0.8 }]\n\n[defaults]\nsteps = 2\n\n'
            '[[image]]\nprompt = "a red circle"\ncount = 2\n\n'
            '[video]\nkind = "slideshow"\nfps = 4\nseconds_per_image = 0.5\n'
        )
        upload = await api.post(
            "/v1/prompts",
            params={"name": "circles"},
            content=prompt_file,
            headers={"Content-Type": "application/toml"},
        )
        assert upload.status_code == 202, upload.text
        source = upload.json()["source"]
        events = await wait_on_sse(
            api, events[-1]["seq"], lambda seen: finished(seen, source, ("generate", "video")), 300
        )
        jobs = jobs_of_drop(events, source)

        generate = (await api.get(f"/v1/jobs/{jobs['generate']}")).json()
        images = [a for a in generate["artifacts"] if a["kind"] == "image"]
        assert len(images) == 2
        for artifact in images:
            png = await api.get(artifact["url"])
            assert png.status_code == 200 and png.headers["content-type"] == "image/png"
            with Image.open(io.BytesIO(png.content)) as image:
                assert image.size == (64, 64)
                assert "shapes" in image.info["parameters"]  # the LoRA is in A1111's infotext

        video = (await api.get(f"/v1/jobs/{jobs['video']}")).json()
        [mp4] = [a for a in video["artifacts"] if a["kind"] == "video"]
        whole = await api.get(mp4["url"])
        assert whole.headers["content-type"] == "video/mp4"
        assert whole.content[4:8] == b"ftyp"  # an ISO base media file
        first = await api.get(mp4["url"], headers={"Range": "bytes=0-15"})
        assert first.status_code == 206 and first.content == whole.content[:16]
