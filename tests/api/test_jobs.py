"""Jobs, commands and artifacts over HTTP: the same shapes and events as the CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import anyio.to_thread
import pytest

from dropkiln.cli import main
from dropkiln.store.events import (
    ArtifactWritten,
    JobFailed,
    JobStarted,
    JobSubmitted,
    job_stream,
)
from tests.api.conftest import Api


async def add_job(api: Api, job_id: str, stage: str = "generate", fail: bool = False) -> None:
    submitted = JobSubmitted(
        job_id=job_id, stage=stage, name="cats", lane="gpu", priority=5, spec={"x": 1}
    )
    events = [submitted, JobStarted(attempt=1, memory_rung=0)]
    if fail:
        events.append(JobFailed(reason="out of memory at every rung"))
    await api.store().append(job_stream(job_id), events)


async def add_artifact(api: Api, job_id: str, name: str, content: bytes) -> int:
    path = api.settings.paths.images / "cats" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    written = ArtifactWritten(
        path=str(path), kind="image", bytes=len(content), sha256=hashlib.sha256(content).hexdigest()
    )
    return (await api.store().append(job_stream(job_id), [written]))[0].seq


async def test_jobs_have_the_shape_of_status_json(
    api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    await add_job(api, "aaaa1111")
    await add_job(api, "bbbb2222", fail=True)
    response = await api.client.get("/v1/jobs", headers=api.auth)
    assert response.status_code == 200
    root = str(api.settings.root)
    assert await anyio.to_thread.run_sync(main, ["status", "--json", "--root", root]) == 0
    assert response.json() == json.loads(capsys.readouterr().out)
    assert [job["id"] for job in response.json()["jobs"]] == ["bbbb2222", "aaaa1111"]
    limited = await api.client.get("/v1/jobs?limit=1", headers=api.auth)
    assert len(limited.json()["jobs"]) == 1


async def test_one_job_has_its_events_artifacts_and_error(api: Api) -> None:
    await add_job(api, "aaaa1111", fail=True)
    seq = await add_artifact(api, "aaaa1111", "000-1.png", b"\x89PNG fake")
    body = (await api.client.get("/v1/jobs/aaaa", headers=api.auth)).json()
    assert body["job"]["id"] == "aaaa1111" and body["job"]["spec"] == {"x": 1}
    assert body["error"] == "out of memory at every rung"
    assert [e["type"] for e in body["events"]] == [
        "JobSubmitted",
        "JobStarted",
        "JobFailed",
        "ArtifactWritten",
    ]
    [artifact] = body["artifacts"]
    assert artifact["id"] == seq and artifact["path"] == "outputs/images/cats/000-1.png"
    download = await api.client.get(artifact["url"], headers=api.auth)
    assert download.status_code == 200 and download.content == b"\x89PNG fake"
    assert download.headers["content-type"] == "image/png"


async def test_unknown_ambiguous_and_path_like_job_ids(api: Api) -> None:
    await add_job(api, "abc11111")
    await add_job(api, "abc22222")
    cases = {
        "/v1/jobs/ffff": (404, "job_not_found"),
        "/v1/jobs/abc": (409, "job_id_ambiguous"),
        # a slash, even encoded, never matches the route at all
        "/v1/jobs/..%2F..%2Fetc%2Fpasswd": (404, "not_found"),
        "/v1/jobs/abc%00": (400, "bad_id"),
        "/v1/jobs/%2E%2E": (400, "bad_id"),
        "/v1/events?job=..%2Fx": (400, "bad_id"),
    }
    for url, (status, code) in cases.items():
        response = await api.client.get(url, headers=api.auth)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), url
    for url in ("/v1/jobs/abc/cancel", "/v1/jobs/ffff/retry"):
        response = await api.client.post(url, headers=api.auth)
        assert response.status_code in (404, 409)
    assert not await api.store().read(0, types=["CancelRequested", "RetryRequested"])


async def test_artifacts_only_by_id(api: Api) -> None:
    await add_job(api, "aaaa1111")
    secret = api.settings.root.parent / "outside.txt"
    secret.write_text("not yours")
    for url, status in (
        ("/v1/artifacts/999", 404),
        ("/v1/artifacts/0", 422),
        ("/v1/artifacts/..%2F..%2Foutside.txt", 404),  # no route takes a slash
        ("/v1/artifacts/%2Fetc%2Fpasswd", 404),
        ("/v1/artifacts/..", 404),
        ("/v1/artifacts/%2E%2E", 422),
    ):
        response = await api.client.get(url, headers=api.auth)
        assert response.status_code == status, url
        assert "error" in response.json()
    # a recorded path outside ROOT (a tampered log) is still not served
    written = ArtifactWritten(path=str(secret), kind="image", bytes=9)
    seq = (await api.store().append(job_stream("aaaa1111"), [written]))[0].seq
    response = await api.client.get(f"/v1/artifacts/{seq}", headers=api.auth)
    assert response.status_code == 410 and response.json()["error"]["code"] == "artifact_missing"


async def test_video_range_requests(api: Api) -> None:
    await add_job(api, "aaaa1111", stage="video")
    content = bytes(range(256)) * 40
    path = api.settings.paths.videos / "cats.mp4"
    path.write_bytes(content)
    written = ArtifactWritten(path=str(path), kind="video", bytes=len(content))
    seq = (await api.store().append(job_stream("aaaa1111"), [written]))[0].seq
    headers = api.auth | {"Range": "bytes=100-199"}
    part = await api.client.get(f"/v1/artifacts/{seq}", headers=headers)
    assert part.status_code == 206
    assert part.content == content[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(content)}"
    assert part.headers["content-type"] == "video/mp4"
    tail = await api.client.get(f"/v1/artifacts/{seq}", headers=api.auth | {"Range": "bytes=-10"})
    assert tail.content == content[-10:]
    whole = await api.client.get(f"/v1/artifacts/{seq}", headers=api.auth)
    assert whole.headers["accept-ranges"] == "bytes" and whole.content == content


async def test_commands_are_the_events_the_cli_writes(api: Api, tmp_path: Path) -> None:
    await add_job(api, "aaaa1111")
    for url in ("/v1/jobs/aaaa/cancel", "/v1/jobs/aaaa1111/retry"):
        response = await api.client.post(url, headers=api.auth)
        assert response.status_code == 202
        assert response.json()["job"]["id"] == "aaaa1111"
    for url in ("/v1/queue/pause", "/v1/queue/resume"):
        assert (await api.client.post(url, headers=api.auth)).status_code == 202
    from_api = await api.store().read(0, types=["CancelRequested", "RetryRequested"])
    from_api += await api.store().read(0, types=["QueuePaused", "QueueResumed"])
    root = str(api.settings.root)
    for args in (["cancel", "aaaa"], ["retry", "aaaa1111"], ["pause"], ["resume"]):
        assert await anyio.to_thread.run_sync(main, [*args, "--root", root]) == 0
    every = await api.store().read(0, types=["CancelRequested", "RetryRequested"])
    every += await api.store().read(0, types=["QueuePaused", "QueueResumed"])
    from_cli = [e for e in every if e.data["by"] == "cli"]
    assert [(e.type, e.stream) for e in from_api] == [(e.type, e.stream) for e in from_cli]
    assert {e.data["by"] for e in from_api} == {"api"}
    jobs = (await api.client.get("/v1/jobs", headers=api.auth)).json()
    assert jobs["paused"] is False


async def test_loras_lists_trained_ones_with_their_metadata(api: Api) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    from dropkiln.store.events import JobSucceeded

    await add_job(api, "aaaa1111", stage="train")
    lora = api.settings.paths.loras / "cats" / "cats.safetensors"
    lora.parent.mkdir(parents=True)
    tensors = {"lora_unet_x.lora_down.weight": np.zeros((4, 8), dtype=np.float32)}
    save_file(tensors, str(lora), metadata={"ss_network_dim": "4", "ss_output_name": "cats"})
    written = ArtifactWritten(path=str(lora), kind="lora", bytes=lora.stat().st_size)
    done = JobSucceeded(result={"lora": str(lora), "steps": 2, "rank": 4, "model": "tiny-sdxl"})
    await api.store().append(job_stream("aaaa1111"), [written, done])
    await add_job(api, "bbbb2222", stage="train", fail=True)
    [found] = (await api.client.get("/v1/loras", headers=api.auth)).json()["loras"]
    assert found["name"] == "cats" and found["steps"] == 2 and found["rank"] == 4
    assert found["metadata"] == {"ss_network_dim": "4", "ss_output_name": "cats"}
    download = await api.client.get(found["file"]["url"], headers=api.auth)
    assert download.content == lora.read_bytes()
