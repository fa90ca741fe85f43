#!/usr/bin/env python
"""For whoever has a GPU: one command that measures what batchprobe can only estimate elsewhere.

    python scripts/gpu_report.py                       # the shipped configs on GPU 0
    python scripts/gpu_report.py --plan                # also time each config (minutes more)
    python scripts/gpu_report.py configs/resnet50.yaml --out my-report
    torchrun --nproc-per-node 8 scripts/gpu_report.py  # a node (rank 0 writes the report)

For each config, in a fresh process: `estimate` on this device (the fake-tensor trace with the
GPU allowance), `find-max` (the measured boundary, with every probe's allocated and reserved
peak, and what stayed allocated after failures), and with `--plan` the timed plan. The report
(`<out>/report.json` with everything, `<out>/report.md` with the table) sets the estimate beside
the measurement at the measured max: traced bytes, traced bytes with the allowance, allocated
and reserved peaks, their ratios. That is what tunes the allowance (fragmentation, context,
workspaces) for a GPU, driver and torch version. Send both files (they hold no model data,
only sizes, times and the device's name) with an issue.

Without a GPU it runs on the simulated one (BATCHPROBE_SIMULATE_CUDA=1): the tests do, to keep
this script working.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEFAULT_CONFIGS = ["quickstart", "resnet50", "gpt2-small", "bert-base", "vit-b16"]


def measure(config: str, with_plan: bool, overrides: list[str]) -> dict[str, Any]:
    """In this process: estimate, find-max (and plan) for one config on the device."""
    from batchprobe.estimate import Tracer
    from batchprobe.flows import estimate, find_max, plan
    from batchprobe.report.json import estimate_json, find_max_json, plan_json
    from batchprobe.session import open_session
    from batchprobe.spec import load_spec

    spec = load_spec(config, ["probe.device=cuda", *overrides])
    out: dict[str, Any] = {"config": config}
    est = estimate.run(spec)
    out["estimate"] = estimate_json(est, spec.model.source)
    session = open_session(spec)
    result = find_max.run(session)
    out["find_max"] = find_max_json(result, spec.model.source)
    best = result.probe_at(result.max_batch_size)
    if best is not None and est.result is not None:
        traced = Tracer(spec, est.allowance).trace(best.batch_size)
        out["comparison"] = {
            "batch_size": best.batch_size,
            "traced_bytes": traced.peak_bytes,
            "traced_with_allowance_bytes": traced.device_bytes,
            # what the estimate expects the allocator to hold: the traced peak with its
            # allowance, and the library workspaces it sets aside from the capacity
            "estimated_allocator_bytes": traced.device_bytes + est.allowance.workspace_bytes,
            "allocated_peak_bytes": best.peak_bytes,
            "reserved_peak_bytes": best.reserved_bytes,
            "allocated_over_traced": _ratio(best.peak_bytes, traced.peak_bytes),
            "reserved_over_allocated": _ratio(best.reserved_bytes, best.peak_bytes),
            # > 1: the estimate was optimistic by that much (this is what tunes the allowance)
            "reserved_over_estimated": _ratio(
                best.reserved_bytes, traced.device_bytes + est.allowance.workspace_bytes
            ),
            "breakdown": traced.breakdown.as_dict(),
        }
    out["left_after_failures_bytes"] = [
        p.retained_bytes for p in result.probes if p.failure is not None
    ]
    if with_plan and result.max_batch_size is not None:
        out["plan"] = plan_json(plan.run(session), spec.model.source)
    return out


def _ratio(a: int | None, b: int | None) -> float | None:
    return round(a / b, 4) if a and b else None


def _gib(n: int | None) -> str:
    return f"{n / 1024**3:.2f}" if n is not None else "-"


def markdown(env: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    devices = env.get("cuda_devices") or [{}]
    lines = [
        f"## batchprobe GPU report: {devices[0].get('name', '?')}",
        "",
        f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}, cuDNN {env.get('cudnn')}), "
        f"{len(devices)} device(s), total {_gib(devices[0].get('total_bytes'))} GiB",
        "",
        "| config | estimated max | measured max | traced GiB | estimated GiB | allocated GiB | "
        "reserved GiB | allocated/traced | reserved/estimated | left after failures |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | error: {r['error'][:80]} |||||||||")
            continue
        c = r.get("comparison", {})
        left = r.get("left_after_failures_bytes") or []
        lines.append(
            f"| {Path(r['config']).stem} | {r['estimate'].get('max_batch_size')} | "
            f"{r['find_max'].get('max_batch_size')} | {_gib(c.get('traced_bytes'))} | "
            f"{_gib(c.get('estimated_allocator_bytes'))} | "
            f"{_gib(c.get('allocated_peak_bytes'))} | {_gib(c.get('reserved_peak_bytes'))} | "
            f"{c.get('allocated_over_traced', '-')} | {c.get('reserved_over_estimated', '-')} | "
            f"{max(left) if left else 0} B |"
        )
    timed = [r for r in rows if r.get("plan")]
    if timed:
        lines += ["", "| config | micro | fwd+bwd s | optimizer s | samples/s | MFU |",
                  "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in timed:
            for row in r["plan"]["rows"]:
                mfu = f"{100 * row['mfu']:.1f}%" if row.get("mfu") is not None else "-"
                lines.append(
                    f"| {Path(r['config']).stem} | {row['micro_batch_size']} | "
                    f"{row['fwd_bwd_time_s']:.4g} | {row['optimizer_time_s']:.4g} | "
                    f"{row['samples_per_s']:.4g} | {mfu} |"
                )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*", help="spec files (default: the shipped configs)")
    parser.add_argument("--out", default="gpu-report", help="directory for report.json/.md")
    parser.add_argument("--plan", action="store_true", help="also time each config")
    parser.add_argument("--set", action="append", default=[], help="spec override for every config")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one config here
    args = parser.parse_args()
    if args.one:
        try:
            print(json.dumps(measure(args.one, args.plan, args.set)))
        except Exception as exc:  # a config that cannot run here is a row, not the end
            print(json.dumps({"config": args.one, "error": f"{type(exc).__name__}: {exc}"}))
        return 0
    configs = args.configs or [str(ROOT / "configs" / f"{c}.yaml") for c in DEFAULT_CONFIGS]
    env_text = subprocess.run(
        [sys.executable, "-m", "batchprobe", "env", "--json"], capture_output=True, text=True
    ).stdout
    env = json.loads(env_text) if env_text.strip() else {}
    rows = []
    for config in configs:
        print(f"measuring {config} ...", file=sys.stderr, flush=True)
        command = [sys.executable, __file__, "--one", config, *(["--plan"] if args.plan else [])]
        for override in args.set:
            command += ["--set", override]
        done = subprocess.run(command, capture_output=True, text=True)
        last = done.stdout.strip().splitlines()[-1:] or ['{"error": "no output"}']
        row = json.loads(last[0])
        row.setdefault("config", config)
        if done.returncode != 0:
            row["error"] = row.get("error") or done.stderr.strip().splitlines()[-1]
        rows.append(row)
    if os.environ.get("RANK", "0") != "0":
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({"env": env, "configs": rows}, indent=2) + "\n")
    (out / "report.md").write_text(markdown(env, rows))
    print(f"wrote {out / 'report.json'} and {out / 'report.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
