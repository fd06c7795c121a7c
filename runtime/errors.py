"""Error types. Every message names the problem and the fix."""
from __future__ import annotations


class BitFitError(ValueError):
    """Everything the toolkit refuses: bad input (exit code 2 on the command line), and, as the subclass
    ParityError, a failed check (exit code 1)."""


class PackError(BitFitError):
    """A task pack is missing, corrupt, or does not hold what its manifest says."""


class IncompatibleError(BitFitError):
    """A task pack does not fit the compiled graph or base model it is used with."""


class UnknownTaskError(BitFitError):
    """A task name that was never registered."""


class CompiledModelError(BitFitError):
    """A compiled directory is missing, corrupt or inconsistent."""


class ParityError(BitFitError):
    """A compiled graph or task pack does not match PyTorch: a failed check, not bad input (exit code 1 on the
    command line, as `bitfit verify` exits on a mismatch). `report` holds every check, `failures` those that
    failed (raised by verify unless it is asked for a report with strict=False, and by compile(verify=...)).
    A BitFitError still, so that `except BitFitError` catches every refusal of the toolkit."""

    def __init__(self, message: str, report: object = None) -> None:
        super().__init__(message)
        self.report = report


class NonFiniteOutputError(BitFitError):
    """A task's forward pass gave NaN or inf for an input: no result is returned, rather than a number that
    means nothing (the pack holds values that overflow, or the input drives the model out of range)."""

    def __init__(self, task: str, what: str = "logits") -> None:
        super().__init__(
            f"task {task!r} produced non-finite numbers (NaN or inf) in its {what} for this input: its pack "
            "holds values that overflow float32 (corrupt, or trained with a diverging learning rate: retrain it, "
            "or re-copy the original), or the input drives the model out of range; no answer is given")
        self.task = task
