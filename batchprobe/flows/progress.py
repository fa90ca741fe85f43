"""What a flow tells the outside while it works. Every method does nothing by default: a caller
overrides the ones it shows (the CLI's live display, a notebook's log, a test's recorder)."""

from __future__ import annotations

from typing import Literal

from batchprobe.results import EstimatePoint, NoiseStats, ProbeResult, StepTiming

Phase = Literal["noise-scale", "find-max", "headroom", "flops", "timing", "exact", "what-if"]


class Progress:
    def probe_started(self, batch_size: int) -> None:
        """A probe at `batch_size` is about to run."""

    def probe_done(self, result: ProbeResult) -> None:
        """A probe ended (or was answered from an earlier one: `result.reused`)."""

    def phase(self, name: Phase) -> None:
        """plan moves on to a new phase."""

    def candidate(self, batch_size: int, index: int, count: int) -> None:
        """plan starts measuring candidate `index` of `count`."""

    def round(self, index: int, count: int) -> None:
        """Timing goes over every candidate again: round `index` of `count` (more rounds
        follow, for the candidates still unstable, when `index` > `count`)."""

    def timed(self, batch_size: int, timing: StepTiming) -> None:
        """A candidate's timing is done."""

    def traced(self, point: EstimatePoint) -> None:
        """estimate traced one batch size."""

    def event(self, text: str) -> None:
        """Anything else worth a line (check's probes and timings)."""

    def noise_step(self, step: int, stats: NoiseStats) -> None:
        """noise-scale finished big batch `step`."""
