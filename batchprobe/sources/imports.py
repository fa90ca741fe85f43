"""`pkg.module:factory` and `path/file.py:factory`: user code, imported by reference.

`import_object` is also how inputs factories, custom losses and data sources are found.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from batchprobe.errors import ModelError, Problem, SpecError
from batchprobe.sources import objects
from batchprobe.sources.base import BuiltModel, InputDefaults, call_factory
from batchprobe.spec import Spec


def import_object(ref: str, key: str, base_dir: Path | None = None) -> Any:
    """'pkg.module:name' or 'path/to/file.py:name' -> the object. Errors name the spec key."""
    target, sep, name = ref.rpartition(":")
    if target == objects.PREFIX:
        return objects.lookup(name, key)
    if not sep or not target or not name:
        raise SpecError([Problem(key, f"{ref!r} must look like pkg.module:name or file.py:name")])
    module = _load_file(target, key, base_dir) if target.endswith(".py") else _import(target, key)
    try:
        return getattr(module, name)
    except AttributeError:
        public = [n for n in dir(module) if not n.startswith("_")]
        close = difflib.get_close_matches(name, public, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise SpecError([Problem(key, f"{target} has no attribute {name!r}{hint}")]) from None


def _import(target: str, key: str) -> Any:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        raise SpecError(
            [Problem(key, f"cannot import module {target!r} ({exc}); is it on PYTHONPATH?")]
        ) from None


def _load_file(target: str, key: str, base_dir: Path | None) -> Any:
    candidates = [Path(target)]
    if base_dir is not None and not Path(target).is_absolute():
        candidates.append(base_dir / target)
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise SpecError([Problem(key, f"file not found: {target}")])
    module_name = f"batchprobe_user_{abs(hash(str(path.resolve())))}"
    module = sys.modules.get(module_name)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise ModelError(f"{key}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    return module


def build(ref: str, kwargs: Mapping[str, Any], spec: Spec) -> BuiltModel:
    """A factory returning an nn.Module; it brings no inputs or loss of its own."""
    base_dir = Path(spec.origin).parent if spec.origin else None
    factory = import_object(ref, "model.source", base_dir)
    if not callable(factory):
        raise SpecError([Problem("model.source", f"{ref} is not callable")])
    module = call_factory(factory, kwargs, ref)
    if not isinstance(module, nn.Module):
        raise ModelError(
            f"model.source: {ref} returned {type(module).__name__}, not a torch.nn.Module"
        )
    enable = getattr(module, "set_gradient_checkpointing", None) or getattr(
        module, "gradient_checkpointing_enable", None
    )
    return BuiltModel(module, InputDefaults(), "auto", enable)
