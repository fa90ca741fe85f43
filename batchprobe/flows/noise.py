"""noise-scale: B_simple from the spec's real data (`data:`), micro-batch gradients of
noise.small_batch_size and their accumulated mean as the big batch."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

from batchprobe.errors import Problem, SpecError
from batchprobe.flows.progress import Progress
from batchprobe.noise import batches, measure
from batchprobe.results import NoiseRun
from batchprobe.session import Session
from batchprobe.sources import Batch, import_object

SYNTHETIC_REFUSAL = (
    "the gradient noise scale needs real data (a data: section with source: pkg.module:factory). "
    "Random synthetic inputs carry no signal to learn: their gradient is pure noise, so B_noise "
    "would measure nothing about your task"
)


def data_batches(session: Session, batch_size: int) -> Iterator[Batch]:
    """Real batches from the spec's data: section, wired like the spec's inputs."""
    data = session.spec.data
    if data is None:
        raise SpecError([Problem("data", SYNTHETIC_REFUSAL)])
    base = Path(session.spec.origin).parent if session.spec.origin else None
    source = import_object(data.source, "data.source", base)
    collate = import_object(data.collate, "data.collate", base) if data.collate else None
    device = session.device  # with isolated probes, the model comes to this process now
    return batches(source, batch_size, device.device, data.kwargs, session.workload.adapt, collate)


def run(session: Session, progress: Progress | None = None) -> NoiseRun:
    progress = progress or Progress()
    n = session.spec.noise
    if session.ranks.distributed:
        raise SpecError([Problem("noise", "noise-scale runs on one device, not under torchrun")])
    started = time.perf_counter()
    stats = measure(
        session.step,
        data_batches(session, n.small_batch_size),
        n.small_batch_size,
        n.accumulation,
        n.steps,
        n.warmup_steps,
        progress.noise_step,
    )
    return NoiseRun(stats, time.perf_counter() - started, session.device.info())
