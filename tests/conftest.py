from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "fixtures"))  # user model modules referenced as pkg.module:factory

# Two cores: keep intra-op threads fixed so timings are comparable inside a run.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fixtures_dir() -> Path:
    return HERE / "fixtures"


@pytest.fixture
def root() -> Path:
    return ROOT


#: FSDP2 on the CPU (gloo) needs CPU streams that record events: torch 2.6 has none (its FSDP2
#: works on GPUs); the CPU tests of FSDP skip there
cpu_fsdp = pytest.mark.skipif(
    not hasattr(torch.cpu.Stream(), "record_event"),
    reason="this torch's FSDP2 does not run on the CPU (its CPU streams record no events)",
)
