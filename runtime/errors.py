"""Error types. Every message names the problem and the fix."""
from __future__ import annotations


class BitFitError(ValueError):
    """Bad input given to the toolkit (exit code 2 on the command line)."""


class PackError(BitFitError):
    """A task pack is missing, corrupt, or does not hold what its manifest says."""


class IncompatibleError(BitFitError):
    """A task pack does not fit the compiled graph or base model it is used with."""


class UnknownTaskError(BitFitError):
    """A task name that was never registered."""


class CompiledModelError(BitFitError):
    """A compiled directory is missing, corrupt or inconsistent."""


class ParityError(BitFitError):
    """A compiled graph or task pack does not match PyTorch: `report` holds every check, `failures` those that
    failed (raised by verify unless it is asked for a report with strict=False)."""

    def __init__(self, message: str, report: object = None) -> None:
        super().__init__(message)
        self.report = report
