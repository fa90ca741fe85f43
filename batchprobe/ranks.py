"""One process or many: `Solo` and `Dist` (torchrun) answer the same questions — agree on a probe,
any rank, timing, who speaks — and `open_ranks` picks one, once.

Under torchrun every rank probes the per-rank micro-batch, and every probe's outcome is agreed.
The process group comes from the environment torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, ...),
with the device backend's collective backend (NCCL on GPU, gloo on CPU). Two kinds of
collectives, on separate groups:

- *data* collectives, inside the training step (DDP's gradient all-reduce, FSDP's all-gathers and
  reduce-scatters), on a group batchprobe re-creates after any failed probe, so a collective one
  rank skipped cannot pair with the next one;
- *control* collectives, a gloo group of its own: after every probe all ranks exchange their
  outcome and peak, and all take the worst outcome and the largest peak. Strategies are pure
  functions of what they are told, so all ranks then try the same next size and end on the same
  answer.

One rank's OOM must not leave the others waiting in a collective for the 10-minute watchdog. With
DDP a probe first runs its training steps under `no_sync()` — the same memory, optimizer state
included, but no collective after DDP's construction — and agrees on that: an OOM is caught
there, at once. An OOM in the synchronized steps that follow (the all-reduce's own buffers) leaves
the other ranks in a collective until `probe.collective_timeout_s`; they report a peer failure,
the agreement names the real one, and the data group is replaced.
"""

from __future__ import annotations

import atexit
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

    def agree(self, result: ProbeResult) -> ProbeResult:
        return result

    def agree_min(self, value: int | None) -> int | None:
        return value

    def any_rank(self, flag: bool) -> bool:
        return flag

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


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    parallel: Parallel
    timeout_s: float
    backend_name: str
    control: Any = None  # gloo group for agreement
    data: Any = None  # group the training step's collectives use
    distributed = True

    # -- set-up ---------------------------------------------------------------------------
    @classmethod
    def from_env(cls, device: Backend, parallel: Parallel, timeout_s: float) -> Dist:
        backend = device.collective_backend
        timeout = timedelta(seconds=timeout_s)
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, timeout=timeout)
        d = cls(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", "0") or 0),
            parallel=parallel,
            timeout_s=timeout_s,
            backend_name=backend,
        )
        # the control group outwaits the data group: a rank stuck in a data collective a peer
        # left reaches the agreement only after the data timeout
        d.control = dist.new_group(backend="gloo", timeout=timedelta(seconds=3 * timeout_s + 30))
        d.data = dist.new_group(backend=backend, timeout=timeout)
        atexit.register(d.close)
        return d

    def renew_data_group(self) -> None:
        """After a failed probe: a fresh group, so no collective left pending pairs with a new one."""
        self.data = dist.new_group(
            backend=self.backend_name, timeout=timedelta(seconds=self.timeout_s)
        )

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # -- the model ------------------------------------------------------------------------
    def wrap(self, backend: Backend) -> Callable[[nn.Module], nn.Module] | None:
        """DDP is built afresh for every probe (its reducer does not survive an exception in
        backward, and its buckets belong in the probe's peak); FSDP shards once, in place."""
        if self.parallel != "ddp":
            return None

        from torch.nn.parallel import DistributedDataParallel

        # No buffer broadcast at each forward: it would be the one collective left in the
        # no_sync dry run (its bytes are a few buffers' worth). Newer torch names the switch
        # forward_sync_buffers.
        params = inspect.signature(DistributedDataParallel).parameters
        no_buffer_sync: dict[str, Any] = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in params
            else {"broadcast_buffers": False}
        )

        def ddp(module: nn.Module) -> nn.Module:
            return DistributedDataParallel(
                module,
                device_ids=backend.ddp_device_ids(),
                process_group=self.data,
                **no_buffer_sync,
            )

        return ddp

    def shard(self, model: nn.Module) -> None:
        """FSDP2, in place: each block of a ModuleList (transformer layers) is a unit — else each
        child with parameters — then the root."""
        if self.parallel != "fsdp":
            return
        from torch.distributed.fsdp import fully_shard

        blocks = [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst]
        units = blocks or [c for c in model.children() if any(True for _ in c.parameters())]
        for unit in units:
            fully_shard(unit)
        fully_shard(model)

    # -- agreement ------------------------------------------------------------------------
    def agree(self, result: ProbeResult) -> ProbeResult:
        """All ranks take the worst outcome (a peer's collective failure is not the cause) and
        the largest peaks."""
        mine = (
            _SEVERITY[result.outcome],
            result.failure.to_dict() if result.failure else None,
            result.peak_bytes or 0,
            result.line_bytes or 0,
            result.reserved_bytes or 0,
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
            reserved_bytes=max(e[4] for e in everyone) or None,
        )
        if outcome is not Outcome.FIT:
            self.renew_data_group()
        return agreed

    def agree_min(self, value: int | None) -> int | None:
        """The smallest value over ranks (None when any rank has none)."""
        tensor = torch.tensor([value if value is not None else -1], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.control)
        out = int(tensor.item())
        return None if out < 0 else out

    def any_rank(self, flag: bool) -> bool:
        """True when `flag` is set on any rank."""
        tensor = torch.tensor([int(flag)], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.control)
        return bool(tensor.item())

    def agree_timing(self, t: StepTiming) -> StepTiming:
        """The slowest rank sets the pace: the max over ranks of every figure."""
        values = torch.tensor(
            [t.fwd_bwd_s, t.optimizer_s, t.step_s, t.spread, t.fwd_bwd_nosync_s or 0.0],
            dtype=torch.float64,
        )
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.control)
        fb, opt, step, spread, nosync = values.tolist()
        return replace(
            t,
            fwd_bwd_s=fb,
            optimizer_s=opt,
            step_s=step,
            spread=spread,
            fwd_bwd_nosync_s=nosync if t.fwd_bwd_nosync_s is not None else None,
        )

    # -- probing --------------------------------------------------------------------------
    def probe(self, step: TrainStep, backend: Backend, batch_size: int, steps: int) -> ProbeResult:
        """A probe every rank runs in lockstep, agreed after each phase."""
        if self.parallel == "ddp":
            dry = self.agree(run_probe(step, backend, batch_size, steps, dry_run=True))
            if dry.outcome is not Outcome.FIT:
                return dry
        return self.agree(run_probe(step, backend, batch_size, steps))


def _is_peer_failure(failure: dict[str, Any]) -> bool:
    if failure["outcome"] != Outcome.ERROR.value:
        return False
    text = failure["message"].lower()
    return any(p in text for p in _PEER_PATTERNS)
