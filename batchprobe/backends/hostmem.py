"""The memory this process can still take on the host: the smallest of every limit the kernel
enforces on it. No torch.

Four kinds of limit can bind on Linux, each read from the files the kernel exports:

- **RAM**: `MemAvailable` in /proc/meminfo (memory the kernel can hand out without swapping).
- **cgroup v2** (containers, CI runners, systemd slices): `memory.max` less `memory.current`, at the
  process's cgroup and every ancestor (a parent's limit holds its children); `memory.high` too,
  where the kernel throttles hard. Exceeding `memory.max` wakes the OOM killer: not catchable.
- **cgroup v1**: `memory.limit_in_bytes` less usage, where usage leaves out inactive page cache
  (`total_inactive_file`, which the kernel reclaims first). Values of 2^60 and above mean none.
- **rlimits** (`ulimit -v`, `prlimit --as`, `--data`): `RLIMIT_AS` less the address space in use
  (`VmSize`), `RLIMIT_DATA` less `VmData`. Exceeding one fails the allocation (ENOMEM), which
  PyTorch raises as "DefaultCPUAllocator: can't allocate memory": catchable, an OOM outcome.

Paths are discovered from /proc/self/mountinfo and /proc/self/cgroup (a container's mount root is
stripped from the cgroup path). Every reader takes a root directory, so tests give it a fake tree.
"""

from __future__ import annotations

import ctypes
import os
import re
import resource
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

#: cgroup v1 reports "no limit" as PAGE_COUNTER_MAX pages (0x7FFFFFFFFFFFF000)
_V1_NONE = 1 << 60


@dataclass(frozen=True)
class HostLimit:
    """One limit on the memory this process may take."""

    label: str  # what sets it, in the words a user would look for
    limit_bytes: int
    used_bytes: int  # what counts against it now
    #: going over it fails the allocation (an error the probe catches) rather than waking the
    #: OOM killer
    catchable: bool = False
    #: the /proc/self/status field the kernel checks this limit against (VmSize, VmData), for
    #: a limit that counts this process's own mappings
    counts: str | None = None

    @property
    def headroom_bytes(self) -> int:
        return max(0, self.limit_bytes - self.used_bytes)

    def counted(self, proc: str = "/proc") -> int | None:
        """What counts against the limit now (one read of /proc/self/status), for a limit on
        this process's own mappings; None for the others."""
        return _status(proc, self.counts) if self.counts is not None else None


#: address space a probe may leave behind without it counting as a new size's kernels (the
#: allocator's own bookkeeping moves by a few pages)
LEFT_MAPPED_NOISE = 64 * 1024


class MovingLimit:
    """A limit on the process's own mappings (an rlimit), in the bytes of live tensors probes
    measure, as it moves during a search. Every new batch size leaves its library kernels
    mapped (a oneDNN kernel per shape: 0.5 MiB for an MLP's GELU, ~14 MiB for a small CNN's
    convolutions), so the limit falls as sizes are tried. It is measured when an allocation
    fails (the tensors live then plus the room the host had: exact to a few KiB, where the
    room read between probes is not) and, from there, lowered by what each probe leaves
    mapped. Told when a probe starts and how it ended; asked after each probe."""

    def __init__(self, limit: HostLimit) -> None:
        self.host = limit
        self.tensor_limit: int | None = None  # as the last failed allocation measured it
        self.left_mapped = 0  # what the last new size left mapped after its probe
        self._at_start: int | None = None  # what the host counted when the probe began
        self._measured = False  # the last probe measured the limit
        self._probes = 0

    def started(self, counted: int | None) -> None:
        self._at_start = counted

    def ended(self, measured: int | None) -> None:
        """The probe's region closed: `measured` is the limit its failed allocation found."""
        self._measured = measured is not None
        if measured is not None:
            self.tensor_limit = measured

    def now(self, held_bytes: int) -> int | None:
        """The limit to aim the next probe at: the measured one, less what each probe since
        left mapped, else the room now plus the tensors held (`held_bytes`); less what the last
        new size left, as the next size maps as much of its own before its peak. Read once
        after each probe, when it has let go of its tensors."""
        counted = self.host.counted()
        if counted is None:
            return None
        if self._at_start is not None:
            left = max(0, counted - self._at_start)
            left = left if left > LEFT_MAPPED_NOISE else 0
            self._probes += 1
            if self._probes > 1:
                # the first large size also maps what the process maps once (its allocator's
                # heap grows): not what the next size will map
                self.left_mapped = left
            if self.tensor_limit is not None and not self._measured:
                self.tensor_limit -= left
            self._at_start = None
        if self.tensor_limit is not None:
            return self.tensor_limit - self.left_mapped
        return self.host.limit_bytes - counted + held_bytes - self.left_mapped


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _int(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() else None


def _status(proc: str, key: str) -> int | None:
    for line in (_read(f"{proc}/self/status") or "").splitlines():
        if line.startswith(key + ":"):
            parts = line.split()
            return int(parts[1]) * 1024 if len(parts) > 1 and parts[1].isdigit() else None
    return None


def _unescape(path: str) -> str:
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")


@dataclass(frozen=True)
class _Mount:
    root: str  # the mount's root inside the hierarchy
    point: str  # where it is mounted
    version: int  # 1 or 2
    options: frozenset[str]


def _mounts(proc: str) -> list[_Mount]:
    mounts = []
    for line in (_read(f"{proc}/self/mountinfo") or "").splitlines():
        before, sep, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if not sep or len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        version = 2 if tail[0] == "cgroup2" else 1
        mounts.append(
            _Mount(
                _unescape(fields[3]),
                _unescape(fields[4]),
                version,
                frozenset(tail[2].split(",")),
            )
        )
    return mounts


def _leaf(mount: _Mount, path: str, sys_root: str) -> tuple[str, str]:
    """The process's cgroup directory under `mount` (and the mount point), with `sys_root`
    prefixed (a test's fake tree). A container's mount root is stripped from the path; a path
    outside the namespace falls back to the mount point."""
    root = mount.root.rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        path = path[len(root) :] or "/"
    point = os.path.normpath(sys_root + mount.point)
    leaf = os.path.normpath(point + "/" + path.lstrip("/"))
    return (leaf if os.path.isdir(leaf) else point), point


def _up(leaf: str, top: str) -> Iterator[str]:
    d = leaf
    while True:
        yield d
        if d == top or len(d) <= len(top):
            return
        d = os.path.dirname(d)


def _cgroup_limits(proc: str, sys_root: str) -> list[HostLimit]:
    limits: list[HostLimit] = []
    mounts = _mounts(proc)
    for line in (_read(f"{proc}/self/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2: "0::/path"
            for mount in (m for m in mounts if m.version == 2):
                leaf, top = _leaf(mount, path, sys_root)
                for d in _up(leaf, top):
                    if not os.path.exists(f"{d}/memory.max"):
                        continue  # the memory controller is not enabled here
                    used = _int(_read(f"{d}/memory.current")) or 0
                    where = "/" + os.path.relpath(d, top).lstrip(".")
                    for knob in ("memory.max", "memory.high"):
                        limit = _int(_read(f"{d}/{knob}"))  # "max" is none
                        if limit is not None:
                            limits.append(HostLimit(f"cgroup {knob} ({where})", limit, used))
                break
        elif "memory" in controllers.split(","):  # v1: "N:memory:/path"
            for mount in (m for m in mounts if m.version == 1 and "memory" in m.options):
                leaf, top = _leaf(mount, path, sys_root)
                for d in _up(leaf, top):
                    limit = _int(_read(f"{d}/memory.limit_in_bytes"))
                    if limit is None or limit >= _V1_NONE:
                        continue
                    usage = _int(_read(f"{d}/memory.usage_in_bytes")) or 0
                    stat = {}
                    for row in (_read(f"{d}/memory.stat") or "").splitlines():
                        key, _, value = row.partition(" ")
                        if value.isdigit():
                            stat[key] = int(value)
                    used = max(0, usage - stat.get("total_inactive_file", 0))
                    where = "/" + os.path.relpath(d, top).lstrip(".")
                    limits.append(HostLimit(f"cgroup memory.limit_in_bytes ({where})", limit, used))
                break
    return limits


def host_limits(proc: str = "/proc", sys_root: str = "") -> list[HostLimit]:
    """Every limit that holds this process, each with what counts against it now."""
    limits = _cgroup_limits(proc, sys_root)
    for name, key, label in (
        ("RLIMIT_AS", "VmSize", "RLIMIT_AS (ulimit -v) less the address space in use"),
        ("RLIMIT_DATA", "VmData", "RLIMIT_DATA (ulimit -d) less the data in use"),
    ):
        soft, used = _rlimit(name), _status(proc, key)
        if soft is not None and used is not None:
            limits.append(HostLimit(label, soft, used, catchable=True, counts=key))
    meminfo = _meminfo(proc)
    if "MemAvailable" in meminfo:
        total = meminfo.get("MemTotal", meminfo["MemAvailable"])
        limits.append(
            HostLimit("RAM available (MemAvailable)", total, total - meminfo["MemAvailable"])
        )
    return limits


def _meminfo(proc: str) -> dict[str, int]:
    meminfo: dict[str, int] = {}
    for row in (_read(f"{proc}/meminfo") or "").splitlines():
        key, _, rest = row.partition(":")
        value = rest.split()
        if value and value[0].isdigit():
            meminfo[key] = int(value[0]) * 1024
    return meminfo


def ram_available(proc: str = "/proc") -> int | None:
    """MemAvailable: the RAM the kernel can hand out without swapping (None: not Linux)."""
    return _meminfo(proc).get("MemAvailable")


#: glibc's mallopt parameters: the size from which an allocation gets its own mapping, and the
#: free space at the top of the heap past which it is given back
_M_MMAP_THRESHOLD = -3
_M_TRIM_THRESHOLD = -1
#: glibc's initial threshold: every block of 128 KiB or more is mapped on its own and unmapped
#: when freed
RETURNING = 128 * 1024
#: the environment variable glibc reads the threshold from at start (the trailing _ is glibc's)
MMAP_THRESHOLD_ENV = "MALLOC_MMAP_THRESHOLD_"


def mmap_threshold(environ: Mapping[str, str] | None = None) -> tuple[int, bool]:
    """The mmap threshold steps run at under a limit that counts this process's mappings, and
    whether the environment chose it: `glibc.malloc.mmap_threshold` in `GLIBC_TUNABLES`, else
    `MALLOC_MMAP_THRESHOLD_` (glibc's order; what a training run started from the same
    environment gets), else `RETURNING`."""
    env = os.environ if environ is None else environ
    value = _tunable(env, "glibc.malloc.mmap_threshold") or env.get(MMAP_THRESHOLD_ENV, "")
    return (int(value), True) if value.isdigit() else (RETURNING, False)


def set_mmap_threshold(nbytes: int) -> bool:
    """Serve every allocation of `nbytes` or more from its own mapping, unmapped when it is freed
    (glibc's `mallopt(M_MMAP_THRESHOLD)`, which also stops glibc from moving the threshold; the
    heap is trimmed past twice that). Left alone, glibc raises the threshold after each large
    free, up to 32 MiB, and serves later blocks from heaps that keep the address space they
    reach: a transformer encoder's plain training loop under `prlimit --as` 2.5 GiB held 2.4 GiB
    of address space at 60 samples with glibc's defaults, 0.8 GiB (1.7 GiB at its peak) at
    128 KiB; 68 samples fit where 110 fit at 128 KiB. False where the C library has no such
    setting (not glibc)."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, nbytes)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 * nbytes))


def _mallopt() -> Any:
    """glibc's `mallopt(param, value)`, or None where the C library has none (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt


def binding(limits: list[HostLimit]) -> HostLimit | None:
    """The limit with the least headroom: the one that sets how much this process can take."""
    return min(limits, key=lambda x: x.headroom_bytes, default=None)


#: Intel MKL's switch for its buffer cache ("fast memory manager"), read once when torch loads MKL
MKL_CACHE_OFF = "MKL_DISABLE_FAST_MM"


def address_space_limited() -> bool:
    """An rlimit caps this process's address space or data (`ulimit -v`, `prlimit --as`)."""
    return any(_rlimit(name) is not None for name in ("RLIMIT_AS", "RLIMIT_DATA"))


def _rlimit(name: str) -> int | None:
    """The soft limit `name` (RLIMIT_AS, ...) in bytes; None when there is none."""
    soft, _ = resource.getrlimit(getattr(resource, name))
    return soft if soft != resource.RLIM_INFINITY and soft >= 0 else None


def before_torch() -> bool:
    """Call before torch is imported. Under an rlimit on the address space, turn off MKL's buffer
    cache (`MKL_DISABLE_FAST_MM=1`, unless the environment already says): MKL keeps the scratch
    buffers of every matrix shape it has multiplied, and under such a limit each new batch size
    probed left the next ~12 MiB less room (a 3-layer MLP: +18, +12, +13 MiB at 4000, 8000, 12000;
    with the cache off, under 2 MiB), so what fit depended on the sizes probed before. A training
    run multiplies one set of shapes: it holds one set of buffers, which each probe still counts
    while its op runs. True when it turned the cache off."""
    import sys

    if "torch" in sys.modules or not address_space_limited():
        return False
    one_arena()
    if MKL_CACHE_OFF in os.environ:
        return False
    os.environ[MKL_CACHE_OFF] = "1"
    return True


#: glibc's mallopt parameter for the most arenas its allocator makes, and the variable it reads
#: the same setting from at start
_M_ARENA_MAX = -8
ARENA_MAX_ENV = "MALLOC_ARENA_MAX"


def arena_max(environ: Mapping[str, str] | None = None) -> str | None:
    """The arena limit the environment sets, if any: `glibc.malloc.arena_max` in
    `GLIBC_TUNABLES`, else `MALLOC_ARENA_MAX` (glibc's order: the tunable wins); a value glibc
    ignores (not a positive number) is none."""
    env = os.environ if environ is None else environ
    value = _tunable(env, "glibc.malloc.arena_max") or env.get(ARENA_MAX_ENV, "")
    return value if value.isdigit() and int(value) > 0 else None


def _tunable(env: Mapping[str, str], name: str) -> str:
    """A glibc tunable's value in `GLIBC_TUNABLES` ("" when it is not set there)."""
    for item in env.get("GLIBC_TUNABLES", "").split(":"):
        key, _, value = item.partition("=")
        if key == name:
            return value
    return ""


def one_arena() -> bool:
    """Under a limit on the address space, let every thread allocate from glibc's main arena
    (`mallopt(M_ARENA_MAX, 1)`), unless the environment sets the arena limit itself. A thread's
    first allocation gets it an arena of its own (up to 8 per core), which reserves 64 MiB of
    address space, counted by RLIMIT_AS; which of torch's and the libraries' threads ever
    allocate, and which reuse an arena a finished thread left, depends on timing, so the room
    moved between runs of the same command by 64 MiB (one run in 6 to 12: a 3-layer MLP's
    exact answer went from 2640 to 1). With one arena every run has the same room. Call before
    torch starts its threads. False where it did nothing (the environment decides, or the C
    library is not glibc)."""
    if arena_max() is not None:
        return False
    mallopt = _mallopt()
    if mallopt is None or not mallopt(_M_ARENA_MAX, 1):
        return False
    os.environ[ARENA_MAX_ENV] = "1"  # what a child (--isolate) and the training run get
    return True


#: the environment this process started with, before batchprobe set anything in it
_STARTED_WITH = dict(os.environ)


def inherited(environment: Mapping[str, str]) -> bool:
    """A training run started from the shell this process was started from has `environment`
    already (batchprobe set none of it itself)."""
    return all(_STARTED_WITH.get(k) == v for k, v in environment.items())


def training_environment() -> dict[str, str]:
    """Under a limit on this process's own mappings, what a training run's environment must say
    for batchprobe's figures to hold there: the mmap threshold every step ran at, and MKL's
    buffer cache off when it was."""
    threshold, _ = mmap_threshold()
    env = {MMAP_THRESHOLD_ENV: str(threshold)}
    arenas = arena_max()
    if arenas is not None:
        env[ARENA_MAX_ENV] = arenas
    if os.environ.get(MKL_CACHE_OFF) == "1":
        env[MKL_CACHE_OFF] = "1"
    return env


#: room under an rlimit below which an interpreter that cannot allocate is out of it
NO_ROOM_BYTES = 1024**3


def _tightest_rlimit(proc: str) -> HostLimit | None:
    """The rlimit (a limit whose failures are catchable) with the least room, if any holds."""
    return min(
        (x for x in host_limits(proc) if x.catchable), key=lambda x: x.headroom_bytes, default=None
    )


def out_of_room(exc: BaseException, proc: str = "/proc", measured: bool = False) -> str | None:
    """What to tell the user when `exc` is this process running out of room under an rlimit —
    torch's libraries could not be mapped ("failed to map segment", also where numpy wraps it
    in its advice), the interpreter could not allocate (MemoryError, or CPython's "error return
    without exception set"), building the model failed in the host allocator ("can't allocate
    memory") — naming the limit and what is mapped already; None for anything else, and where
    no rlimit holds (then it is no limit of the user's). `measured`: the command has results
    (the failure came after them)."""
    said = no_room_words(exc)
    if said is None:
        return None
    limit = _tightest_rlimit(proc)
    if limit is None:
        return None
    asked = re.search(r"tried to allocate (\d+) bytes", said)
    over = asked is not None and int(asked.group(1)) > limit.headroom_bytes
    if not over and limit.headroom_bytes > max(NO_ROOM_BYTES, limit.limit_bytes // 4):
        return None  # room enough: not the limit's doing (a bug keeps its traceback)
    what = f"{type(exc).__name__}: {said}" if said else type(exc).__name__
    when = "" if measured else " before anything was measured"
    gib = 1024**3
    return (
        f"out of memory under {limit.label.split(' less ')[0]}{when} "
        f"({what}): the limit is {limit.limit_bytes / gib:.2f} GiB and this process maps "
        f"{limit.used_bytes / gib:.2f} GiB of it already (torch's libraries, the model). "
        "Raise or lift the limit (ulimit -v, prlimit --as)."
    )


#: room above which no torch build's libraries run short of address space: no trial load
TRIAL_LOAD_BELOW = 16 * 1024**3
#: a trial process takes this process's room: it maps what this one maps more than it does,
#: by the counter the limit counts (VmSize for RLIMIT_AS, VmData for RLIMIT_DATA)
_TRIAL = """
import mmap, sys
key, target = sys.argv[1], int(sys.argv[2])
used = lambda: next(int(l.split()[1]) * 1024 for l in open("/proc/self/status")
                    if l.startswith(key + ":"))
pad = target - used()
# private, writable, never touched: counted by RLIMIT_AS and RLIMIT_DATA, using no memory
ballast = mmap.mmap(-1, pad, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(
    mmap, "MAP_NORESERVE", 0)) if pad > 0 else None
import torch, torch.nn
torch.ones(1) + 1
print("loaded")
"""
#: what a trial load that ran out of room says, besides `_NO_ROOM_MARKERS`
_TRIAL_NO_ROOM = ("memoryerror", "bad_alloc", "memory allocation still failed")


def load_fails(proc: str = "/proc", timeout_s: float = 300.0) -> str | None:
    """Under an rlimit with less room than any torch build could want, load torch first in a
    child process that has this process's room: just below what loading needs, torch's native
    libraries end the process themselves (OpenBLAS: "Memory allocation still failed after 10
    retries", exit 1; C++'s `std::bad_alloc`, SIGABRT), before Python can say anything. What to
    tell the user when the child ran out of room (killed by a signal, or saying so); None when
    it loaded, failed for another reason (then loading here says why, with its traceback), or
    when nothing is to be tried (no rlimit, room enough, torch loaded already)."""
    import subprocess
    import sys

    if "torch" in sys.modules:
        return None
    limit = _tightest_rlimit(proc)
    if limit is None or limit.headroom_bytes >= TRIAL_LOAD_BELOW:
        return None
    used = _status(proc, limit.counts or "VmSize")
    if used is None:
        return None
    try:
        done = subprocess.run(
            [sys.executable, "-c", _TRIAL, limit.counts or "VmSize", str(used)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None  # no verdict: load it here and see
    if done.returncode == 0 and "loaded" in done.stdout:
        return None
    said = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    text = done.stderr.lower()
    markers = (*_NO_ROOM_MARKERS, *_TRIAL_NO_ROOM)
    if done.returncode >= 0 and not any(m in text for m in markers):
        return None  # not the room: loading here says what it is
    why = next((s for s in reversed(said) if any(m in s.lower() for m in markers)), None)
    why = why or (said[-1] if said else f"killed by signal {-done.returncode}")
    gib = 1024**3
    return (
        f"out of memory under {limit.label.split(' less ')[0]} before anything was measured: "
        f"torch could not be loaded in the room left (tried in a child process: {why}); the "
        f"limit is {limit.limit_bytes / gib:.2f} GiB, this process uses {used / gib:.2f} GiB of "
        f"it already, and loading torch takes more than the {limit.headroom_bytes / gib:.2f} GiB "
        "left (a CUDA build maps ~3.1 GiB). Raise or lift the limit (ulimit -v, prlimit --as)."
    )


#: what a loader or an allocator says when the room ran out, in an exception's text
_NO_ROOM_MARKERS = ("failed to map segment", "cannot allocate memory", "can't allocate memory")


def no_room_words(exc: BaseException) -> str | None:
    """The line of `exc` (or of what caused it) that says the room ran out: "" for a bare
    MemoryError or SystemError, None when nothing does."""
    seen: BaseException | None = exc
    for _ in range(8):  # the exception, its cause or context, theirs
        if seen is None:
            break
        for line in str(seen).splitlines():
            if any(m in line.lower() for m in _NO_ROOM_MARKERS):
                return line.strip()
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    if isinstance(exc, (MemoryError, SystemError)):
        return str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return None


def mkl_buffer_cache() -> str:
    """What `env` and the CPU device say about MKL's buffer cache."""
    return "off (MKL_DISABLE_FAST_MM=1)" if os.environ.get(MKL_CACHE_OFF) == "1" else "on"
