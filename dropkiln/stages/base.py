"""What a stage is and what it may see: its spec and a StageContext. Nothing else.

A stage never imports ``dropkiln.store`` or ``dropkiln.daemon``; the daemon gives it a
context and the stage reports through it, so a stage can be run and tested alone.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, Self

from pydantic import BaseModel, ConfigDict, ValidationError

if TYPE_CHECKING:
    from dropkiln.stages.starting_rung import StartFacts

Lane = Literal["cpu", "gpu"]


class StageSpec(BaseModel):
    """Base of every stage's validated input."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def validation_reason(exc: ValidationError) -> str:
    """A pydantic error as one line a user can act on: ``images.0.crop_box: …; name: …``."""
    problems = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"])
        problems.append(f"{where}: {error['msg']}" if where else error["msg"])
    return "; ".join(problems)


class StageResult(BaseModel):
    """Base of a stage's result: recorded with its JobSucceeded, read back (``upstream``) by
    the jobs that depend on it. The stage that returns it owns its fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def upstream(cls, ctx: StageContext, stage: str) -> Self:
        """This job's ``stage`` dependency's result, validated.

        A result recorded by another dropkiln version may carry keys this one does not know
        (they are ignored); one that lacks a key this one needs is a StageError naming it."""
        recorded = ctx.upstream(stage)
        known = {key: value for key, value in recorded.items() if key in cls.model_fields}
        try:
            return cls.model_validate(known)
        except ValidationError as exc:
            raise StageError(
                f"the {stage} job's result cannot be used: {validation_reason(exc)}"
            ) from exc


class StageStopped(Exception):
    """Raised by a stage that saw ``should_stop()``, after its checkpoint was saved."""


class StageError(Exception):
    """A failure with a reason meant for the user (bad input, impossible request)."""


class Artifact(NamedTuple):
    """An output file, written atomically, for ``StageContext.checkpoint`` to record."""

    path: Path
    kind: str
    sha256: str | None = None
    """Of the bytes the stage wrote, when it hashed them as it wrote (None: hash the file)."""


class StageContext(Protocol):
    """The stage's window on the daemon."""

    job_id: str
    attempt: int
    memory_rung: int
    device: str
    work_dir: Path
    """Private scratch and checkpoint folder of this job; survives restarts."""
    root: Path
    """The dropkiln ROOT, for outputs/ and state/models/."""

    def progress(self, done: int, total: int, **metrics: Any) -> None:
        """Report progress; cheap, may be called every step (the daemon coalesces)."""

    def checkpoint(self, state: dict[str, Any], artifacts: Sequence[Artifact] = ()) -> None:
        """Record a checkpoint (small JSON: a step and the files already written atomically),
        with the records of the ``artifacts`` it covers, in one durable write (as ``artifact``
        records each, idempotent).

        Returns once the record is durable: after a kill, ``resume_state()`` returns it.
        """

    def resume_state(self) -> dict[str, Any] | None:
        """The last checkpoint recorded for this job, or None for a fresh start."""

    def checkpoint_unusable(self, checkpoint: str, reason: str, resumed_from_step: int) -> None:
        """Record that a saved checkpoint could not be restored and where the stage went on."""

    def artifact(self, path: Path, kind: str, sha256: str | None = None) -> None:
        """Record an output file (already written atomically), with its hash: ``sha256`` of
        the bytes written when the stage has it, else the file's.

        Idempotent: a file already recorded with the same content is not recorded again,
        so a resumed stage reports every output it finds on disk, and a kill between a
        write and its record loses nothing."""

    def should_stop(self) -> bool:
        """True once the job is cancelled or preempted: checkpoint and raise StageStopped."""

    def upstream(self, stage: str) -> dict[str, Any]:
        """The result of the dependency job of that stage (e.g. the bucket manifest path)."""

    def fault(self, point: str) -> None:
        """A named fault-injection point (``DROPKILN_FAULTS``); does nothing unless armed."""

    def deferred_fault(self, point: str) -> str | None:
        """A fault point whose fault fires elsewhere (a worker process): the fault due, if
        any, for ``faults.fire`` there."""


RunFn = Callable[[Any, StageContext], StageResult | dict[str, Any]]
"""A stage's run function. Its result is a StageResult; train, generate and video still
return a plain dict of JSON values."""


@dataclass(frozen=True)
class MemoryRung:
    """One step of a stage's out-of-memory ladder."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageDef:
    """A stage as the daemon sees it: name, lane, spec type, run function, memory ladder."""

    name: str
    lane: Lane
    spec: type[StageSpec]
    run: RunFn
    ladder: tuple[MemoryRung, ...] = (MemoryRung("default"),)
    priority: int = 0
    start_rung: Callable[[Any, StartFacts], int | None] | None = None
    """The first rung the spec is estimated to fit on a GPU (``stages/starting_rung.py``);
    None (or returning None): no estimate, the job starts at the default rung."""
    inputs: tuple[str, ...] = ()
    """The artifact kinds of its dependencies the stage reads. The executor waits until those
    files are visible before an attempt starts: another box may have written them
    (``daemon/inputs.py``)."""

    def rung(self, index: int) -> MemoryRung:
        return self.ladder[min(index, len(self.ladder) - 1)]

    def execute(self, spec: StageSpec, ctx: StageContext) -> dict[str, Any]:
        """Run the stage; its result as JobSucceeded records it (JSON values)."""
        result = self.run(spec, ctx)
        return result.model_dump(mode="json") if isinstance(result, StageResult) else result


def _new_file_mode() -> int:
    """What open() gives a new file (0o666 less the umask): mkstemp's 0600 would hide outputs
    from the group that the systemd unit's UMask=0027 lets read them."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    return 0o644


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temp path beside ``target``; on success it is fsynced and renamed over it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.fchmod(fd, _new_file_mode())
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def fsync_dir(folder: Path) -> None:
    """Make the renames and new entries in ``folder`` survive a power cut."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(target: Path, data: bytes | str) -> Path:
    """Write bytes or text to ``target`` atomically (temp file + fsync + rename)."""
    with atomic_path(target) as tmp:
        write_file(tmp, data)
    return target


def write_file(path: Path, data: bytes | str) -> None:
    """Write a whole file (not atomically: for a temp or staging file).

    Every file a stage writes goes through here, so a fault-injected full or failing disk
    (``enospc``/``eio``) tears a real write: the file object's write puts half the bytes on
    disk, then raises, as a write that runs out of room part-way does."""
    from dropkiln.stages.faults import take_torn_write

    payload = data.encode() if isinstance(data, str) else data
    with open(path, "wb") as handle:
        torn = take_torn_write()
        if torn is not None:
            handle.write(payload[: len(payload) // 2])
            handle.flush()
            raise torn
        handle.write(payload)
