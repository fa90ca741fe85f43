"""find-max: the largest micro-batch that completes full training steps, exact to one sample."""

from __future__ import annotations

from batchprobe.flows.progress import Progress
from batchprobe.results import FindMaxResult
from batchprobe.session import Session


def run(session: Session, progress: Progress | None = None) -> FindMaxResult:
    """The session's search with the spec's strategy, against its limit (budget or free memory)."""
    return session.search(progress=progress)
