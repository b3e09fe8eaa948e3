"""Uploads are drops: checked by the daemon's own code first, refused with its reason, and
only a complete, accepted upload ever appears in the drop folder."""

from __future__ import annotations

import io
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from dropkiln.config import Settings
from dropkiln.daemon.ingest import Ingestor
from dropkiln.daemon.planner import Planner
from dropkiln.store import EventStore
from tests.api.conftest import Api
from tests.samples import write_dataset

SMALL = "resolution = 64\nbucket_step = 32\nmin_side = 32\nmax_side = 128\nsteps = 2\n"
PROMPTS = b'[defaults]\nwidth = 64\nheight = 64\nsteps = 2\n\n[[image]]\nprompt = "a red circle"\n'


def dataset_zip(tmp_path: Path, name: str = "cats") -> bytes:
    folder = write_dataset(tmp_path / "src" / name, toml=SMALL)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.iterdir()):
            archive.write(path, f"{name}/{path.name}")
    return buffer.getvalue()


def leftovers(settings: Settings) -> list[Path]:
    """Everything in the drop folders (accepted drops and any staging left behind)."""
    return sorted(
        p for folder in (settings.paths.datasets, settings.paths.prompts) for p in folder.iterdir()
    )


def error(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["code"]


async def test_a_dataset_zip_lands_in_the_drop_folder_whole(api: Api, tmp_path: Path) -> None:
    body = dataset_zip(tmp_path)
    response = await api.client.post(
        "/v1/datasets?name=cats",
        content=body,
        headers=api.auth | {"Content-Type": "application/zip"},
    )
    assert response.status_code == 202, response.text
    target = api.settings.paths.datasets / "cats.zip"
    assert response.json()["source"] == str(target) and response.json()["files"] == 1
    assert target.read_bytes() == body
    assert leftovers(api.settings) == [target]
    # the same name again, before the daemon took the first: refused, the first kept
    again = await api.client.post(
        "/v1/datasets?name=cats",
        content=body,
        headers=api.auth | {"Content-Type": "application/zip"},
    )
    assert error(again) == (409, "already_pending")
    assert leftovers(api.settings) == [target]


async def test_a_multipart_dataset_upload(api: Api, tmp_path: Path) -> None:
    files = {"file": ("dogs.zip", dataset_zip(tmp_path, "dogs"), "application/zip")}
    response = await api.client.post("/v1/datasets", files=files, headers=api.auth)
    assert response.status_code == 202, response.text
    assert (api.settings.paths.datasets / "dogs.zip").is_file()


def zip_of(entries: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (zip_of({"../../escape.png": png()}), "would land outside"),
        (zip_of({"/etc/cron.d/x.png": png()}), "would land outside"),
        (zip_of({"a.png": b"\0" * (8 * 2**20)}, zipfile.ZIP_DEFLATED), "zip bomb"),
        (b"this is not a zip at all" * 100, "not a zip"),
        (
            zip_of({"a.txt": b"only a caption", "dataset.toml": b"learning_rat = 1\n"}),
            "learning_rat",
        ),
    ],
    ids=["zip-slip", "absolute", "zip-bomb", "not-a-zip", "unknown-key"],
)
async def test_a_bad_zip_is_refused_with_the_reason_and_leaves_nothing(
    api: Api, body: bytes, says: str
) -> None:
    response = await api.client.post(
        "/v1/datasets?name=bad",
        content=body,
        headers=api.auth | {"Content-Type": "application/zip"},
    )
    assert error(response) == (422, "invalid_dataset")
    assert says in response.json()["error"]["message"]
    assert leftovers(api.settings) == []
    scratch = api.settings.paths.work / "drops"
    assert not scratch.exists() or not list(scratch.iterdir())  # extraction scratch removed
    assert await api.store().read(0) == []  # nothing recorded: it never became a drop


async def test_an_oversized_upload_is_cut_off_and_its_partial_file_removed(api: Api) -> None:
    api.settings.api.max_upload_bytes = 64 * 1024
    sent = []

    async def endless() -> AsyncIterator[bytes]:
        for _ in range(1000):
            sent.append(1)
            yield b"x" * 4096

    response = await api.client.post(
        "/v1/datasets?name=big",
        content=endless(),
        headers=api.auth | {"Content-Type": "application/zip"},
    )
    assert error(response) == (413, "upload_too_large")
    assert len(sent) < 1000  # cut off while still sending, not read to the end
    assert leftovers(api.settings) == []
    # a declared length over the limit is refused before a byte is read
    declared = await api.client.post(
        "/v1/datasets?name=big",
        content=b"x" * (64 * 1024 + 1),
        headers=api.auth | {"Content-Type": "application/zip"},
    )
    assert error(declared) == (413, "upload_too_large")
    assert leftovers(api.settings) == []


@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", "x\x00y", "..", "a" * 200])
async def test_names_that_could_leave_the_drop_folder_are_refused(api: Api, name: str) -> None:
    response = await api.client.post(
        "/v1/prompts",
        params={"name": name},
        content=PROMPTS,
        headers=api.auth | {"Content-Type": "application/toml"},
    )
    assert error(response) == (400, "bad_name")
    files = {"file": (name, PROMPTS, "application/toml")}
    multipart = await api.client.post("/v1/prompts", files=files, headers=api.auth)
    assert multipart.status_code in (400, 422), multipart.text
    assert leftovers(api.settings) == []


async def test_a_prompt_file_as_toml_or_json(api: Api) -> None:
    toml = await api.client.post(
        "/v1/prompts?name=reds",
        content=PROMPTS,
        headers=api.auth | {"Content-Type": "application/toml"},
    )
    assert toml.status_code == 202, toml.text
    assert (api.settings.paths.prompts / "reds.toml").read_bytes() == PROMPTS
    body = {"defaults": {"width": 64, "height": 64}, "image": [{"prompt": "a blue square"}]}
    json_upload = await api.client.post("/v1/prompts?name=blues", json=body, headers=api.auth)
    assert json_upload.status_code == 202, json_upload.text
    assert (api.settings.paths.prompts / "blues.json").is_file()
    wrong_type = await api.client.post(
        "/v1/prompts", content=b"<xml/>", headers=api.auth | {"Content-Type": "application/xml"}
    )
    assert error(wrong_type) == (415, "unsupported_media_type")


async def test_a_prompt_file_with_its_control_image_becomes_one_folder(api: Api) -> None:
    text = PROMPTS + b'control = { image = "pose.png", model = "tiny" }\n'
    files = [
        ("file", ("posed.toml", text, "application/toml")),
        ("images", ("pose.png", png(), "image/png")),
    ]
    response = await api.client.post("/v1/prompts", files=files, headers=api.auth)
    assert response.status_code == 202, response.text
    folder = api.settings.paths.prompts / "posed"
    assert sorted(p.name for p in folder.iterdir()) == ["pose.png", "posed.toml"]
    missing = [("file", ("lost.toml", text, "application/toml"))]
    refused = await api.client.post("/v1/prompts", files=missing, headers=api.auth)
    assert error(refused) == (422, "invalid_prompt_file")
    assert "pose.png" in refused.json()["error"]["message"]


BAD_PROMPT_FILES = {
    "unknown-key": PROMPTS + b'colour = "red"\n',
    "unknown-top-key": b"modle = 'tiny-sdxl'\n" + PROMPTS,
    "size": PROMPTS.replace(b"width = 64", b"width = 65"),
    "scheduler": PROMPTS + b'scheduler = "warp"\n',
    "lora": b'loras = [{ name = "nobody" }]\n' + PROMPTS,
    "escape": PROMPTS + b'name = "../../outside"\n',
    "not-toml": b"[[image]\nprompt = \n",
}


@pytest.mark.parametrize("case", list(BAD_PROMPT_FILES))
async def test_a_bad_prompt_file_gets_the_daemons_own_message(
    api: Api, case: str, tmp_path: Path
) -> None:
    text = BAD_PROMPT_FILES[case]
    response = await api.client.post(
        "/v1/prompts?name=bad",
        content=text,
        headers=api.auth | {"Content-Type": "application/toml"},
    )
    assert error(response) == (422, "invalid_prompt_file")
    assert leftovers(api.settings) == []
    # The same file dropped on a daemon: its .error.txt gives the same reason, word for word.
    daemon_home = Settings.load(root=tmp_path / "daemon-home")
    daemon_home.paths.create()
    dropped = daemon_home.paths.prompts / "bad.toml"
    dropped.write_bytes(text)
    async with await EventStore.open(daemon_home.paths.db, create=True) as store:
        await Ingestor(daemon_home, store, Planner(daemon_home, store)).ingest(dropped)
    note = (daemon_home.paths.failed / "bad.toml.error.txt").read_text()
    reason = note.split("Reason: ", 1)[1].split("\n\nDrop id:", 1)[0]
    assert response.json()["error"]["message"] == reason


async def test_a_full_disk_mid_upload_is_507_and_leaves_nothing(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from dropkiln.api import receive

    written: list[int] = []

    class FullDisk(io.BytesIO):
        def write(self, data: bytes) -> int:  # type: ignore[override]
            written.append(len(data))
            if len(written) > 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return len(data)

    real_open = open

    def open_on_a_full_disk(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if mode == "xb":
            real_open(path, mode).close()  # the partial file exists, as on a real disk
            return FullDisk()
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(receive, "open", open_on_a_full_disk, raising=False)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 1000

    response = await api.client.post(
        "/v1/datasets?name=cats",
        content=chunks(),
        headers=api.auth | {"Content-Type": "application/zip"},
    )
    assert error(response) == (507, "insufficient_storage")
    assert leftovers(api.settings) == []


async def test_a_multipart_dataset_upload_takes_one_file_field(api: Api, tmp_path: Path) -> None:
    body = dataset_zip(tmp_path, "dogs")
    files = [("file", ("a.zip", body, "application/zip")), ("file", ("b.zip", body, "x/y"))]
    response = await api.client.post("/v1/datasets", files=files, headers=api.auth)
    assert error(response) == (422, "invalid_request")
    other = [("notes", ("a.txt", b"hi", "text/plain"))]
    response = await api.client.post("/v1/datasets", files=other, headers=api.auth)
    assert error(response) == (422, "invalid_request")
    assert leftovers(api.settings) == []
