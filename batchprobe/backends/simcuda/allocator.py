"""PyTorch's CUDA caching allocator, as a model: blocks, segments, the reserved-memory cap, and the
retry after a failed cudaMalloc. Pure Python; the simulated device feeds it sizes.

The rules follow `c10/cuda/CUDACachingAllocator.cpp` (torch 2.4-2.14):
- every request is rounded up to a multiple of 512 bytes (`round_size`); `memory_allocated`
  counts rounded blocks;
- requests up to 1 MiB come from the small pool, in 2 MiB segments; larger ones from the large
  pool, in 20 MiB segments below 10 MiB, else in a segment of their own rounded up to 2 MiB
  (`get_allocation_size`); `memory_reserved` counts segments;
- a free cached block is reused best-fit; it is split when the remainder is at least 512 B (small
  pool) or more than 1 MiB (large pool), else handed out whole;
- `set_per_process_memory_fraction` caps *reserved* memory: a new segment that would take
  reserved past the cap fails like a cudaMalloc OOM, so a peak of allocated bytes under the cap
  can still fail;
- after a failed segment allocation, every cached segment with nothing allocated in it is
  released and the allocation retried once (`num_alloc_retries` counts these, failed or not);
  partly used segments are never released, not even by `empty_cache()`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

MIN_BLOCK = 512
SMALL_SIZE = 1024**2
SMALL_BUFFER = 2 * 1024**2
LARGE_BUFFER = 20 * 1024**2
MIN_LARGE_ALLOC = 10 * 1024**2
ROUND_LARGE = 2 * 1024**2


def round_size(n: int) -> int:
    return max(MIN_BLOCK, -(-n // MIN_BLOCK) * MIN_BLOCK)


def allocation_size(size: int) -> int:
    """The segment a rounded request of `size` bytes gets when no cached block fits."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


def format_size(n: int) -> str:
    """c10's size pretty-printer: bytes up to 1024, then KiB/MiB/GiB with two decimals."""
    if n <= 1024:
        return f"{n} bytes"
    if n <= 1024**2:
        return f"{n / 1024:.2f} KiB"
    if n <= 1024**3:
        return f"{n / 1024**2:.2f} MiB"
    return f"{n / 1024**3:.2f} GiB"


@dataclass(eq=False)
class Block:
    segment: Segment
    offset: int
    size: int
    used: bool = False


@dataclass(eq=False)
class Segment:
    size: int
    small: bool
    blocks: list[Block] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return len(self.blocks) == 1 and not self.blocks[0].used


class SegmentRefused(Exception):
    """No segment could be had: the OOM the caller turns into torch's message."""

    def __init__(self, alloc_size: int) -> None:
        super().__init__(alloc_size)
        self.alloc_size = alloc_size


@dataclass
class CachingAllocator:
    #: free device memory outside this allocator's segments (the device's total, less the CUDA
    #: context, library memory and other processes)
    room: Callable[[], int]
    #: the cap on reserved bytes (set_per_process_memory_fraction), None when unset
    cap_bytes: int | None = None
    segments: list[Segment] = field(default_factory=list)
    allocated: int = 0
    reserved: int = 0
    peak_allocated: int = 0
    peak_reserved: int = 0
    num_alloc_retries: int = 0
    num_ooms: int = 0

    def malloc(self, nbytes: int) -> Block:
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        block = self._best_fit(size, small)
        if block is None:
            alloc_size = allocation_size(size)
            if not self._new_segment(alloc_size, small):
                self.release_cached()
                self.num_alloc_retries += 1
                if not self._new_segment(alloc_size, small):
                    self.num_ooms += 1
                    raise SegmentRefused(alloc_size)
            block = self._best_fit(size, small)
            assert block is not None
        self._use(block, size)
        return block

    def free(self, block: Block) -> None:
        assert block.used
        block.used = False
        self.allocated -= block.size
        blocks = block.segment.blocks
        i = blocks.index(block)
        # merge with free neighbours in the same segment
        if i + 1 < len(blocks) and not blocks[i + 1].used:
            block.size += blocks.pop(i + 1).size
        if i > 0 and not blocks[i - 1].used:
            prev = blocks[i - 1]
            prev.size += blocks.pop(i).size

    def release_cached(self) -> int:
        """Give every segment with nothing allocated in it back to the device; bytes released."""
        keep, released = [], 0
        for seg in self.segments:
            if seg.empty:
                released += seg.size
            else:
                keep.append(seg)
        self.segments = keep
        self.reserved -= released
        return released

    def reset_peaks(self) -> None:
        self.peak_allocated = self.allocated
        self.peak_reserved = self.reserved

    # -- internals --------------------------------------------------------------------------
    def _best_fit(self, size: int, small: bool) -> Block | None:
        free = [
            b
            for s in self.segments
            if s.small == small
            for b in s.blocks
            if not b.used and b.size >= size
        ]
        return min(free, key=lambda b: b.size, default=None)

    def _new_segment(self, alloc_size: int, small: bool) -> bool:
        if self.cap_bytes is not None and self.reserved + alloc_size > self.cap_bytes:
            return False
        if alloc_size > self.room():
            return False
        seg = Segment(alloc_size, small)
        seg.blocks.append(Block(seg, 0, alloc_size))
        self.segments.append(seg)
        self.reserved += alloc_size
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        return True

    def _use(self, block: Block, size: int) -> None:
        remaining = block.size - size
        split = remaining >= MIN_BLOCK if block.segment.small else remaining > SMALL_SIZE
        if split:
            rest = Block(block.segment, block.offset + size, remaining)
            blocks = block.segment.blocks
            blocks.insert(blocks.index(block) + 1, rest)
            block.size = size
        block.used = True
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
