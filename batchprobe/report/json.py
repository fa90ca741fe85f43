"""The JSON contract of every command: result -> plain dict. Keys are only ever added.

The keys every consumer may rely on (sizes in bytes, times in seconds):
- find-max: command, device, device_name, capacity_bytes, budget_bytes, max_batch_size, capped,
  probes [{batch_size, outcome, peak_bytes, seconds}], seconds;
- plan: command, max_batch_size, world_size, target_global_batch_size, rows [{micro_batch_size,
  grad_accum_steps, global_batch_size, peak_bytes, fwd_bwd_time_s, optimizer_time_s, step_time_s,
  update_time_s, samples_per_s, tokens_per_s, mfu, lr, warmup_steps, projected_seconds}],
  recommended {micro_batch_size, ...}, warnings;
- estimate: command, capacity_bytes, max_batch_size, points [{batch_size, peak_bytes,
  breakdown {parameters, gradients, optimizer_state, activations, other}}];
- find-max, plan and estimate add peak_breakdown {batch_size, peak_bytes, source, reading,
  by_module [{module, bytes, by_kind}], top_tensors [{bytes, shape, dtype, op, module, kind}]}
  at the max (plan: the recommended micro-batch), or null;
- estimate and plan add what_if [{change, max_batch_size, peak_bytes, changes_numerics,
  effect, error}] with estimate.what_if (--what-if), else null; estimate adds sweep {axis:
  seq_len, points [{seq_len, max_batch_size, tokens_per_micro_batch, peak_bytes, error}]} with
  --sweep, else null;
- every command that opens a device adds training_environment: environment variables a training
  run needs for the figures to hold ({} but for the CPU under an rlimit, where every step ran
  with glibc's mmap threshold fixed and one malloc arena: MALLOC_MMAP_THRESHOLD_,
  MALLOC_ARENA_MAX, MKL_DISABLE_FAST_MM), and capacity_source: what set the capacity (the
  binding limit), or null (estimate: when it opened the device, to verify or to probe);
- find-max adds axis (batch_size | seq_len); along seq_len also max_seq_len, batch_size (the
  micro-batch held), and each probe's seq_len (its batch_size is the one held);
- check: command, passed, checks [{name, expected, measured, passed}];
- noise-scale: command, b_simple, b_simple_stderr, steps.
Under torchrun every command adds "world_size".
"""

from __future__ import annotations

import json
import math
from typing import Any

from batchprobe.results import (
    CheckRun,
    DeviceInfo,
    EstimateRun,
    FindMaxResult,
    NoiseRun,
    PeakBreakdown,
    PlanRun,
    WhatIf,
)
from batchprobe.search import Outcome

#: what estimate says of the device when it opened it (its own capacity_bytes is the target's)
DEVICE_SAID = ("training_environment", "capacity_source")
#: tensors listed in `peak_breakdown.top_tensors` unless `--top` says
DEFAULT_TOP = 8


def device_dict(info: DeviceInfo) -> dict[str, Any]:
    return {
        "device": info.device,
        "device_name": info.name,
        "capacity_bytes": info.capacity_bytes,
        # what set the capacity: the limit that binds (the CPU: the RAM available, a cgroup's
        # limit, an rlimit), as the summary names it; null where the device does not say
        "capacity_source": info.details.get("capacity"),
        "torch_version": info.torch_version,
        # what a training run's environment must say for the figures to hold (the allocator
        # setting every step ran with under an rlimit on the CPU); {} almost everywhere
        "training_environment": dict(info.details.get("training_environment") or {}),
    }


def breakdown_json(explained: PeakBreakdown | None, top: int) -> dict[str, object] | None:
    """`peak_breakdown`: by_module (every module; the sums are the peak), the `top` largest
    tensors, the reading, and whether the peak was measured or traced."""
    return None if explained is None else explained.to_dict(top)


def find_max_json(result: FindMaxResult, source: str, top: int = DEFAULT_TOP) -> dict[str, Any]:
    """The find-max contract, plus a few added keys."""
    error = result.error
    out: dict[str, Any] = {
        "command": "find-max",
        **device_dict(result.device),
        "budget_bytes": result.budget_bytes,
        "limit_bytes": result.limit_bytes,
        "max_batch_size": result.max_batch_size,
        "capped": result.search.capped,
        "exact": result.search.exact,
        "stopped": result.search.stopped,
        "peak_bytes": result.peak_bytes,
        "probes": [p.to_dict() for p in result.probes],
        "seconds": round(result.seconds, 4),
        "strategy": result.strategy,
        "estimated_max_batch_size": result.guess,
        "trace_check": result.trace_check.to_dict() if result.trace_check else None,
        "trace_seconds": round(result.trace_seconds, 4),
        "model": source,
        "provenance": "measured",
        "interrupted": result.interrupted,
        "warnings": list(result.warnings),
        "peak_breakdown": breakdown_json(result.explained, top),
    }
    if result.world_size > 1:
        out["world_size"] = result.world_size
    if error is not None and error.failure is not None:
        out["error"] = {
            "batch_size": error.batch_size,
            "type": error.failure.error_type,
            "message": error.failure.message,
            "traceback": error.failure.traceback,
        }
    out["axis"] = result.axis
    return _along_seq_len(out, result) if result.axis == "seq_len" else out


def _along_seq_len(out: dict[str, Any], result: FindMaxResult) -> dict[str, Any]:
    """The sizes were sequence lengths at one micro-batch: `max_seq_len` is the answer,
    `max_batch_size` that micro-batch (it trains at max_seq_len; null when nothing fits), and
    every probe, the explanation and the error say their `seq_len` beside it."""
    held = result.held_batch_size
    found = result.max_batch_size
    out.update(
        max_seq_len=found,
        batch_size=held,
        max_batch_size=held if found is not None else None,
        probes=[{**p, "seq_len": p["batch_size"], "batch_size": held} for p in out["probes"]],
    )
    if out.get("peak_breakdown"):
        out["peak_breakdown"] = {**out["peak_breakdown"], "seq_len": found, "batch_size": held}
    if "error" in out:
        out["error"] = {**out["error"], "seq_len": out["error"]["batch_size"], "batch_size": held}
    return out


def _what_if(rows: list[WhatIf] | None) -> list[dict[str, object]] | None:
    """`what_if`: the spec's own row ("change": "(as specified)") and one per change, largest
    max first; null when not asked for (estimate.what_if)."""
    return None if rows is None else [r.to_dict() for r in rows]


def to_json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, default=str) + "\n"


PLAN_COLUMNS = (
    "micro_batch_size", "grad_accum_steps", "global_batch_size", "peak_bytes", "peak_fraction",
    "fwd_bwd_time_s", "optimizer_time_s", "fwd_bwd_nosync_time_s", "step_time_s", "update_time_s",
    "samples_per_s",
    "tokens_per_s", "mfu", "lr", "warmup", "warmup_steps", "optimizer_steps", "projected_seconds",
    "within_headroom", "divides_exactly", "timing_spread", "timing_stable", "cpu_wait", "eligible",
    "excluded_because",
)  # fmt: skip


def plan_json(run: PlanRun, source: str, top: int = DEFAULT_TOP) -> dict[str, Any]:
    """The plan contract, plus the find-max part and provenance."""
    fm = run.find_max
    plan = run.plan
    settings = plan.settings if plan else None
    rows = [r.to_dict() for r in plan.rows] if plan else []
    recommended = plan.recommended.to_dict() if plan and plan.recommended else None
    return {
        "command": "plan",
        **device_dict(fm.device),
        "model": source,
        "max_batch_size": fm.max_batch_size,
        "world_size": settings.world_size if settings else None,
        "target_global_batch_size": settings.target_global_batch if settings else None,
        "tokens_per_sample": settings.tokens_per_sample if settings else None,
        "budget_bytes": fm.budget_bytes,
        "limit_bytes": fm.limit_bytes,
        "headroom": settings.headroom if settings else None,
        "headroom_batch_size": run.headroom_batch_size,
        "lr_scaling": settings.lr_rule if settings else None,
        "peak_flops": settings.peak_flops if settings else None,
        "threads": fm.device.details.get("threads"),
        "rows": rows,
        "recommended": recommended,
        "recommendation_reason": plan.reason if plan else None,
        "warnings": [*fm.warnings, *run.warnings, *(plan.warnings if plan else ())],
        "interrupted": run.interrupted,
        "noise_scale": noise_json(run.noise, source) if run.noise is not None else None,
        "peak_breakdown": breakdown_json(run.explained, top),
        "what_if": _what_if(run.what_if),
        "find_max": find_max_json(fm, source, top),
        "provenance": {
            "peak_bytes": "measured (full training steps)",
            "fwd_bwd_time_s": (
                "measured: first quartile of timed steps after warm-up, the candidates "
                "interleaved in rounds"
            ),
            "optimizer_time_s": "measured",
            "samples_per_s": "derived from measured step times",
            "projected_seconds": "estimated: optimizer steps x measured update time",
            "mfu": "estimated: counted FLOPs / (measured time x datasheet peak)",
            "lr": "rule of thumb (linear: Goyal et al. 2017; sqrt: Malladi et al. 2022)",
        },
    }


def estimate_json(run: EstimateRun, source: str, top: int = DEFAULT_TOP) -> dict[str, Any]:
    """The estimate contract, plus the target, the allowance and provenance."""
    result = run.result
    a = run.allowance
    out: dict[str, Any] = {
        "command": "estimate",
        "model": source,
        "target": run.target,
        "capacity_bytes": run.capacity_bytes,
        "allowance": {
            "fragmentation": a.fragmentation,
            "context_bytes": a.context_bytes,
            "workspace_bytes": a.workspace_bytes,
            "round_to_bytes": a.round_to,
            "flash_attention": a.flash_attention,
            "optimizer": "foreach" if a.foreach else "single-tensor",
        },
    }
    if result is not None:
        out.update(
            {
                "max_batch_size": result.max_batch_size,
                "exact": result.search.exact,
                "capped": result.search.capped,
                "usable_bytes": result.usable_bytes,
                "num_parameters": result.num_parameters,
                "points": [p.to_dict() for p in result.points],
                "seconds": round(result.seconds, 3),
                "provenance": "estimated: fake-tensor trace of full training steps",
                "peak_breakdown": breakdown_json(run.explained, top),
                "what_if": _what_if(run.what_if),
                "sweep": (
                    None
                    if run.sweep is None
                    else {"axis": "seq_len", "points": [p.to_dict() for p in run.sweep]}
                ),
            }
        )
        if run.device is not None:  # the device was opened (the verifying probe)
            out["training_environment"] = dict(run.device.details.get("training_environment") or {})
            out["capacity_source"] = run.device.details.get("capacity")
        if run.verified is not None:
            out["trace_check"] = run.verified.to_dict()
        if run.verify_probe is not None:
            out["verify_probe"] = run.verify_probe.to_dict()
    else:
        err = run.trace_error
        fm = run.fallback
        out.update(
            {
                "max_batch_size": fm.max_batch_size if fm else None,
                "points": [
                    {"batch_size": p.batch_size, "peak_bytes": p.peak_bytes, "breakdown": None}
                    for p in (fm.probes if fm else [])
                    if p.outcome is Outcome.FIT
                ],
                "trace_error": {"op": err.op if err else None, "message": str(err)},
                "provenance": "measured: real probes (the model could not be traced)",
                "find_max": find_max_json(fm, source, top) if fm else None,
                **(
                    {k: v for k, v in device_dict(fm.device).items() if k in DEVICE_SAID}
                    if fm
                    else {}
                ),
                "peak_breakdown": breakdown_json(run.explained, top),
            }
        )
    return out


def check_json(run: CheckRun, source: str) -> dict[str, Any]:
    """The check contract, plus device, provenance and the baseline written."""
    out = {
        "command": "check",
        "passed": run.passed,
        "checks": [o.to_dict() for o in run.outcomes],
        **device_dict(run.device),
        "model": source,
        "seconds": round(run.seconds, 3),
        "interrupted": run.interrupted,
    }
    if run.baseline is not None:
        out["baseline"] = run.baseline
    return out


def noise_json(run: NoiseRun, source: str) -> dict[str, Any]:
    """The noise-scale contract, plus the parts of the estimate."""
    stats = run.stats
    b = stats.b_simple()
    err = stats.stderr()
    finite = math.isfinite(b) and b > 0
    return {
        "command": "noise-scale",
        **device_dict(run.device),
        "model": source,
        "b_simple": b if finite else None,
        "b_simple_stderr": err if finite and math.isfinite(err) else None,
        "steps": stats.steps,
        "g2": stats.g2() if stats.steps else None,
        "trace_sigma": stats.trace_sigma() if stats.steps else None,
        "small_batch_size": stats.small_batch_size,
        "big_batch_size": stats.big_batch_size,
        "stopped": stats.stopped,
        "seconds": round(run.seconds, 3),
        "provenance": "measured: two-batch estimator (McCandlish et al. 2018, App. A), bootstrap stderr",
    }
