"""One error family. Library code raises these; each edge (CLI, worker) translates them once."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class DifftptError(Exception):
    """Base of every error difftpt-ops raises on purpose. Exit code 1 at the CLI."""

    exit_code = 1


class InputError(DifftptError):
    """Bad input from the user: an argument, a file, a spec. Exit code 2; nothing was written."""

    exit_code = 2

    def __init__(self, argument: str, value: object, problem: str) -> None:
        self.argument = argument
        self.value = value
        self.problem = problem
        super().__init__(f"{argument}={value!s}: {problem}")


class InvalidSpecError(InputError):
    """A spec field outside its allowed range."""


class NotFoundError(InputError):
    """A named thing (dataset, run, model directory) does not exist."""


class ConflictError(InputError):
    """The request contradicts what is already stored (a name taken with other content)."""


class InvalidTransitionError(DifftptError):
    """A run or shard asked to move between states that do not connect."""


class ServiceUnavailableError(DifftptError):
    """A database, broker or tracking server cannot be reached. The message says what to do."""


class TransientError(DifftptError):
    """A failure worth retrying (a locked database, a dropped connection)."""


class SampleError(DifftptError):
    """One sample cannot be processed (corrupt image, non-finite loss); the shard goes on."""


class NotReadyError(DifftptError):
    """Work whose inputs are not there yet (a DiffTPT sample's generated images): it waits, it does not fail."""


@contextmanager
def about_one_sample(index: int) -> Iterator[None]:
    """An InputError raised inside is about sample `index`'s images, not the run: it becomes a SampleError naming
    the sample (recorded, and the shard goes on)."""
    try:
        yield
    except InputError as exc:
        raise SampleError(f"sample {index}: {exc}") from exc
