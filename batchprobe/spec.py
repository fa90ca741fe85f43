"""The YAML spec: text and overrides in, one frozen, validated `Spec` out.

Parsing happens once, at the edge. Every problem is collected (unknown keys with a suggestion,
wrong types, impossible values, missing keys) and reported together with the key path and, for
YAML files, the line. Only `yaml.safe_load`-equivalent loading is used (SafeLoader).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from batchprobe.backends import device_help, is_device_name
from batchprobe.errors import Problem, SpecError
from batchprobe.search import STRATEGIES
from batchprobe.units import MemorySize, parse_bytes, parse_memory_size

Precision = Literal["fp32", "bf16", "fp16"]
OptimizerName = Literal["sgd", "adam", "adamw", "none"]
#: the torch.optim class of each optimizer name (the one table: step, spec checks, snippets)
OPTIMIZER_CLASSES: dict[str, str] = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}
InputKind = Literal["tokens", "image", "tensor", "callable"]
Task = Literal["causal-lm", "masked-lm", "seq-cls", "image-cls"]
Strategy = Literal["auto", "estimate", "predict", "doubling"]  # checked against search.STRATEGIES
Parallel = Literal["auto", "none", "ddp", "fsdp"]
LrScaling = Literal["auto", "linear", "sqrt", "none"]
Axis = Literal["batch_size", "seq_len"]

Shape = tuple[int, ...]


class Bytes(int):
    """A byte count written as 20GiB, 512MB or a number of bytes."""


def _doc(text: str, **checks: Any) -> dict[str, Any]:
    return {"doc": text, **checks}


@dataclass(frozen=True)
class ModelSpec:
    source: str = field(
        metadata=_doc(
            "zoo:NAME | torchvision:NAME | timm:NAME | transformers:TYPE_OR_ID | "
            "pkg.module:factory | path/file.py:factory"
        )
    )
    kwargs: Mapping[str, Any] = field(
        default_factory=dict, metadata=_doc("passed to the factory / model config")
    )
    task: Task | None = field(
        default=None, metadata=_doc("transformers only; default causal-lm (image-cls for vision)")
    )


@dataclass(frozen=True)
class InputsSpec:
    kind: InputKind | None = field(
        default=None, metadata=_doc("default: what the model source implies")
    )
    seq_len: int | None = field(default=None, metadata=_doc("tokens per sample", min=1))
    vocab_size: int | None = field(default=None, metadata=_doc("token ids are drawn below", min=1))
    shape: Shape | None = field(
        default=None, metadata=_doc("per-sample shape: [3, 224, 224] or '3x224x224'")
    )
    num_classes: int | None = field(
        default=None, metadata=_doc("class targets for cross-entropy", min=1)
    )
    target_shape: Shape | None = field(
        default=None, metadata=_doc("per-sample regression target shape (mse)")
    )
    factory: str | None = field(
        default=None, metadata=_doc("kind: callable -> pkg.module:make_batch or file.py:make_batch")
    )


@dataclass(frozen=True)
class OptimizerSpec:
    name: OptimizerName = field(default="adamw", metadata=_doc("sgd | adam | adamw | none"))
    lr: float = field(default=1e-3, metadata=_doc("learning rate used while probing", gt=0))
    kwargs: Mapping[str, Any] = field(
        default_factory=dict, metadata=_doc("other constructor arguments (weight_decay, ...)")
    )


@dataclass(frozen=True)
class TrainSpec:
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec, metadata=_doc("optimizer"))
    precision: Precision = field(
        default="fp32", metadata=_doc("fp32 | bf16 | fp16 (autocast; fp16 adds a GradScaler)")
    )
    gradient_checkpointing: bool = field(default=False, metadata=_doc("recompute activations"))
    compile: bool = field(default=False, metadata=_doc("torch.compile the model"))
    channels_last: bool = field(default=False, metadata=_doc("channels-last memory format"))
    parallel: Parallel = field(
        default="auto", metadata=_doc("auto (ddp when WORLD_SIZE > 1) | none | ddp | fsdp")
    )
    cudnn_benchmark: bool = field(
        default=True,
        metadata=_doc(
            "torch.backends.cudnn.benchmark, as training scripts set it: cuDNN autotunes each "
            "convolution shape, and the workspace it picks is in the peak"
        ),
    )
    tf32: bool | None = field(
        default=None,
        metadata=_doc(
            "TF32 math for float32 matmuls and convolutions: null = torch's defaults "
            "(convolutions TF32, matmuls full FP32), true = both, false = neither"
        ),
    )


@dataclass(frozen=True)
class ProbeSpec:
    device: str = field(default="auto", metadata=_doc(device_help()))
    memory_budget: MemorySize | None = field(
        default=None, metadata=_doc("'24GiB' | 0.9 | null (CPU default: half the available RAM)")
    )
    start: int = field(default=1, metadata=_doc("first batch size tried", min=1))
    max_batch_size: int = field(default=65536, metadata=_doc("never probe above this", min=1))
    steps: int = field(default=2, metadata=_doc("full training steps per probe", min=2))
    strategy: Strategy = field(
        default="auto",
        metadata=_doc(
            "auto (estimate, else predict, else doubling) | "
            + " | ".join(f"{s.name}: {s.doc}" for s in STRATEGIES.values())
        ),
    )
    isolate: bool = field(default=False, metadata=_doc("run each probe in a child process"))
    timeout_s: float = field(default=600.0, metadata=_doc("isolated probe timeout, seconds", gt=0))
    collective_timeout_s: float = field(
        default=60.0, metadata=_doc("torchrun: timeout of a probe's collectives, seconds", gt=0)
    )
    axis: Axis = field(
        default="batch_size",
        metadata=_doc(
            "what find-max searches: batch_size | seq_len (the longest inputs.seq_len that "
            "trains at probe.batch_size, up to the model's maximum positions)"
        ),
    )
    batch_size: int | None = field(
        default=None, metadata=_doc("the micro-batch a probe.axis: seq_len search holds", min=1)
    )


@dataclass(frozen=True)
class PlanSpec:
    global_batch_size: int | None = field(
        default=None, metadata=_doc("samples per optimizer step", min=1)
    )
    global_tokens: int | None = field(
        default=None, metadata=_doc("tokens per optimizer step (token inputs)", min=1)
    )
    base_lr: float | None = field(
        default=None, metadata=_doc("LR known to work at base_batch_size", gt=0)
    )
    base_batch_size: int | None = field(
        default=None, metadata=_doc("global batch at which base_lr works", min=1)
    )
    lr_scaling: LrScaling = field(
        default="auto",
        metadata=_doc("auto (sqrt for Adam-family, linear for SGD) | linear | sqrt | none"),
    )
    dataset_size: int | None = field(default=None, metadata=_doc("samples per epoch", min=1))
    total_tokens: int | None = field(default=None, metadata=_doc("tokens in the whole run", min=1))
    epochs: float = field(default=1.0, metadata=_doc("passes over dataset_size", gt=0))
    num_gpus: int | None = field(
        default=None, metadata=_doc("data-parallel ranks; default WORLD_SIZE else 1", min=1)
    )
    headroom: float = field(
        default=0.9, metadata=_doc("keep peak below this fraction of capacity/budget", gt=0, max=1)
    )
    peak_tflops: float | None = field(
        default=None, metadata=_doc("device peak TFLOP/s for MFU (default: known GPUs)", gt=0)
    )
    candidates: tuple[int, ...] | None = field(
        default=None, metadata=_doc("micro-batches to time (default: powers of two, max, headroom)")
    )
    min_time_s: float = field(
        default=1.0, metadata=_doc("timed seconds per candidate (at least 5 steps)", gt=0)
    )


@dataclass(frozen=True)
class EstimateSpec:
    gpu: str | None = field(
        default=None, metadata=_doc("target GPU from the table (h100-80gb, a100-40gb, l4, ...)")
    )
    capacity: Bytes | None = field(
        default=None,
        metadata=_doc("target capacity (80GiB); default: the GPU's, else the device's"),
    )
    fragmentation: float | None = field(
        default=None, metadata=_doc("GPU allowance on the peak (default 0.05)", min=0, max=1)
    )
    context_bytes: Bytes | None = field(
        default=None,
        metadata=_doc("GPU fixed allowance: CUDA context, workspaces (default 512MiB)"),
    )
    batch_sizes: tuple[int, ...] | None = field(
        default=None, metadata=_doc("also trace these batch sizes (default: the search's)")
    )
    verify: bool = field(
        default=True,
        metadata=_doc(
            "when the target is the device here: one real probe at the estimated max, to check "
            "the trace"
        ),
    )
    what_if: bool = field(
        default=False,
        metadata=_doc(
            "also estimate the max under each change that applies (precision, checkpointing, "
            "optimizer, foreach, channels-last, half the seq_len), as --set lines"
        ),
    )
    sweep_seq_len: tuple[int, ...] | None = field(
        default=None,
        metadata=_doc("estimate the max micro-batch at each of these inputs.seq_len values"),
    )


@dataclass(frozen=True)
class Threshold:
    micro_batch_size: int = field(metadata=_doc("micro-batch the figure is measured at", min=1))
    value: float = field(metadata=_doc("the expected figure", min=0))


@dataclass(frozen=True)
class ByteThreshold:
    micro_batch_size: int = field(metadata=_doc("micro-batch the figure is measured at", min=1))
    value: Bytes = field(metadata=_doc("bytes: 20GiB, 512MB, ..."))


@dataclass(frozen=True)
class CheckSpec:
    min_max_batch_size: int | None = field(
        default=None, metadata=_doc("max batch must be at least this", min=1)
    )
    min_samples_per_s: Threshold | None = field(
        default=None, metadata=_doc("{micro_batch_size, value}")
    )
    min_tokens_per_s: Threshold | None = field(
        default=None, metadata=_doc("{micro_batch_size, value}")
    )
    max_peak_bytes: ByteThreshold | None = field(
        default=None, metadata=_doc("{micro_batch_size, value: 20GiB}")
    )
    tolerance: float = field(
        default=0.05, metadata=_doc("relative slack on every expectation", min=0, max=1)
    )


@dataclass(frozen=True)
class DataSpec:
    source: str = field(
        metadata=_doc("pkg.module:factory or file.py:factory returning batches or a Dataset")
    )
    kwargs: Mapping[str, Any] = field(default_factory=dict, metadata=_doc("passed to the factory"))
    collate: str | None = field(
        default=None, metadata=_doc("pkg.module:fn collating Dataset items (default: stack)")
    )


@dataclass(frozen=True)
class NoiseSpec:
    small_batch_size: int = field(
        default=8, metadata=_doc("B_small: samples per micro-batch gradient", min=1)
    )
    accumulation: int = field(
        default=8, metadata=_doc("micro-batches per big batch: B_big = B_small x this", min=2)
    )
    steps: int = field(default=100, metadata=_doc("big batches averaged", min=2))
    warmup_steps: int = field(
        default=0, metadata=_doc("optimizer steps of training before measuring", min=0)
    )


@dataclass(frozen=True)
class Spec:
    model: ModelSpec = field(metadata=_doc("what to train"))
    inputs: InputsSpec = field(default_factory=InputsSpec, metadata=_doc("synthetic inputs"))
    loss: str = field(
        default="auto", metadata=_doc("auto | cross_entropy | mse | model | pkg.module:fn")
    )
    train: TrainSpec = field(default_factory=TrainSpec, metadata=_doc("how to train"))
    probe: ProbeSpec = field(default_factory=ProbeSpec, metadata=_doc("how to probe"))
    plan: PlanSpec = field(default_factory=PlanSpec, metadata=_doc("plan settings"))
    estimate: EstimateSpec = field(default_factory=EstimateSpec, metadata=_doc("estimate settings"))
    check: CheckSpec = field(default_factory=CheckSpec, metadata=_doc("CI expectations"))
    data: DataSpec | None = field(default=None, metadata=_doc("real batches (noise scale)"))
    noise: NoiseSpec = field(default_factory=NoiseSpec, metadata=_doc("noise-scale settings"))
    origin: str | None = field(default=None, metadata={"internal": True})

    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML/JSON-able) for reports and child processes."""
        return _to_plain(self)


def _to_plain(value: Any) -> Any:
    if isinstance(value, MemorySize):
        return value.bytes if value.bytes is not None else value.fraction
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            if f.metadata.get("internal"):
                continue
            out[f.name] = _to_plain(getattr(value, f.name))
        return out
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_to_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- loading


def load_spec(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    text: str | None = None,
    values: Mapping[str, Any] | None = None,
) -> Spec:
    """Read a YAML spec (file or text), apply `values` (key.path -> value, from flags) and then
    `--set key.path=value` overrides, validate everything and return a frozen Spec.

    Raises SpecError listing every problem.
    """
    origin = str(path) if path is not None else None
    lines: dict[str, int] = {}
    data: Any = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SpecError([Problem("", f"config file not found: {path}")]) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise SpecError([Problem("", f"cannot read config file {path}: {exc}")]) from None
    if text is not None:
        data, lines = _parse_yaml(text, origin)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(
            [Problem("", f"the spec must be a mapping of sections, got {_type_name(data)}", 1)],
            origin,
        )
    problems: list[Problem] = []
    for key, value in (values or {}).items():
        _set_path(data, key.split("."), value, problems, source="flag")
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(
                Problem(item, "an override must look like key.path=value", source="--set")
            )
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        _set_path(data, key.split("."), value, problems, source="--set")
    spec = _convert_dataclass(Spec, data, "", lines, problems)
    if spec is not None:
        spec = _optimizer_kwargs(spec, lines, problems)
        problems.extend(_cross_checks(spec, lines))
    if problems:
        problems.sort(key=lambda p: (p.line is None, p.line or 0))
        raise SpecError(problems, origin)
    assert spec is not None
    return dataclasses.replace(spec, origin=origin)


def _parse_yaml(text: str, origin: str | None) -> tuple[Any, dict[str, int]]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.load(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark is not None else None
        text = f"invalid YAML: {exc.problem or exc}"
        if exc.context and exc.context_mark is not None:
            text += f" ({exc.context} started on line {exc.context_mark.line + 1})"
        raise SpecError([Problem("", text, line)], origin) from None
    except yaml.YAMLError as exc:
        raise SpecError([Problem("", f"invalid YAML: {exc}")], origin) from None
    lines: dict[str, int] = {}
    if node is not None:
        _collect_lines(node, "", lines)
    return data, lines


def _collect_lines(node: yaml.Node, prefix: str, lines: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = str(key_node.value)
            path = f"{prefix}.{key}" if prefix else key
            lines[path] = key_node.start_mark.line + 1
            _collect_lines(value_node, path, lines)


def _set_path(
    data: dict[str, Any], keys: list[str], value: Any, problems: list[Problem], source: str
) -> None:
    node = data
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif isinstance(child, str) and key == "optimizer":
            child = node[key] = {"name": child}
        elif not isinstance(child, dict):
            problems.append(
                Problem(
                    ".".join(keys[: i + 1]),
                    f"is a {_type_name(child)}, not a section; cannot set {'.'.join(keys)}",
                    source=source,
                )
            )
            return
        node = child
    node[keys[-1]] = value


# --------------------------------------------------------------------------- conversion


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "list",
        dict: "mapping",
    }.get(type(value), type(value).__name__)


class _Invalid(Exception):
    pass


def _convert_dataclass(
    cls: type, data: Any, path: str, lines: dict[str, int], problems: list[Problem]
) -> Any:
    line = lines.get(path)
    if cls is OptimizerSpec and isinstance(data, str):
        data = {"name": data}
    if not isinstance(data, dict):
        problems.append(Problem(path, f"must be a mapping, got {_type_name(data)}", line))
        return None
    if cls is OptimizerSpec:
        data = _split_optimizer(data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in data:
        if key not in fields:
            key_path = f"{path}.{key}" if path else str(key)
            suggestion = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean '{suggestion[0]}'?" if suggestion else ""
            valid = ", ".join(fields)
            problems.append(
                Problem(
                    key_path,
                    f"unknown key{hint} (valid keys here: {valid})",
                    lines.get(key_path, line),
                )
            )
    kwargs: dict[str, Any] = {}
    ok = True
    for name, f in fields.items():
        key_path = f"{path}.{name}" if path else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(
                    Problem(key_path, f"is required ({f.metadata.get('doc', '')})", line)
                )
                ok = False
            continue
        before = len(problems)
        value = _convert(hints[name], data[name], key_path, lines, problems, f.metadata)
        if len(problems) > before:
            ok = False
        else:
            kwargs[name] = value
    if not ok:
        return None
    return cls(**kwargs)


def _split_optimizer(data: dict[str, Any]) -> dict[str, Any]:
    """`{name: adamw, lr: 3e-4, weight_decay: 0.1}`: keys other than name/lr go to kwargs."""
    out = {k: v for k, v in data.items() if k in ("name", "lr", "kwargs")}
    extra = {k: v for k, v in data.items() if k not in out}
    kwargs = out.get("kwargs", {})
    if extra and isinstance(kwargs, dict):  # a kwargs that is not a mapping is reported as such
        out["kwargs"] = {**kwargs, **extra}
    return out


def _convert(
    tp: Any,
    value: Any,
    path: str,
    lines: dict[str, int],
    problems: list[Problem],
    meta: Mapping[str, Any],
) -> Any:
    line = lines.get(path)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value is None:
            return None
        tp = non_none[0] if len(non_none) == 1 else tp
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
    elif value is None:
        problems.append(Problem(path, "must not be null", line))
        return None
    try:
        if dataclasses.is_dataclass(tp) and tp is not MemorySize:
            return _convert_dataclass(tp, value, path, lines, problems)  # type: ignore[arg-type]
        result = _convert_scalar(tp, origin, args, value)
        _check_range(result, meta)
        return result
    except _Invalid as exc:
        problems.append(Problem(path, str(exc), line))
        return None


def _convert_scalar(tp: Any, origin: Any, args: tuple[Any, ...], value: Any) -> Any:
    if origin is Literal:
        if value not in args:
            choices = " | ".join(str(a) for a in args)
            suggestion = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean '{suggestion[0]}'?" if suggestion else ""
            raise _Invalid(f"must be one of {choices}, got {value!r}{hint}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _Invalid(f"must be true or false, got {_type_name(value)} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer() and math.isfinite(value):
                return int(value)
            raise _Invalid(f"must be a whole number, got {_type_name(value)} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise _Invalid(f"must be a number, got boolean {value!r}")
        if isinstance(value, int | float):
            result = float(value)
        elif isinstance(value, str):
            # YAML 1.1 reads 3e-4 (no dot) as a string; accept it as the number it means.
            try:
                result = float(value)
            except ValueError:
                raise _Invalid(f"must be a number, got string {value!r}") from None
        else:
            raise _Invalid(f"must be a number, got {_type_name(value)}")
        if not math.isfinite(result):
            raise _Invalid(f"must be a finite number, got {value!r}")
        return result
    if tp is str:
        if not isinstance(value, str) or not value.strip():
            raise _Invalid(f"must be a non-empty string, got {_type_name(value)} {value!r}")
        return value
    if tp is Bytes:
        if not isinstance(value, str | int | float):
            raise _Invalid(f"must be a size such as 20GiB, got {_type_name(value)}")
        try:
            return Bytes(parse_bytes(value))
        except ValueError as exc:
            raise _Invalid(str(exc)) from None
    if tp is MemorySize:
        if not isinstance(value, str | int | float):
            raise _Invalid(
                f"must be a size such as 24GiB or a fraction such as 0.9, got {_type_name(value)}"
            )
        try:
            return parse_memory_size(value)
        except ValueError as exc:
            raise _Invalid(str(exc)) from None
    if origin is tuple:  # Shape or tuple[int, ...]
        return _convert_shape(value)
    if origin in (Mapping, dict) or tp is dict:
        if not isinstance(value, dict):
            raise _Invalid(f"must be a mapping, got {_type_name(value)}")
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise _Invalid(f"keys must be strings, got {bad[0]!r}")
        return dict(value)
    raise AssertionError(f"spec type not handled: {tp}")  # a bug in the schema, not user input


def _convert_shape(value: Any) -> tuple[int, ...]:
    items: Iterable[Any]
    if isinstance(value, bool):
        raise _Invalid("must be a shape such as [3, 224, 224] or '3x224x224'")
    if isinstance(value, int):
        items = [value]
    elif isinstance(value, str):
        parts = [p.strip() for p in value.lower().replace(",", "x").split("x")]
        try:
            items = [int(p) for p in parts]
        except ValueError:
            raise _Invalid(f"cannot read {value!r} as a shape; use e.g. 3x224x224") from None
    elif isinstance(value, list):
        items = value
    else:
        raise _Invalid(f"must be a shape such as [3, 224, 224], got {_type_name(value)}")
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item < 1:
            raise _Invalid(f"every dimension must be a positive whole number, got {item!r}")
        out.append(item)
    if not out:
        raise _Invalid("a shape needs at least one dimension")
    return tuple(out)


def _check_range(value: Any, meta: Mapping[str, Any]) -> None:
    if isinstance(value, MemorySize) or value is None:
        return
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if not isinstance(v, int | float) or isinstance(v, bool):
            continue
        if "min" in meta and v < meta["min"]:
            raise _Invalid(f"must be at least {meta['min']}, got {v:g}")
        if "gt" in meta and v <= meta["gt"]:
            raise _Invalid(f"must be greater than {meta['gt']}, got {v:g}")
        if "max" in meta and v > meta["max"]:
            raise _Invalid(f"must be at most {meta['max']}, got {v:g}")


def optimizer_parameters(name: str) -> list[str]:
    """Constructor arguments of a torch optimizer, other than params and lr."""
    return list(optimizer_defaults(name))


def optimizer_defaults(name: str) -> dict[str, Any]:
    """Constructor arguments of a torch optimizer, other than params and lr, with defaults."""
    import torch.optim

    cls = getattr(torch.optim, OPTIMIZER_CLASSES[name])
    return {
        p.name: p.default
        for p in inspect.signature(cls).parameters.values()
        if p.name not in ("self", "params", "lr")
    }


def _number(value: Any) -> float | None:
    """A number from YAML: PyYAML reads `5e-4` (no dot) as text."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _optimizer_kwargs(spec: Spec, lines: dict[str, int], problems: list[Problem]) -> Spec:
    """Each optimizer setting in the type of the constructor's default: numbers (`5e-4` as YAML
    text too), a pair of numbers (`betas`), true/false; anything else named in a problem."""
    opt = spec.train.optimizer
    if opt.name == "none" or not opt.kwargs:
        return spec
    defaults = optimizer_defaults(opt.name)
    kwargs = dict(opt.kwargs)
    for key, value in opt.kwargs.items():
        if key not in defaults:
            continue  # named by the cross-checks
        default, path = defaults[key], f"train.optimizer.{key}"
        expected = None
        if isinstance(default, bool):
            if not isinstance(value, bool):
                expected = "true or false"
        elif isinstance(default, int | float):
            number = _number(value)
            if number is None:
                expected = "a number"
            else:
                kwargs[key] = float(number) if isinstance(default, float) else number
        elif isinstance(default, tuple) and all(isinstance(d, int | float) for d in default):
            numbers = [_number(v) for v in value] if isinstance(value, list | tuple) else []
            if len(numbers) != len(default) or any(n is None for n in numbers):
                expected = f"{len(default)} numbers, e.g. {list(default)}"
            else:
                kwargs[key] = [float(n) for n in numbers if n is not None]
        if expected is not None:
            problems.append(
                Problem(
                    path,
                    f"must be {expected} (default {default!r}), got {value!r}",
                    lines.get(path),
                )
            )
    optimizer = dataclasses.replace(opt, kwargs=kwargs)
    return dataclasses.replace(spec, train=dataclasses.replace(spec.train, optimizer=optimizer))


def _cross_checks(spec: Spec, lines: dict[str, int]) -> list[Problem]:
    problems: list[Problem] = []

    def add(path: str, message: str) -> None:
        problems.append(Problem(path, message, lines.get(path)))

    opt = spec.train.optimizer
    if opt.name != "none" and opt.kwargs:
        allowed = optimizer_parameters(opt.name)
        for key in opt.kwargs:
            if key not in allowed:
                suggestion = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
                hint = f"; did you mean '{suggestion[0]}'?" if suggestion else ""
                add(
                    f"train.optimizer.{key}",
                    f"not an argument of {opt.name}{hint} (accepted: {', '.join(allowed)})",
                )
    if not is_device_name(spec.probe.device):
        add("probe.device", f"must be one of {device_help()}, got {spec.probe.device!r}")
    if spec.estimate.gpu is not None:
        from batchprobe.gpus import GPUS, lookup, suggest

        if lookup(spec.estimate.gpu) is None:
            close = suggest(spec.estimate.gpu)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            add(
                "estimate.gpu",
                f"unknown GPU {spec.estimate.gpu!r}{hint} (known: {', '.join(g.key for g in GPUS)})",
            )
    if spec.probe.axis == "seq_len" and spec.probe.batch_size is None:
        add("probe.batch_size", "is required with probe.axis: seq_len (the micro-batch to hold)")
    if spec.probe.axis != "seq_len" and spec.probe.batch_size is not None:
        add("probe.batch_size", "only applies with probe.axis: seq_len")
    if spec.probe.axis == "seq_len" and spec.inputs.kind not in (None, "tokens"):
        add("probe.axis", f"seq_len needs token inputs, not inputs.kind: {spec.inputs.kind}")
    if spec.probe.max_batch_size < spec.probe.start:
        add(
            "probe.max_batch_size",
            f"must be at least probe.start ({spec.probe.start}), got {spec.probe.max_batch_size}",
        )
    plan = spec.plan
    if plan.global_batch_size is not None and plan.global_tokens is not None:
        add("plan.global_tokens", "give plan.global_batch_size or plan.global_tokens, not both")
    if plan.dataset_size is not None and plan.total_tokens is not None:
        add("plan.total_tokens", "give plan.dataset_size or plan.total_tokens, not both")
    if plan.base_lr is not None and plan.base_batch_size is None:
        add(
            "plan.base_batch_size", "is required with plan.base_lr (the batch base_lr was tuned at)"
        )
    if plan.base_batch_size is not None and plan.base_lr is None:
        add("plan.base_lr", "is required with plan.base_batch_size")
    inputs = spec.inputs
    if inputs.kind == "callable" and inputs.factory is None:
        add("inputs.factory", "is required with inputs.kind: callable (pkg.module:make_batch)")
    if inputs.factory is not None and inputs.kind not in (None, "callable"):
        add("inputs.factory", f"only applies to inputs.kind: callable, not {inputs.kind}")
    if inputs.kind == "tokens" and inputs.shape is not None:
        add("inputs.shape", "token inputs take inputs.seq_len, not inputs.shape")
    if inputs.kind == "image" and inputs.shape is not None and len(inputs.shape) != 3:
        add("inputs.shape", f"an image shape is channels x height x width, got {inputs.shape}")
    if spec.model.task is not None and not spec.model.source.startswith("transformers:"):
        add("model.task", "only applies to transformers: model sources")
    if ":" not in spec.model.source:
        add(
            "model.source",
            f"{spec.model.source!r} has no prefix; use zoo:NAME, torchvision:NAME, timm:NAME, "
            "transformers:TYPE, pkg.module:factory or path/file.py:factory",
        )
    return problems


def key_doc(path: str) -> str:
    """The documentation of one spec key (what --help shows for the flag that sets it)."""
    for key, _, doc in describe_keys():
        if key == path:
            return doc
    raise KeyError(path)


def describe_keys() -> list[tuple[str, str, str]]:
    """(key path, type, doc) for every spec key: the README table and `--help` are built from it."""
    rows: list[tuple[str, str, str]] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal"):
                continue
            path = f"{prefix}.{f.name}" if prefix else f.name
            tp = hints[f.name]
            inner = [a for a in typing.get_args(tp) if a is not type(None)]
            target = inner[0] if typing.get_origin(tp) in (Union, types.UnionType) else tp
            if dataclasses.is_dataclass(target) and target not in (
                Threshold,
                ByteThreshold,
                MemorySize,
            ):
                walk(target, path)  # type: ignore[arg-type]
            else:
                rows.append((path, _describe_type(tp), f.metadata.get("doc", "")))

    walk(Spec, "")
    return rows


def _describe_type(tp: Any) -> str:
    optional = typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(
        tp
    )
    if optional:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    names = {
        int: "integer",
        float: "number",
        bool: "boolean",
        str: "string",
        MemorySize: "size or fraction",
        Bytes: "size",
        Threshold: "{micro_batch_size, value}",
        ByteThreshold: "{micro_batch_size, value}",
    }
    origin = typing.get_origin(tp)
    if origin is Literal:
        text = "one of " + " | ".join(str(a) for a in typing.get_args(tp))
    elif origin is tuple:
        text = "list of integers"
    elif origin in (Mapping, dict):
        text = "mapping"
    else:
        text = names.get(tp, getattr(tp, "__name__", str(tp)))
    return f"{text} or null" if optional else text
