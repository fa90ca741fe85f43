"""`timm:NAME`: `timm.create_model(NAME, pretrained=False, **kwargs)`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from batchprobe.sources.base import (
    BuiltModel,
    InputDefaults,
    Source,
    call_factory,
    require,
    unknown_name,
)
from batchprobe.spec import Spec


def build(name: str, kwargs: Mapping[str, Any], spec: Spec) -> BuiltModel:
    timm = require("timm", "timm", f"model source timm:{name}")
    if not timm.list_models(name) and not timm.is_model(name):
        raise unknown_name("timm", name, timm.list_models())
    kwargs = {**kwargs, "pretrained": False}
    module = call_factory(timm.create_model, {"model_name": name, **kwargs}, f"timm:{name}")
    cfg = getattr(module, "pretrained_cfg", None) or {}
    inputs = InputDefaults(
        kind="image",
        shape=tuple(cfg.get("input_size", (3, 224, 224))),
        num_classes=getattr(module, "num_classes", 1000),
    )

    def enable() -> None:
        module.set_grad_checkpointing(True)

    return BuiltModel(module, inputs, "cross_entropy", enable)


SOURCE = Source("timm", "timm.create_model(NAME, pretrained=False)", build)
