#!/usr/bin/env python
"""Benchmark: real probes and wall time of each find-max strategy, and the boundary each finds.

    python scripts/bench_search.py            # all cases (a few minutes on 2 CPU cores)
    python scripts/bench_search.py --quick    # two cases
    python scripts/bench_search.py --lightning-only

Part 1 runs every strategy (doubling, predict, estimate) on the CPU backend for several models
and budgets, in this process, and checks that they agree on the exact boundary.

Part 2, when `lightning` is installed, puts batchprobe and PyTorch Lightning's
`Tuner.scale_batch_size(mode="binsearch")` under the same *real* memory limit: each runs in a
child process whose address space is capped (RLIMIT_AS), so the host allocator itself fails
(`DefaultCPUAllocator: can't allocate memory`). Same model, same AdamW, same synthetic data.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CASES = [
    ("zoo:mlp", {}, "256MiB"),
    ("zoo:mlp", {"hidden": 2048}, "1GiB"),
    ("zoo:cnn", {}, "256MiB"),
    ("zoo:gpt", {"n_layer": 2, "n_head": 4, "n_embd": 128, "vocab_size": 2048, "block_size": 64}, "256MiB"),
    ("zoo:gpt", {}, "512MiB"),
    ("transformers:gpt2", {"n_layer": 2, "n_embd": 128, "n_head": 4, "vocab_size": 4096, "n_positions": 128}, "256MiB"),
    ("torchvision:resnet18", {}, "512MiB"),
]  # fmt: skip
INPUTS = {"transformers:gpt2": {"seq_len": 128}, "torchvision:resnet18": {"shape": [3, 64, 64]}}
STRATEGIES = ("doubling", "predict", "estimate")


def part1(cases: list[tuple[str, dict, str]]) -> list[dict]:
    import gc

    from batchprobe.session import open_session
    from batchprobe.sources import quiet_warnings
    from batchprobe.spec import load_spec

    rows = []
    for source, kwargs, budget in cases:
        data = {
            "model": {"source": source, "kwargs": kwargs},
            "probe": {"device": "cpu", "memory_budget": budget},
        }
        if source in INPUTS:
            data["inputs"] = INPUTS[source]
        results = {}
        for strategy in STRATEGIES:
            data["probe"]["strategy"] = strategy
            with quiet_warnings():
                session = open_session(load_spec(text=json.dumps(data)))
            gc.collect()
            gc.freeze()
            started = time.perf_counter()
            result = session.search()
            wall = time.perf_counter() - started
            results[strategy] = (
                result.max_batch_size,
                result.search.exact,
                len(result.probes),
                wall,
            )
            gc.unfreeze()
            del session
        best = {r[0] for r in results.values()}
        label = f"{source} {kwargs or ''} @ {budget}".replace("{}", "").strip()
        rows.append({"case": label, "results": results, "agree": len(best) == 1})
        cells = "  ".join(f"{s}: {n:>2} probes {w:6.1f} s" for s, (_, _, n, w) in results.items())
        print(
            f"{label:<70} max {results['doubling'][0]:>6}  {cells}  {'ok' if len(best) == 1 else 'DISAGREE'}",
            flush=True,
        )
    return rows


# --------------------------------------------------------------------------- part 2

CHILD_COMMON = """
import os, resource, json, time, sys
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(2)
from batchprobe.sources.zoo import MLP
"""

OURS = (
    CHILD_COMMON
    + """
from batchprobe.spec import load_spec
from batchprobe.session import open_session
# No budget in the way: the address-space limit is the only one, unknown to both tools, so the
# search is the plain doubling + bisection (the predictive ones need the limit).
spec = load_spec(text=json.dumps({{"model": {{"source": "zoo:mlp", "kwargs": {kwargs!r}}},
                                   "probe": {{"device": "cpu", "memory_budget": "1TiB",
                                              "strategy": "doubling"}}}}))
session = open_session(spec)
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, ({limit}, hard))
started = time.perf_counter()
result = session.search()
print(json.dumps({{"max": result.max_batch_size, "trials": [p.batch_size for p in result.probes],
                   "outcomes": [p.outcome.value for p in result.probes],
                   "seconds": time.perf_counter() - started}}))
"""
)

LIGHTNING = (
    CHILD_COMMON
    + """
import logging
logging.getLogger("lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
import lightning.pytorch as pl
from lightning.pytorch.tuner import Tuner
from torch.utils.data import DataLoader, Dataset

class Random(Dataset):
    def __init__(self, n): self.n = n
    def __len__(self): return 10**8
    def __getitem__(self, i): return torch.randn(self.n), torch.randint(0, 10, ()).long()

seen = []
class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.batch_size = 2
        self.net = MLP(**{kwargs!r})
    def training_step(self, batch, i):
        x, y = batch
        if not seen or seen[-1] != x.shape[0]:
            seen.append(x.shape[0])
        return torch.nn.functional.cross_entropy(self.net(x), y)
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)
    def train_dataloader(self):
        return DataLoader(Random(self.net.blocks[0][0].in_features), batch_size=self.batch_size)

model = Module()
trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, ({limit}, hard))
started = time.perf_counter()
found = Tuner(trainer).scale_batch_size(
    model, mode="binsearch", init_val=2, max_trials=40, max_val=65536  # our cap; margin: its default
)
print(json.dumps({{"max": found, "trials": seen, "seconds": time.perf_counter() - started}}))
"""
)


def _baseline_vsize() -> int:
    script = CHILD_COMMON.format(root=str(ROOT)) + textwrap.dedent(
        """
        import lightning.pytorch
        from batchprobe.session import open_session
        for line in open('/proc/self/status'):
            if line.startswith('VmSize:'):
                print(int(line.split()[1]) * 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def _child(template: str, kwargs: dict, limit: int) -> dict:
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "PYTHONWARNINGS": "ignore"}
    script = template.format(root=str(ROOT), kwargs=kwargs, limit=limit)
    with tempfile.TemporaryDirectory() as cwd:  # Lightning writes a checkpoint to the cwd
        done = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            env=env,
            timeout=1800,
            cwd=cwd,
        )
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def part2() -> list[dict]:
    try:
        import lightning  # noqa: F401
    except ImportError:
        print("\n(lightning is not installed: pip install lightning, to compare with its finder)")
        return []
    base = _baseline_vsize()
    rows = []
    print(f"\nUnder a real address-space limit (baseline {base / 2**30:.2f} GiB after imports):")
    for kwargs, extra in (
        ({"hidden": 1024, "depth": 3}, 0.5 * 2**30),
        ({"hidden": 4096, "depth": 2}, 1.0 * 2**30),
    ):
        limit = int(base + extra)
        ours = _child(OURS, kwargs, limit)
        theirs = _child(LIGHTNING, kwargs, limit)
        rows.append(
            {"model": f"zoo:mlp {kwargs}", "limit": limit, "batchprobe": ours, "lightning": theirs}
        )
        print(f"  zoo:mlp {kwargs}, limit baseline + {extra / 2**30:.1f} GiB")
        for name, r in (("batchprobe", ours), ("lightning binsearch", theirs)):
            if "error" in r:
                print(f"    {name:<20} failed: {r['error']}")
                continue
            tested = "tested" if r["max"] in r["trials"] else "NEVER TESTED"
            print(
                f"    {name:<20} max {r['max']!s:>6} ({tested})  {len(r['trials']):>2} trials  "
                f"{r['seconds']:6.1f} s  trials: {r['trials']}"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="two cases only")
    parser.add_argument("--lightning-only", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    rows: dict[str, list] = {}
    if not args.lightning_only:
        cases = CASES[:2] if args.quick else CASES
        print("Real probes and wall time per strategy (CPU backend, budget as given):")
        rows["strategies"] = part1(cases)
        totals = {s: sum(r["results"][s][2] for r in rows["strategies"]) for s in STRATEGIES}
        times = {s: sum(r["results"][s][3] for r in rows["strategies"]) for s in STRATEGIES}
        n = len(rows["strategies"])
        print(
            "mean probes: "
            + ", ".join(f"{s} {totals[s] / n:.1f}" for s in STRATEGIES)
            + "; total time: "
            + ", ".join(f"{s} {times[s]:.1f} s" for s in STRATEGIES)
        )
    rows["lightning"] = part2()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
