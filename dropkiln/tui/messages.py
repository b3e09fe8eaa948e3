"""What a screen asks of the app: the messages bubble up, and the app, which owns the store
and the screen stack, acts on them."""

from __future__ import annotations

from textual.message import Message

from dropkiln.store import JobView


class OpenJob(Message):
    """Show one job on its own screen."""

    def __init__(self, job_id: str) -> None:
        super().__init__()
        self.job_id = job_id


class CancelJob(Message):
    """The user asked to cancel this job (``None``: no job was selected)."""

    def __init__(self, job: JobView | None) -> None:
        super().__init__()
        self.job = job


class RetryJob(Message):
    """The user asked to retry this job (``None``: no job was selected)."""

    def __init__(self, job: JobView | None) -> None:
        super().__init__()
        self.job = job
