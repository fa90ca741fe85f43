#!/usr/bin/env python
"""Benchmark: real probes and wall time of each find-max strategy, and the boundary each finds.

    python scripts/bench_search.py            # all cases (a few minutes on 2 CPU cores)
    python scripts/bench_search.py --quick    # two cases under the address-space limit
    python scripts/bench_search.py --lightning-only

Part 1 runs every strategy (doubling, predict, estimate) on the CPU backend for several models
and budgets, in this process, and checks that they agree on the exact boundary. Then adversarial
cases on one model: the fake-tensor trace's per-sample bytes off by x0.25, x0.5, x2, x8 (the error
injected into the prior), and a limit that falls to 60% after the first probe (another process
taking memory the search was not told about). An LSTM is among the models: on the CPU its
oneDNN kernel's workspace is invisible to the trace, which is ~6x under. Figures: real probes
(the warm-up step at batch 1 not counted) and wall-clock seconds of the search, tracing included.

Part 2 puts batchprobe (default strategy and doubling, no budget given) and, when `lightning` is
installed, PyTorch Lightning's `Tuner.scale_batch_size(mode="binsearch")` under the same *real*
memory limit: each runs in a child process whose address space is capped (RLIMIT_AS, as
`prlimit --as` does), so the host allocator itself fails (`DefaultCPUAllocator: can't allocate
memory`). batchprobe reads the limit; Lightning does not need to. Same model, same AdamW, same
synthetic data. Then each answer is put to use: a new process under the same limit trains at it
for 4 steps — with the environment the tool says its answer needs (batchprobe's
`training_environment`), and with glibc's defaults.
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
    ("zoo:cnn", {}, "256MiB"),
    ("zoo:gpt", {"n_layer": 2, "n_head": 4, "n_embd": 128, "vocab_size": 2048, "block_size": 64}, "256MiB"),
    ("transformers:gpt2", {"n_layer": 2, "n_embd": 128, "n_head": 4, "vocab_size": 4096, "n_positions": 128}, "256MiB"),
    ("torchvision:resnet18", {}, "512MiB"),
    ("zoo:lstm", {}, "300MiB"),
]  # fmt: skip
INPUTS = {"transformers:gpt2": {"seq_len": 128}, "torchvision:resnet18": {"shape": [3, 64, 64]}}
STRATEGIES = ("doubling", "predict", "estimate")
#: the adversarial cases run on this model: a prior off by a factor, a limit that shrinks
ADVERSARY = CASES[2]
PRIOR_ERRORS = (0.25, 0.5, 2.0, 8.0)
SHRINK = 0.6  # after the first probe, the real limit falls to this share of the one told


class _Shrink:
    """Another process takes memory after the first probe: the budget the probes run under
    falls, while the search was told the original limit."""

    def __init__(self, session) -> None:
        self.session, self.done = session, False

    def probe_started(self, batch_size: int) -> None:
        pass

    def probe_done(self, result) -> None:
        if not self.done:
            self.done = True
            backend = self.session.backend
            backend.budget_bytes = int(backend.budget_bytes * SHRINK)


def _run(source, kwargs, budget, strategy, prior_error=None, shrink=False):
    import gc

    from batchprobe.search import Line, Prior
    from batchprobe.session import Session, open_session
    from batchprobe.sources import quiet_warnings
    from batchprobe.spec import load_spec

    data = {
        "model": {"source": source, "kwargs": kwargs},
        "probe": {"device": "cpu", "memory_budget": budget, "strategy": strategy},
    }
    if source in INPUTS:
        data["inputs"] = INPUTS[source]
    with quiet_warnings():
        session = open_session(load_spec(text=json.dumps(data)))
    gc.collect()
    gc.freeze()
    if prior_error is not None:  # the trace's per-sample bytes, times the error
        real = Session.prior

        def wrong(self, limit):
            prior, why = real(self, limit)
            if prior is None:
                return prior, why
            line = Line(prior.line.fixed, prior.line.per_sample * prior_error)
            points = tuple((b, int(line.at(b))) for b, _ in prior.points)
            return Prior(line, prior.flat, points), why

        session.prior = wrong.__get__(session)
    started = time.perf_counter()
    result = session.search(progress=_Shrink(session) if shrink else None)
    wall = time.perf_counter() - started
    ran = [p.batch_size for p in result.probes if not p.reused]
    gc.unfreeze()
    return {
        "max": result.max_batch_size,
        "exact": result.search.exact,
        "probes": len(ran),
        "sizes": ran,
        "seconds": wall,
        "trace_seconds": result.trace_seconds,
        "trace_check": result.trace_check.describe() if result.trace_check else None,
    }


def _row(label: str, results: dict) -> dict:
    best = {r["max"] for r in results.values()}
    cells = "  ".join(
        f"{s}: {r['probes']:>2} probes {r['seconds']:6.1f} s" for s, r in results.items()
    )
    mx = next(iter(results.values()))["max"]
    ok = "ok" if len(best) == 1 and all(r["exact"] for r in results.values()) else "DISAGREE"
    print(f"{label:<64} max {mx!s:>5}  {cells}  {ok}", flush=True)
    return {"case": label, "results": results, "agree": ok == "ok"}


def part1(cases: list[tuple[str, dict, str]], adversarial: bool = True) -> list[dict]:
    rows = []
    for source, kwargs, budget in cases:
        label = f"{source} {kwargs or ''} @ {budget}".replace("{}", "").strip()
        results = {s: _run(source, kwargs, budget, s) for s in STRATEGIES}
        rows.append(_row(label, results))
        if (source, kwargs, budget) == ADVERSARY and adversarial:
            base = results
    if not adversarial:
        return rows
    source, kwargs, budget = ADVERSARY
    short = f"{source} (2 layers) @ {budget}"
    for error in PRIOR_ERRORS:
        # only the estimate strategy reads the prior: the others are the base case's
        wrong = {**base, "estimate": _run(source, kwargs, budget, "estimate", prior_error=error)}
        rows.append(_row(f"{short}, trace x{error} per sample", wrong))
    shrunk = {s: _run(source, kwargs, budget, s, shrink=True) for s in STRATEGIES}
    rows.append(_row(f"{short}, limit falls to {SHRINK:.0%} after probe 1", shrunk))
    return rows


# --------------------------------------------------------------------------- part 2

CHILD_COMMON = """
import os, resource, json, time, sys
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(2)
from batchprobe.sources import zoo
MODEL = {model!r}  # (zoo name, kwargs, input kind, per-sample shape or seq_len, vocab or None)
"""

OURS = (
    CHILD_COMMON
    + """
from batchprobe.spec import load_spec
from batchprobe.session import open_session
# No budget: the address-space limit is the only one, set before batchprobe looks at the host,
# so it reads it (RLIMIT_AS less the address space in use) as the capacity.
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, ({limit}, hard))
started = time.perf_counter()
spec = load_spec(text=json.dumps({{"model": {{"source": "zoo:" + MODEL[0], "kwargs": MODEL[1]}},
                                   "probe": {{"device": "cpu", "strategy": {strategy!r}}}}}))
session = open_session(spec)
result = session.search()
seconds = time.perf_counter() - started
ran = [p for p in result.probes if not p.reused]
print(json.dumps({{"max": result.max_batch_size, "trials": [p.batch_size for p in ran],
                   "outcomes": [p.outcome.value for p in ran],
                   "capacity": session.backend.info().details["capacity"],
                   "environment": session.backend.training_environment(),
                   "trace_seconds": result.trace_seconds, "seconds": seconds}}))
"""
)

BATCH = """
def batch(n):
    name, kwargs, kind, shape, vocab = MODEL
    if kind == "tokens":
        return torch.randint(0, vocab, (n, shape)), torch.randint(0, 10, (n,))
    return torch.randn(n, *shape), torch.randint(0, 10, (n,))
"""

LIGHTNING = (
    CHILD_COMMON
    + BATCH
    + """
import logging
logging.getLogger("lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
import lightning.pytorch as pl
from lightning.pytorch.tuner import Tuner
from torch.utils.data import DataLoader, Dataset

class Random(Dataset):
    def __len__(self): return 10**8
    def __getitem__(self, i):
        x, y = batch(1)
        return x[0], y[0]

seen = []
class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.batch_size = 2
        self.net = zoo.ZOO[MODEL[0]].factory(**MODEL[1])
    def training_step(self, batch, i):
        x, y = batch
        if not seen or seen[-1] != x.shape[0]:
            seen.append(x.shape[0])
        return torch.nn.functional.cross_entropy(self.net(x), y)
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)
    def train_dataloader(self):
        return DataLoader(Random(), batch_size=self.batch_size)

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

#: what the answers are for: a plain training loop in a new process under the same limit, at
#: one batch size, for several steps (the first steps of a training run)
TRAIN = (
    CHILD_COMMON
    + BATCH
    + """
torch.manual_seed(0)
net = zoo.ZOO[MODEL[0]].factory(**MODEL[1])
opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
x, y = batch({size})
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, ({limit}, hard))
try:
    for _ in range(4):
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    print(json.dumps("trains"))
except RuntimeError as exc:
    print(json.dumps("oom" if "can't allocate memory" in str(exc) else str(exc)[:200]))
"""
)


def _baseline_vsize(model: tuple, lightning: bool) -> int:
    """The address space of a child after its imports (the limit is set above it)."""
    script = CHILD_COMMON.format(root=str(ROOT), model=model) + textwrap.dedent(
        f"""
        {"import lightning.pytorch" if lightning else ""}
        from batchprobe.session import open_session
        for line in open('/proc/self/status'):
            if line.startswith('VmSize:'):
                print(int(line.split()[1]) * 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def _child(template: str, model: tuple, limit: int, env: dict | None = None, **fields) -> dict:
    """Run `template` in a child under the address-space limit. MKL's buffer cache is off in
    batchprobe's (as its CLI sets it before torch loads, under such a limit) and as `env` says
    (a training environment); the others run as they would."""
    base = {k: v for k, v in os.environ.items() if k not in ("MKL_DISABLE_FAST_MM",)}
    base |= {"MALLOC_ARENA_MAX": "2", "PYTHONWARNINGS": "ignore"}
    if template is OURS:
        base["MKL_DISABLE_FAST_MM"] = "1"
    script = template.format(root=str(ROOT), model=model, limit=limit, **fields)
    with tempfile.TemporaryDirectory() as cwd:  # Lightning writes a checkpoint to the cwd
        done = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            env={**base, **(env or {})},
            timeout=1800,
            cwd=cwd,
        )
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]}
    return json.loads(done.stdout.strip().splitlines()[-1])


#: (label, (zoo name, kwargs, input kind, shape or seq_len, vocab), room above the imports)
LIMIT_CASES = (
    (
        "zoo:encoder 4 layers, d_model 256, 128 tokens",
        ("encoder", {}, "tokens", 128, 8000),
        1.5 * 2**30,
    ),
    (
        "zoo:mlp hidden 1024, depth 3",
        ("mlp", {"hidden": 1024, "depth": 3}, "tensor", [784], None),
        0.5 * 2**30,
    ),
    (
        "zoo:mlp hidden 4096, depth 2",  # slow: --quick leaves it out
        ("mlp", {"hidden": 4096, "depth": 2}, "tensor", [784], None),
        1.0 * 2**30,
    ),
)


def part2(quick: bool = False) -> list[dict]:
    try:
        import lightning  # noqa: F401

        have_lightning = True
    except ImportError:
        print("\n(lightning is not installed: pip install lightning, to compare with its finder)")
        have_lightning = False
    rows = []
    print("\nUnder a real address-space limit (RLIMIT_AS), no budget given:")
    for label, model, extra in LIMIT_CASES[:2] if quick else LIMIT_CASES:
        base = _baseline_vsize(model, have_lightning)
        limit = int(base + extra)
        runs = {
            "batchprobe (default)": _child(OURS, model, limit, strategy="auto"),
            "batchprobe doubling": _child(OURS, model, limit, strategy="doubling"),
        }
        if have_lightning:
            runs["lightning binsearch"] = _child(LIGHTNING, model, limit)
        print(f"  {label}: limit {limit / 2**30:.2f} GiB ({extra / 2**30:.1f} GiB above imports)")
        for name, r in runs.items():
            if "error" in r:
                print(f"    {name:<22} failed: {r['error']}")
                continue
            tested = "tested" if r["max"] in r["trials"] or r["max"] == 1 else "NEVER TESTED"
            # does the answer train? a new process, the limit, 4 steps: with the environment
            # the tool says its answer needs, and as a process starts by default
            said = r.get("environment") or {}
            r["trains"] = _child(TRAIN, model, limit, env=said, size=r["max"])
            if said:
                r["trains_by_default"] = _child(TRAIN, model, limit, size=r["max"])
            trains = r["trains"] + (
                f" with {' '.join(f'{k}={v}' for k, v in said.items())}; "
                f"{r['trains_by_default']} with glibc's defaults"
                if said
                else ""
            )
            print(
                f"    {name:<22} max {r['max']!s:>6} ({tested})  {len(r['trials']):>2} trials  "
                f"{r['seconds']:6.1f} s  trials: {r['trials']}\n"
                f"    {'':<22} a new training process at {r['max']}: {trains}"
            )
        rows.append({"model": label, "limit": limit, **runs})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="two cases under the address-space limit"
    )
    parser.add_argument("--lightning-only", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    rows: dict[str, list] = {}
    if not args.lightning_only:
        print("Real probes (warm-up at batch 1 not counted) and wall time, tracing included:")
        rows["strategies"] = part1(CASES)
        for s in STRATEGIES:
            probes = sorted(r["results"][s]["probes"] for r in rows["strategies"])
            seconds = sum(r["results"][s]["seconds"] for r in rows["strategies"])
            print(
                f"  {s:<9} median probes {probes[len(probes) // 2]:>2}, max {probes[-1]:>2}, "
                f"total {seconds:6.1f} s"
            )
        worse = [
            r["case"]
            for r in rows["strategies"]
            if r["results"]["estimate"]["probes"] > r["results"]["doubling"]["probes"]
        ]
        print(f"  estimate takes more probes than doubling on: {worse or 'no case'}")
    rows["lightning"] = part2(quick=args.quick)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
