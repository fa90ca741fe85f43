"""batchprobe: the largest micro-batch that trains on your device, and the plan that follows.

The Python API runs the same search as `batchprobe find-max`::

    import torch, batchprobe
    from torch import nn

    model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 10))
    result = batchprobe.find_max_batch_size(
        model,
        lambda b, device: (torch.randn(b, 784, device=device), torch.randint(0, 10, (b,), device=device)),
        loss="cross_entropy",
        device="cpu",
        memory_budget="512MiB",
    )
    result.max_batch_size

The model object is not modified (probes train a copy); the batch function is called as
`batch_fn(batch_size, device)` and its batch is wired as `inputs.kind: callable` says (a tensor
is `model(x)`, a tuple `(x, y)` is `model(x)` against target `y`, a dict is `model(**batch)`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from torch import nn

    from batchprobe.results import FindMaxResult
    from batchprobe.spec import Spec

__all__ = ["__version__", "find_max_batch_size", "load_spec"]


def load_spec(path: Any = None, overrides: Any = (), **kwargs: Any) -> Spec:
    """Read and validate a YAML spec (see `batchprobe.spec.load_spec`)."""
    from batchprobe.spec import load_spec as _load

    return _load(path, overrides, **kwargs)


def find_max_batch_size(
    model: Spec | nn.Module | str,
    batch_fn: Callable[[int, Any], Any] | None = None,
    *,
    loss: str | Callable[..., Any] | None = None,
    device: str | None = None,
    memory_budget: str | float | None = None,
    optimizer: str | Mapping[str, Any] | None = None,
    precision: str | None = None,
    strategy: str | None = None,
    max_batch_size: int | None = None,
    overrides: Sequence[str] = (),
) -> FindMaxResult:
    """Largest micro-batch that completes full training steps (forward, backward, optimizer).

    `model` is a Spec (from `load_spec`), a model reference as the CLI takes it
    (`"zoo:mlp"`, `"torchvision:resnet50"`, `"pkg.module:factory"`), or an nn.Module in
    memory — never modified: probes train a copy. `batch_fn(batch_size, device)` makes a batch
    (needed for an nn.Module unless its first and last layers are Linear); `loss` is a name
    (`cross_entropy`, `mse`, `model`) or a function `loss(output, target)`. The other keywords
    are the spec keys of the same name; `overrides` are `key.path=value` as `--set` takes them.

    Raises SpecError for bad input (naming the key), NothingFitsError when batch 1 does not
    fit, and ModelError when the model fails for a reason other than memory."""
    from batchprobe.errors import ModelError, NothingFitsError
    from batchprobe.session import open_session
    from batchprobe.spec import Spec as _Spec

    spec = model if isinstance(model, _Spec) else _spec_for(
        model, batch_fn, loss, device, memory_budget, optimizer, precision, strategy,
        max_batch_size, overrides,
    )  # fmt: skip
    result = open_session(spec).search()
    error = result.error
    if error is not None and error.failure is not None:
        raise ModelError(
            f"the model failed at batch {error.batch_size}: {error.failure.error_type}: "
            f"{error.failure.message}"
        )
    if result.max_batch_size is None and not result.interrupted:
        raise NothingFitsError("batch size 1 does not fit on the device (or within the budget)")
    return result


def _spec_for(
    model: Any,
    batch_fn: Any,
    loss: Any,
    device: Any,
    memory_budget: Any,
    optimizer: Any,
    precision: Any,
    strategy: Any,
    max_batch_size: Any,
    overrides: Sequence[str],
) -> Spec:
    """A spec for the keyword API: objects in memory registered as `object:N` references."""
    from batchprobe.sources import objects
    from batchprobe.spec import load_spec as _load

    values: dict[str, Any] = {}
    values["model.source"] = model if isinstance(model, str) else objects.register(model)
    if batch_fn is not None:
        values["inputs.kind"] = "callable"
        values["inputs.factory"] = objects.register(batch_fn)
    if loss is not None:
        values["loss"] = loss if isinstance(loss, str) else objects.register(loss)
    for key, value in (
        ("probe.device", device),
        ("probe.memory_budget", memory_budget),
        ("train.optimizer", optimizer),
        ("train.precision", precision),
        ("probe.strategy", strategy),
        ("probe.max_batch_size", max_batch_size),
    ):
        if value is not None:
            values[key] = value
    return _load(None, overrides, values=values)
