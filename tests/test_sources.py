"""Model sources and the one batch adapter shared by inputs, data and the noise estimator."""

from __future__ import annotations

import json
import math

import pytest
import torch

from batchprobe.errors import ModelError, SpecError
from batchprobe.flows.noise import run as run_noise
from batchprobe.session import open_session
from batchprobe.sources import SOURCES, build_workload
from batchprobe.sources.inputs import wire
from batchprobe.spec import load_spec


def test_a_pair_data_factory_feeds_a_model_that_computes_its_own_loss() -> None:
    # data yields (x, y); the model is forward(x, y) -> loss: both arguments reach the model
    spec = load_spec(
        text=json.dumps(
            {
                "model": {"source": "user_models:dict_loss_model"},
                "inputs": {"kind": "callable", "factory": "user_models:make_batch"},
                "loss": "model",
                "data": {"source": "user_models:pairs"},
                "probe": {"device": "cpu"},
                "noise": {"steps": 5, "accumulation": 2, "small_batch_size": 4},
            }
        )
    )
    run = run_noise(open_session(spec))
    assert run.stats.steps == 5
    assert math.isfinite(run.stats.g2())


def test_a_pair_feeds_inputs_and_target_when_the_loss_is_separate() -> None:
    x, y = torch.randn(3, 4), torch.randn(3)
    separate = wire((x, y), target_last=True, key="data.source")
    assert separate.args == (x,) and separate.target is y
    own = wire((x, y), target_last=False, key="data.source")
    assert own.args == (x, y) and own.target is None
    named = wire({"x": x}, target_last=True, key="data.source")
    assert named.kwargs == {"x": x}
    with pytest.raises(ModelError, match=r"inputs\.factory: a batch must be"):
        wire("text", target_last=True, key="inputs.factory")


def test_synthetic_and_factory_batches_are_wired_alike() -> None:
    spec = load_spec(
        text="model: {source: user_models:dict_loss_model}\n"
        "inputs: {kind: callable, factory: user_models:make_batch}\nloss: model\n"
    )
    workload = build_workload(spec)
    batch = workload.make_batch(4, torch.device("cpu"))
    assert set(batch.kwargs) == {"x", "y"}
    assert workload.loss_fn(workload.model(*batch.args, **batch.kwargs), batch).dim() == 0


@pytest.mark.parametrize(
    ("source", "suggestion"),
    [("torchvison:resnet50", "torchvision:resnet50"), ("tim:resnet18", "timm:resnet18")],
)
def test_a_typo_in_the_prefix_gets_did_you_mean(source: str, suggestion: str) -> None:
    with pytest.raises(SpecError, match=f"did you mean '{suggestion}'"):
        build_workload(load_spec(text=f"model: {{source: '{source}'}}"))


def test_an_importable_module_is_never_mistaken_for_a_typo() -> None:
    # 'json' is close to nothing registered, but importable: it is an import path
    with pytest.raises(SpecError, match="json has no attribute 'nope'"):
        build_workload(load_spec(text="model: {source: 'json:nope'}"))


def test_every_registered_source_is_documented_in_the_readme(root) -> None:
    readme = (root / "README.md").read_text()
    for prefix in SOURCES:
        assert f"`{prefix}:" in readme, prefix
