"""Errors meant for users. Core code raises these; only `cli.py` turns them into exit codes.

Anything that is not a `BatchprobeError` is a bug in batchprobe and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_ENVIRONMENT = 3
EXIT_NOTHING_FITS = 4
EXIT_INTERRUPTED = 130


class BatchprobeError(Exception):
    """A problem the user can fix; its message says how."""

    exit_code = EXIT_BAD_INPUT


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec: where (key path, file line) and what."""

    path: str
    message: str
    line: int | None = None
    source: str | None = None

    def __str__(self) -> str:
        where = self.path or "(top level)"
        if self.line is not None:
            where = f"line {self.line}: {where}"
        elif self.source:
            where = f"{self.source}: {where}"
        return f"{where}: {self.message}"


class SpecError(BatchprobeError):
    """Every problem found in a spec, reported together (exit 2)."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, problems: Sequence[Problem], origin: str | None = None) -> None:
        self.problems = list(problems)
        self.origin = origin
        head = f"{origin}: " if origin else ""
        if len(self.problems) == 1:
            text = f"{head}{self.problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            text = f"{head}{len(self.problems)} problems in the spec:\n{lines}"
        super().__init__(text)


class ModelError(BatchprobeError):
    """The model, its inputs or its loss cannot be built or run as specified (exit 2)."""

    exit_code = EXIT_BAD_INPUT


class MissingPackageError(BatchprobeError):
    """An optional package a model source needs is not installed (exit 2)."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, package: str, extra: str, what: str) -> None:
        super().__init__(
            f"{what} needs the '{package}' package, which is not installed.\n"
            f"  Fix: pip install '{package}'   (or: pip install 'batchprobe[{extra}]')"
        )


class DeviceError(BatchprobeError):
    """The requested device is not available (exit 3)."""

    exit_code = EXIT_ENVIRONMENT


class HostLimitError(BatchprobeError):
    """The process ran out of room under a limit on its own memory (an rlimit) before anything
    could be measured (exit 3)."""

    exit_code = EXIT_ENVIRONMENT


class NothingFitsError(BatchprobeError):
    """Batch size 1 does not fit (exit 4)."""

    exit_code = EXIT_NOTHING_FITS
