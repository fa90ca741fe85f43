"""Probes in child processes: what a real GPU does near its limit becomes an outcome, not a crash.

Each probe runs in a fresh process (forked from a forkserver that has imported torch once, so a
probe costs a model build, not an interpreter start; the forkserver never touches CUDA, so every
child gets a clean context). The parent waits with a timeout and turns what happens into a
ProbeResult:

- the child reports a result: that result (OOM, fit, ...);
- the child is killed by a signal — SIGKILL is what the Linux OOM killer sends: `oom`, kind `killed`;
- no result within the timeout (a hang, swap thrash): the child is killed; `limit`, kind `timeout`
  (the search stops growing there and carries on below);
- a sticky device error (illegal memory access, device-side assert) in the child: `limit`, kind
  `sticky` — the process that saw it is gone, the search carries on below;
- any other exit: `error`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import multiprocessing.connection
import signal
import sys
import time
import types
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from batchprobe.backends.base import Backend, DeviceView
from batchprobe.errors import DeviceError
from batchprobe.probe import classify
from batchprobe.results import Failure, ProbeResult
from batchprobe.search import Outcome
from batchprobe.spec import Spec
from batchprobe.units import MemorySize

_PRELOAD = ["torch", "batchprobe.session"]


def _child(conn: multiprocessing.connection.Connection, request: dict[str, Any]) -> None:
    """Runs in the child: open the device; describe it, or build the model and run one probe
    (after the warm-up every process does); send the answer back."""
    try:
        from batchprobe.backends import get_backend
        from batchprobe.probe import run_probe, warm_up
        from batchprobe.sources import build_workload, quiet_warnings
        from batchprobe.spec import load_spec
        from batchprobe.step import TrainStep
        from batchprobe.units import MemorySize

        spec = replace(load_spec(text=json.dumps(request["spec"])), origin=request["origin"])
        backend = get_backend(spec.probe.device)
        budget = request["budget"]
        backend.set_budget(MemorySize(**budget) if budget else None)
        if request.get("describe"):
            conn.send({"description": _describe(backend, spec)})
            return
        backend.configure(spec.train)
        with quiet_warnings():
            workload = build_workload(spec, backend.device)
        step = TrainStep(
            workload, spec.train, backend.device, optimizer_defaults=backend.optimizer_defaults()
        )
        size = request["batch_size"]
        warm_up(lambda b: run_probe(step, backend, b, 1), backend)
        result = run_probe(step, backend, size, spec.probe.steps)
        conn.send(result.to_record())
    except BaseException as exc:  # a failure to build is an outcome too
        failure = classify(exc)
        conn.send({"build_failure": failure.to_dict()})
    finally:
        conn.close()


def _describe(backend: Backend, spec: Spec) -> dict[str, Any]:
    label, capacity, allowance = backend.estimate_target(spec.estimate)
    return {
        "info": dataclasses.asdict(backend.info()),
        "capacity_bytes": backend.capacity_bytes,
        "budget_bytes": backend.budget_bytes,
        "budget_is_default": backend.budget_is_default,
        "free_bytes_at_start": backend.free_bytes_at_start,
        "collective_backend": backend.collective_backend,
        "estimate_target": [label, capacity, dataclasses.asdict(allowance)],
        "peak_flops": {
            f"{p}/{m}": backend.peak_flops(p, m)
            for p in ("fp32", "bf16", "fp16")
            for m in ("matmul", "conv")
        },
        "optimizer_defaults": backend.optimizer_defaults(),
        "training_environment": backend.training_environment(),
    }


@contextlib.contextmanager
def _main_not_reimported() -> Iterator[None]:
    """multiprocessing re-imports the parent's __main__ in every child started by a forkserver:
    an unguarded user script would run again, a REPL's '<stdin>' cannot be found. The child needs
    nothing from __main__ (its target and request live in this module), so hide it while the
    child (and, the first time, the forkserver) starts."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


class IsolatedProber:
    """`prober(b) -> ProbeResult`, each call in a fresh child process. The parent holds none of
    the device's memory: `describe()` asks a child what the device looks like."""

    def __init__(self, spec: Spec, budget: MemorySize | None, timeout_s: float) -> None:
        self.request = {
            "spec": spec.to_dict(),
            "origin": spec.origin,
            "budget": dataclasses.asdict(budget) if budget is not None else None,
        }
        self.timeout_s = timeout_s
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(_PRELOAD)

    def __call__(self, batch_size: int) -> ProbeResult:
        data, exitcode, seconds = self._ask({"batch_size": batch_size})
        return _result(batch_size, data, exitcode, seconds, self.timeout_s)

    def describe(self) -> DeviceView:
        """The device as a fresh process sees it (its capacity, free memory, budget)."""
        data, exitcode, _ = self._ask({"describe": True})
        if not isinstance(data, dict) or "description" not in data:
            failure = data.get("build_failure") if isinstance(data, dict) else None
            why = failure["message"] if failure else f"exit code {exitcode}"
            raise DeviceError(f"the device could not be opened in a child process: {why}")
        return DeviceView.from_description(data["description"])

    def _ask(self, extra: dict[str, Any]) -> tuple[Any, int | None, float]:
        recv, send = self.ctx.Pipe(duplex=False)
        child = self.ctx.Process(target=_child, args=(send, {**self.request, **extra}), daemon=True)
        started = time.perf_counter()
        with _main_not_reimported():
            child.start()
        send.close()
        data = None
        try:
            if recv.poll(self.timeout_s):
                try:
                    data = recv.recv()
                except EOFError:  # the child died without a word
                    data = None
            else:
                data = "timeout"
        finally:
            recv.close()
            # a child that answered exits at once; one that timed out is killed now
            child.join(timeout=5 if isinstance(data, dict) else 0.1)
            if child.is_alive():
                child.kill()
                child.join()
        return data, child.exitcode, time.perf_counter() - started


def _result(
    batch_size: int, data: Any, exitcode: int | None, seconds: float, timeout_s: float
) -> ProbeResult:
    if isinstance(data, dict):
        if "build_failure" in data:
            failure = Failure.from_dict(data["build_failure"])
            result = ProbeResult(batch_size, failure.outcome, None, seconds, failure=failure)
        else:
            result = ProbeResult.from_record(data)
        if result.failure is not None and result.failure.sticky:
            # the process that saw it is gone: a size this large is off limits, smaller ones are not
            result = replace(result, outcome=Outcome.LIMIT)
        return replace(result, isolated=True, seconds=seconds)
    if data == "timeout":
        failure = Failure(
            Outcome.LIMIT,
            "timeout",
            "Timeout",
            f"no result within {timeout_s:g} s (probe.timeout_s): the child was killed",
        )
        return ProbeResult(batch_size, Outcome.LIMIT, None, seconds, failure=failure, isolated=True)
    if exitcode is not None and exitcode < 0:
        name = (
            signal.Signals(-exitcode).name
            if -exitcode in signal.valid_signals()
            else str(-exitcode)
        )
        if -exitcode == signal.SIGKILL:
            failure = Failure(
                Outcome.OOM,
                "killed",
                name,
                "the child was killed by SIGKILL — most likely the operating system's OOM killer",
            )
        else:
            failure = Failure(Outcome.ERROR, "crash", name, f"the child died of {name}")
        return ProbeResult(
            batch_size, failure.outcome, None, seconds, failure=failure, isolated=True
        )
    failure = Failure(
        Outcome.ERROR, "crash", "ChildExit", f"the child exited with code {exitcode} and no result"
    )
    return ProbeResult(batch_size, Outcome.ERROR, None, seconds, failure=failure, isolated=True)
