"""Inputs: the spec's `inputs:` over the model's defaults, synthetic batches, and the one adapter
that wires any batch — synthetic, from `inputs.factory` or from `data.source` — into a call.

The adapter (`wire`): a dict is passed as `model(**batch)`; a tensor as `model(batch)`; a tuple or
list as `model(*batch)` when the model computes its own loss (`loss: model`), otherwise as
`(inputs..., target)`: `model(*batch[:-1])`, and the last element goes to the loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from batchprobe.errors import ModelError, Problem, SpecError
from batchprobe.sources.base import InputDefaults
from batchprobe.sources.imports import import_object
from batchprobe.spec import InputKind, InputsSpec, Task

_REQUIRED: dict[InputKind, tuple[str, ...]] = {
    "tokens": ("seq_len", "vocab_size"),
    "image": ("shape",),
    "tensor": ("shape",),
    "callable": ("factory",),
}


@dataclass(frozen=True)
class Inputs:
    """Inputs with every default filled in from the model source."""

    kind: InputKind
    seq_len: int | None = None
    vocab_size: int | None = None
    shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    target_shape: tuple[int, ...] | None = None
    factory: str | None = None
    # transformers: how the batch is named ("input_ids"/"pixel_values") and labelled
    hf_task: Task | None = None
    # the longest sequence the model accepts, when it has a limit
    max_seq_len: int | None = None

    @property
    def tokens_per_sample(self) -> int | None:
        return self.seq_len if self.kind == "tokens" else None

    def describe(self) -> str:
        if self.kind == "tokens":
            return f"tokens: seq_len {self.seq_len}, vocab {self.vocab_size}"
        if self.kind in ("image", "tensor"):
            shape = "x".join(str(d) for d in self.shape or ())
            target = (
                f", {self.num_classes} classes"
                if self.num_classes
                else f", target {self.target_shape}"
                if self.target_shape is not None
                else ""
            )
            return f"{self.kind} {shape}{target}"
        return f"callable {self.factory}"


@dataclass
class Batch:
    """One batch: the model is called as model(*args, **kwargs); `target` goes to the loss."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    target: Any = None
    raw: Any = None  # a user's batch as given, for a custom loss when there is no target


def wire(raw: Any, *, target_last: bool, key: str) -> Batch:
    """The one adapter from a user's batch to a call (see the module docstring). `key` names the
    spec key that produced the batch, for the error."""
    if isinstance(raw, Mapping):
        return Batch(kwargs=dict(raw), raw=raw)
    if isinstance(raw, torch.Tensor):
        return Batch(args=(raw,), raw=raw)
    if isinstance(raw, tuple | list):
        if target_last and len(raw) >= 2:
            return Batch(args=tuple(raw[:-1]), target=raw[-1], raw=raw)
        return Batch(args=tuple(raw), raw=raw)
    raise ModelError(
        f"{key}: a batch must be a tensor (model(batch)), a tuple/list (model(*batch), or "
        f"(inputs..., target) with a separate loss) or a dict (model(**batch)); got "
        f"{type(raw).__name__}"
    )


def resolve_inputs(spec_inputs: InputsSpec, defaults: InputDefaults, source: str) -> Inputs:
    """The spec's inputs over the model's defaults; raise SpecError if still incomplete."""
    values = {k: v for k, v in dataclasses.asdict(defaults).items() if v is not None}
    user = {f.name: getattr(spec_inputs, f.name) for f in dataclasses.fields(spec_inputs)}
    if user["kind"] is not None and user["kind"] != values.get("kind"):
        # a different kind: the model's defaults for the other kind no longer apply
        values = {k: v for k, v in values.items() if k in ("hf_task", "max_seq_len")}
    values.update({k: v for k, v in user.items() if v is not None})
    if "kind" not in values:
        shape = values.get("shape")
        if values.get("factory"):
            values["kind"] = "callable"
        elif values.get("seq_len") or values.get("vocab_size"):
            values["kind"] = "tokens"
        elif shape is not None:
            values["kind"] = "image" if len(shape) == 3 else "tensor"
        elif source.startswith("object:"):
            raise SpecError(
                [
                    Problem(
                        "inputs",
                        "an in-memory model needs a batch function: "
                        "find_max_batch_size(model, batch_fn) with batch_fn(batch_size, device) "
                        "returning the batch, e.g. (x, y)",
                    )
                ]
            )
        else:
            raise SpecError(
                [
                    Problem(
                        "inputs",
                        f"{source} has no default inputs: set inputs.kind (tokens | image | tensor "
                        "| callable) with its keys, e.g. inputs: {kind: tensor, shape: [784], "
                        "num_classes: 10}",
                    )
                ]
            )
    kind: InputKind = values["kind"]
    problems = [
        Problem(f"inputs.{key}", f"is required for inputs.kind: {kind}")
        for key in _REQUIRED[kind]
        if values.get(key) is None
    ]
    if kind == "image" and values.get("shape") is not None and len(values["shape"]) != 3:
        problems.append(Problem("inputs.shape", f"an image is CxHxW, got {values['shape']}"))
    # a setting the inputs' kind does not read would be silently ignored: say so
    unused = {
        "tokens": ("shape",),
        "image": ("seq_len", "vocab_size"),
        "tensor": ("seq_len", "vocab_size"),
    }.get(kind, ())
    for key in unused:
        if user.get(key) is not None:
            problems.append(
                Problem(
                    f"inputs.{key}",
                    f"does not apply: {source} takes {kind} inputs"
                    + (f" (inputs.shape: {values['shape']})" if values.get("shape") else ""),
                )
            )
    if problems:
        raise SpecError(problems)
    return Inputs(**values)


BatchFn = Callable[[int, torch.device], Batch]


def make_batch_fn(
    inputs: Inputs,
    base_dir: Path | None,
    channels_last: bool,
    target_last: bool,
) -> BatchFn:
    """A function making a batch of any size on a device: synthetic data, or the user's factory
    (called as make_batch(batch_size, device)) wired by `wire`."""
    kind = inputs.kind
    if kind == "callable":
        assert inputs.factory is not None
        factory = import_object(inputs.factory, "inputs.factory", base_dir)

        def make_callable(b: int, device: torch.device) -> Batch:
            return wire(factory(b, device), target_last=target_last, key="inputs.factory")

        return make_callable

    def target(b: int, device: torch.device) -> torch.Tensor | None:
        if inputs.num_classes is not None:
            return torch.randint(0, inputs.num_classes, (b,), device=device)
        if inputs.target_shape is not None:
            return torch.randn((b, *inputs.target_shape), device=device)
        return None

    hf = inputs.hf_task
    if kind == "tokens":
        assert inputs.seq_len is not None and inputs.vocab_size is not None
        seq_len, vocab = inputs.seq_len, inputs.vocab_size

        def make_tokens(b: int, device: torch.device) -> Batch:
            ids = torch.randint(0, vocab, (b, seq_len), device=device)
            if hf is not None:
                labels = ids if hf in ("causal-lm", "masked-lm") else target(b, device)
                return Batch(kwargs={"input_ids": ids, "labels": labels})
            if inputs.num_classes is not None:  # a sequence classifier: one label per sample
                return Batch(args=(ids,), target=target(b, device))
            return Batch(args=(ids,), target=torch.randint(0, vocab, (b, seq_len), device=device))

        return make_tokens

    assert inputs.shape is not None
    shape = inputs.shape
    channels_last = channels_last and kind == "image"

    def make_tensor(b: int, device: torch.device) -> Batch:
        x = torch.randn((b, *shape), device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if hf is not None:
            return Batch(kwargs={"pixel_values": x, "labels": target(b, device)})
        return Batch(args=(x,), target=target(b, device))

    return make_tensor
