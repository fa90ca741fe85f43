from __future__ import annotations

import pytest

from batchprobe.search import Observation, Outcome, search, summarize


def sizes(result) -> list[int]:
    return [b for b, _ in result.probes]


def test_doubling_then_bisect_exact_sequence() -> None:
    result = search(lambda b: b <= 37, strategy="doubling")
    assert sizes(result) == [1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 37]
    assert result.best == 37
    assert result.exact and not result.capped
    assert result.stopped == "boundary"


def test_start_above_boundary_searches_down() -> None:
    result = search(lambda b: b <= 5, start=64, strategy="doubling")
    assert sizes(result) == [64, 32, 16, 8, 4, 6, 5]
    assert result.best == 5 and result.exact


def test_nothing_fits() -> None:
    result = search(lambda b: False, start=8, strategy="doubling")
    assert sizes(result) == [8, 4, 2, 1]
    assert result.best is None
    assert result.stopped == "nothing-fits"


def test_cap_is_respected_and_reported() -> None:
    result = search(lambda b: True, cap=100, strategy="doubling")
    assert sizes(result) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert result.best == 100 and result.capped and result.stopped == "cap"
    assert max(sizes(result)) <= 100


def test_limit_stops_growth_like_a_non_fit() -> None:
    def fits(b: int) -> Outcome:
        return Outcome.FIT if b <= 20 else Outcome.LIMIT

    result = search(fits, strategy="doubling")
    assert result.best == 20 and result.exact
    assert all(b <= 32 for b in sizes(result))


def test_error_stops_the_search_at_once() -> None:
    def fits(b: int) -> Outcome:
        return Outcome.FIT if b < 8 else Outcome.ERROR

    result = search(fits, strategy="doubling")
    assert sizes(result) == [1, 2, 4, 8]
    assert result.stopped == "error"
    assert result.best == 4 and not result.exact


def test_only_tested_sizes_are_returned_even_when_not_monotone() -> None:
    # 33 fails once (fragmentation-like noise), larger sizes fit: the answer is still tested.
    result = search(lambda b: b <= 40 and b != 33, strategy="doubling")
    tested = sizes(result)
    assert result.best in tested
    assert result.best + 1 in tested
    assert dict(result.probes)[result.best + 1].outcome is not Outcome.FIT


def _affine(fixed: int, per_sample: int, limit: int, flat: int = 0):
    """Memory max(flat, fixed + per_sample*b); fits when <= limit."""

    def fits(b: int) -> Observation:
        peak = max(flat, fixed + per_sample * b)
        return Observation(Outcome.FIT if peak <= limit else Outcome.OOM, peak)

    return fits


@pytest.mark.parametrize("boundary", [1, 2, 3, 7, 37, 100, 255, 256, 257, 1000, 4097, 30000])
@pytest.mark.parametrize("strategy", ["doubling", "predict"])
def test_every_strategy_finds_the_exact_boundary(boundary: int, strategy: str) -> None:
    per_sample, fixed = 1000, 50_000
    limit = fixed + per_sample * boundary + per_sample // 2
    result = search(_affine(fixed, per_sample, limit), strategy=strategy, limit_bytes=limit)
    assert result.best == boundary
    assert result.exact


def test_predictive_needs_fewer_probes_on_affine_memory() -> None:
    per_sample, fixed = 3000, 2_000_000
    totals = {"doubling": 0, "predict": 0}
    for boundary in range(50, 5000, 97):
        limit = fixed + per_sample * boundary + 1
        for strategy in totals:
            result = search(
                _affine(fixed, per_sample, limit, flat=fixed + 20 * per_sample),
                strategy=strategy,
                limit_bytes=limit,
            )
            assert result.best == boundary, (strategy, boundary)
            totals[strategy] += result.num_probes
    assert totals["predict"] < totals["doubling"]


def test_summarize_partial_run() -> None:
    probes = [(1, Observation(Outcome.FIT)), (2, Observation(Outcome.FIT))]
    result = summarize(probes, cap=1000, interrupted=True)
    assert result.best == 2 and not result.exact and result.stopped == "interrupted"


def test_seeded_search_from_a_right_guess_takes_two_probes() -> None:
    from batchprobe.search import seeded

    def run(guess: int, boundary: int) -> list[int]:
        gen = seeded(guess, cap=65536)
        tried = []
        b = next(gen)
        try:
            while True:
                tried.append(b)
                b = gen.send(Observation(Outcome.FIT if b <= boundary else Outcome.OOM))
        except StopIteration:
            return tried

    assert run(37, 37) == [37, 38]
    assert run(40, 37) == [40, 39, 37, 38]  # steps down by 1, 2, then bisects
    assert run(30, 37) == [30, 31, 33, 37, 45, 41, 39, 38]
    assert run(5, 1) == [5, 4, 2, 1]
    assert run(3, 0) == [3, 2, 1]


def test_a_size_tried_again_counts_as_its_latest_outcome() -> None:
    # 12 fit, then the device lost room: 12 failed when tried again, 11 fits
    fit, oom = Observation(Outcome.FIT), Observation(Outcome.OOM)
    probes = [(8, fit), (16, oom), (12, fit), (13, oom), (12, oom), (11, fit)]
    result = summarize(probes, cap=1000)
    assert result.best == 11 and result.exact and result.stopped == "boundary"
