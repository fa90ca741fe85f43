"""Progress on the terminal: the probes as a live table (a log line each when stderr is not a
terminal, as in CI logs), plan's candidates as a bar, and one line per trace, check event or noise
step."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.progress import Progress as Bar

from batchprobe.flows.progress import Phase, Progress
from batchprobe.report.find_max import probe_line, probe_table
from batchprobe.results import EstimatePoint, NoiseStats, ProbeResult, StepTiming
from batchprobe.units import format_bytes, format_count, format_seconds


class LiveProgress(Progress):
    """Use as a context manager: the live display stops (and the bar goes) on the way out."""

    def __init__(
        self,
        console: Console,
        limit_bytes: int | None,
        noise_steps: int = 0,
        size: str = "batch",
    ) -> None:
        self.size = size  # what a probe's size is: "batch", or "seq_len" along that axis
        self.console = console
        self.limit_bytes = limit_bytes
        self.noise_steps = noise_steps
        self.done: list[ProbeResult] = []
        self.live: Live | None = None
        self.table_done = False  # the live table showed its search; later probes are lines
        self.bar: Bar | None = None
        self.task: TaskID | None = None

    def __enter__(self) -> LiveProgress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop_live()
        if self.bar is not None:
            self.bar.stop()

    def _stop_live(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
            self.table_done = True

    def _line(self, text: str, style: str = "") -> None:
        console = self.bar.console if self.bar is not None else self.console
        console.print(text, markup=False, soft_wrap=True, style=style or None)

    # -- probes -----------------------------------------------------------------------------
    def probe_started(self, batch_size: int) -> None:
        if self.live is None and self.console.is_terminal and not self.table_done:
            self.live = Live(
                probe_table(self.done, self.limit_bytes, size=self.size),
                console=self.console,
                refresh_per_second=8,
            )
            self.live.start()
        if self.live is not None:
            self.live.update(
                probe_table(self.done, self.limit_bytes, running=batch_size, size=self.size)
            )

    def probe_done(self, result: ProbeResult) -> None:
        self.done.append(result)
        if self.live is not None:
            self.live.update(probe_table(self.done, self.limit_bytes, size=self.size))
        else:
            self._line(probe_line(len(self.done), result, self.size))

    # -- plan -------------------------------------------------------------------------------
    def phase(self, name: Phase) -> None:
        if name != "find-max":  # the find-max table is complete: later probes are log lines
            self._stop_live()
        if name == "exact":
            self._line("timing micro-batches that reach the target global batch exactly")
        if name == "what-if":
            self._line("what if: tracing the model under each change that applies")

    def candidate(self, batch_size: int, index: int, count: int) -> None:
        self._stop_live()
        if not self.console.is_terminal:
            self._line(f"timing micro-batch {batch_size} ({index}/{count})")
            return
        self._bar("timing micro-batch", f"{batch_size:>6}", index - 1, count)

    def round(self, index: int, count: int) -> None:
        what = "the candidates still unstable" if index > count else "all candidates"
        n = index - count if index > count else index
        if not self.console.is_terminal:
            self._line(f"timing round {n}/{count} over {what}", style="dim")
            return
        self._bar(f"timing round over {what}", "", n - 1, count)

    def _bar(self, what: str, batch: str, completed: int, total: int) -> None:
        if self.bar is None:
            self.bar = Bar(
                TextColumn("{task.fields[what]}"),
                TextColumn("[bold]{task.fields[batch]}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task("timing", total=total, what=what, batch=batch)
        assert self.task is not None
        self.bar.update(self.task, what=what, batch=batch, completed=completed, total=total)

    def timed(self, batch_size: int, timing: StepTiming) -> None:
        self._line(
            f"  micro-batch {batch_size}: fwd+bwd {format_seconds(timing.fwd_bwd_s)}, optimizer "
            f"{format_seconds(timing.optimizer_s)}, "
            f"{format_count(batch_size / (timing.fwd_bwd_s + timing.optimizer_s))} samples/s per step"
            + ("  (unstable)" if timing.unstable else "")
        )

    # -- the other commands -----------------------------------------------------------------
    def traced(self, point: EstimatePoint) -> None:
        self._line(f"traced batch {point.batch_size:>6}: peak {format_bytes(point.peak_bytes)}")

    def event(self, text: str) -> None:
        self._line(text, style="dim")

    def noise_step(self, step: int, stats: NoiseStats) -> None:
        if step % 10 == 0 or step == self.noise_steps:
            b = stats.b_simple()
            self._line(f"{step}/{self.noise_steps} big batches: B_simple ≈ {b:,.1f}", style="dim")
