"""torchrun on the simulated GPU (NCCL's behaviour on top of gloo) and on the CPU: the ways a
multi-GPU search goes wrong on its first day, reproduced."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import cpu_fsdp
from test_distributed import _free_port, start_ranks

pytestmark = pytest.mark.slow  # each test starts two processes
TENSOR = "inputs={kind: tensor, shape: [16], num_classes: 4}"


def ranks(
    args: list[str], sim: dict | None = None, env: dict | None = None, timeout: float = 300
) -> list[subprocess.CompletedProcess[str]]:
    """Two ranks as torchrun starts them; on the simulated GPU, each sees one GPU of its own."""
    envs = []
    for rank in range(2):
        extra = dict(env or {})
        if sim is not None:
            config = {"device_count": 1, "physical_id": rank, "total_bytes": "1GiB",
                      "context_bytes": "16MiB", "nccl_buffer_bytes": "8MiB", **sim}  # fmt: skip
            extra["BATCHPROBE_SIMULATE_CUDA"] = json.dumps(config)
        envs.append(extra)
    return start_ranks(args, envs, timeout)


def test_each_rank_with_its_one_visible_gpu() -> None:
    # a launcher that gives each rank one GPU (CUDA_VISIBLE_DEVICES): cuda:LOCAL_RANK would be
    # cuda:1 on a process that sees a single device
    rank0, rank1 = ranks(
        ["find-max", "--model", "zoo:mlp", "--device", "cuda", "--memory-budget", "256MiB",
         "--max-batch-size", "64", "--json"],
        sim={},
    )  # fmt: skip
    assert rank0.returncode == rank1.returncode == 0, rank0.stderr[-2000:] + rank1.stderr[-2000:]
    data = json.loads(rank0.stdout)
    assert data["world_size"] == 2 and data["device"] == "cuda:0" and data["max_batch_size"] == 64


FIND_MAX_ASYMMETRIC = [
    "find-max", "--model", "user_models:oom_on_one_rank", "--set", TENSOR, "--device", "cuda",
    "--strategy", "doubling", "--max-batch-size", "64", "--set", "probe.collective_timeout_s=5",
    "--json",
]  # fmt: skip


def test_one_rank_out_of_memory_in_a_synchronized_step_does_not_end_the_job() -> None:
    # rank 1 runs out at batch 8 in the first synchronized step (its no_sync dry run passed):
    # rank 0 waits in the gradient all-reduce until the collective timeout
    rank0, rank1 = ranks(FIND_MAX_ASYMMETRIC, sim={})
    assert rank0.returncode == rank1.returncode == 0, rank0.stderr[-2000:]
    data = json.loads(rank0.stdout)
    assert data["max_batch_size"] == 7 and data["exact"]
    (failed,) = [p for p in data["probes"] if p["outcome"] != "fit"]
    assert failed["batch_size"] == 8 and failed["message"].startswith("rank 1: CUDA out of memory")


def test_with_nccls_default_error_handling_the_waiting_rank_is_torn_down() -> None:
    # what the same run does with TORCH_NCCL_ASYNC_ERROR_HANDLING at torch's default (3): the
    # watchdog takes the waiting rank down, and the job with it; batchprobe says so up front
    rank0, rank1 = ranks(FIND_MAX_ASYMMETRIC, sim={}, env={"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"})
    assert rank0.returncode != 0 and rank1.returncode != 0
    assert "we are taking the entire process down" in rank0.stderr
    assert "Watchdog caught collective operation timeout" in rank0.stderr


def test_a_step_that_fails_on_one_rank_while_timed_is_agreed() -> None:
    # rank 1 runs out at batch 4 while plan times it (its 5th forward at 4: the probe's dry run
    # and synchronized steps came first): every rank skips that candidate, none is left waiting
    rank0, rank1 = ranks(
        ["plan", "--model", "user_models:oom_on_one_rank", "--set", "model.kwargs={at: 4, nth: 5}",
         "--set", TENSOR, "--device", "cuda", "--memory-budget", "256MiB", "--strategy", "doubling",
         "--max-batch-size", "8", "--set", "plan.candidates=[4, 8]", "--set", "plan.min_time_s=0.05",
         "--set", "probe.collective_timeout_s=5", "--global-batch-size", "32", "--json"],
        sim={},
    )  # fmt: skip
    assert rank0.returncode == rank1.returncode == 0, rank0.stderr[-3000:]
    data = json.loads(rank0.stdout)
    assert [r["micro_batch_size"] for r in data["rows"]] == [8]
    assert any(
        "micro-batch 4" in w and "rank 1: CUDA out of memory" in w for w in data["warnings"]
    ), data["warnings"]


@cpu_fsdp
def test_fsdp_shards_nested_module_lists_from_the_inside_out() -> None:
    # blocks that hold ModuleLists of layers: sharded outside-in, a layer's parameters are
    # already DTensors and fully_shard takes them for tensor-parallel shards
    rank0, rank1 = ranks(
        ["find-max", "--model", "user_models:nested", "--set", "model.kwargs={width: 64}",
         "--set", TENSOR, "--device", "cpu", "--set", "train.parallel=fsdp",
         "--memory-budget", "64MiB", "--max-batch-size", "16", "--json"],
    )  # fmt: skip
    assert rank0.returncode == rank1.returncode == 0, rank0.stderr[-2000:]
    assert json.loads(rank0.stdout)["max_batch_size"] == 16


@cpu_fsdp
def test_failed_fsdp_steps_leave_nothing_behind() -> None:
    # each failed step used to leave FSDP's unsharded parameters allocated: later probes had less
    # room and the boundary drifted down. The size above the answer must fail in a fresh process
    # too, where no failure came before.
    args = ["find-max", "--model", "zoo:mlp", "--set", "model.kwargs={hidden: 512}", "--device",
            "cpu", "--set", "train.parallel=fsdp", "--memory-budget", "24MiB", "--json"]  # fmt: skip
    rank0, _ = ranks([*args, "--strategy", "doubling"])
    data = json.loads(rank0.stdout)
    assert data["exact"] and not data["warnings"], data["warnings"]
    best = data["max_batch_size"]
    assert sum(p["outcome"] != "fit" for p in data["probes"]) >= 3  # failures before the answer
    above = str(best + 1)
    fresh, _ = ranks([*args, "--start", above, "--max-batch-size", above])
    again = json.loads(fresh.stdout)
    assert again["probes"][0]["batch_size"] == best + 1
    assert again["probes"][0]["outcome"] != "fit"  # best + 1 fails fresh too: no drift
    assert again["max_batch_size"] == best


def test_a_replaced_data_group_is_destroyed_and_frees_its_buffers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In this process, one rank: each data group's communicator takes its buffers at the
    first collective; replacing the group must give them back."""
    import torch
    import torch.distributed as dist

    from batchprobe.backends import get_backend
    from batchprobe.backends.simcuda import simulated_cuda
    from batchprobe.ranks import Dist

    port = str(_free_port())
    for key, value in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
    }.items():
        monkeypatch.setenv(key, value)
    with simulated_cuda(
        total_bytes=1024**3, context_bytes=0, nccl_buffer_bytes=64 * 1024**2
    ) as sim:
        d = Dist.from_env(get_backend("cuda"), "ddp", 10.0)
        try:
            held = []
            for _ in range(3):
                dist.all_reduce(torch.ones(4), group=d.data)  # the communicator comes to life
                held.append(sim.devices[0].outside.get("nccl buffers", 0))
                d.renew_data_group()
            # the world group's communicator and one data group's: never more
            assert held == [held[0]] * 3 and held[0] <= 2 * 64 * 1024**2
        finally:
            dist.destroy_process_group()
    assert not os.environ.get("BATCHPROBE_SIMULATE_CUDA")


@cpu_fsdp
def test_a_step_cut_short_puts_fsdp_back_to_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    """In this process, one rank: a forward that fails after FSDP gathered the first units'
    parameters leaves them unsharded; ending the probe shards them again."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from batchprobe import load_spec
    from batchprobe.backends import get_backend
    from batchprobe.ranks import Dist
    from batchprobe.sources import build_workload
    from batchprobe.step import TrainStep

    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(_free_port())}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    spec = load_spec(overrides=["model.source=zoo:mlp", "train.parallel=fsdp"])
    d = Dist.from_env(get_backend("cpu"), "fsdp", 10.0)
    try:
        workload = build_workload(spec)
        d.shard(workload.model)
        step = TrainStep(workload, spec.train, torch.device("cpu"))
        last = [m for m in workload.model.modules() if isinstance(m, torch.nn.Linear)][-1]

        def fail(*_: object) -> None:
            raise RuntimeError("CPU out of memory (a failure mid-forward)")

        sharded = lambda: all(isinstance(p, DTensor) for p in workload.model.parameters())  # noqa: E731
        assert sharded()
        step.begin()
        handle = last.register_forward_pre_hook(fail)
        with pytest.raises(RuntimeError, match="mid-forward"):
            step.train_step(step.make_batch(8))
        handle.remove()
        assert not sharded()  # the failed forward left gathered parameters behind
        step.end()
        assert sharded()
        step.begin()
        step.train_step(step.make_batch(8))  # and the next probe runs
        step.end()
    finally:
        dist.destroy_process_group()
