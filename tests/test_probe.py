from __future__ import annotations

import dataclasses
import gc
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from batchprobe.probe import classify, run_probe
from batchprobe.search import Observation, Outcome, search
from batchprobe.units import MemorySize

from helpers import budget_for, peak_at, session

# ----------------------------------------------------------------------------- classification

OOM_TEXTS = [
    "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total capacity; 3.1 GiB "
    "reserved by PyTorch but unallocated)",
    "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported",
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a "
    "non-contiguous input.",
    "HIP out of memory. Tried to allocate 1.00 GiB",
    "XPU out of memory. Tried to allocate 512.00 MiB",
    "MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.2 GB)",
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you "
    "tried to allocate 80000000000 bytes. Error code 12 (Cannot allocate memory)",
    "DefaultCPUAllocator: not enough memory: you tried to allocate 80000000000 bytes.",
]
LIMIT_TEXTS = [
    "nonzero is not supported for tensors with more than INT_MAX elements, file a support request",
    "Expected canUse32BitIndexMath(input) && canUse32BitIndexMath(output) to be true",
    "CUDA error: invalid configuration argument",
]
STICKY_TEXTS = [
    "CUDA error: an illegal memory access was encountered",
    "CUDA error: device-side assert triggered",
    "CUDA error: unspecified launch failure",
]


@pytest.mark.parametrize("text", OOM_TEXTS)
def test_oom_messages_are_oom(text: str) -> None:
    assert classify(RuntimeError(text)).outcome is Outcome.OOM


def test_oom_by_type_first_and_along_the_cause_chain() -> None:
    assert classify(torch.OutOfMemoryError("anything")).outcome is Outcome.OOM
    assert classify(MemoryError()).outcome is Outcome.OOM
    try:
        try:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB")
        except RuntimeError as inner:
            raise ValueError("wrapped by a library") from inner
    except ValueError as outer:
        assert classify(outer).outcome is Outcome.OOM


@pytest.mark.parametrize("text", LIMIT_TEXTS)
def test_non_memory_limits_are_limits(text: str) -> None:
    assert classify(RuntimeError(text)).outcome is Outcome.LIMIT


@pytest.mark.parametrize("text", STICKY_TEXTS)
def test_sticky_errors_are_errors_marked_sticky(text: str) -> None:
    failure = classify(RuntimeError(text))
    assert failure.outcome is Outcome.ERROR and failure.sticky


def test_a_library_that_cannot_allocate_under_an_rlimit_is_out_of_memory() -> None:
    # seen under `prlimit --as` near the boundary: oneDNN fails to create a primitive whose
    # scratch would not fit; under a limit that fails allocations that is the limit's OOM,
    # and the search goes on (an error would end it short of the boundary)
    for text in ("could not create a primitive", "std::bad_alloc"):
        assert classify(RuntimeError(text)).outcome is Outcome.ERROR  # no such limit
        failure = classify(RuntimeError(text), host_limited=True)
        assert (failure.outcome, failure.kind) == (Outcome.OOM, "host")
    # a configuration oneDNN does not support is an error whatever the memory
    text = "could not create a primitive descriptor for a matmul primitive"
    assert classify(RuntimeError(text), host_limited=True).outcome is Outcome.ERROR
    # through a probe: the CPU backend says when an rlimit binds
    s = session(
        "user_models:no_primitive", inputs={"kind": "tensor", "shape": [16], "num_classes": 4}
    )
    assert run_probe(s.step, s.backend, 8).outcome is Outcome.ERROR
    assert s.backend.limit is not None
    s.backend.limit = dataclasses.replace(s.backend.limit, catchable=True)
    failed = run_probe(s.step, s.backend, 8)
    assert failed.outcome is Outcome.OOM and failed.failure and failed.failure.kind == "host"
    assert run_probe(s.step, s.backend, 4).outcome is Outcome.FIT


def test_other_errors_keep_their_traceback() -> None:
    try:
        raise ValueError("mat1 and mat2 shapes cannot be multiplied")
    except ValueError as exc:
        failure = classify(exc)
    assert failure.outcome is Outcome.ERROR
    assert failure.traceback is not None and "ValueError" in failure.traceback


# ----------------------------------------------------------------------------- exact boundary


FAMILIES = {
    "mlp": ("zoo:mlp", {"model": {"source": "zoo:mlp", "kwargs": {"hidden": 256, "depth": 2}}}, 23),
    "cnn-batchnorm": (
        "zoo:cnn",
        {"model": {"source": "zoo:cnn", "kwargs": {"width": 8, "depth": 2}}},
        19,
    ),
    "transformers-gpt2": (
        "transformers:gpt2",
        {
            "model": {
                "source": "transformers:gpt2",
                "kwargs": {
                    "n_layer": 2,
                    "n_embd": 64,
                    "n_head": 2,
                    "vocab_size": 512,
                    "n_positions": 64,
                },
            },
            "inputs": {"seq_len": 32},
        },
        13,
    ),
}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("strategy", ["doubling", "predict", "auto"])
@pytest.mark.slow
def test_boundary_is_exact_against_a_brute_force_scan(family: str, strategy: str) -> None:
    source, sections, target = FAMILIES[family]
    sections = {k: v for k, v in sections.items() if k != "model"} | {"model": sections["model"]}
    s = session(source, **sections)
    s.backend.set_budget(MemorySize(bytes=budget_for(s, target)))
    if strategy == "auto":  # the default: from the fake-tensor estimate, through the session
        result = s.search()
        assert result.guess is not None and len(result.probes) == 2
    else:
        result = s.search(strategy=strategy)
    assert result.search.exact
    best = result.max_batch_size
    assert best is not None
    # brute force: every size from 1 to best+2, each a full probe under the same budget
    scan = {b: run_probe(s.step, s.backend, b).outcome for b in range(1, best + 3)}
    assert all(scan[b] is Outcome.FIT for b in range(1, best + 1)), scan
    assert scan[best + 1] is Outcome.OOM and scan[best + 2] is Outcome.OOM
    assert best == target


# ----------------------------------------------------------------------------- probe semantics


def _live_tensor_ids() -> set[int]:
    gc.collect()
    return {id(o) for o in gc.get_objects() if isinstance(o, torch.Tensor)}


def test_no_memory_held_after_a_search_with_several_ooms() -> None:
    s = session("zoo:gpt", model={"kwargs": {"n_layer": 2, "n_embd": 64, "vocab_size": 512}})
    s.backend.set_budget(MemorySize(bytes=budget_for(s, 9)))
    before = _live_tensor_ids()
    result = s.search(strategy="doubling")
    after = _live_tensor_ids()
    ooms = [p for p in result.probes if p.outcome is Outcome.OOM]
    assert len(ooms) >= 3
    assert result.max_batch_size == 9
    assert all(p.retained_bytes == 0 for p in result.probes)
    assert after - before == set(), "tensors created by probes are still alive"
    assert not result.warnings


def test_retained_memory_is_detected_and_reported() -> None:
    # The detector itself can fail: a model that stashes its activations leaks, and says so.
    stash: list[torch.Tensor] = []
    s = session("zoo:mlp", model={"kwargs": {"in_features": 64, "hidden": 64, "depth": 1}})
    s.step.model.blocks[0].register_forward_hook(lambda m, i, o: stash.append(o))
    result = run_probe(s.step, s.backend, 16)
    assert result.outcome is Outcome.FIT
    assert result.retained_bytes > 0
    stash.clear()


def test_optimizer_state_and_gradients_are_inside_the_peak() -> None:
    kwargs = {"model": {"kwargs": {"in_features": 512, "hidden": 1024, "depth": 3}}}
    adamw = session("zoo:mlp", **kwargs, train={"optimizer": {"name": "adamw"}})
    sgd = session("zoo:mlp", **kwargs, train={"optimizer": {"name": "sgd"}})
    param_bytes = sum(p.numel() * p.element_size() for p in adamw.step.parameters())
    p_adamw, p_sgd = peak_at(adamw, 4), peak_at(sgd, 4)
    # params + grads + two AdamW moments
    assert p_adamw >= 4 * param_bytes
    assert p_adamw - p_sgd >= 2 * param_bytes * 0.99


def test_peak_grows_with_batch_size_and_matches_activation_scale() -> None:
    s = session("zoo:mlp", model={"kwargs": {"in_features": 256, "hidden": 512, "depth": 2}})
    assert peak_at(s, 512) > peak_at(s, 256) > peak_at(s, 8)


def test_model_error_is_an_error_outcome_that_stops_the_search() -> None:
    s = session(
        "user_models:broken",
        inputs={"kind": "tensor", "shape": [16], "num_classes": 4},
    )
    result = s.search(strategy="doubling")
    assert result.search.stopped == "error"
    error = result.error
    assert error is not None and error.batch_size == 8
    assert error.failure is not None and "mat1 and mat2" in (error.failure.traceback or "")


def test_callable_inputs_and_model_loss() -> None:
    s = session(
        "user_models:dict_loss_model",
        inputs={"kind": "callable", "factory": "user_models:make_batch"},
    )
    assert s.workload.loss_name == "model"
    result = run_probe(s.step, s.backend, 32)
    assert result.outcome is Outcome.FIT and result.peak_bytes


@pytest.mark.slow
def test_real_host_allocator_failure_is_an_oom(tmp_path) -> None:
    # An address-space limit makes the host allocator itself fail (no budget involved).
    script = textwrap.dedent(
        """
        import resource, json
        from batchprobe.probe import run_probe
        from batchprobe.session import open_session
        from batchprobe.spec import load_spec
        from batchprobe.units import MemorySize
        s = open_session(load_spec(text="model: {source: zoo:mlp, kwargs: {in_features: 4096, hidden: 4096, depth: 1}}\\nprobe: {device: cpu}"))
        s.backend.set_budget(MemorySize(bytes=1 << 40))   # no budget in the way
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, hard))
        r = run_probe(s.step, s.backend, 200_000)
        small = run_probe(s.step, s.backend, 8)
        print(json.dumps([r.outcome.value, r.failure.kind if r.failure else None, small.outcome.value]))
        """
    )
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    outcome, kind, small = __import__("json").loads(done.stdout.strip().splitlines()[-1])
    assert (outcome, kind) == ("oom", "host")
    assert small == "fit"  # the process survived and keeps probing


@pytest.mark.slow
def test_a_wrong_trace_is_said_and_costs_no_more_than_doubling() -> None:
    """On the CPU an LSTM runs oneDNN's kernel, whose workspace a fake-tensor trace does not
    see: the trace is several times under. The search says so at the first probe, names the
    op, learns from the failures, and takes no more probes than doubling to the same answer."""
    s = session(
        "zoo:lstm",
        budget="96MiB",
        model={"kwargs": {"hidden": 128, "embed": 64}},
        inputs={"seq_len": 64},
    )
    result = s.search()
    assert result.search.exact and result.max_batch_size is not None
    check = result.trace_check
    assert check is not None and check.ratio > 2, check
    assert check.op is not None and "rnn" in check.op, check
    assert "under-counted" in check.describe() and check.op in check.describe()
    assert check.to_dict()["measured_bytes"] > check.to_dict()["traced_bytes"]
    assert 0 < result.trace_seconds <= result.seconds
    # a failure under the budget says what was live and what it needed
    budget = s.backend.budget_bytes
    assert budget is not None
    failed = [p for p in result.probes if p.outcome is Outcome.OOM]
    assert failed and all(p.need_bytes and p.need_bytes > budget for p in failed), failed
    assert all(p.live_bytes is not None and p.live_bytes <= budget for p in failed), failed
    # doubling, told the same outcomes, to the same boundary
    best = result.max_batch_size
    plain = search(
        lambda b: Observation(Outcome.FIT if b <= best else Outcome.OOM), strategy="doubling"
    )
    assert plain.best == best
    ran = [p for p in result.probes if not p.reused]
    assert len(ran) <= plain.num_probes - 1, [p.batch_size for p in ran]  # batch 1: warm-up


def test_what_a_worker_thread_still_holds_is_not_left_behind() -> None:
    """A buffer a busy worker thread lets go of only after the step ended (as a collective's
    worker does): the probe waits for the process's threads to rest before counting what
    stayed, instead of calling it a leak."""
    s = session("user_models:hands_off", inputs={"kind": "tensor", "shape": [16], "num_classes": 4})
    result = run_probe(s.step, s.backend, 8)
    assert result.outcome is Outcome.FIT and result.retained_bytes == 0


class _Falls:
    """Another process takes memory after the first probe: the budget the probes run under falls
    to `share` of the one the search was told."""

    def __init__(self, backend, share: float) -> None:
        self.backend, self.share, self.done = backend, share, False

    def probe_started(self, batch_size: int) -> None:
        pass

    def probe_done(self, result) -> None:
        if not self.done:
            self.done = True
            self.backend.budget_bytes = int(self.backend.budget_bytes * self.share)


def test_a_fall_the_failures_prove_is_not_probed_again() -> None:
    """The limit fell under the search. A later failure that needed less than a smaller size
    used when it fit proves that size no longer fits (memory at a size does not change): no
    probe to learn it again (it was the costliest of the search). The answer is the exact
    boundary under the new limit, its max + 1 tried."""
    s = session(
        "zoo:gpt",
        budget="64MiB",
        model={"kwargs": {"n_layer": 2, "n_head": 4, "n_embd": 128, "vocab_size": 2048,
                          "block_size": 64}},
    )  # fmt: skip
    result = s.search(progress=_Falls(s.backend, 0.6))
    ran = [p.batch_size for p in result.probes if not p.reused]
    first = ran[0]
    assert result.probes[[p.batch_size for p in result.probes].index(first)].outcome is Outcome.FIT
    assert ran.count(first) == 1, ran
    assert any("the limit fell" in w for w in result.warnings), result.warnings
    best = result.max_batch_size
    assert best is not None and best < first and result.search.exact, ran
    assert best + 1 in ran
    budget = s.backend.budget_bytes
    assert peak_at(s, best) <= budget < peak_at(s, best + 1)
