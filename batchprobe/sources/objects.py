"""In-memory objects as model sources, batch factories and losses: what a notebook user has.

`register(obj)` gives a reference, `object:N`, that any spec key taking an import path accepts
(`model.source`, `inputs.factory`, `loss`, `data.source`), so the Python API runs the same
session as the CLI. A registered model is never modified: each build is a copy (on the meta
device for traces, without copying a byte of its weights; on the probing device for probes),
so probes train the copy, not the caller's weights.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from batchprobe.errors import Problem, SpecError
from batchprobe.sources.base import BuiltModel, InputDefaults, Source

PREFIX = "object"
_OBJECTS: dict[str, Any] = {}
_ids = itertools.count()


def register(obj: Any) -> str:
    """A reference to `obj` for this process: `object:N`."""
    key = str(next(_ids))
    _OBJECTS[key] = obj
    return f"{PREFIX}:{key}"


def lookup(name: str, key: str) -> Any:
    try:
        return _OBJECTS[name]
    except KeyError:
        raise SpecError(
            [Problem(key, f"no object {PREFIX}:{name} in this process (register it first)")]
        ) from None


def copy_to(module: nn.Module, device: torch.device) -> nn.Module:
    """A copy of `module` on `device`: its parameters and buffers made anew there (empty on
    meta), the rest of the module deep-copied."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        data = p.detach()
        data = (
            torch.empty_like(data, device=device)
            if device.type == "meta"
            else data.to(device, copy=True)
        )
        memo[id(p)] = nn.Parameter(data, requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = (
            torch.empty_like(b, device=device) if device.type == "meta" else b.to(device, copy=True)
        )
    return copy.deepcopy(module, memo)


def implied_inputs(module: nn.Module) -> InputDefaults:
    """Inputs for a model whose first and last layers are Linear: a [in_features] tensor and a
    [out_features] target (mse). Anything else needs a batch function."""
    layers = [m for m in module.modules() if not list(m.children())]
    if layers and isinstance(layers[0], nn.Linear) and isinstance(layers[-1], nn.Linear):
        return InputDefaults(
            kind="tensor",
            shape=(layers[0].in_features,),
            target_shape=(layers[-1].out_features,),
        )
    return InputDefaults()


def _build(name: str, kwargs: Mapping[str, Any], spec: Any) -> BuiltModel:
    module = lookup(name, "model.source")
    if not isinstance(module, nn.Module):
        raise SpecError(
            [
                Problem(
                    "model.source",
                    f"{PREFIX}:{name} is a {type(module).__name__}, not an nn.Module",
                )
            ]
        )
    if kwargs:
        raise SpecError([Problem("model.kwargs", "an in-memory model takes no kwargs")])
    device = torch.get_default_device()
    return BuiltModel(copy_to(module, device), implied_inputs(module), "auto")


SOURCE = Source(PREFIX, "a model object in this process (the Python API)", _build)
