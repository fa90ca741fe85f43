"""The gradient noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training").

With squared gradient norms measured at two batch sizes B_small < B_big (App. A):

    |G|^2  ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(S)  ~ (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)
    B_simple = tr(S) / |G|^2

Both norms come from one accumulation: each micro-batch's gradient is a B_small gradient, their
mean is the B_big gradient. Numerator and denominator are averaged over many big batches before
dividing (the ratio of noisy estimates is biased); the uncertainty is a bootstrap over those
batches. Training steps needed then scale as S = S_min (1 + B_noise / B): batches far above the
noise scale buy little.

`NoiseStats` is pure; `measure()` drives a TrainStep over real batches.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from batchprobe.results import NoiseStats
from batchprobe.sources import Batch

# --------------------------------------------------------------------------- real batches


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(_to_device(v, device) for v in value)
    return value


def batches(
    source: Callable[..., Any],
    batch_size: int,
    device: torch.device,
    kwargs: Mapping[str, Any],
    adapt: Callable[[Any], Batch],
    collate: Callable[[list[Any]], Any] | None = None,
) -> Iterator[Batch]:
    """Batches of `batch_size` from a data source: a factory called as
    source(batch_size=..., device=..., **kwargs) that returns an iterable of batches or a
    torch.utils.data.Dataset (then loaded in shuffled epochs, repeated as needed). `adapt` wires
    each batch as the spec's inputs are wired (`Workload.adapt`)."""
    from torch.utils.data import DataLoader, Dataset

    made = source(batch_size=batch_size, device=device, **kwargs)
    if isinstance(made, Dataset):
        loader_kwargs: dict[str, Any] = {
            "batch_size": batch_size,
            "shuffle": True,
            "drop_last": True,
        }
        if collate is not None:
            loader_kwargs["collate_fn"] = collate
        for epoch in itertools.count():
            torch.manual_seed(epoch)
            produced = False
            for raw in DataLoader(made, **loader_kwargs):
                produced = True
                yield adapt(_to_device(raw, device))
            if not produced:
                return
    else:
        for raw in made:
            yield adapt(_to_device(raw, device))


# --------------------------------------------------------------------------- measurement


def _grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def _sq_norm(tensors: Iterable[torch.Tensor]) -> float:
    return float(sum(t.float().pow(2).sum() for t in tensors))


def measure(
    step: Any,
    source: Iterator[Batch],
    small_batch_size: int,
    accumulation: int,
    steps: int,
    warmup_steps: int = 0,
    on_step: Callable[[int, NoiseStats], None] | None = None,
) -> NoiseStats:
    """Gradients of `accumulation` micro-batches per big batch, at fixed weights (after
    `warmup_steps` optimizer steps of training on the same source). Stops early, with what it has,
    when the source runs dry or on Ctrl-C."""
    stats = NoiseStats(small_batch_size, small_batch_size * accumulation)
    params = [p for p in step.parameters() if p.requires_grad]
    step.begin()
    try:
        for _ in range(warmup_steps):
            step.forward_backward(next(source))
            step.optimizer_step()
        for i in range(steps):
            total: list[torch.Tensor] | None = None
            small = 0.0
            for _ in range(accumulation):
                for p in params:
                    p.grad = None
                step.forward_backward(next(source))
                g = _grads(params)
                small += _sq_norm(g)
                total = g if total is None else [t.add_(x) for t, x in zip(total, g, strict=True)]
            assert total is not None
            big = _sq_norm(t / accumulation for t in total)
            stats.add(small / accumulation, big)
            if on_step is not None:
                on_step(i + 1, stats)
    except StopIteration:
        stats.stopped = "data ran out"
    except KeyboardInterrupt:
        stats.stopped = "interrupted"
    finally:
        step.end()
    return stats
