"""Losses: cross-entropy, MSE, the model's own (`loss: model`), or a user function."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from batchprobe.errors import ModelError, Problem, SpecError
from batchprobe.sources.imports import import_object
from batchprobe.sources.inputs import Batch, Inputs

LossFn = Callable[[Any, Batch], torch.Tensor]


def _output_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ModelError(
        f"loss: cannot find a tensor in the model output ({type(out).__name__}); "
        "set loss: model (the model returns the loss) or loss: pkg.module:fn"
    )


def cross_entropy(out: Any, batch: Batch) -> torch.Tensor:
    logits = _output_tensor(out)
    target = batch.target
    if target is None:
        raise ModelError("loss: cross_entropy needs class targets: set inputs.num_classes")
    if logits.dim() > 2 and target.dim() == logits.dim() - 1:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))
    return F.cross_entropy(logits.float(), target)


def mse(out: Any, batch: Batch) -> torch.Tensor:
    pred = _output_tensor(out)
    target = batch.target
    if target is None:
        raise ModelError("loss: mse needs a regression target: set inputs.target_shape")
    return F.mse_loss(pred.float().reshape(target.shape), target)


def model_loss(out: Any, batch: Batch) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        if out.numel() != 1:
            raise ModelError(
                f"loss: model expects the model to return the loss; it returned a tensor of shape "
                f"{tuple(out.shape)}. Use loss: cross_entropy | mse | pkg.module:fn"
            )
        return out.reshape(())
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if not isinstance(loss, torch.Tensor):
        raise ModelError(
            f"loss: model expects the output to be the loss or to have .loss; got {type(out).__name__}"
        )
    return loss


BUILTIN: dict[str, LossFn] = {"cross_entropy": cross_entropy, "mse": mse, "model": model_loss}


def resolve_loss(
    name: str, default: str, inputs: Inputs, base_dir: Path | None
) -> tuple[str, LossFn]:
    """(name, function) for the spec's `loss` (auto: the model source's default, else what the
    inputs imply)."""
    if name == "auto":
        name = default if default != "auto" else _implied(inputs)
    if name in BUILTIN:
        return name, BUILTIN[name]
    if ":" not in name:
        close = difflib.get_close_matches(name, [*BUILTIN, "auto"], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise SpecError(
            [
                Problem(
                    "loss",
                    f"unknown loss {name!r}{hint} (auto | cross_entropy | mse | model | pkg.module:fn)",
                )
            ]
        )
    fn = import_object(name, "loss", base_dir)
    if not callable(fn):
        raise SpecError([Problem("loss", f"{name} is not callable")])

    def custom(out: Any, batch: Batch) -> torch.Tensor:
        return fn(out, batch.target if batch.target is not None else batch.raw)

    return name, custom


def _implied(inputs: Inputs) -> str:
    if inputs.kind == "callable":
        return "model"
    if inputs.kind == "tokens" or inputs.num_classes is not None:
        return "cross_entropy"
    if inputs.target_shape is not None:
        return "mse"
    raise SpecError(
        [
            Problem(
                "loss",
                "cannot choose a loss: set inputs.num_classes (cross_entropy), "
                "inputs.target_shape (mse), or loss: model | pkg.module:fn",
            )
        ]
    )
