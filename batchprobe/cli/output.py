"""Where output goes: human tables to stdout (stderr under --json), progress and messages to
stderr, files written atomically. Under torchrun only rank 0 says or writes anything."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.text import Text

from batchprobe import launcher
from batchprobe.errors import EXIT_INTERRUPTED, BatchprobeError, HostLimitError
from batchprobe.report.json import to_json


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write via a temporary file in the same directory and rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Out:
    """`human` for tables and summaries, `err` for progress and messages; files for --output
    and friends."""

    def __init__(self, json_mode: bool) -> None:
        self.json_mode = json_mode
        self.has_result = False
        self.quiet = not launcher.speaks()
        if self.quiet:
            self.err = self.human = Console(file=io.StringIO())
        else:
            self.err = Console(stderr=True, highlight=False)
            self.human = self.err if json_mode else Console(highlight=False)

    def emit_json(self, text: str) -> None:
        if not self.quiet:
            sys.stdout.write(text)
            sys.stdout.flush()

    def result(self, data: dict[str, Any], output: Path | None) -> None:
        """The command's JSON result: to --output, and to stdout under --json."""
        self.has_result = True
        text = to_json(data)
        self.write(output, text)
        if self.json_mode:
            self.emit_json(text)

    def write(self, path: Path | None, data: str | bytes, what: str = "") -> None:
        """Write a file atomically (rank 0 only) and say so."""
        if path is None or self.quiet:
            return
        write_atomic(path, data)
        self.err.print(f"[dim]wrote {what}{path}[/dim]")

    def warn(self, text: str) -> None:
        self.human.print(Text(f"warning: {text}", style="yellow"))


def fail(out: Out, command: str, exc: BatchprobeError) -> NoReturn:
    if out.json_mode:
        out.emit_json(
            to_json(
                {"command": command, "error": {"message": str(exc), "exit_code": exc.exit_code}}
            )
        )
    out.err.print(Text("error: ", style="bold red") + Text(str(exc)), soft_wrap=True)
    raise typer.Exit(exc.exit_code)


@contextlib.contextmanager
def handled(out: Out, command: str, output: Path | None = None) -> Iterator[None]:
    """User errors become one message and their exit code; Ctrl-C exits 130. A Ctrl-C that
    comes before the command has a result (building the model, tracing, the first warm-up
    step) still writes --output (and --json): the command, `interrupted`, nothing measured."""
    try:
        from batchprobe.backends.hostmem import load_fails

        told = load_fails()  # under a tight rlimit: before torch's libraries can abort us
        if told is not None:
            raise HostLimitError(told)
        yield
    except BatchprobeError as exc:
        fail(out, command, exc)
    except typer.Exit:
        raise  # a command's own exit code (typer.Exit is a RuntimeError)
    except (ImportError, MemoryError, SystemError, RuntimeError) as exc:
        # under an rlimit, loading torch, building the model or the warm-up may find no room:
        # say so, no traceback (anything else keeps its traceback)
        from batchprobe.backends.hostmem import out_of_room

        told = out_of_room(exc, measured=out.has_result)
        if told is None:
            raise
        fail(out, command, HostLimitError(told))
    except KeyboardInterrupt:
        if not out.has_result:
            out.err.print("[yellow]interrupted before anything was measured[/yellow]")
            out.result(
                {"command": command, "interrupted": True, "max_batch_size": None, "probes": []},
                output,
            )
        raise typer.Exit(EXIT_INTERRUPTED) from None
