from __future__ import annotations

import pytest

from batchprobe.isolate import IsolatedProber
from batchprobe.probe import is_thrashing
from batchprobe.search import Outcome
from batchprobe.units import MemorySize

from helpers import session

TENSOR = {"kind": "tensor", "shape": [16], "num_classes": 4}


@pytest.mark.slow
def test_a_child_killed_by_sigkill_is_an_oom_and_the_search_goes_on() -> None:
    s = session(
        "user_models:killed_above", budget="64MiB", inputs=TENSOR,
        probe={"isolate": True, "timeout_s": 60, "strategy": "doubling", "start": 32},
    )  # fmt: skip
    result = s.search()
    assert result.max_batch_size == 39 and result.search.exact
    killed = [p for p in result.probes if p.failure is not None]
    assert killed and all(p.outcome is Outcome.OOM and p.failure.kind == "killed" for p in killed)  # type: ignore[union-attr]
    assert all(p.isolated for p in result.probes)


@pytest.mark.slow
def test_a_hanging_child_is_a_timeout_and_the_search_goes_on() -> None:
    s = session(
        "user_models:hangs_above", budget="64MiB", inputs=TENSOR,
        probe={"isolate": True, "timeout_s": 4, "strategy": "doubling", "start": 16},
    )  # fmt: skip
    result = s.search()
    assert result.max_batch_size == 23 and result.search.exact
    hung = [p for p in result.probes if p.failure is not None]
    assert {p.failure.kind for p in hung} == {"timeout"}  # type: ignore[union-attr]
    assert all(p.outcome is Outcome.LIMIT and p.seconds < 30 for p in hung)


@pytest.mark.slow
def test_a_sticky_error_in_process_switches_to_isolation() -> None:
    s = session(
        "user_models:sticky_above", budget="64MiB", inputs=TENSOR, probe={"strategy": "doubling"}
    )
    result = s.search()
    assert result.max_batch_size == 11 and result.search.exact
    assert result.poisoned and s.poisoned
    assert any("switching to isolated probes" in w for w in result.warnings)
    first_isolated = next(i for i, p in enumerate(result.probes) if p.isolated)
    assert all(p.isolated for p in result.probes[first_isolated:])
    assert result.probes[first_isolated].failure.kind == "sticky"  # type: ignore[union-attr]


def test_a_build_failure_in_the_child_is_reported() -> None:
    s = session("zoo:mlp", budget="64MiB")
    prober = IsolatedProber(s.spec, MemorySize(bytes=1), timeout_s=60)  # nothing fits
    result = prober(4)
    assert result.outcome is Outcome.OOM and result.isolated


@pytest.mark.parametrize(
    ("retries", "thrash"),
    [
        ([], False),
        ([0, 0], False),
        ([3, 0], False),
        ([0, 2], False),
        ([1, 1], True),
        ([0, 4, 2], True),
    ],
)
def test_allocator_thrash_rule(retries: list[int], thrash: bool) -> None:
    assert is_thrashing(retries) is thrash
