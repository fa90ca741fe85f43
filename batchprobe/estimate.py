"""Memory of full training steps traced with fake tensors: no compute, no device memory.

The model is built on the meta device, given fake CPU storage (FakeTensorMode), and driven by the
same TrainStep as a probe, with the same storage ledger counting live bytes — so on CPU the
estimate equals what a probe measures. For a GPU target the trace cannot see what the device adds:
the CUDA context and library workspaces (outside PyTorch's allocator), and the allocator's block
rounding and fragmentation. Those are a stated, configurable allowance: every storage is rounded up
to 512 bytes as the caching allocator does, the peak is multiplied by (1 + fragmentation), and a
fixed `context_bytes` is taken off the capacity. Attention is traced as the memory-efficient
kernels a GPU runs (no T x T score matrix), since the CPU's math kernel would materialise it.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from batchprobe.errors import ModelError, Problem, SpecError
from batchprobe.memory import ModuleScope, OutOfTime, StorageLedger, TrackingMode
from batchprobe.results import Allowance, EstimatePoint, EstimateResult, Timeline, TraceFailure
from batchprobe.search import Line, Observation, Outcome, Prior, search
from batchprobe.sources import build_workload, quiet_warnings
from batchprobe.spec import Spec
from batchprobe.step import TrainStep
from batchprobe.units import format_bytes

CUDA_BLOCK_BYTES = 512  # the caching allocator's smallest block: every allocation rounds up to it


class TraceError(Exception):
    """The model cannot be traced with fake tensors (an op without a fake implementation, or
    data-dependent control flow). Carries the op when known."""

    def __init__(self, message: str, op: str | None) -> None:
        super().__init__(message)
        self.op = op

    @property
    def failure(self) -> TraceFailure:
        return TraceFailure(str(self), self.op)


@contextmanager
def _fused_attention() -> Iterator[None]:
    """Trace scaled_dot_product_attention as a GPU runs it: a fused kernel that keeps the output
    and its log-sum-exp, never the T x T scores. On CPU the same memory profile comes from the
    CPU flash kernel, which takes neither dropout nor masks: both are dropped for the trace (a
    GPU's fused kernels draw dropout from a seed and read the mask, storing neither).

    The function itself is swapped for the trace (and put back): a function mode would not be
    seen by activation checkpointing's recomputation, which must repeat the forward exactly."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    original = F.scaled_dot_product_attention

    def fused(q: Any, k: Any, v: Any, attn_mask: Any = None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: Any = None, enable_gqa: bool = False) -> Any:  # fmt: skip
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return original(
                    q,
                    k,
                    v,
                    is_causal=is_causal and attn_mask is None,
                    scale=scale,
                    enable_gqa=enable_gqa,
                )
        except RuntimeError:  # shapes the fused kernel does not take: trace the call as it is
            return original(
                q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
            )

    F.scaled_dot_product_attention = fused  # type: ignore[assignment]
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


class Tracer:
    """A spec's model with fake storage, and one method: trace(b) -> EstimatePoint."""

    def __init__(self, spec: Spec, allowance: Allowance, steps: int = 2) -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.spec = spec
        self.allowance = allowance
        self.steps = steps
        with quiet_warnings():
            try:
                self.workload = build_workload(spec, "meta")  # shapes only
            except ModelError as exc:  # e.g. a constructor that reads a tensor's value
                first = str(exc).splitlines()[0]
                message = f"the model cannot be built on the meta device: {first}"
                raise TraceError(message, None) from None
        # Data-dependent ops cannot run on fake tensors; plain CPU tensors created outside the
        # mode (e.g. module constants) are allowed in.
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        with self.mode:
            materialize(self.workload.model, torch.device("cpu"))
        # the optimizer as the target runs it: the CPU's single-tensor loops otherwise
        defaults = {"foreach": True} if allowance.foreach else {}
        self.step = TrainStep(
            self.workload, spec.train, torch.device("cpu"), fake=True, optimizer_defaults=defaults
        )
        self._points: dict[int, EstimatePoint] = {}
        self._primed: dict[int, EstimatePoint] = {}
        #: the parameters a traced step gave dense gradients to (ids), once a step was traced;
        #: None: not yet, or one was sparse (then nothing is primed)
        self._graded: set[int] | None = None
        self._sparse = False

    def trace(
        self, batch_size: int, deadline: float | None = None, primed: bool = False
    ) -> EstimatePoint:
        """Peak of `steps` traced training steps at `batch_size` (each size traced once). Past
        `deadline` (time.perf_counter), raises OutOfTime. `primed`: the same peak from the
        optimizer's state made first and one step (`TrainStep.prime_optimizer`) — what a prior
        needs, at two thirds of the cost; its timeline and explanation are of that one step. A
        size traced in full answers for it; until a step was traced (to learn which parameters
        get gradients), or where one got a sparse gradient, it is a full trace."""
        if primed and (batch_size in self._points or self._graded is None):
            primed = False
        points = self._primed if primed else self._points
        if batch_size not in points:
            points[batch_size] = self._trace(batch_size, deadline, primed=primed)
        return points[batch_size]

    def timeline(self, batch_size: int) -> Timeline:
        """Live bytes by kind after each op of the traced steps at `batch_size`, with the phase
        (forward, backward, optimizer): what `--plot` draws."""
        into: Timeline = []
        self._trace(batch_size, None, into)
        return into

    def _trace(
        self,
        batch_size: int,
        deadline: float | None,
        timeline: Timeline | None = None,
        primed: bool = False,
    ) -> EstimatePoint:
        started = time.perf_counter()
        ledger = StorageLedger(round_to=self.allowance.round_to, keep_breakdown=True, by_op={})
        ledger.timeline = timeline
        ledger.scope = ModuleScope(self.step.runner)
        attention = (
            _fused_attention() if self.allowance.flash_attention else contextlib.nullcontext()
        )
        try:
            with self.mode, quiet_warnings(), attention, ledger.scope:
                ledger.mark(self.step.persistent_tensors(), "parameters")
                self.step.observer = ledger
                with TrackingMode(ledger, deadline):
                    self.step.begin()
                    batch = self.step.make_batch(batch_size)
                    if primed:
                        assert self._graded is not None
                        self.step.prime_optimizer(self._graded)
                    for _ in range(1 if primed else self.steps):
                        self.step.forward_backward(batch)
                        if self._graded is None and not self._sparse:
                            self._learn_graded()
                        self.step.optimizer_step()
                    del batch
        except OutOfTime:
            raise
        except Exception as exc:
            raise _trace_error(exc) from None
        finally:
            self.step.observer = None
            self.step.end()
        point = EstimatePoint(
            batch_size,
            ledger.peak_bytes,
            self.allowance.device_bytes(ledger.peak_bytes),
            ledger.breakdown(),
            dict(ledger.phase_peaks),
            dict(ledger.by_op or {}),
            time.perf_counter() - started,
            ledger.explain(batch_size, "traced"),
        )
        ledger.close()
        return point

    def _learn_graded(self) -> None:
        """After a traced backward: which parameters it gave gradients to, for priming."""
        grads = [(id(p), p.grad) for p in self.step.parameters() if p.grad is not None]
        if any(g.is_sparse for _, g in grads):
            self._sparse = True  # zeros would be dense: nothing is primed
        else:
            self._graded = {i for i, _ in grads}

    #: traces a prior may take, and how close to where its line meets the limit the last one
    #: must be to stop before that (at 1%, a 2-layer GPT took a fourth trace, 0.3 s, that
    #: moved the crossing by nothing)
    PRIOR_TRACES = 5
    PRIOR_CLOSE = 0.05

    def prior(
        self,
        limit_bytes: int,
        extra_bytes: int = 0,
        deadline: float | None = None,
        cap: int = 2**20,
    ) -> Prior:
        """The trace as a line over batch sizes, in the bytes a probe on the target measures
        (with the allowance, its workspaces and `extra_bytes` — DDP's buckets — as fixed
        memory), from as few traces as the line needs: batch 1, the size that surely fits under
        `limit_bytes` if memory grows at most linearly (1 x (limit / traced - 1)), and only
        when the line meets the limit far beyond that, secant steps toward where it does (memory
        is not quite a line over a wide range) until a trace lands within 5% of it (between traces
        that close memory is a line: one more would only confirm the crossing); never above
        `cap` (the sizes a search may try). Raises OutOfTime past
        `deadline`, TraceError when the model cannot be traced."""
        a = self.allowance
        fixed = a.workspace_bytes + extra_bytes

        def measured(p: EstimatePoint) -> int:
            return a.device_bytes(p.line_bytes) + fixed

        def flat(p: EstimatePoint) -> int:
            return a.device_bytes(p.phase_peaks.get("optimizer", 0)) + fixed

        def trace(b: int, deadline: float | None = None) -> EstimatePoint:
            return self.trace(b, deadline, primed=True)

        first = trace(1, deadline)
        sizes = [1]
        nxt = max(2, min(cap, int(limit_bytes / max(measured(first), 1)) - 1))
        line = Line(float(measured(first)), 0.0)
        while len(sizes) < self.PRIOR_TRACES and nxt not in sizes:
            sizes.append(nxt)
            (b1, b2) = sizes[-2:]  # a secant step: the last two traced sizes
            p1, p2 = measured(trace(b1, deadline)), measured(trace(b2, deadline))
            line = Line(p2 - (p2 - p1) / (b2 - b1) * b2, (p2 - p1) / (b2 - b1))
            crossing = line.crossing(limit_bytes)
            if crossing is None or (len(sizes) == 2 and crossing <= 4 * b2):
                break  # the line meets the limit near the sizes traced: a line is enough there
            if abs(crossing - b2) <= self.PRIOR_CLOSE * crossing:
                break
            nxt = max(2, min(crossing, cap))
        points = tuple((b, measured(trace(b))) for b in sizes)
        last = trace(sizes[-1])
        slope = max((flat(last) - flat(first)) / (sizes[-1] - 1), 0.0)
        return Prior(line, Line(flat(first) - slope, slope), points)


def materialize(model: torch.nn.Module, device: torch.device) -> None:
    """Give a meta model storage on `device` (fake storage under FakeTensorMode), keeping shared
    parameters shared: `Module.to_empty` converts a tied weight (GPT-2's embedding and LM head)
    once per owner, which would count it twice."""
    memo: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in memo:
                memo[id(param)] = torch.nn.Parameter(
                    torch.empty_like(param, device=device), requires_grad=param.requires_grad
                )
            module._parameters[name] = memo[id(param)]  # type: ignore[assignment]
        for name, buf in list(module._buffers.items()):
            if buf is None:
                continue
            if id(buf) not in memo:
                memo[id(buf)] = torch.empty_like(buf, device=device)
            module._buffers[name] = memo[id(buf)]


_OP_RE = re.compile(r"\b(aten[.:]{1,2}[\w.]+|\w+::\w+)")


def _trace_error(exc: Exception) -> TraceError:
    """Name the op that could not be traced, when the exception says which."""
    op = getattr(exc, "func", None)
    name = str(op) if op is not None else None
    if name is None:
        match = _OP_RE.search(str(exc))
        name = match.group(1) if match else None
    return TraceError(f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}", name)


def estimate(
    spec: Spec,
    capacity_bytes: int,
    allowance: Allowance,
    target: str,
    *,
    batch_sizes: tuple[int, ...] = (),
    on_point: Callable[[EstimatePoint], None] | None = None,
    tracer: Tracer | None = None,
) -> EstimateResult:
    """Trace at `batch_sizes` and search (on traces) for the largest batch that fits
    `capacity_bytes` once the allowance is applied. Raises TraceError if the model cannot be
    traced, SpecError/ModelError for bad input."""
    started = time.perf_counter()
    tracer = tracer or Tracer(spec, allowance, steps=spec.probe.steps)
    usable = allowance.usable(capacity_bytes)
    if usable <= 0:
        e = spec.estimate
        key = (
            "estimate.capacity"
            if e.capacity is not None
            else "estimate.context_bytes"
            if e.context_bytes is not None
            else "estimate.gpu"
            if e.gpu is not None
            else "probe.memory_budget"
        )
        fixed = allowance.context_bytes + allowance.workspace_bytes
        raise SpecError(
            [
                Problem(
                    key,
                    f"the capacity ({format_bytes(capacity_bytes)}) is not larger than the "
                    f"fixed allowance ({format_bytes(fixed)}: context and library workspaces)",
                )
            ]
        )
    points: dict[int, EstimatePoint] = {}

    def traced(b: int) -> EstimatePoint:
        if b not in points:
            points[b] = tracer.trace(b)
            if on_point is not None:
                on_point(points[b])
        return points[b]

    for b in batch_sizes:
        traced(b)

    def fits(b: int) -> Observation:
        p = traced(b)
        if p.device_bytes > usable:
            return Observation(Outcome.OOM)
        line = max((p.phase_peaks.get(k, 0) for k in ("forward", "backward")), default=0)
        flat = allowance.device_bytes(p.phase_peaks.get("optimizer", 0))
        return Observation(
            Outcome.FIT,
            p.device_bytes,
            allowance.device_bytes(line) or None,
            flat_bytes=flat or None,
        )

    result = search(
        fits,
        start=spec.probe.start,
        cap=spec.probe.max_batch_size,
        strategy="predict",
        limit_bytes=usable,
    )
    return EstimateResult(
        points=sorted(points.values(), key=lambda p: p.batch_size),
        capacity_bytes=capacity_bytes,
        usable_bytes=usable,
        allowance=allowance,
        target=target,
        search=result,
        seconds=time.perf_counter() - started,
        num_parameters=tracer.workload.num_parameters,
    )
