"""Search strategies: pure functions of the outcomes they are told. No device, no torch.

A strategy is a generator: it yields the next batch size to try and receives the Observation of
that probe. `search(fits, ...)` drives one with a plain function (what the tests do);
`probe.find_max` drives one with real probes and can stop at any point (Ctrl-C) with what it has.

Invariant kept by every strategy: `lo` is the largest size that fit, `hi` the smallest that did not;
the search ends when `hi == lo + 1` (exact boundary) or `lo == cap`. Only tested sizes are returned.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Literal


class Outcome(str, enum.Enum):
    FIT = "fit"
    OOM = "oom"
    LIMIT = (
        "limit"  # a non-memory batch limit (32-bit indexing, launch config): not growing past it
    )
    ERROR = "error"  # a bug in the model or spec: the search stops and reports it

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Observation:
    outcome: Outcome
    peak_bytes: int | None = None
    #: the part of the peak that grows with the batch: the forward/backward peak, when the
    #: backend can tell it apart from the optimizer step's (None: use peak_bytes)
    line_bytes: int | None = None


StrategyGen = Generator[int, Observation, None]


@dataclass
class _Bracket:
    """lo: the largest size that fit (0: none yet); hi: the smallest that did not (None: none)."""

    cap: int
    lo: int = 0
    hi: int | None = None

    def record(self, b: int, obs: Observation) -> bool:
        """Take in a probe's outcome; True when the search is over."""
        if obs.outcome is Outcome.ERROR:
            return True
        if obs.outcome is Outcome.FIT:
            self.lo = b
            if b >= self.cap:
                return True
        else:
            self.hi = b
        return self.hi is not None and self.hi - self.lo <= 1

    @property
    def middle(self) -> int:
        assert self.hi is not None
        return (self.lo + self.hi) // 2


def doubling(start: int, cap: int) -> StrategyGen:
    """Double from `start` until the first non-fit, then bisect to the exact boundary."""
    br = _Bracket(cap)
    b = min(start, cap)
    while True:
        if br.record(b, (yield b)):
            return
        b = min(2 * b, cap) if br.hi is None else br.middle


def predictive(start: int, cap: int, limit_bytes: int) -> StrategyGen:
    """Jump near the boundary using the measured peaks, then bracket and finish exactly.

    Memory is modelled as max(optimizer-step peak, intercept + slope * b): flat while the optimizer
    step dominates, affine once activations do (a 2-layer LSTM measured 27.1 -> 28.7 -> 56.9 MB
    at batch 1, 2, 8).
    Backends report the forward/backward part apart (`Observation.line_bytes`), so the line is
    fitted on the part that grows with the batch.
    - Growing: `b * (limit / peak - 1)` still fits under that model whatever the split between
      fixed and per-sample memory — a safe jump. With two points, the line's crossing of `limit`
      predicts the boundary; when the larger point is far below the prediction, aim 90% of the
      way there first, so that the next line is fitted close to the boundary.
    - Bracketed: try the line's prediction inside the bracket (then its neighbour); bisect when a
      try fails to halve the bracket, so the worst case stays logarithmic.
    Predictions are only places to look: the answer is always a tested size with `hi == lo + 1`.
    """
    br = _Bracket(cap)
    fits: list[tuple[int, int]] = []  # (batch, growing part of the peak) of sizes that fit
    b = min(start, cap)
    bisect_next = False
    while True:
        width_before = None if br.hi is None else br.hi - br.lo
        obs = yield b
        if obs.outcome is Outcome.FIT and obs.peak_bytes is not None:
            line = obs.line_bytes if obs.line_bytes is not None else obs.peak_bytes
            fits.append((b, line))
        if br.record(b, obs):
            return
        lo, hi = br.lo, br.hi
        if hi is not None and lo == 0:  # even the first size failed: no peaks to go on
            b = hi // 2
            continue
        target = _target(fits, lo, limit_bytes)
        if hi is None:
            b = min(
                max(lo + 1 if target else 2 * lo, _safe_jump(fits, limit_bytes), target or 0), cap
            )
            continue
        if width_before is not None and (hi - lo) * 2 > width_before:
            bisect_next = True  # the last try did not halve the bracket
        if bisect_next or target is None or target >= hi:
            # the line overshot (memory grows faster than it said): split the bracket — in log
            # space while it spans more than 4x, where the answer's order of magnitude is unknown
            floor = max(lo + 1, _safe_jump(fits, limit_bytes))
            wide = hi > 4 * floor and not bisect_next
            b = math.isqrt(floor * hi) if wide else (lo + hi) // 2
            bisect_next = False
            continue
        b = target


def _target(fits: Sequence[tuple[int, int]], lo: int, limit_bytes: int) -> int | None:
    """Where the line points next: its prediction, 90% of the way there when the prediction is
    far beyond the points it was fitted on, lo + 1 when it says lo is the boundary."""
    pred = _predict(fits, limit_bytes)
    if pred is None:
        return None
    if pred <= lo:
        return lo + 1
    nearest = max(b for b, _ in fits)
    if nearest >= pred // 2:
        return pred
    return lo + max(1, int(0.9 * (pred - lo)))


def _safe_jump(fits: Sequence[tuple[int, int]], limit_bytes: int) -> int:
    if not fits:
        return 0
    b, peak = max(fits)
    if peak <= 0:
        return 2 * b
    return int(b * (limit_bytes / peak - 1))


def _predict(fits: Sequence[tuple[int, int]], limit_bytes: int) -> int | None:
    """Largest b with intercept + slope*b <= limit, from the line through the two largest fits."""
    points = sorted(set(fits))
    if len(points) < 2:
        return None
    (b1, p1), (b2, p2) = points[-2], points[-1]
    if b2 == b1 or p2 <= p1:
        return None
    slope = (p2 - p1) / (b2 - b1)
    intercept = p2 - slope * b2
    if limit_bytes <= intercept:
        return None
    return math.floor((limit_bytes - intercept) / slope)


def seeded(guess: int, cap: int) -> StrategyGen:
    """Start at a guess (e.g. from a fake-tensor estimate), step outward by 1, 2, 4, ... until the
    boundary is bracketed, then bisect: 2 probes when the guess is right, O(log error) when not."""
    br = _Bracket(cap)
    b = min(max(guess, 1), cap)
    step = 1
    while True:
        if br.record(b, (yield b)):
            return
        if br.hi is None:
            b = min(br.lo + step, cap)
        elif br.lo == 0:
            b = max(br.hi - step, 1)
        else:
            b = br.middle
            continue
        step *= 2


def iter_once(size: int) -> StrategyGen:
    """One probe at `size` (a check, not a search)."""
    yield size


@dataclass(frozen=True)
class SearchContext:
    """What a strategy may know before its first probe."""

    start: int = 1
    cap: int = 65536
    limit_bytes: int | None = None  # the memory a probe may use
    guess: int | None = None  # the boundary a fake-tensor trace predicts


@dataclass(frozen=True)
class StrategyInfo:
    name: str
    doc: str  # one line, for --help and README
    make: Callable[[SearchContext], StrategyGen]
    needs_limit: bool = False
    needs_guess: bool = False

    def usable(self, ctx: SearchContext) -> bool:
        return (not self.needs_limit or bool(ctx.limit_bytes)) and (
            not self.needs_guess or ctx.guess is not None
        )


STRATEGIES: dict[str, StrategyInfo] = {}
#: what `auto` means, best first; a named strategy whose inputs are missing falls back along it
AUTO_ORDER = ("estimate", "predict", "doubling")


def register(info: StrategyInfo) -> None:
    STRATEGIES[info.name] = info


register(
    StrategyInfo(
        "estimate",
        "start at the fake-tensor estimate, step outward by 1, 2, 4, ..., then bisect",
        lambda ctx: seeded(ctx.guess or 1, ctx.cap),
        needs_limit=True,
        needs_guess=True,
    )
)
register(
    StrategyInfo(
        "predict",
        "jump to where the measured peaks cross the limit, then bracket and bisect",
        lambda ctx: predictive(ctx.start, ctx.cap, ctx.limit_bytes or 0),
        needs_limit=True,
    )
)
register(
    StrategyInfo(
        "doubling",
        "double from probe.start until the first failure, then bisect",
        lambda ctx: doubling(ctx.start, ctx.cap),
    )
)


def candidates(requested: str) -> tuple[str, ...]:
    """The strategies to try, in order, for a requested name: `auto` is the preference order; a
    named strategy falls back to those after it (doubling needs nothing, so it always runs)."""
    if requested == "auto":
        return AUTO_ORDER
    if requested not in STRATEGIES:
        raise ValueError(f"unknown strategy {requested!r}")
    if requested in AUTO_ORDER:
        return AUTO_ORDER[AUTO_ORDER.index(requested) :]
    return (requested, "doubling")


def choose(requested: str, ctx: SearchContext) -> StrategyInfo:
    """The first usable strategy among `candidates(requested)` (doubling always is)."""
    return next(STRATEGIES[n] for n in candidates(requested) if STRATEGIES[n].usable(ctx))


def make_strategy(
    name: str, start: int, cap: int, limit_bytes: int | None, guess: int | None = None
) -> StrategyGen:
    """A strategy generator for `name` (`auto` resolved by `choose`)."""
    ctx = SearchContext(start, cap, limit_bytes, guess)
    return choose(name, ctx).make(ctx)


Stopped = Literal["boundary", "cap", "error", "interrupted", "nothing-fits", "incomplete"]


@dataclass(frozen=True)
class SearchResult:
    """What a search established. `best` is None when nothing fit."""

    best: int | None
    exact: bool  # best fit and best+1 was tried and did not (or best == cap)
    capped: bool  # best == cap: larger sizes were not tried
    probes: tuple[tuple[int, Observation], ...]
    stopped: Stopped

    @property
    def num_probes(self) -> int:
        return len(self.probes)


def summarize(
    probes: Sequence[tuple[int, Observation]], cap: int, *, interrupted: bool = False
) -> SearchResult:
    """The result implied by a list of probes (complete or not). A size tried more than once
    (the device changed under the search) counts as its latest outcome."""
    latest = {b: o.outcome for b, o in probes}
    fit_sizes = [b for b, o in latest.items() if o is Outcome.FIT]
    failed = {b for b, o in latest.items() if o is not Outcome.FIT}
    best = max(fit_sizes) if fit_sizes else None
    error = any(o.outcome is Outcome.ERROR for _, o in probes)
    capped = best is not None and best >= cap
    exact = best is not None and (capped or (best + 1) in failed)
    stopped: Stopped
    if interrupted:
        stopped = "interrupted"
    elif error:
        stopped = "error"
    elif best is None:
        stopped = "nothing-fits" if 1 in failed else "incomplete"
    elif capped:
        stopped = "cap"
    else:
        stopped = "boundary" if exact else "incomplete"
    return SearchResult(best, exact, capped, tuple(probes), stopped)


def search(
    fits: Callable[[int], Observation | Outcome | bool],
    start: int = 1,
    cap: int = 65536,
    strategy: str = "doubling",
    limit_bytes: int | None = None,
    guess: int | None = None,
) -> SearchResult:
    """Run a strategy against a plain function: `search(lambda b: b <= 37)`."""
    gen = make_strategy(strategy, start, cap, limit_bytes, guess)
    probes: list[tuple[int, Observation]] = []
    try:
        b = next(gen)
        while True:
            obs = _as_observation(fits(b))
            probes.append((b, obs))
            b = gen.send(obs)
    except StopIteration:
        pass
    return summarize(probes, cap)


def _as_observation(value: Observation | Outcome | bool) -> Observation:
    if isinstance(value, Observation):
        return value
    if isinstance(value, Outcome):
        return Observation(value)
    return Observation(Outcome.FIT if value else Outcome.OOM)
