from __future__ import annotations

import re
from pathlib import Path

import pytest

from batchprobe.errors import SpecError
from batchprobe.spec import Spec, describe_keys, load_spec
from batchprobe.units import MemorySize

SPECS = Path(__file__).parent / "specs"
INVALID = sorted((SPECS / "invalid").glob("*.yaml"))
VALID = sorted((SPECS / "valid").glob("*.yaml"))


def _expected(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} lacks its '# expect:' line"
    return first.removeprefix("# expect: ")


def test_there_are_at_least_a_dozen_kinds_of_bad_input() -> None:
    assert len(INVALID) >= 12


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_spec_is_rejected_with_a_clear_message(path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert re.search(_expected(path), message), message
    assert str(path) in message  # the file is named
    assert "Traceback" not in message


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_specs_load(path: Path) -> None:
    spec = load_spec(path)
    assert isinstance(spec, Spec)
    assert spec.origin == str(path)


def test_full_spec_values_are_typed() -> None:
    spec = load_spec(SPECS / "valid" / "full.yaml")
    assert spec.train.optimizer.name == "adamw"
    assert spec.train.optimizer.lr == pytest.approx(3e-4)  # '3e-4' is a string in YAML 1.1
    assert spec.train.optimizer.kwargs == {"weight_decay": 0.1, "betas": [0.9, 0.95]}
    assert spec.probe.memory_budget == MemorySize(bytes=512 * 1024**2)
    assert spec.check.max_peak_bytes is not None
    assert spec.check.max_peak_bytes.value == 20 * 1024**3
    assert spec.plan.global_tokens == 524288
    assert spec.inputs.seq_len == 64


def test_fraction_budget_and_optimizer_shorthand() -> None:
    spec = load_spec(SPECS / "valid" / "fraction_budget.yaml")
    assert spec.probe.memory_budget == MemorySize(fraction=0.25)
    assert spec.train.optimizer.name == "sgd"


def test_overrides_apply_after_flags_and_parse_yaml_values() -> None:
    spec = load_spec(
        text="model: {source: zoo:mlp}\nprobe: {start: 2}",
        values={"probe.start": 4, "probe.device": "cpu"},
        overrides=["probe.start=8", "model.kwargs={depth: 2}", "probe.memory_budget=1GiB"],
    )
    assert spec.probe.start == 8
    assert spec.probe.device == "cpu"
    assert spec.model.kwargs == {"depth": 2}
    assert spec.probe.memory_budget == MemorySize(bytes=1024**3)


def test_override_with_unknown_key_suggests_the_right_one() -> None:
    with pytest.raises(
        SpecError, match=r"--set: |probe\.max_batch: unknown key; did you mean 'max_batch_size'"
    ):
        load_spec(text="model: {source: zoo:mlp}", overrides=["probe.max_batch=8"])


def test_override_without_equals_sign_is_an_error() -> None:
    with pytest.raises(SpecError, match=r"an override must look like key\.path=value"):
        load_spec(text="model: {source: zoo:mlp}", overrides=["probe.start"])


def test_override_into_a_scalar_is_an_error() -> None:
    with pytest.raises(SpecError, match="loss: is a string, not a section"):
        load_spec(text="model: {source: zoo:mlp}\nloss: mse", overrides=["loss.name=mse"])


def test_optimizer_string_can_be_extended_by_override() -> None:
    spec = load_spec(
        text="model: {source: zoo:mlp}\ntrain: {optimizer: sgd}",
        overrides=["train.optimizer.momentum=0.9"],
    )
    assert spec.train.optimizer.name == "sgd"
    assert spec.train.optimizer.kwargs == {"momentum": 0.9}


def test_flags_alone_make_a_spec() -> None:
    spec = load_spec(values={"model.source": "torchvision:resnet50", "inputs.shape": "3x224x224"})
    assert spec.model.source == "torchvision:resnet50"
    assert spec.inputs.shape == (3, 224, 224)


def test_missing_file_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="config file not found"):
        load_spec("does/not/exist.yaml")


def test_every_key_is_documented() -> None:
    rows = describe_keys()
    paths = {r[0] for r in rows}
    assert {"model.source", "probe.memory_budget", "plan.global_tokens", "check.tolerance"} <= paths
    undocumented = [path for path, _, doc in rows if not doc]
    assert not undocumented


def test_to_dict_round_trips() -> None:
    spec = load_spec(SPECS / "valid" / "full.yaml")
    import json

    again = load_spec(text=json.dumps(spec.to_dict()))  # JSON is YAML
    assert again.to_dict() == spec.to_dict()


def test_readme_documents_every_key_and_command() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [path for path, _, _ in describe_keys() if f"`{path}`" not in readme]
    assert not missing, f"README.md does not document: {missing}"
    from batchprobe.cli import app

    for command in app.registered_commands:
        assert f"batchprobe {command.name}" in readme


def test_optimizer_settings_in_exponent_notation_reach_torch_as_numbers() -> None:
    """PyYAML reads `5e-4` (no dot) as text: every numeric setting is converted, as the
    constructor's default says, and a probe runs with it."""
    from batchprobe.probe import run_probe
    from batchprobe.session import open_session

    text = """
    model: {source: zoo:mlp, kwargs: {hidden: 32, depth: 1}}
    probe: {device: cpu, memory_budget: 64MiB}
    train: {optimizer: {name: sgd, lr: 0.1, momentum: 0.9, weight_decay: 5e-4}}
    """
    spec = load_spec(text=text, overrides=["train.optimizer.dampening=1e-1"])
    assert spec.train.optimizer.kwargs == {"momentum": 0.9, "weight_decay": 5e-4, "dampening": 0.1}
    s = open_session(spec)
    assert run_probe(s.step, s.backend, 4).outcome.value == "fit"
    adam = load_spec(
        text="model: {source: zoo:mlp}\ntrain: {optimizer: {name: adamw, eps: 1e-8, betas: [0.9, 95e-2]}}"
    )
    assert adam.train.optimizer.kwargs == {"eps": 1e-8, "betas": [0.9, 0.95]}


def test_optimizer_settings_of_the_wrong_kind_name_the_key() -> None:
    bad = "model: {source: zoo:mlp}\ntrain: {optimizer: {name: adam, eps: tiny, amsgrad: 3, betas: [0.9]}}"
    with pytest.raises(SpecError) as err:
        load_spec(text=bad)
    text = str(err.value)
    for key in ("train.optimizer.eps", "train.optimizer.amsgrad", "train.optimizer.betas"):
        assert key in text
