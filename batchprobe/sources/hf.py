"""`transformers:TYPE_OR_ID`: a Hugging Face model built from its config — nothing downloaded.

`AutoConfig.for_model(TYPE, **kwargs)` (or the config of a hub id already in the local cache),
then `AutoModelFor<task>.from_config`. The model computes its own loss from `labels`.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Mapping
from typing import Any

import torch

from batchprobe.errors import Problem, SpecError
from batchprobe.sources.base import BuiltModel, InputDefaults, Source, require
from batchprobe.spec import Spec, Task

_ENCODER_ONLY = {
    "bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "xlm-roberta",
    "camembert", "mpnet", "modernbert", "ernie", "megatron-bert", "roformer",
}  # fmt: skip
_AUTO_CLASSES: dict[Task, str] = {
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "seq-cls": "AutoModelForSequenceClassification",
    "image-cls": "AutoModelForImageClassification",
}


def _config(ref: str, kwargs: Mapping[str, Any]) -> Any:
    transformers = require("transformers", "transformers", f"model source transformers:{ref}")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if ref in CONFIG_MAPPING:
        try:
            return transformers.AutoConfig.for_model(ref, **kwargs)
        except (TypeError, ValueError) as exc:
            raise SpecError([Problem("model.kwargs", f"transformers:{ref}: {exc}")]) from None
    try:
        return transformers.AutoConfig.from_pretrained(ref, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        close = difflib.get_close_matches(ref, list(CONFIG_MAPPING.keys()), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise SpecError(
            [
                Problem(
                    "model.source",
                    f"transformers:{ref} is neither a model type nor a hub id whose config is in "
                    f"the local cache (nothing is downloaded).{hint}",
                )
            ]
        ) from None


def _default_task(config: Any) -> Task:
    if getattr(config, "vocab_size", None) is None and hasattr(config, "image_size"):
        return "image-cls"
    return "masked-lm" if config.model_type in _ENCODER_ONLY else "causal-lm"


def _auto_class(transformers: Any, task: Task, config: Any) -> Any:
    """The AutoModelFor<task> class, with the model's own module imported — on the CPU: models
    are built under a device context (meta for traces), and some transformers versions compute
    with tensors when a module is first imported (`.item()` cannot run on meta; a lazy import
    that failed once stays failed)."""
    with torch.device("cpu"):
        auto = getattr(transformers, _AUTO_CLASSES[task])
        mapping = getattr(auto, "_model_mapping", None)
        if mapping is not None:
            with contextlib.suppress(Exception):  # a model type without one: from_config says
                mapping[type(config)]
    return auto


def build(ref: str, kwargs: Mapping[str, Any], spec: Spec) -> BuiltModel:
    transformers = require("transformers", "transformers", f"model source transformers:{ref}")
    with torch.device("cpu"):  # see _auto_class
        config = _config(ref, kwargs)
    task = spec.model.task or _default_task(config)
    auto = _auto_class(transformers, task, config)
    try:
        module = auto.from_config(config)
    except ValueError as exc:
        raise SpecError(
            [Problem("model.task", f"transformers:{ref} has no {task} model: {str(exc)[:300]}")]
        ) from None
    if task == "image-cls":
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        inputs = InputDefaults(
            kind="image",
            shape=(getattr(config, "num_channels", 3), size, size),
            num_classes=getattr(config, "num_labels", 2),
            hf_task=task,
        )
    else:
        max_pos = (
            getattr(config, "max_position_embeddings", None)
            or getattr(config, "n_positions", None)
            or 512
        )
        inputs = InputDefaults(
            kind="tokens",
            seq_len=min(int(max_pos), 1024),
            vocab_size=config.vocab_size,
            hf_task=task,
            num_classes=getattr(config, "num_labels", 2) if task == "seq-cls" else None,
            max_seq_len=int(max_pos),
        )

    def enable() -> None:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    return BuiltModel(module, inputs, "model", enable)


SOURCE = Source("transformers", "AutoModelFor<task>.from_config(AutoConfig.for_model(TYPE))", build)
