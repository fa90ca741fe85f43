"""The CUDA backend's control flow against the simulated GPU: the defects a real GPU exposes, each
reproduced, and what batchprobe does about it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from batchprobe.backends import backend_class
from batchprobe.backends.simcuda import simulated_cuda
from batchprobe.backends.simcuda.allocator import round_size
from batchprobe.cli import app
from batchprobe.estimate import Tracer
from batchprobe.flows import estimate as estimate_flow
from batchprobe.flows.progress import Progress
from batchprobe.gpus import lookup
from batchprobe.isolate import IsolatedProber
from batchprobe.probe import run_probe
from batchprobe.results import Allowance, Failure
from batchprobe.search import Outcome
from batchprobe.session import Session, open_session
from batchprobe.spec import EstimateSpec, load_spec

GiB, MiB = 1024**3, 1024**2
TENSOR = {"kind": "tensor", "shape": [16], "num_classes": 4}
# a small GPT on a small simulated GPU: boundaries of tens of samples, cheap to run on a CPU
GPT = {"kwargs": {"n_layer": 2, "n_head": 2, "n_embd": 64, "vocab_size": 512, "block_size": 32}}
SMALL = {"total_bytes": 256 * MiB, "context_bytes": 16 * MiB, "capability": (8, 0)}
runner = CliRunner()


def _session(source: str, **sections: object) -> Session:
    data: dict = {"model": {"source": source}, "probe": {"device": "cuda"}}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)  # type: ignore[arg-type]
    return open_session(load_spec(text=json.dumps(data)))


@pytest.fixture
def gpu() -> Iterator[object]:
    with simulated_cuda(**SMALL) as sim:
        yield sim


# ----------------------------------------------------------------------------- sticky errors


@pytest.mark.slow
def test_a_sticky_error_becomes_an_outcome_and_the_search_finishes_isolated(gpu) -> None:
    # batch 12 makes an illegal memory access: this process's context is poisoned, and every
    # CUDA call after it fails — cleanup included. The search switches to child processes.
    s = _session(
        "user_models:sim_sticky_above",
        inputs=TENSOR,
        probe={"memory_budget": "64MiB", "strategy": "doubling", "timeout_s": 120},
    )
    result = s.search()
    assert result.max_batch_size == 11 and result.search.exact
    assert result.poisoned and any("switching to isolated probes" in w for w in result.warnings)
    sticky = [p for p in result.probes if p.failure is not None and p.failure.kind == "sticky"]
    assert sticky and all(p.batch_size >= 12 for p in sticky)
    assert all(p.isolated for p in result.probes if p.batch_size > 12)


def test_a_sticky_error_in_an_isolated_child_is_a_limit(gpu) -> None:
    spec = load_spec(
        text=json.dumps(
            {"model": {"source": "user_models:sim_sticky_above"}, "inputs": TENSOR,
             "probe": {"device": "cuda", "timeout_s": 120}}
        )
    )  # fmt: skip
    result = IsolatedProber(spec, None, timeout_s=120)(16)
    assert result.outcome is Outcome.LIMIT and result.failure is not None
    assert result.failure.kind == "sticky" and result.isolated


# ----------------------------------------------------------------------------- workspaces


def test_library_workspaces_are_not_memory_a_failed_probe_left(gpu) -> None:
    # the first probe is far above the boundary and fails; cuBLAS's workspaces (one per
    # thread, kept for the life of the process) must not read as memory it left behind
    s = _session(
        "zoo:gpt",
        model=GPT,
        probe={"memory_budget": "96MiB", "strategy": "doubling", "start": 4096},
    )
    result = s.search()
    assert result.probes[0].outcome is Outcome.OOM
    assert result.search.exact
    assert all(p.retained_bytes == 0 for p in result.probes)
    assert not any(p.isolated for p in result.probes) and not result.warnings
    assert len(gpu.devices[0].cublas) == 2  # forward and autograd's thread, made in the warm-up


# ----------------------------------------------------------------------------- isolation


@pytest.mark.slow
def test_with_isolated_probes_the_parent_holds_no_device_memory(tmp_path: Path) -> None:
    with simulated_cuda(**SMALL, state_dir=str(tmp_path)) as sim:
        isolated = _session("zoo:gpt", model=GPT, probe={"isolate": True, "strategy": "predict"})
        isolated_result = isolated.search()
        # while the children probed, this process held nothing on the device
        assert not (tmp_path / f"gpu0.{os.getpid()}").exists()
        assert sim.devices[0].allocator.reserved == 0 and not sim.devices[0].context
        in_process = _session("zoo:gpt", model=GPT, probe={"strategy": "predict"})
        direct = in_process.search()
    assert isolated_result.max_batch_size == direct.max_batch_size
    assert isolated_result.search.exact and direct.search.exact
    assert all(p.isolated for p in isolated_result.probes)
    # the limit each search worked against is what a process sees with its own context
    assert isolated_result.limit_bytes == pytest.approx(direct.limit_bytes, rel=0.05)


# ----------------------------------------------------------------------------- the budget


def test_a_size_whose_allocated_peak_is_under_the_budget_can_still_fail(gpu) -> None:
    # the budget caps reserved memory (segments), not allocated bytes
    s = _session("zoo:gpt", model=GPT, probe={"memory_budget": "96MiB"})
    result = s.search(strategy="doubling")
    assert result.search.exact
    budget = 96 * MiB
    best = result.probe_at(result.max_batch_size)
    assert best is not None and best.reserved_bytes is not None
    failed_under = [
        p for p in result.probes if p.outcome is Outcome.OOM and (p.peak_bytes or 0) < budget
    ]
    assert failed_under, "some size failed with its allocated peak under the budget"
    assert best.reserved_bytes <= budget


def test_estimate_with_a_budget_does_not_take_the_context_off_it(gpu) -> None:
    sections = {
        "model": {"source": "zoo:gpt", **GPT},
        "probe": {"device": "cuda", "memory_budget": "128MiB"},
    }
    run = estimate_flow.run(load_spec(text=json.dumps(sections)))
    assert run.result is not None
    # the budget caps the allocator, which never holds the context: only what lives inside it
    # (cuBLAS's two workspaces of 8,519,680 B on this sm80) comes off the budget
    assert run.allowance.context_bytes == 0
    assert run.result.usable_bytes == 128 * MiB - 2 * 8_519_680
    measured = _session("zoo:gpt", model=GPT, probe={"memory_budget": "128MiB"}).search()
    estimated = run.result.max_batch_size
    assert estimated is not None and measured.max_batch_size is not None
    # with the context taken off as well, nothing would be left of this budget (512 MiB > 128
    # MiB); what remains between the two is the allocator's segments on a small budget, which
    # the measured search corrects
    assert estimated >= measured.max_batch_size


# ----------------------------------------------------------------------------- the optimizer


def test_gpu_traces_run_the_optimizer_as_cuda_does() -> None:
    # torch runs Adam/AdamW/SGD's foreach path on CUDA tensors: at the step, temporaries the size
    # of all parameters at once (the square roots of the second moments); the CPU's
    # single-tensor loop holds a couple of one parameter's size. Many similar parameters (a
    # transformer's layers; here twelve) make the difference.
    kwargs = {"in_features": 256, "hidden": 512, "depth": 12}
    with simulated_cuda(total_bytes=1 * GiB, context_bytes=16 * MiB) as gpu:
        s = _session("zoo:mlp", model={"kwargs": kwargs}, probe={"memory_budget": "512MiB"})
        measured = run_probe(s.step, s.device, 4)
        workspaces = sum(b.size for b in gpu.devices[0].cublas.values())
    on_gpu = measured.peak_bytes - workspaces  # the trace sees tensors, not library workspaces
    spec = s.spec
    gpu_trace = Tracer(spec, Allowance(round_to=512, foreach=True)).trace(4).peak_bytes
    cpu_trace = Tracer(spec, Allowance(round_to=512)).trace(4).peak_bytes
    params = sum(round_size(p.numel() * 4) for p in s.step.parameters())
    assert gpu_trace == pytest.approx(on_gpu, rel=0.01)
    assert on_gpu - cpu_trace > 0.7 * params  # the single-tensor trace misses the temporaries
    assert backend_class("cuda").allowance(EstimateSpec()).foreach


# ----------------------------------------------------------------------------- speed settings


def test_cudnn_benchmark_is_set_as_training_scripts_set_it(gpu) -> None:
    saved = torch.backends.cudnn.benchmark
    try:
        peaks = {}
        for benchmark in (False, True):
            s = _session(
                "zoo:cnn", train={"cudnn_benchmark": benchmark}, probe={"memory_budget": "128MiB"}
            )
            assert torch.backends.cudnn.benchmark is benchmark
            peaks[benchmark] = run_probe(s.step, s.device, 16).peak_bytes
        assert peaks[True] > peaks[False]  # the autotuned algorithm's workspace is in the peak
        assert load_spec(text="model: {source: zoo:cnn}").train.cudnn_benchmark is True
    finally:
        torch.backends.cudnn.benchmark = saved


@pytest.mark.slow
@pytest.mark.parametrize(
    ("source", "tf32", "peak_tflops"),
    [("zoo:cnn", None, 494.7), ("zoo:mlp", None, 66.9), ("zoo:mlp", True, 494.7)],
)
def test_mfu_is_against_the_peak_of_the_math_that_ran(source, tf32, peak_tflops) -> None:
    # on an H100 in fp32: cuDNN convolutions run TF32 by default, matmuls full FP32 unless asked
    saved = torch.backends.cuda.matmul.allow_tf32
    args = ["plan", "--model", source, "--device", "cuda", "--memory-budget", "512MiB", "--json",
            "--set", "plan.candidates=[4]", "--set", "plan.min_time_s=0.05",
            "--global-batch-size", "64", "--max-batch-size", "8"]  # fmt: skip
    if tf32 is not None:
        args += ["--set", f"train.tf32={str(tf32).lower()}"]
    try:
        with simulated_cuda(total_bytes=1 * GiB, context_bytes=16 * MiB):  # an H100 (sm90)
            result = runner.invoke(app, args)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["peak_flops"] == pytest.approx(peak_tflops * 1e12, rel=0.05)
    assert data["rows"][0]["mfu"] is not None


# ----------------------------------------------------------------------------- capacities


def test_capacities_are_what_torch_sees() -> None:
    h100 = lookup("h100-80gb")
    assert h100 is not None and h100.capacity_bytes == 81089 * MiB < 80 * GiB
    assert h100.capacity_source == "reported"
    with simulated_cuda(total_bytes=81089 * MiB):
        s = _session("zoo:mlp")
        assert s.device.capacity_bytes == 81089 * MiB  # what the device reports


def test_under_torchrun_the_estimate_allows_for_nccl(monkeypatch: pytest.MonkeyPatch) -> None:
    alone = backend_class("cuda").allowance(EstimateSpec()).context_bytes
    monkeypatch.setenv("WORLD_SIZE", "8")
    ranks = backend_class("cuda").allowance(EstimateSpec()).context_bytes
    assert ranks - alone == 512 * MiB


# ----------------------------------------------------------------------------- classification


def test_cudnn_not_supported_at_batch_1_is_a_model_error_not_nothing_fits() -> None:
    with simulated_cuda(cudnn_unsupported_above=10, **SMALL):
        result = runner.invoke(app, ["find-max", "--model", "zoo:cnn", "--device", "cuda"])
    assert result.exit_code == 2, result.output
    assert "CUDNN_STATUS_NOT_SUPPORTED" in result.stderr and "not a memory limit" in result.stderr


def test_cudnn_not_supported_near_the_top_ends_growth_exactly() -> None:
    # zoo:cnn's widest convolution input is 32 channels of 32x32: above batch 20 it passes
    # 20 x 32768 elements
    with simulated_cuda(cudnn_unsupported_above=20 * 32 * 32 * 32, **SMALL):
        s = _session("zoo:cnn", probe={"strategy": "doubling"})
        result = s.search()
    assert result.max_batch_size == 20 and result.search.exact
    assert {p.failure.kind for p in result.probes if p.failure} == {"unsupported"}


# ----------------------------------------------------------------------------- other processes


class _Tenant(Progress):
    """Another process takes `nbytes` of the device when the search is `after` probes in."""

    def __init__(self, sim, after: int, nbytes: int) -> None:
        self.sim, self.after, self.nbytes, self.seen = sim, after, nbytes, 0

    def probe_started(self, batch_size: int) -> None:
        self.seen += 1
        if self.seen == self.after + 1:
            self.sim.occupy(self.nbytes, owner="tenant")


def test_memory_taken_by_another_process_mid_search_is_noticed(tmp_path: Path) -> None:
    with simulated_cuda(**SMALL, state_dir=str(tmp_path)) as sim:
        s = _session("zoo:gpt", model=GPT, probe={"strategy": "doubling"})
        quiet = s.search()
        assert quiet.max_batch_size is not None
        # the search climbs past the quiet boundary's half before the other process arrives
        steps_up = quiet.max_batch_size.bit_length() - 1
        busy = s.search(progress=_Tenant(sim, after=steps_up, nbytes=48 * MiB))
        best = busy.max_batch_size
        assert best is not None and best < quiet.max_batch_size
        assert any("free device memory fell by 48.0 MiB" in w for w in busy.warnings), busy.warnings
        # the answer holds for the device as it is now
        assert run_probe(s.step, s.device, best).outcome is Outcome.FIT
        assert run_probe(s.step, s.device, best + 1).outcome is not Outcome.FIT


def test_the_max_is_timed_with_only_its_own_batch_alive(gpu) -> None:
    """A plan times every candidate after the search. Each probe measured its size with its own
    batch alone; timing held every size's batch at once, and on a GPU with the max's room and
    no more, the max then failed when timed ("fit when probed but hit oom while timed")."""
    s = _session(
        "zoo:mlp",
        model={"kwargs": {"in_features": 4096, "hidden": 256, "depth": 2}},
        probe={"memory_budget": "96MiB"},
    )
    best = s.search().max_batch_size
    assert best is not None and best > 64
    sizes = [1, 2, 4, 8, 16, 32, 64, best]
    timed = s.time(sizes)
    failed = {b: t.message for b, t in timed.items() if isinstance(t, Failure)}
    assert not failed, failed


SEGMENTED = [
    ("zoo:mlp", {"model": {"kwargs": {"in_features": 4096, "hidden": 256, "depth": 2}},
                 "probe": {"memory_budget": "96MiB"}}),
    ("zoo:gpt", {"model": GPT, "probe": {"memory_budget": "96MiB"}}),
    ("zoo:cnn", {"probe": {"memory_budget": "128MiB"}}),
    ("zoo:mlp", {"model": {"kwargs": {"in_features": 4096, "hidden": 256, "depth": 2}}}),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("source, sections", SEGMENTED)
def test_a_caching_allocator_s_failures_cost_no_more_probes_than_doubling(
    source: str, sections: dict
) -> None:
    """The caching allocator's message names the segment it asked for (20 MiB for a 2 MiB
    block), and what it held when it failed is no floor on the peaks that fit (its free blocks
    sit in segments): taken as needs and floors, they made the default search walk down from
    its failures, one size at a time — the MLP without a budget took 24 probes where doubling
    took 23. Now it takes fewer than doubling on each, to an exact boundary."""
    counts = {}
    for strategy in ("doubling", "estimate"):
        with simulated_cuda(**SMALL):
            data = {k: dict(v) for k, v in sections.items()}
            data.setdefault("probe", {})["strategy"] = strategy
            result = _session(source, **data).search()
        assert result.search.exact, (strategy, [p.batch_size for p in result.probes])
        counts[strategy] = sum(1 for p in result.probes if not p.reused)
    assert counts["estimate"] < counts["doubling"], counts
