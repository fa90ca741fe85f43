from __future__ import annotations

import pytest

from batchprobe.units import (
    MemorySize,
    format_bytes,
    format_seconds,
    parse_bytes,
    parse_memory_size,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24GiB", 24 * 1024**3),
        ("24GB", 24 * 1000**3),
        ("512MiB", 512 * 1024**2),
        ("512 mb", 512 * 1000**2),
        ("1.5GiB", int(1.5 * 1024**3)),
        ("1024", 1024),
        (4096, 4096),
        ("80gb", 80 * 1000**3),
        ("1e9", 10**9),  # a whole number of bytes, however written
    ],
)
def test_parse_bytes(text: str | int, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(
    "text", ["12 parsecs", "GiB", "", "-1GiB", "1..5GB", "1.5", "0.9", "1e400", "1e30GiB"]
)
def test_parse_bytes_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_bytes(text)


def test_memory_size_fraction_and_bytes() -> None:
    assert parse_memory_size(0.9) == MemorySize(fraction=0.9)
    assert parse_memory_size("0.5") == MemorySize(fraction=0.5)
    assert parse_memory_size("90%") == MemorySize(fraction=0.9)
    assert parse_memory_size("2GiB") == MemorySize(bytes=2 * 1024**3)
    assert parse_memory_size(0.5).resolve(1000) == 500
    with pytest.raises(ValueError):
        parse_memory_size("150%")
    with pytest.raises(ValueError):
        parse_memory_size(True)


def test_formatting() -> None:
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(200 * 1024**2) == "200 MiB"
    assert format_bytes(None) == "-"
    assert format_seconds(0.0123) == "12.3 ms"
    assert format_seconds(125) == "2 min 05 s"
    assert format_seconds(7300) == "2 h 01 min"


@pytest.mark.parametrize("value", ["1.5", 1.5, "512", 2, "1000000"])
def test_a_plain_number_between_a_fraction_and_a_mebibyte_is_ambiguous(value: object) -> None:
    with pytest.raises(ValueError, match=r"ambiguous.*0\.9 or 90%.*1\.5GiB"):
        parse_memory_size(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["1e100", 1e30, "2000000TiB"])
def test_absurd_sizes_are_refused_plainly(value: object) -> None:
    with pytest.raises(ValueError, match="more memory than any machine"):
        parse_memory_size(value)  # type: ignore[arg-type]


def test_sizes_and_fractions_still_read() -> None:
    assert parse_memory_size("0.9").fraction == 0.9
    assert parse_memory_size("90%").fraction == 0.9
    assert parse_memory_size("1.5GiB").bytes == 1.5 * 1024**3
    assert parse_memory_size(8_000_000_000).bytes == 8_000_000_000


def test_counts_round_into_the_next_suffix_not_into_exponent_notation() -> None:
    from batchprobe.units import format_count

    assert format_count(999.7) == "1k"  # was "1e+03"
    assert format_count(999_700.0) == "1M"
    assert format_count(615.2) == "615"
    assert format_count(1450.0) == "1.45k"
