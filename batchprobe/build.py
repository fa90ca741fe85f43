"""Model sources, synthetic inputs and losses: Spec -> Workload.

A Workload is what one training step needs: the model, a function making a batch of any size on a
device, and the loss. Weights are random; nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from batchprobe.errors import MissingPackageError, ModelError, Problem, SpecError
from batchprobe.spec import InputsSpec, Spec
from batchprobe.zoo import ZOO


@dataclass(frozen=True)
class Inputs:
    """Inputs with every default filled in from the model source."""

    kind: str
    seq_len: int | None = None
    vocab_size: int | None = None
    shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    target_shape: tuple[int, ...] | None = None
    factory: str | None = None
    # transformers: how the batch is named ("input_ids"/"pixel_values") and labelled
    hf_task: str | None = None

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
    raw: Any = None  # a user callable's batch, passed to a custom loss


LossFn = Callable[[Any, Batch], torch.Tensor]
BatchFn = Callable[[int, torch.device], Batch]


@dataclass
class Workload:
    model: nn.Module
    inputs: Inputs
    loss_name: str
    loss_fn: LossFn
    make_batch: BatchFn
    source: str
    has_batchnorm: bool

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in _unique_parameters(self.model))


def _unique_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield p


# --------------------------------------------------------------------------- imports


def import_object(ref: str, key: str, base_dir: Path | None = None) -> Any:
    """'pkg.module:name' or 'path/to/file.py:name' -> the object. Errors name the spec key."""
    target, sep, name = ref.rpartition(":")
    if not sep or not target or not name:
        raise SpecError([Problem(key, f"{ref!r} must look like pkg.module:name or file.py:name")])
    if target.endswith(".py"):
        candidates = [Path(target)]
        if base_dir is not None and not Path(target).is_absolute():
            candidates.append(base_dir / target)
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise SpecError([Problem(key, f"file not found: {target}")])
        module_name = f"batchprobe_user_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(module_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(module_name, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except Exception as exc:
                del sys.modules[module_name]
                raise ModelError(
                    f"{key}: importing {path} failed: {type(exc).__name__}: {exc}"
                ) from exc
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            raise SpecError(
                [Problem(key, f"cannot import module {target!r} ({exc}); is it on PYTHONPATH?")]
            ) from None
    try:
        return getattr(module, name)
    except AttributeError:
        public = [n for n in dir(module) if not n.startswith("_")]
        close = difflib.get_close_matches(name, public, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise SpecError([Problem(key, f"{target} has no attribute {name!r}{hint}")]) from None


def _require(module: str, extra: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingPackageError(module, extra, what) from None


# --------------------------------------------------------------------------- model sources


@dataclass
class _Model:
    module: nn.Module
    defaults: dict[str, Any]
    loss: str
    enable_checkpointing: Callable[[], None] | None = None


def _build_zoo(name: str, kwargs: Mapping[str, Any]) -> _Model:
    entry = ZOO.get(name)
    if entry is None:
        close = difflib.get_close_matches(name, list(ZOO), n=1)
        hint = f"; did you mean 'zoo:{close[0]}'?" if close else ""
        raise SpecError(
            [Problem("model.source", f"no zoo model {name!r}{hint} (zoo: {', '.join(ZOO)})")]
        )
    module = _call_factory(entry.factory, kwargs, f"zoo:{name}")
    enable = getattr(module, "set_gradient_checkpointing", None)
    return _Model(module, entry.inputs(kwargs), entry.loss, enable)


def _call_factory(factory: Callable[..., Any], kwargs: Mapping[str, Any], what: str) -> Any:
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


def _build_torchvision(name: str, kwargs: Mapping[str, Any]) -> _Model:
    tv = _require("torchvision", "torchvision", f"model source torchvision:{name}")
    names = tv.models.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise SpecError([Problem("model.source", f"torchvision has no model {name!r}{hint}")])
    kwargs = dict(kwargs)
    kwargs.setdefault("weights", None)
    module = _call_factory(
        lambda **kw: tv.models.get_model(name, **kw), kwargs, f"torchvision:{name}"
    )
    size = kwargs.get("image_size") or (299 if name.startswith("inception") else 224)
    defaults = {
        "kind": "image",
        "shape": (3, size, size),
        "num_classes": kwargs.get("num_classes", 1000),
    }
    return _Model(module, defaults, "cross_entropy")


def _build_timm(name: str, kwargs: Mapping[str, Any]) -> _Model:
    timm = _require("timm", "timm", f"model source timm:{name}")
    if not timm.list_models(name) and not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise SpecError([Problem("model.source", f"timm has no model {name!r}{hint}")])
    kwargs = dict(kwargs)
    kwargs["pretrained"] = False
    module = _call_factory(timm.create_model, {"model_name": name, **kwargs}, f"timm:{name}")
    cfg = getattr(module, "pretrained_cfg", None) or {}
    shape = tuple(cfg.get("input_size", (3, 224, 224)))
    defaults = {
        "kind": "image",
        "shape": shape,
        "num_classes": getattr(module, "num_classes", 1000),
    }

    def enable() -> None:
        module.set_grad_checkpointing(True)

    return _Model(module, defaults, "cross_entropy", enable)


_ENCODER_ONLY = {
    "bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "xlm-roberta",
    "camembert", "mpnet", "modernbert", "ernie", "megatron-bert", "roformer",
}  # fmt: skip


def _transformers_config(ref: str, kwargs: Mapping[str, Any]) -> Any:
    transformers = _require("transformers", "transformers", f"model source transformers:{ref}")
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


def _build_transformers(ref: str, kwargs: Mapping[str, Any], task: str | None) -> _Model:
    transformers = _require("transformers", "transformers", f"model source transformers:{ref}")
    config = _transformers_config(ref, kwargs)
    is_vision = getattr(config, "vocab_size", None) is None and hasattr(config, "image_size")
    if task is None:
        if is_vision:
            task = "image-cls"
        elif config.model_type in _ENCODER_ONLY:
            task = "masked-lm"
        else:
            task = "causal-lm"
    auto = {
        "causal-lm": transformers.AutoModelForCausalLM,
        "masked-lm": transformers.AutoModelForMaskedLM,
        "seq-cls": transformers.AutoModelForSequenceClassification,
        "image-cls": transformers.AutoModelForImageClassification,
    }[task]
    try:
        module = auto.from_config(config)
    except ValueError as exc:
        raise SpecError(
            [Problem("model.task", f"transformers:{ref} has no {task} model: {str(exc)[:300]}")]
        ) from None
    if task == "image-cls":
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        defaults: dict[str, Any] = {
            "kind": "image",
            "shape": (getattr(config, "num_channels", 3), size, size),
            "num_classes": getattr(config, "num_labels", 2),
            "hf_task": task,
        }
    else:
        max_pos = (
            getattr(config, "max_position_embeddings", None)
            or getattr(config, "n_positions", None)
            or 512
        )
        defaults = {
            "kind": "tokens",
            "seq_len": min(int(max_pos), 1024),
            "vocab_size": config.vocab_size,
            "hf_task": task,
            "num_classes": getattr(config, "num_labels", 2) if task == "seq-cls" else None,
        }

    def enable() -> None:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    return _Model(module, defaults, "model", enable)


def _build_import(ref: str, kwargs: Mapping[str, Any], base_dir: Path | None) -> _Model:
    factory = import_object(ref, "model.source", base_dir)
    if not callable(factory):
        raise SpecError([Problem("model.source", f"{ref} is not callable")])
    module = _call_factory(factory, kwargs, ref)
    if not isinstance(module, nn.Module):
        raise ModelError(
            f"model.source: {ref} returned {type(module).__name__}, not a torch.nn.Module"
        )
    enable = getattr(module, "set_gradient_checkpointing", None) or getattr(
        module, "gradient_checkpointing_enable", None
    )
    return _Model(module, {}, "auto", enable)


def _build_model(spec: Spec) -> _Model:
    source = spec.model.source
    prefix, _, rest = source.partition(":")
    kwargs = spec.model.kwargs
    base_dir = Path(spec.origin).parent if spec.origin else None
    if prefix == "zoo":
        return _build_zoo(rest, kwargs)
    if prefix == "torchvision":
        return _build_torchvision(rest, kwargs)
    if prefix == "timm":
        return _build_timm(rest, kwargs)
    if prefix == "transformers":
        return _build_transformers(rest, kwargs, spec.model.task)
    return _build_import(source, kwargs, base_dir)


# --------------------------------------------------------------------------- inputs


def resolve_inputs(spec_inputs: InputsSpec, defaults: Mapping[str, Any], source: str) -> Inputs:
    """The spec's inputs over the model's defaults; raise SpecError if still incomplete."""
    values = {k: v for k, v in defaults.items() if v is not None}
    user = {f.name: getattr(spec_inputs, f.name) for f in dataclasses.fields(spec_inputs)}
    if user["kind"] is not None and user["kind"] != values.get("kind"):
        # a different kind: the model's defaults for the other kind no longer apply
        values = {k: v for k, v in values.items() if k == "hf_task"}
    values.update({k: v for k, v in user.items() if v is not None})
    if "kind" not in values:
        shape = values.get("shape")
        if values.get("factory"):
            values["kind"] = "callable"
        elif values.get("seq_len") or values.get("vocab_size"):
            values["kind"] = "tokens"
        elif shape is not None:
            values["kind"] = "image" if len(shape) == 3 else "tensor"
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
    kind = values["kind"]
    problems: list[Problem] = []
    required = {
        "tokens": ["seq_len", "vocab_size"],
        "image": ["shape"],
        "tensor": ["shape"],
        "callable": ["factory"],
    }[kind]
    for key in required:
        if values.get(key) is None:
            problems.append(Problem(f"inputs.{key}", f"is required for inputs.kind: {kind}"))
    if kind == "image" and values.get("shape") is not None and len(values["shape"]) != 3:
        problems.append(Problem("inputs.shape", f"an image is CxHxW, got {values['shape']}"))
    if problems:
        raise SpecError(problems)
    return Inputs(**values)


def _make_batch_fn(inputs: Inputs, base_dir: Path | None, channels_last: bool) -> BatchFn:
    kind = inputs.kind
    if kind == "callable":
        assert inputs.factory is not None
        factory = import_object(inputs.factory, "inputs.factory", base_dir)

        def make_callable(b: int, device: torch.device) -> Batch:
            raw = factory(b, device)
            if isinstance(raw, Mapping):
                return Batch(kwargs=dict(raw), raw=raw)
            if isinstance(raw, tuple | list):
                return Batch(args=tuple(raw), raw=raw)
            if isinstance(raw, torch.Tensor):
                return Batch(args=(raw,), raw=raw)
            raise ModelError(
                f"inputs.factory {inputs.factory} returned {type(raw).__name__}; return a tensor, "
                "a tuple/list (model(*batch)) or a dict (model(**batch))"
            )

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


# --------------------------------------------------------------------------- losses


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


def _cross_entropy(out: Any, batch: Batch) -> torch.Tensor:
    logits = _output_tensor(out)
    target = batch.target
    if target is None:
        raise ModelError("loss: cross_entropy needs class targets: set inputs.num_classes")
    if logits.dim() > 2 and target.dim() == logits.dim() - 1:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))
    return F.cross_entropy(logits.float(), target)


def _mse(out: Any, batch: Batch) -> torch.Tensor:
    pred = _output_tensor(out)
    target = batch.target
    if target is None:
        raise ModelError("loss: mse needs a regression target: set inputs.target_shape")
    return F.mse_loss(pred.float().reshape(target.shape), target)


def _model_loss(out: Any, batch: Batch) -> torch.Tensor:
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


def _resolve_loss(
    name: str, default: str, inputs: Inputs, base_dir: Path | None
) -> tuple[str, LossFn]:
    if name == "auto":
        if default != "auto":
            name = default
        elif inputs.kind == "callable":
            name = "model"
        elif inputs.kind == "tokens" or inputs.num_classes is not None:
            name = "cross_entropy"
        elif inputs.target_shape is not None:
            name = "mse"
        else:
            raise SpecError(
                [
                    Problem(
                        "loss",
                        "cannot choose a loss: set inputs.num_classes (cross_entropy), "
                        "inputs.target_shape (mse), or loss: model | pkg.module:fn",
                    )
                ]
            )
    builtin: dict[str, LossFn] = {
        "cross_entropy": _cross_entropy,
        "mse": _mse,
        "model": _model_loss,
    }
    if name in builtin:
        return name, builtin[name]
    if ":" not in name:
        close = difflib.get_close_matches(name, [*builtin, "auto"], n=1)
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
        return fn(out, batch.raw if batch.raw is not None else batch.target)

    return name, custom


# --------------------------------------------------------------------------- entry point


def build_workload(spec: Spec, device: torch.device | str = "cpu") -> Workload:
    """Build the model directly on `device` (a real device, 'meta', or under FakeTensorMode)."""
    device = torch.device(device)
    # Seeded, so the random weights (and what is measured on them, such as the noise scale) are
    # the same from run to run; the caller's RNG state is left as it was.
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        built = _build_model(spec)
    inputs = resolve_inputs(spec.inputs, built.defaults, spec.model.source)
    base_dir = Path(spec.origin).parent if spec.origin else None
    loss_name, loss_fn = _resolve_loss(spec.loss, built.loss, inputs, base_dir)
    make_batch = _make_batch_fn(inputs, base_dir, spec.train.channels_last)
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


@contextlib.contextmanager
def quiet_warnings() -> Iterator[None]:
    """Silence library chatter (transformers/timm logging) while building models."""
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in ("transformers", "timm", "torch")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
