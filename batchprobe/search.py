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
    #: a failed allocation: the bytes live when it failed (the limit is at least this) and live
    #: plus the request (memory at this size is at least this; the limit is below it)
    live_bytes: int | None = None
    need_bytes: int | None = None
    #: the optimizer step's own peak, when the backend can tell it apart (None: not known)
    flat_bytes: int | None = None
    #: the limit the next probe faces, as the device knew it after this probe (None: the
    #: configured limit holds), and whether it moves with what the probes themselves map (an
    #: rlimit: each new size's kernels stay mapped) rather than because the limit changed
    limit_bytes: int | None = None
    limit_moves_with_probes: bool = False


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


@dataclass(frozen=True)
class Line:
    """Memory as `fixed + per_sample * b`: what grows with the batch, on top of what does not."""

    fixed: float
    per_sample: float

    def at(self, b: float) -> float:
        return self.fixed + self.per_sample * b

    def crossing(self, limit: float) -> int | None:
        """The largest b with at(b) <= limit (None when the line does not grow)."""
        if self.per_sample <= 0:
            return None
        return math.floor((limit - self.fixed) / self.per_sample)


@dataclass(frozen=True)
class Prior:
    """What a fake-tensor trace says before any probe, in the bytes probes measure: the
    forward/backward peak as a line over batch sizes, and the optimizer step's peak as another
    (nearly flat: parameters, gradients and state, plus the batch still alive). Memory at b is the
    larger of the two."""

    line: Line
    flat: Line = Line(0.0, 0.0)
    #: the traced sizes and their bytes (memory is not quite a line at the smallest sizes)
    points: tuple[tuple[int, int], ...] = ()

    def crossing(self, limit: int) -> int | None:
        return _crossing(self.line, self.flat, limit)

    def at(self, b: int) -> float:
        """The traced bytes at b when b was traced, else the line's."""
        return dict(self.points).get(b, self.line.at(b))


def _crossing(line: Line | None, flat: Line | None, limit: float) -> int | None:
    """The largest size whose memory — the larger of the forward/backward line and the
    optimizer step's — is under the limit: 0 when the optimizer step alone is over it at any
    size, None when neither line says (or grows)."""
    if flat is not None and flat.at(1) > limit:
        return 0
    known = [c for c in (x.crossing(limit) for x in (line, flat) if x is not None) if c is not None]
    return min(known) if known else None


def _apart(points: list[tuple[int, int]]) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """The largest measured size and the largest at most 90% of it: two points far enough
    apart for a slope (sizes next to each other measure noise)."""
    if not points:
        return None
    b2 = points[-1][0]
    apart = [(b, p) for b, p in points[:-1] if b <= 0.9 * b2]
    return (apart[-1], points[-1]) if apart else None


#: a measured point within this share of the prior's line agrees with it
AGREE = 0.02


class _Knowledge:
    """Everything the probes said, as facts about two unknowns: memory at each size, and the
    limit. A fit: memory(b) = its peak, and limit >= peak. A failed allocation: memory(b) >=
    live + request, and live <= limit < live + request. The line through the facts, and the
    limit between its bounds, give where the boundary is."""

    def __init__(self, limit: int, prior: Prior | None) -> None:
        self.configured = limit
        self.prior = prior
        self.fits: dict[int, int] = {}  # b -> growing part of the measured peak
        self.peaks: dict[int, int] = {}  # b -> the measured peak
        self.flats: dict[int, int] = {}  # b -> the optimizer step's measured peak
        self.needs: dict[int, int] = {}  # b -> memory at b is at least this (a failure)
        self.floor = 0  # the limit is at least this (peaks that fit, bytes live at a failure)
        self.trust_prior = prior is not None  # until the line it gave missed
        self.current: int | None = None  # the limit as the device last measured it
        #: the limit the device read fell (not by what probes map): to this
        self.fell_to: int | None = None

    def add(self, b: int, obs: Observation) -> None:
        self.fell_to = None
        if obs.limit_bytes is not None:
            before = self.current if self.current is not None else self.configured
            self.current = obs.limit_bytes
            if not obs.limit_moves_with_probes and obs.limit_bytes < before:
                self.fell_to = obs.limit_bytes
        if obs.outcome is Outcome.FIT and obs.peak_bytes:
            line = obs.line_bytes if obs.line_bytes is not None else obs.peak_bytes
            self.fits[b] = line
            self.peaks[b] = obs.peak_bytes
            if obs.flat_bytes:
                self.flats[b] = obs.flat_bytes
            self.floor = max(self.floor, obs.peak_bytes)
        elif obs.outcome is Outcome.OOM:
            if not obs.need_bytes and (guess := self.line()) is not None:
                # a failure that says nothing of its bytes: memory at b is what the line says
                # (the limit is below it)
                self.needs[b] = max(self.needs.get(b, 0), int(guess.at(b)) + 1)
            if obs.need_bytes:
                self.needs[b] = max(self.needs.get(b, 0), obs.need_bytes)
            if obs.live_bytes:
                self.floor = max(self.floor, obs.live_bytes)

    @property
    def ceiling(self) -> int:
        """The limit is at most this (strictly below a failed allocation's live + request)."""
        return min([self.configured, *(n - 1 for n in self.needs.values())])

    @property
    def limit(self) -> int:
        """The limit to aim under: as the device measured it last, where it does (never above
        the configured one), else the ceiling the failures left."""
        if self.current is not None:
            return min(self.current, self.configured)
        return self.ceiling

    def contradicts_prior(self, b: int, obs: Observation) -> bool:
        """A miss the prior's memory may be to blame for. Only a failure where the device also
        measured the limit (`limit_bytes`) can clear it: one that needed no more than the
        prior says memory is at b shows a limit lower than thought, not a wrong trace. Any
        other miss — a fit, a failure that needed more, a failure against a limit nobody
        measured (it fails early in a step, below what a wrong trace says) — blames it."""
        if self.prior is None or obs.outcome is not Outcome.OOM or not obs.need_bytes:
            return True
        if obs.limit_bytes is None:
            return True
        return obs.need_bytes > max(self.prior.at(b), self.prior.flat.at(b))

    @property
    def learned(self) -> bool:
        """Failures showed a limit below the configured one (a limit the tool cannot see,
        fragmentation, another process): the limit is searched between floor and ceiling."""
        return self.ceiling < self.configured

    def line(self) -> Line | None:
        """The measured line: through two fits far enough apart, else the prior moved onto the
        one fit, else the prior; then steepened to meet every failure above it."""
        points = sorted(self.fits.items())
        line: Line | None = None
        if points:
            b2, p2 = points[-1]
            pair = _apart(points)
            if pair is None and len(points) >= 2 and self.prior is None:
                pair = points[-2], points[-1]  # no trace to lean on: the two nearest will do
            if self.trust_prior and self._grows_as_traced(b2, p2):
                # the trace is right where it was measured: its slope there is exact, while a
                # slope down to the warm-up's batch 1 is not (memory is no line at the smallest
                # sizes: 3% off on an MLP, 5 samples at 4500)
                pair = None
            if pair is not None:
                (b1, p1), _ = pair
                slope = (p2 - p1) / (b2 - b1)
                if slope > 0:
                    line = Line(p2 - slope * b2, slope)
            if line is None and self.trust_prior:
                line = self._prior_through(b2, p2)
        elif self.prior is not None and self.trust_prior:
            line = self.prior.line
        if line is None:
            return None
        for b, need in sorted(self.needs.items()):
            if line.at(b) >= need:
                continue
            below = [(fb, fp) for fb, fp in points if fb < b]
            if below:  # from the largest fit below the failure up to what it needed
                fb, fp = below[-1]
                slope = (need - fp) / (b - fb)
                line = Line(fp - slope * fb, slope)
            else:  # no measured point: what does not grow is the prior's
                line = Line(line.fixed, (need - line.fixed) / b)
        return line

    def _agrees(self, b: int, measured: int) -> bool:
        """A measured peak within AGREE of what the prior says at b."""
        if self.prior is None:
            return False
        expected = self.prior.at(b)
        return abs(measured - expected) <= AGREE * expected

    def _grows_as_traced(self, b: int, measured: int) -> bool:
        """What grows with the batch, measured at b, within AGREE of the prior's: the trace's
        slope is confirmed there (agreeing in total says nothing of it where the fixed part is
        most of the memory)."""
        if self.prior is None or not self._agrees(b, measured):
            return False
        line = self.prior.line
        growth = line.per_sample * b
        return growth > 0 and abs(measured - line.fixed - growth) <= AGREE * growth

    def _prior_through(self, b: int, measured: int) -> Line:
        """The prior's line moved onto one measured point. When they agree, by the difference
        (an offset); when the measurement is above, the per-sample part takes the difference
        (what does not grow — parameters, optimizer state — a trace counts exactly; what goes
        wrong is per sample: a kernel's workspace, a layout); below, the line scales down."""
        assert self.prior is not None
        prior = self.prior.line
        expected = self.prior.at(b)
        if self._agrees(b, measured):
            return Line(prior.fixed + (measured - expected), prior.per_sample)
        if measured > expected and measured > prior.fixed:
            return Line(prior.fixed, (measured - prior.fixed) / b)
        scale = measured / expected if expected > 0 else 1.0
        return Line(prior.fixed * scale, prior.per_sample * scale)

    def flat(self) -> Line | None:
        """The optimizer step's peak as a line: through two measurements far enough apart, else
        the prior's moved onto the largest measurement, else flat at it."""
        points = sorted(self.flats.items())
        prior = self.prior.flat if self.prior is not None else None
        if not points:
            return prior
        b2, p2 = points[-1]
        if (pair := _apart(points)) is not None:
            (b1, p1), _ = pair
            slope = max((p2 - p1) / (b2 - b1), 0.0)
            return Line(p2 - slope * b2, slope)
        if prior is not None:
            return Line(prior.fixed + (p2 - prior.at(b2)), prior.per_sample)
        return Line(p2, 0.0)

    def interval(self) -> tuple[int, int] | None:
        """Where the lines say the boundary is: the largest size under the limit — a point
        while the configured limit holds, a range once failures showed it is lower."""
        line, flat = self.line(), self.flat()
        high = _crossing(line, flat, self.limit)
        if high is None:
            return None
        if not self.learned or self.current is not None:
            return high, high
        low = _crossing(line, flat, self.floor) if 0 < self.floor <= self.ceiling else None
        return (high, high) if low is None else (min(low, high), high)

    def safe_jump(self, b: int) -> int:
        """From a fit, a size that fits whatever the split between fixed and per-sample memory:
        b * (limit / peak - 1)."""
        peak = max(self.fits.get(b, 0), self.flats.get(b, 0))
        if peak <= 0:
            return 2 * b
        return int(b * (self.limit / peak - 1))


#: misses after which the model is followed again because the device measured the limit there
MEASURED_RETRIES = 3


def _bisect(lo: int, hi: int) -> int:
    """The middle of a bracket: in log space while it spans more than 4x."""
    return math.isqrt(max(lo, 1) * hi) if hi > 4 * max(lo, 1) else (lo + hi) // 2


def learned(
    start: int,
    cap: int,
    limit_bytes: int,
    prior: Prior | None = None,
    seen: Sequence[tuple[int, Observation]] = (),
) -> StrategyGen:
    """Learn where the boundary is from every observation; bisect where the model misses.

    Knowledge (`_Knowledge`): a line through the measured peaks (the growing part, forward and
    backward), the prior line from the fake-tensor trace until two measurements stand apart, the
    memory each failed allocation proves necessary, and the limit between the peaks that fit and
    the failed allocations. `seen` adds observations made before the search (the warm-up step):
    they inform the line but are not results.

    Each probe is either the model's or a bisection step:
    - the model's: where the line meets the limit (expected to fit), then the size above it
      (expected to fail); once failures showed a lower limit than configured, the middle of the
      sizes the limit can still allow.
    - a bisection step (log space while the bracket spans more than 4x) right after the model
      missed — a size it said fits did not, or one it said fails did — and whenever its answer
      lies outside the bracket. A wrong prior or a wrong line costs one probe each time, and the
      bracket still shrinks as fast as a bisection's.
    Before any failure with no line to follow: the safe jump from the largest fit, else
    doubling. The answer is always a tested size with `hi == lo + 1` (or the cap).
    """
    k = _Knowledge(limit_bytes, prior)
    for b, obs in seen:
        k.add(b, obs)
    br = _Bracket(cap)
    b, expect, span = start, None, 0
    if (around := k.interval()) is not None:  # a prior, or measurements seen before
        if around[0] < around[1]:  # a range (failures showed a lower limit): halve it
            b, span = (around[0] + around[1] + 1) // 2, around[1] - around[0] + 1
        else:
            b, expect = around[1], Outcome.FIT
    b = min(max(b, 1), cap)
    retry = True  # once per search, the line corrected by a miss is followed before bisecting
    #: a limit the device measured at the miss (it moves with each new size's kernels): the
    #: model knows where it stands now, and is followed again, a few times
    remeasured = MEASURED_RETRIES
    while True:
        obs = yield b
        k.add(b, obs)
        done = br.record(b, obs)
        if obs.outcome is Outcome.ERROR:
            return
        if k.fell_to is not None and br.lo:
            # the limit the device read fell below what the largest fit used (a budget another
            # layer lowered): it no longer fits, and the search goes on below it (`voided`)
            still = [fb for fb, peak in k.peaks.items() if peak <= k.fell_to]
            if br.lo not in still:
                br.lo = max(still, default=0)
                done = br.hi is not None and br.hi - br.lo <= 1
        if done:
            return
        lo, hi = br.lo, br.hi
        around = k.interval()
        if around is not None and obs.limit_moves_with_probes:
            # a limit that moves with the process's own mappings (each new size leaves its
            # kernels): below what fit, the boundary is that fit, measured as the limit stood
            around = (max(around[0], lo), max(around[1], lo))
        if hi is None:  # nothing has failed yet
            if around is None:
                b, expect = max(2 * lo, k.safe_jump(lo)), None
            elif around[1] <= lo:
                b, expect = lo + 1, Outcome.OOM
            else:
                b, expect = max(around[1], k.safe_jump(lo)), Outcome.FIT
            b = min(max(b, lo + 1), cap)  # above what fit (lo may have been voided to 0)
            continue
        low, high = (max(around[0], lo), min(around[1], hi - 1)) if around else (1, 0)
        # the model's last probe missed: a size it said fits did not (or the reverse), or the
        # range it was meant to halve did not halve
        missed = expect is not None and (obs.outcome is Outcome.FIT) != (expect is Outcome.FIT)
        missed |= span > 0 and high - low + 1 > (span + 1) // 2
        if missed and k.trust_prior and len(k.fits) < 2 and k.contradicts_prior(b, obs):
            k.trust_prior = False  # the trace was wrong here: measurements alone from now on
            around = k.interval()
            low, high = (max(around[0], lo), min(around[1], hi - 1)) if around else (1, 0)
        expect, span = None, 0
        if missed and obs.limit_moves_with_probes and remeasured > 0 and low <= high:
            remeasured, missed = remeasured - 1, False
        if missed and retry and low <= high:
            # a near miss (a line off by a little near the boundary) is corrected by the
            # measurement that showed it: one more probe where the corrected line says
            retry, missed = False, False
        if missed or low > high:  # no model, or one the probes contradict: bisect
            b = _bisect(lo, hi)
        elif low == high:  # one size: it should fit, the next should not
            b, expect = (low, Outcome.FIT) if low > lo else (low + 1, Outcome.OOM)
        else:  # a range (the limit is not known exactly): halve it
            b, span = (low + high + 1) // 2, high - low + 1
        b = max(b, 1)


def limit_fell(
    observations: Sequence[tuple[int, Observation]],
) -> tuple[int, tuple[int, int, int, int]] | None:
    """A failure that needed less memory than a smaller size used when it fit, earlier: the
    limit fell between them (memory the device could not see go, a budget another layer
    lowered). (index of the failure, (its size, its need, the fit's size, the fit's peak))."""
    fits: list[tuple[int, int]] = []
    for i, (b, obs) in enumerate(observations):
        if obs.limit_moves_with_probes:
            # a limit that moves with what the probes themselves map: a search follows it, and
            # what fit before it moved still fits a process that did not run those probes
            continue
        if obs.outcome is Outcome.FIT and obs.peak_bytes:
            fits.append((b, obs.peak_bytes))
        elif obs.outcome is Outcome.OOM and obs.need_bytes:
            for size, peak in fits:
                if size < b and obs.need_bytes < peak:
                    return i, (b, obs.need_bytes, size, peak)
    return None


def voided(
    observations: Sequence[tuple[int, Observation]], limit_bytes: int | None = None
) -> set[int]:
    """Fits (their indices) that the limit, as the device read it after them, fell below: it
    went down from the limit the search was told (`limit_bytes`) or from an earlier reading (a
    budget another layer lowered; not what the probes themselves map) to less than they used.
    They are no part of the answer. A fit above a reading that did not fall (under torchrun
    the peaks are the largest and the limit the smallest of all ranks) stands."""
    out: set[int] = set()
    reading: int | None = limit_bytes
    for i, (_, obs) in enumerate(observations):
        limit = obs.limit_bytes
        if limit is None or obs.limit_moves_with_probes:
            continue
        if reading is not None and limit < reading:  # it fell, by this probe's end at least
            out |= {
                j
                for j, (_, o) in enumerate(observations[: i + 1])
                if o.outcome is Outcome.FIT and (o.peak_bytes or 0) > limit
            }
        reading = limit
    return out


def iter_once(size: int) -> StrategyGen:
    """One probe at `size` (a check, not a search)."""
    yield size


@dataclass(frozen=True)
class SearchContext:
    """What a strategy may know before its first probe."""

    start: int = 1
    cap: int = 65536
    limit_bytes: int | None = None  # the memory a probe may use
    prior: Prior | None = None  # what a fake-tensor trace says memory is at each size
    seen: tuple[tuple[int, Observation], ...] = ()  # measured before the search (the warm-up)

    @property
    def guess(self) -> int | None:
        """The boundary the prior alone predicts (the fake-tensor estimate)."""
        if self.prior is None or not self.limit_bytes:
            return None
        crossing = self.prior.crossing(self.limit_bytes)
        return None if crossing is None else min(max(crossing, 0), self.cap)


@dataclass(frozen=True)
class StrategyInfo:
    name: str
    doc: str  # one line, for --help and README
    make: Callable[[SearchContext], StrategyGen]
    needs_limit: bool = False
    needs_prior: bool = False

    def usable(self, ctx: SearchContext) -> bool:
        return (not self.needs_limit or bool(ctx.limit_bytes)) and (
            not self.needs_prior or ctx.prior is not None
        )


STRATEGIES: dict[str, StrategyInfo] = {}
#: what `auto` means, best first; a named strategy whose inputs are missing falls back along it
AUTO_ORDER = ("estimate", "predict", "doubling")


def register(info: StrategyInfo) -> None:
    STRATEGIES[info.name] = info


register(
    StrategyInfo(
        "estimate",
        "start where the fake-tensor trace meets the limit, then learn from every probe",
        lambda ctx: learned(ctx.start, ctx.cap, ctx.limit_bytes or 0, ctx.prior, ctx.seen),
        needs_limit=True,
        needs_prior=True,
    )
)
register(
    StrategyInfo(
        "predict",
        "jump to where the measured peaks meet the limit, learning from every probe",
        lambda ctx: learned(ctx.start, ctx.cap, ctx.limit_bytes or 0, None, ctx.seen),
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


def make_strategy(name: str, ctx: SearchContext) -> StrategyGen:
    """A strategy generator for `name` (`auto` resolved by `choose`)."""
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
    probes: Sequence[tuple[int, Observation]],
    cap: int,
    *,
    interrupted: bool = False,
    limit_bytes: int | None = None,
) -> SearchResult:
    """The result implied by a list of probes (complete or not). A size tried more than once
    (the device changed under the search) counts as its latest outcome; a fit that a later
    reading of the limit no longer allows (`voided`: the search was told `limit_bytes`) is no
    fit of the result."""
    void = voided(probes, limit_bytes)
    latest = {b: o.outcome for i, (b, o) in enumerate(probes) if i not in void}
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
    prior: Prior | None = None,
    seen: Sequence[tuple[int, Observation]] = (),
) -> SearchResult:
    """Run a strategy against a plain function: `search(lambda b: b <= 37)`."""
    gen = make_strategy(strategy, SearchContext(start, cap, limit_bytes, prior, tuple(seen)))
    probes: list[tuple[int, Observation]] = []
    try:
        b = next(gen)
        while True:
            obs = _as_observation(fits(b))
            probes.append((b, obs))
            b = gen.send(obs)
    except StopIteration:
        pass
    return summarize(probes, cap, limit_bytes=limit_bytes)


def _as_observation(value: Observation | Outcome | bool) -> Observation:
    if isinstance(value, Observation):
        return value
    if isinstance(value, Outcome):
        return Observation(value)
    return Observation(Outcome.FIT if value else Outcome.OOM)
