"""One process or many: `Solo` and `Dist` (torchrun) answer the same questions — agree on a probe,
on a failure, on "go on?", who speaks — and `open_ranks` picks one, once.

Under torchrun every rank probes the per-rank micro-batch, and every probe's outcome is agreed.
The process group comes from the environment torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, ...),
with the device backend's collective backend (NCCL on GPU, gloo on CPU), bound to this rank's
device. Two kinds of collectives, on separate groups:

- *data* collectives, inside the training step (DDP's gradient all-reduce, FSDP's all-gathers and
  reduce-scatters). After a failure in a step that holds them, a collective one rank skipped must
  not pair with the next one: the group is replaced by a fresh one and the old one destroyed (its
  communicator's buffers freed); FSDP's model is re-sharded on the new group's mesh.
- *control* collectives, a gloo group of its own: after every probe all ranks exchange their
  outcome and peak, and all take the worst outcome and the largest peak. Strategies are pure
  functions of what they are told, so all ranks then try the same next size and end on the same
  answer.

One rank's OOM must not leave the others waiting in a collective. With DDP a probe first runs its
training steps under `no_sync()` — the same memory, optimizer state included, but no collective
after DDP's construction — and agrees on that: an OOM is caught there, at once. An OOM in the
synchronized steps that follow (an all-reduce's own buffers, FSDP's all-gathers) leaves the other
ranks in a collective until `probe.collective_timeout_s`. NCCL's watchdog then acts as
`TORCH_NCCL_ASYNC_ERROR_HANDLING` says; its default (3, torch 2.4-2.14) takes every waiting
process down, so batchprobe sets 2 (CleanUpOnly: the communicator is aborted and the waiting
rank's collective raises) unless the user chose otherwise. The waiting ranks then report a peer
failure, the agreement names the real one, and the data group is replaced.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from batchprobe import launcher
from batchprobe.probe import run_probe
from batchprobe.results import Failure, ProbeResult, StepTiming
from batchprobe.search import Outcome
from batchprobe.step import TrainStep
from batchprobe.timing import PEER_FAILURE

if TYPE_CHECKING:
    from batchprobe.backends.base import Backend

Parallel = Literal["ddp", "fsdp", "none"]

_SEVERITY = {Outcome.FIT: 0, Outcome.OOM: 1, Outcome.LIMIT: 2, Outcome.ERROR: 3}
# What a rank sees when a peer left a collective: these are not the cause, the peer's failure is.
_PEER_PATTERNS = (
    "timed out",
    "timeout",
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "nccl communicator was aborted",
)


class Solo:
    """One process: every agreement is with itself."""

    world_size = 1
    rank = 0
    parallel: Parallel = "none"
    distributed = False
    notes: tuple[str, ...] = ()

    def agree(self, result: ProbeResult) -> ProbeResult:
        return result

    def agree_failure(self, failure: Failure) -> Failure:
        return failure

    def agree_min(self, value: int | None) -> int | None:
        return value

    def any_rank(self, *flags: bool) -> tuple[bool, ...]:
        return flags

    def agree_timing(self, t: StepTiming) -> StepTiming:
        return t

    def probe(self, step: TrainStep, backend: Backend, batch_size: int, steps: int) -> ProbeResult:
        return run_probe(step, backend, batch_size, steps)

    def wrap(self, backend: Backend) -> Callable[[nn.Module], nn.Module] | None:
        return None

    def shard(self, model: nn.Module) -> None:
        return None


def open_ranks(backend: Backend, parallel: Parallel, timeout_s: float) -> Solo | Dist:
    """Solo, or under torchrun (WORLD_SIZE > 1) this rank's place in the process group."""
    if launcher.world_size() == 1:
        return Solo()
    return Dist.from_env(backend, parallel, timeout_s)


_ERROR_HANDLING = "TORCH_NCCL_ASYNC_ERROR_HANDLING"


def _nccl_error_handling() -> tuple[str, ...]:
    """CleanUpOnly (2) unless the user chose: a timed-out collective aborts its communicator and
    raises on the waiting rank, where TearDown (1) and SkipCleanUp (3, the default) end the
    process. Read by NCCL when a process group is made: set before the first."""
    chosen = os.environ.get(_ERROR_HANDLING)
    if chosen is None:
        os.environ[_ERROR_HANDLING] = "2"
        return ()
    if chosen.strip() in ("1", "3"):
        return (
            f"{_ERROR_HANDLING}={chosen.strip()}: NCCL takes the whole job down when a collective "
            "times out, so a rank that runs out of memory inside a synchronized step (the others "
            "waiting in an all-reduce) ends the search; unset it to let batchprobe recover",
        )
    return ()


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    parallel: Parallel
    timeout_s: float
    backend_name: str
    device_type: str  # what FSDP's mesh is made of
    control: Any = None  # gloo group for agreement
    data: Any = None  # group the training step's collectives use
    notes: tuple[str, ...] = ()
    #: set by the session under FSDP: a fresh model, sharded on the new data group
    rebuild: Callable[[], None] | None = None
    distributed = True

    # -- set-up ---------------------------------------------------------------------------
    @classmethod
    def from_env(cls, device: Backend, parallel: Parallel, timeout_s: float) -> Dist:
        backend = device.collective_backend
        timeout = timedelta(seconds=timeout_s)
        notes = _nccl_error_handling()
        if not dist.is_initialized():
            bound = device.collective_device()
            supported = "device_id" in inspect.signature(dist.init_process_group).parameters
            extra: dict[str, Any] = {"device_id": bound} if bound is not None and supported else {}
            dist.init_process_group(backend=backend, timeout=timeout, **extra)
        d = cls(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", "0") or 0),
            parallel=parallel,
            timeout_s=timeout_s,
            backend_name=backend,
            device_type=device.device.type,
            notes=notes,
        )
        # the control group outwaits the data group: a rank stuck in a data collective a peer
        # left reaches the agreement only after the data timeout
        d.control = dist.new_group(backend="gloo", timeout=timedelta(seconds=3 * timeout_s + 30))
        d.data = dist.new_group(backend=backend, timeout=timeout)
        atexit.register(d.close)
        return d

    def renew_data_group(self) -> None:
        """A fresh data group, so no collective left pending pairs with a new one; the old group
        is destroyed (its communicator and buffers freed), and FSDP's model re-sharded."""
        old = self.data
        self.data = dist.new_group(
            backend=self.backend_name, timeout=timedelta(seconds=self.timeout_s)
        )
        # an aborted communicator may refuse to be destroyed: it is gone anyway
        with contextlib.suppress(RuntimeError, ValueError):
            dist.destroy_process_group(old)
        if self.parallel == "fsdp" and self.rebuild is not None:
            self.rebuild()

    #: how long a rank waits at the end for its peers before tearing the groups down
    CLOSE_TIMEOUT_S = 30.0

    def close(self) -> None:
        """Wait (boundedly) until every rank is done, then tear the groups down: a rank that
        destroys its groups while a peer's gloo threads still talk to it can abort at exit."""
        if not dist.is_initialized():
            return
        if self.control is not None:
            try:
                timeout = timedelta(seconds=self.CLOSE_TIMEOUT_S)
                dist.monitored_barrier(group=self.control, timeout=timeout)
            except Exception:  # a peer that died or hangs: tear down anyway
                pass
        dist.destroy_process_group()

    # -- the model ------------------------------------------------------------------------
    def wrap(self, backend: Backend) -> Callable[[nn.Module], nn.Module] | None:
        """DDP is built afresh for every probe (its reducer does not survive an exception in
        backward, and its buckets belong in the probe's peak); FSDP shards once, in place."""
        return _ddp(lambda: self.data, backend) if self.parallel == "ddp" else None

    def shard(self, model: nn.Module) -> None:
        if self.parallel == "fsdp":
            _fsdp_shard(model, self.data, self.device_type)

    # -- agreement ------------------------------------------------------------------------
    def agree(self, result: ProbeResult, synced: bool = True) -> ProbeResult:
        """All ranks take the worst outcome (a peer's collective failure is not the cause) and
        the largest peaks. After a failure in steps that held data collectives (`synced`), the
        data group is replaced."""
        mine = (
            _SEVERITY[result.outcome],
            result.failure.to_dict() if result.failure else None,
            result.peak_bytes or 0,
            result.line_bytes or 0,
            result.reserved_bytes or 0,
            (result.live_bytes, result.need_bytes, result.failed_op),
            result.flat_bytes or 0,
            (result.limit_after_bytes, result.limit_moves_with_probes),
        )
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, mine, group=self.control)
        causes = [e for e in everyone if e[1] is None or not _is_peer_failure(e[1])]
        worst = max(causes or everyone, key=lambda e: e[0])
        outcome = next(o for o, s in _SEVERITY.items() if s == worst[0])
        failure = None
        if worst[1] is not None:
            failure = Failure.from_dict(worst[1])
            rank = everyone.index(worst)
            failure = replace(failure, message=f"rank {rank}: {failure.message}")
        agreed = replace(
            result,
            outcome=outcome,
            failure=failure,
            peak_bytes=max(e[2] for e in everyone) or None,
            line_bytes=max(e[3] for e in everyone) or None,
            flat_bytes=max(e[6] for e in everyone) or None,
            reserved_bytes=max(e[4] for e in everyone) or None,
            # what the failing rank's allocator said (its rank holds the smallest limit)
            live_bytes=worst[5][0],
            need_bytes=worst[5][1],
            failed_op=worst[5][2],
            # every rank's search must be told the same: the smallest limit any rank read
            **_agreed_limit([e[7] for e in everyone]),
        )
        if outcome is not Outcome.FIT and synced:
            self.renew_data_group()
            # A failed step's collectives may still be in flight when the probe measures what it
            # left (their buffers); they go with the data group destroyed here. (On the simulated
            # GPU, allocated memory after a search of failed FSDP steps is what it was after the
            # warm-up.)
            agreed = replace(agreed, retained_bytes=0)
        return agreed

    def agree_failure(self, failure: Failure) -> Failure:
        """A step failed on some rank while timed: every rank takes the real cause (not a peer's
        collective error), and the data group is replaced."""
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, failure.to_dict(), group=self.control)
        causes = [e for e in everyone if not _is_peer_failure(e)] or everyone
        worst = max(causes, key=lambda e: _SEVERITY[Outcome(e["outcome"])])
        self.renew_data_group()
        agreed = Failure.from_dict(worst)
        return replace(agreed, message=f"rank {everyone.index(worst)}: {agreed.message}")

    def agree_min(self, value: int | None) -> int | None:
        """The smallest value over ranks (None when any rank has none)."""
        tensor = torch.tensor([value if value is not None else -1], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.control)
        out = int(tensor.item())
        return None if out < 0 else out

    def any_rank(self, *flags: bool) -> tuple[bool, ...]:
        """For each flag, whether it is set on any rank."""
        tensor = torch.tensor([int(f) for f in flags], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.control)
        return tuple(bool(v) for v in tensor.tolist())

    def agree_timing(self, t: StepTiming) -> StepTiming:
        """The slowest rank sets the pace: the max over ranks of every figure."""
        wait = -1.0 if t.cpu_wait is None else t.cpu_wait
        values = torch.tensor(
            [t.fwd_bwd_s, t.optimizer_s, t.step_s, t.spread, t.fwd_bwd_nosync_s or 0.0, wait],
            dtype=torch.float64,
        )
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.control)
        fb, opt, step, spread, nosync, wait = values.tolist()
        return replace(
            t,
            fwd_bwd_s=fb,
            optimizer_s=opt,
            step_s=step,
            spread=spread,
            fwd_bwd_nosync_s=nosync if t.fwd_bwd_nosync_s is not None else None,
            cpu_wait=wait if wait >= 0 else None,
        )

    # -- probing --------------------------------------------------------------------------
    def probe(self, step: TrainStep, backend: Backend, batch_size: int, steps: int) -> ProbeResult:
        """A probe every rank runs in lockstep, agreed after each phase."""
        if self.parallel == "ddp":
            dry = run_probe(step, backend, batch_size, steps, dry_run=True)
            dry = self.agree(dry, synced=False)  # no collective ran: the group is clean
            if dry.outcome is not Outcome.FIT:
                return dry
        return self.agree(run_probe(step, backend, batch_size, steps))


def _ddp(group: Callable[[], Any], backend: Backend) -> Callable[[nn.Module], nn.Module]:
    """A DDP wrapper on the data group of the moment (it is replaced after a failure)."""
    from torch.nn.parallel import DistributedDataParallel

    # No buffer broadcast at each forward: it would be the one collective left in the no_sync
    # dry run (its bytes are a few buffers' worth). Newer torch names the switch
    # forward_sync_buffers.
    params = inspect.signature(DistributedDataParallel).parameters
    no_buffer_sync: dict[str, Any] = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in params
        else {"broadcast_buffers": False}
    )

    def wrap(module: nn.Module) -> nn.Module:
        return DistributedDataParallel(
            module, device_ids=backend.ddp_device_ids(), process_group=group(), **no_buffer_sync
        )

    return wrap


def _fsdp_shard(model: nn.Module, group: Any, device_type: str) -> None:
    """FSDP2, in place, on `group`'s mesh: each block of a ModuleList (transformer layers) is a
    unit — else each child with parameters — then the root. Inner units first: a module must be
    sharded before any module that contains it."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    mesh = DeviceMesh.from_group(group, device_type)
    blocks = [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst]
    units = blocks or [c for c in model.children() if any(True for _ in c.parameters())]
    depth = {id(m): d for d, m in _depths(model)}
    for unit in sorted(units, key=lambda m: -depth[id(m)]):  # deepest first
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _depths(model: nn.Module) -> list[tuple[int, nn.Module]]:
    out: list[tuple[int, nn.Module]] = []

    def walk(module: nn.Module, depth: int) -> None:
        out.append((depth, module))
        for child in module.children():
            walk(child, depth + 1)

    walk(model, 0)
    return out


def _agreed_limit(readings: list[tuple[int | None, bool]]) -> dict[str, Any]:
    """The limit every rank is told after a probe: the smallest any rank read (each reads its
    own: its budget, the room its process has), moving with the probes if any rank's does; none
    if a rank could not read one."""
    if any(limit is None for limit, _ in readings):
        return {"limit_after_bytes": None, "limit_moves_with_probes": False}
    return {
        "limit_after_bytes": min(limit for limit, _ in readings if limit is not None),
        "limit_moves_with_probes": any(moves for _, moves in readings),
    }


def _is_peer_failure(failure: dict[str, Any]) -> bool:
    if failure["outcome"] != Outcome.ERROR.value:
        return False
    if failure["error_type"] == PEER_FAILURE:
        return True
    text = failure["message"].lower()
    return any(p in text for p in _PEER_PATTERNS)
