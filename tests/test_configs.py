from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from batchprobe.sources import build_workload, quiet_warnings
from batchprobe.spec import load_spec

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_the_families_users_know_are_shipped() -> None:
    names = {p.stem for p in CONFIGS}
    assert {"quickstart", "resnet50", "gpt2-small", "bert-base", "vit-b16", "llama-1b"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_opens_with_its_command_and_builds(path: Path) -> None:
    if path.stem == "bert-base" and int(version("transformers").split(".")[0]) < 5:
        pytest.skip("transformers < 5's BERT reads a mask's value in forward: not traceable")
    first = path.read_text().splitlines()[0]
    assert first.startswith("# batchprobe ") and f"--config configs/{path.name}" in first
    spec = load_spec(path)
    with quiet_warnings():
        workload = build_workload(spec, "meta")  # shapes only: no memory, no compute
    with FakeTensorMode(allow_non_fake_inputs=True), quiet_warnings():
        workload.model.to_empty(device="cpu")
        batch = workload.make_batch(2, torch.device("cpu"))
        out = workload.model(*batch.args, **batch.kwargs)
        loss = workload.loss_fn(out, batch)
    assert loss.dim() == 0
