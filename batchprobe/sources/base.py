"""What a model source gives back: the module, its typed input defaults and its default loss.

A model source is one file with a `SOURCE` (prefix, summary, build function) and one line in the
registry (`batchprobe.sources.SOURCES`). `build(name, kwargs, spec)` gets the text after the
prefix (`resnet50` in `torchvision:resnet50`), the spec's `model.kwargs` and the whole spec.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from batchprobe.backends.hostmem import no_room_words
from batchprobe.errors import MissingPackageError, ModelError, Problem, SpecError
from batchprobe.spec import InputKind, Spec, Task

#: how a default loss is chosen: a built-in loss name, or "auto" (decided from the inputs)
DefaultLoss = Literal["auto", "cross_entropy", "mse", "model"]


@dataclass(frozen=True)
class InputDefaults:
    """Inputs a model source implies; the spec's `inputs:` section overrides any of them."""

    kind: InputKind | None = None
    seq_len: int | None = None
    vocab_size: int | None = None
    shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    target_shape: tuple[int, ...] | None = None
    #: transformers: the batch is named (input_ids / pixel_values, labels) for this task
    hf_task: Task | None = None
    #: the longest sequence the model accepts (position embeddings), when it has a limit
    max_seq_len: int | None = None


@dataclass
class BuiltModel:
    module: nn.Module
    inputs: InputDefaults
    loss: DefaultLoss
    enable_checkpointing: Callable[[], None] | None = None


@dataclass(frozen=True)
class Source:
    """One model source: `prefix:name` in `model.source`."""

    prefix: str
    summary: str
    build: Callable[[str, Mapping[str, Any], Spec], BuiltModel]


def require(module: str, extra: str, what: str) -> Any:
    """Import an optional package, or say which `pip install` fixes its absence."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingPackageError(module, extra, what) from None


def call_factory(factory: Callable[..., Any], kwargs: Mapping[str, Any], what: str) -> Any:
    """factory(**kwargs), with kwargs it does not take reported as a spec problem."""
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        raise SpecError(
            [Problem("model.kwargs", f"{what} does not accept these kwargs: {exc}")]
        ) from None
    except ValueError:
        pass  # no signature available (builtins); let the call decide
    try:
        return factory(**kwargs)
    except (TypeError, ValueError) as exc:
        raise SpecError([Problem("model.kwargs", f"{what}: {exc}")]) from None
    except Exception as exc:
        if _out_of_memory(exc):
            raise  # the host's or the device's doing, not the spec's: said as such above
        trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        raise ModelError(
            f"model.kwargs: {what} failed to build: {type(exc).__name__}: {exc}\n{trace}"
        ) from exc


def _out_of_memory(exc: BaseException) -> bool:
    """A constructor that ran out of memory (torch's OutOfMemoryError, the host allocator's
    "can't allocate memory", a library that could not be mapped, MemoryError — here or in what
    caused it) failed for want of room, not for its arguments."""
    return (
        isinstance(exc, MemoryError)
        or type(exc).__name__ == "OutOfMemoryError"
        or no_room_words(exc) is not None
        or "out of memory" in str(exc).lower()
    )


def unknown_name(what: str, name: str, known: list[str], prefix: str = "") -> SpecError:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(repr(prefix + c) for c in close)}?" if close else ""
    return SpecError([Problem("model.source", f"{what} has no model {name!r}{hint}")])
