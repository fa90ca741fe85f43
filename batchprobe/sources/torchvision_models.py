"""`torchvision:NAME`: `torchvision.models.get_model(NAME, weights=None, **kwargs)`."""

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
    tv = require("torchvision", "torchvision", f"model source torchvision:{name}")
    if name not in tv.models.list_models():
        raise unknown_name("torchvision", name, tv.models.list_models())
    kwargs = {"weights": None, **kwargs}
    module = call_factory(
        lambda **kw: tv.models.get_model(name, **kw), kwargs, f"torchvision:{name}"
    )
    size = kwargs.get("image_size") or (299 if name.startswith("inception") else 224)
    inputs = InputDefaults(
        kind="image", shape=(3, size, size), num_classes=kwargs.get("num_classes", 1000)
    )
    return BuiltModel(module, inputs, "cross_entropy")


SOURCE = Source("torchvision", "torchvision.models.get_model(NAME, weights=None)", build)
