"""The bearer token: every route but /healthz, constant-time compare, limits, events, rotation."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dropkiln.api.app import create_app
from dropkiln.api.auth import FailureLimiter
from dropkiln.api.token import write_token
from dropkiln.cli import main
from tests.api.conftest import Api, client_for


def test_init_makes_a_private_token(tmp_path: Path) -> None:
    assert main(["init", str(tmp_path / "h")]) == 0
    token_file = tmp_path / "h" / "state" / "api-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert len(token_file.read_text().strip()) >= 40  # 32 random bytes, url-safe base64


async def test_every_route_but_healthz_refuses_a_request_without_the_token(api: Api) -> None:
    app = api.client._transport.app  # type: ignore[attr-defined]
    routes = [(p, m) for p, methods in app.openapi()["paths"].items() for m in methods]
    routes.append(("/v1/openapi.json", "get"))
    assert len(routes) >= 13
    for route_path, method in routes:
        path = route_path.replace("{job}", "abc").replace("{artifact_id}", "1")
        response = await api.client.request(method, path)
        if route_path == "/healthz":
            assert response.status_code == 200
            continue
        assert response.status_code == 401, (method, path)
        assert response.json()["error"]["code"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"
        # the limiter is per client; start each route afresh
        app.state.auth.limiter = FailureLimiter(1000, 60)


async def test_a_wrong_token_is_refused_and_recorded_without_the_token(api: Api) -> None:
    guesses = ["Bearer " + api.token[:-1] + "x", "Basic " + api.token, "Bearer ", api.token]
    for header in guesses:
        response = await api.client.get("/v1/jobs", headers={"Authorization": header})
        assert response.status_code == 401
    failures = await api.store().read(0, types=["ApiAuthFailed"])
    assert [e.data["reason"] for e in failures] == ["wrong", "malformed", "malformed", "malformed"]
    assert {e.stream for e in failures} == {"api"}
    assert all(e.data["client"] == "192.0.2.10" for e in failures)
    raw = str([e.as_json() for e in failures])
    assert api.token not in raw and api.token[:-1] not in raw


async def test_a_client_that_keeps_failing_is_refused_for_a_while_others_are_not(api: Api) -> None:
    limit = api.settings.api.auth_failures
    for _ in range(limit):
        bad = await api.client.get("/v1/jobs", headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401
    locked = await api.client.get("/v1/jobs", headers=api.auth)
    assert locked.status_code == 429
    assert locked.json()["error"]["code"] == "too_many_failures"
    assert int(locked.headers["retry-after"]) >= 1
    # refused attempts are not recorded one by one: the log stays bounded under a flood
    for _ in range(20):
        await api.client.get("/v1/jobs", headers={"Authorization": "Bearer nope"})
    assert len(await api.store().read(0, types=["ApiAuthFailed"])) == limit
    app = api.client._transport.app  # type: ignore[attr-defined]
    async with client_for(app, ("192.0.2.99", 1)) as other:
        assert (await other.get("/v1/jobs", headers=api.auth)).status_code == 200


def test_the_window_forgets_old_failures() -> None:
    limiter = FailureLimiter(limit=2, window_s=10)
    limiter.record("a", now=0)
    limiter.record("a", now=1)
    assert limiter.retry_after("a", now=2) == pytest.approx(8)
    assert limiter.retry_after("a", now=10.5) is None
    assert limiter.retry_after("b", now=2) is None


async def test_a_rotated_token_works_at_once_and_the_old_one_stops(api: Api) -> None:
    old = api.auth
    new_token = write_token(api.settings.paths.api_token)
    assert stat.S_IMODE(os.stat(api.settings.paths.api_token).st_mode) == 0o600
    assert (await api.client.get("/v1/jobs", headers=old)).status_code == 401
    fresh = {"Authorization": f"Bearer {new_token}"}
    assert (await api.client.get("/v1/jobs", headers=fresh)).status_code == 200


def test_cli_rotates_and_shows_the_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = str(tmp_path / "h")
    assert main(["init", root]) == 0
    capsys.readouterr()
    assert main(["api-token", "--root", root]) == 0
    before = capsys.readouterr().out.strip()
    assert main(["api-token", "rotate", "--root", root]) == 0
    assert main(["api-token", "show", "--root", root]) == 0
    after = capsys.readouterr().out.strip().splitlines()[-1]
    assert before and after and before != after


async def test_openapi_schema_is_served_behind_the_token(api: Api) -> None:
    assert (await api.client.get("/v1/openapi.json")).status_code == 401
    schema = (await api.client.get("/v1/openapi.json", headers=api.auth)).json()
    for path in ("/v1/jobs", "/v1/events", "/v1/datasets", "/v1/prompts", "/v1/loras"):
        assert path in schema["paths"]
    app = create_app(api.settings)
    assert app.openapi()["info"]["title"] == "dropkiln"
