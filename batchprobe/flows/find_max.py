"""find-max: the largest micro-batch that completes full training steps, exact to one sample."""

from __future__ import annotations

from batchprobe.estimate import TraceError
from batchprobe.flows.progress import Progress
from batchprobe.results import FindMaxResult
from batchprobe.session import Session


def run(
    session: Session, progress: Progress | None = None, timeline: bool = False
) -> FindMaxResult:
    """The session's search with the spec's strategy, against its limit (budget or free
    memory). With `timeline` (for --plot), the steps at the max traced op by op: on the CPU
    the trace is what the probe measured; on a GPU the allocator does not see tensors."""
    result = session.search(progress=progress)
    best = result.max_batch_size
    if timeline and best is not None and session.ranks.parallel != "fsdp":
        try:
            result.timeline = session.tracer().timeline(best)
        except TraceError as exc:
            result.warnings.append(f"no memory timeline: the model cannot be traced ({exc.op})")
    return result
