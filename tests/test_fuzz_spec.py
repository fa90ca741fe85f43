"""The spec loader, fuzzed: any YAML text or override gives a valid Spec or a SpecError."""

from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from batchprobe.cli import app
from batchprobe.errors import SpecError
from batchprobe.spec import Spec, describe_keys, load_spec

KEYS = [path for path, _, _ in describe_keys()]
NAMES = sorted({part for path in KEYS for part in path.split(".")})

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["zoo:mlp", "24GiB", "0.9", "3x224x224", "fp16", "adamw", "1e-3", "90%", "-1"]),
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(NAMES) | st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)


def _nest(path: str, value: object) -> dict:
    out: dict = {}
    node = out
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _merge(a: dict, b: dict) -> dict:
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            _merge(a[k], v)
        else:
            a[k] = v
    return a


def _loads_or_spec_error(**kwargs: object) -> None:
    try:
        spec = load_spec(**kwargs)  # type: ignore[arg-type]
    except SpecError as exc:
        assert str(exc)  # a message, naming what is wrong
        return
    assert isinstance(spec, Spec)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_any_text(text: str) -> None:
    _loads_or_spec_error(text=text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(KEYS), values), min_size=1, max_size=6))
def test_any_values_at_real_keys(items: list[tuple[str, object]]) -> None:
    data: dict = {"model": {"source": "zoo:mlp"}}
    for path, value in items:
        _merge(data, _nest(path, value))
    _loads_or_spec_error(text=yaml.safe_dump(data, allow_unicode=True))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(KEYS) | st.text(max_size=10), st.text(max_size=15)),
        max_size=5,
    )
)
def test_any_overrides(pairs: list[tuple[str, str]]) -> None:
    overrides = [f"{k}={v}" for k, v in pairs]
    _loads_or_spec_error(text="model: {source: zoo:mlp}", overrides=overrides)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(KEYS), st.text(max_size=10) | st.sampled_from(["cpu", "cuda", "1"])
        ),
        max_size=4,
    )
)
def test_cli_never_shows_a_traceback(pairs: list[tuple[str, str]]) -> None:
    # the model reference is bad, so a valid spec also ends in exit 2 before any probe runs
    args = ["find-max", "--model", "zoo:no-such-model", "--device", "cpu"]
    for key, value in pairs:
        if key != "model.source":
            args += ["--set", f"{key}={value}"]
    result = CliRunner().invoke(app, args)
    cuda_asked = any(k == "probe.device" and v.strip().lower().startswith("cuda") for k, v in pairs)
    assert result.exit_code == 2 or (cuda_asked and result.exit_code == 3), result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
