"""One training step — forward, loss, backward, optimizer step, zero_grad — and nothing else.

No search or timing policy lives here: probes, timing and estimates all drive this same code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from batchprobe.sources import Batch, Workload
from batchprobe.spec import OPTIMIZER_CLASSES, TrainSpec

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class StepObserver(Protocol):
    """Told which phase a step is in, and which tensors are gradients / optimizer state."""

    def phase(self, name: str) -> None: ...

    def mark(self, tensors: Any, tag: str) -> None: ...

    def region(self, name: str) -> None:
        """What is made from here on, outside any module, is this region's (the loss)."""


class TrainStep:
    """A model on its device with a fresh optimizer per `begin()`; drives one step at a time."""

    def __init__(
        self,
        workload: Workload,
        train: TrainSpec,
        device: torch.device,
        wrap: Callable[[nn.Module], nn.Module] | None = None,
        fake: bool = False,
        optimizer_defaults: Mapping[str, Any] | None = None,
    ) -> None:
        self.workload = workload
        # How the device runs the optimizer when the spec does not say (torch picks the
        # multi-tensor `foreach` path for CUDA tensors): stated, so that the simulated GPU and the
        # traces of a GPU run the same implementation, with its temporaries.
        self.optimizer_defaults = dict(optimizer_defaults or {})
        # Traced with fake tensors (estimate): no GradScaler (its inf check reads a value; its
        # state is a few scalars) and no compilation.
        self.fake = fake
        self.train_spec = train
        self.device = device
        self.model = workload.model
        if any(t.device != device for t in (*self.model.parameters(), *self.model.buffers())):
            self.model = self.model.to(device)
        self.model.train()
        # What the step calls: the model, or a DDP wrapper built afresh by every begin() (its
        # buckets belong in each probe's peak; its reducer does not survive a failed backward).
        self.wrap = wrap
        self.runner: nn.Module = self.model
        self._compiled: Callable[..., Any] | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.observer: StepObserver | None = None
        self._in_step = False  # a forward began and its optimizer step has not ended
        self.autocast_dtype = _AUTOCAST.get(train.precision)

    def replace_model(self, model: nn.Module) -> None:
        """Train `model` from now on (FSDP's model, re-sharded on a new process group)."""
        self.end()
        self.workload.model = self.model = self.runner = model
        self.model.train()

    # -- state ------------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for p in self.runner.parameters():
            seen.setdefault(id(p), p)
        return list(seen.values())

    def persistent_tensors(self) -> list[torch.Tensor]:
        """What lives across steps: parameters and buffers (the optimizer is fresh per probe)."""
        tensors: list[torch.Tensor] = list(self.parameters())
        tensors.extend(self.runner.buffers())
        return tensors

    def begin(self) -> None:
        """Fresh optimizer and scaler, no gradients: every probe starts from the same state."""
        self.end()
        if self.wrap is not None:
            self.runner = self.wrap(self.model)
        spec = self.train_spec.optimizer
        params = [p for p in self.parameters() if p.requires_grad]
        if spec.name in OPTIMIZER_CLASSES:
            cls = getattr(torch.optim, OPTIMIZER_CLASSES[spec.name])
            chosen = "foreach" in spec.kwargs or "fused" in spec.kwargs
            kwargs = spec.kwargs if chosen else {**self.optimizer_defaults, **spec.kwargs}
            self.optimizer = cls(params, lr=spec.lr, **kwargs)
        if self.train_spec.precision == "fp16" and not self.fake:
            # init_scale=1: with the default 2**16 the first steps often overflow and are skipped,
            # and a skipped step creates no optimizer state: the probe would under-count memory.
            self.scaler = torch.amp.GradScaler(self.device.type, init_scale=1.0)
        if self.train_spec.compile and not self.fake:
            torch.compiler.reset()  # a fresh graph per batch size, as a real run compiles once
            self._compiled = torch.compile(self.runner)

    def end(self) -> None:
        """Drop optimizer state, gradients and the DDP wrapper (what a probe created); after an
        iteration cut short, put a sharded model's per-iteration state back to rest."""
        if self._in_step:
            _reset_sharded(self.model)
            self._in_step = False
        self.optimizer = None
        self.scaler = None
        self._compiled = None
        for p in self.parameters():
            p.grad = None
        if self.runner is not self.model:
            # DDP's reducer hooks the parameters' gradients; a wrapper left to the garbage
            # collector (it sits in reference cycles) would keep reducing on a stale group
            remove = getattr(self.runner, "_remove_autograd_hooks", None)
            if remove is not None:
                remove()
            self.runner = self.model

    # -- one step ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        if self.observer is not None:
            self.observer.phase(name)
        yield
        if self.observer is not None:
            self.observer.phase("other")

    def make_batch(self, batch_size: int) -> Batch:
        with self._phase("batch"):
            return self.workload.make_batch(batch_size, self.device)

    def no_sync(self) -> contextlib.AbstractContextManager[Any]:
        """Skip the gradient synchronization, as accumulation steps before the last one do."""
        runner: Any = self.runner
        if hasattr(runner, "no_sync"):  # DDP
            return runner.no_sync()
        if hasattr(runner, "set_requires_gradient_sync"):  # FSDP2
            return _fsdp_no_sync(runner)
        return contextlib.nullcontext()

    def forward_backward(self, batch: Batch, loss_divisor: int = 1) -> None:
        """Forward, loss, backward. Divide the loss by `loss_divisor` under accumulation."""
        self._in_step = True
        # Under a Python dispatch mode (the CPU's storage ledger) dynamo does not compile; calling
        # the compiled model there makes torch 2.6 skip its code for good, so run the eager one.
        model: Callable[..., Any] = self.runner
        if self._compiled is not None and _get_current_dispatch_mode() is None:
            model = self._compiled
        with self._phase("forward"):
            ctx = (
                torch.autocast(self.device.type, dtype=self.autocast_dtype)
                if self.autocast_dtype is not None
                else contextlib.nullcontext()
            )
            with ctx:
                out = model(*batch.args, **batch.kwargs)
                if self.observer is not None:
                    self.observer.region("loss")
                loss = self.workload.loss_fn(out, batch)
            del out
            if loss_divisor != 1:
                loss = loss / loss_divisor
        with self._phase("backward"):
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
        if self.observer is not None:
            self.observer.mark(
                (p.grad for p in self.parameters() if p.grad is not None), "gradients"
            )

    def optimizer_step(self) -> None:
        """optimizer.step() (through the GradScaler for fp16), then zero_grad(set_to_none=True)."""
        with self._phase("optimizer"):
            if self.optimizer is not None:
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
        if self.observer is not None and self.optimizer is not None:
            self.observer.mark(_state_tensors(self.optimizer), "optimizer_state")
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            for p in self.parameters():
                p.grad = None
        self._in_step = False

    def train_step(self, batch: Batch) -> None:
        self.forward_backward(batch)
        self.optimizer_step()

    def prime_optimizer(self, graded: set[int]) -> None:
        """The optimizer's first step without a forward: gradients of zeros for the parameters
        a step gives gradients to (`graded`, their ids: an unused head gets none, and no state),
        `step()` (which creates the state as the first real step would), `zero_grad`. A step
        after it runs as a second step does, with the state in memory: one traced step then
        shows the peak of two (a trace for the search's prior, at two thirds of the cost).
        Weight decay moves the weights: for fake tensors only."""
        assert self.fake, "priming moves the weights: traces only"
        for p in self.parameters():
            if id(p) in graded:
                p.grad = torch.zeros_like(p)
        if self.observer is not None:
            self.observer.mark(
                (p.grad for p in self.parameters() if p.grad is not None), "gradients"
            )
        self.optimizer_step()


def _reset_sharded(model: nn.Module) -> None:
    """FSDP2 after an exception mid-iteration: its unsharded parameters and training state back
    to rest — `reset_iter_state()` on the root (torch >= 2.13), else `reshard()` on every unit —
    so that the next probe starts clean and nothing of the failed one stays allocated."""
    reset = getattr(model, "reset_iter_state", None)
    if reset is not None:
        reset()
        return
    for m in model.modules():
        reshard = getattr(m, "reshard", None)
        if reshard is not None:
            reshard()


@contextlib.contextmanager
def _fsdp_no_sync(module: Any) -> Iterator[None]:
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def _state_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                yield value
