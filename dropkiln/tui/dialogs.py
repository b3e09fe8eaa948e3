"""Modal dialogs: confirm a destructive command, filter the event log, list every key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from dropkiln.tui.reads import LogFilter, event_types_for


class ConfirmScreen(ModalScreen[bool]):
    """Ask before a command that stops or redoes work; ``y`` confirms, ``n``/escape declines."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n", "answer(False)", "No"),
        Binding("escape", "answer(False)", "No", show=False),
    ]

    def __init__(self, question: str, confirm_label: str) -> None:
        super().__init__()
        self.question = question
        self.confirm_label = confirm_label

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self.question, id="question")
            with Horizontal(id="buttons"):
                yield Button(f"{self.confirm_label} (y)", variant="error", id="yes")
                yield Button("Keep it (n)", variant="primary", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


@dataclass(frozen=True)
class FilterRequest:
    """What the user typed: a job id (or prefix) to resolve, and the event types."""

    job: str
    types: tuple[str, ...]


class FilterScreen(ModalScreen[FilterRequest | None]):
    """Filter the event log by job and event type; empty fields show everything."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Close", show=False)]

    def __init__(self, current: LogFilter, selected_job: str | None) -> None:
        super().__init__()
        self.current = current
        self.selected_job = selected_job

    def compose(self) -> ComposeResult:
        hint = f" (selected: {self.selected_job[:8]})" if self.selected_job else ""
        with Vertical(id="dialog"):
            yield Label("Filter the event log — enter applies, escape closes")
            yield Label(f"Job id or prefix{hint}", classes="field-label")
            yield Input(self.current.job_id or "", placeholder="all jobs", id="job")
            yield Label("Event types, e.g. JobFailed, oom — or -progress", classes="field-label")
            yield Input(", ".join(self.current.types), placeholder="all types", id="types")
            yield Static(id="filter-error")

    def on_input_submitted(self, _event: Input.Submitted) -> None:
        job = self.query_one("#job", Input).value.strip()
        try:
            types = event_types_for(self.query_one("#types", Input).value)
        except ValueError as exc:
            self.query_one("#filter-error", Static).update(Text(str(exc), style="bold red"))
            return
        self.dismiss(FilterRequest(job, types))

    def action_cancel(self) -> None:
        self.dismiss(None)


NAVIGATION = (
    ("↑ ↓ PgUp PgDn", "move in the focused table or log"),
    ("tab", "focus the next panel"),
    ("escape", "close a dialog, or go back from a job"),
)


class HelpScreen(ModalScreen[None]):
    """Every key of the screen underneath, with what it does."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "close", "Close", show=False),
        Binding("question_mark", "close", "Close", show=False),
    ]

    def __init__(self, keys: list[tuple[str, str]]) -> None:
        super().__init__()
        self.keys = keys

    def compose(self) -> ComposeResult:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column()
        for key, description in [*self.keys, *NAVIGATION]:
            table.add_row(key, description)
        with Vertical(id="dialog"):
            yield Label("Keys — escape closes", id="help-title")
            yield Static(table, id="help-keys")

    def action_close(self) -> None:
        self.dismiss(None)
