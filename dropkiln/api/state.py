"""What every request handler reaches: the settings, the store and the event hub."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from dropkiln.api.hub import EventHub
from dropkiln.config import Settings
from dropkiln.store import EventStore


@dataclass
class ApiState:
    settings: Settings
    store: EventStore
    hub: EventHub


def api_state(request: Request) -> ApiState:
    state: ApiState = request.app.state.api
    return state


State = Annotated[ApiState, Depends(api_state)]
"""A handler's parameter for the shared state."""
