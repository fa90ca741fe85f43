"""Model sources, inputs and losses: Spec -> Workload.

A Workload is what one training step needs: the model, a function making a batch of any size on a
device, the loss, and the adapter that wires a user's batch (`adapt`). Weights are random (seeded);
nothing is downloaded.

Model sources are a registry keyed by the prefix of `model.source` (`zoo:mlp`, `torchvision:NAME`,
...); anything else is an import path (`pkg.module:factory`, `path/file.py:factory`). To add a
source: a module with `SOURCE = Source(prefix, summary, build)` and one line in `SOURCES`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from batchprobe.errors import Problem, SpecError
from batchprobe.sources import hf, imports, objects, timm_models, torchvision_models, zoo
from batchprobe.sources.base import BuiltModel, Source
from batchprobe.sources.imports import import_object
from batchprobe.sources.inputs import Batch, BatchFn, Inputs, make_batch_fn, resolve_inputs, wire
from batchprobe.sources.losses import LossFn, resolve_loss
from batchprobe.spec import Spec

__all__ = [
    "SOURCES",
    "Batch",
    "Inputs",
    "Workload",
    "build_workload",
    "import_object",
    "quiet_warnings",
]

SOURCES: dict[str, Source] = {
    s.prefix: s
    for s in (zoo.SOURCE, torchvision_models.SOURCE, timm_models.SOURCE, hf.SOURCE, objects.SOURCE)
}


@dataclass
class Workload:
    model: nn.Module
    inputs: Inputs
    loss_name: str
    loss_fn: LossFn
    make_batch: BatchFn
    source: str
    has_batchnorm: bool

    def adapt(self, raw: Any, key: str = "data.source") -> Batch:
        """A user's batch (from a data source) wired as the spec's inputs are."""
        return wire(raw, target_last=self.loss_name != "model", key=key)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())


def _build_model(spec: Spec) -> BuiltModel:
    ref = spec.model.source
    prefix, _, rest = ref.partition(":")
    source = SOURCES.get(prefix)
    if source is not None:
        return source.build(rest, spec.model.kwargs, spec)
    if not prefix.endswith(".py") and not _importable(prefix):
        # not a registered prefix and not an importable module: most likely a typo'd prefix
        close = difflib.get_close_matches(prefix, list(SOURCES), n=1, cutoff=0.7)
        if close:
            raise SpecError(
                [
                    Problem(
                        "model.source",
                        f"unknown model source {prefix!r}; did you mean '{close[0]}:{rest}'? "
                        f"(sources: {', '.join(f'{p}:NAME' for p in SOURCES)}, "
                        "pkg.module:factory, path/file.py:factory)",
                    )
                ]
            )
    return imports.build(ref, spec.model.kwargs, spec)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module.split(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def build_workload(spec: Spec, device: torch.device | str = "cpu") -> Workload:
    """Build the model directly on `device` (a real device, 'meta', or under FakeTensorMode)."""
    device = torch.device(device)
    # Seeded, so the random weights (and what is measured on them, such as the noise scale) are
    # the same from run to run; the caller's RNG state is left as it was.
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        built = _build_model(spec)
    inputs = resolve_inputs(spec.inputs, built.inputs, spec.model.source)
    base_dir = Path(spec.origin).parent if spec.origin else None
    loss_name, loss_fn = resolve_loss(spec.loss, built.loss, inputs, base_dir)
    make_batch = make_batch_fn(
        inputs, base_dir, spec.train.channels_last, target_last=loss_name != "model"
    )
    if spec.probe.axis == "seq_len":
        make_batch = _along_seq_len(inputs, spec, base_dir, loss_name != "model")
    if spec.train.channels_last and inputs.kind == "image":
        built.module = built.module.to(memory_format=torch.channels_last)
    if spec.train.gradient_checkpointing:
        if built.enable_checkpointing is None:
            raise SpecError(
                [
                    Problem(
                        "train.gradient_checkpointing",
                        f"{spec.model.source} offers no switch for it; use a zoo, timm or "
                        "transformers model, or a factory whose model has "
                        "set_gradient_checkpointing()",
                    )
                ]
            )
        built.enable_checkpointing()
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in built.module.modules())
    return Workload(
        model=built.module,
        inputs=inputs,
        loss_name=loss_name,
        loss_fn=loss_fn,
        make_batch=make_batch,
        source=spec.model.source,
        has_batchnorm=has_bn,
    )


def _along_seq_len(inputs: Inputs, spec: Spec, base_dir: Path | None, target_last: bool) -> BatchFn:
    """probe.axis: seq_len — the size a probe is asked for is the sequence length, at the
    micro-batch probe.batch_size."""
    if inputs.kind != "tokens":
        raise SpecError(
            [Problem("probe.axis", f"seq_len needs token inputs; {spec.model.source} takes {inputs.kind}")]
        )  # fmt: skip
    fixed = spec.probe.batch_size
    assert fixed is not None  # checked when the spec was loaded

    def make(seq_len: int, device: torch.device) -> Batch:
        at = dataclasses.replace(inputs, seq_len=seq_len)
        return make_batch_fn(at, base_dir, False, target_last)(fixed, device)

    return make


FAKE_TENSOR_LOG = "torch._subclasses.fake_tensor"


@contextlib.contextmanager
def quiet_warnings() -> Iterator[None]:
    """Silence library chatter (transformers/timm logging) while building and tracing models."""
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in ("transformers", "timm", "torch", FAKE_TENSOR_LOG)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        # the fake-tensor log prints a whole traceback at ERROR for a shape bug a trace meets;
        # batchprobe says it in one line ("could not trace the model (...)")
        lg.setLevel(logging.CRITICAL if lg.name == FAKE_TENSOR_LOG else logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
