"""How long this process's threads waited for a CPU: the sign of a busy machine.

Linux keeps, per thread, the time it ran and the time it was runnable but waited on a run queue
(`/proc/self/task/<tid>/schedstat`, fields 1 and 2, in nanoseconds). Over a window, the waited
share `wait / (run + wait)` is near 0 on a machine with a CPU free for every thread and rises as
other processes take the CPUs: with as many busy processes as cores, each of torch's threads
waits about half the time. A step's wall-clock time on such a machine says little about the
code: its intra-op threads can fall into lock-step behind the other processes (each parallel op
then costs a scheduler time slice; seen: a step 180x slower, steady to 1%). A timing taken there
is flagged instead of being trusted. Elsewhere (no /proc) every figure is None.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

_TASKS = "/proc/self/task"

#: a waited share above this: the machine was busy while timed (idle: ~0; as many busy processes
#: as cores: ~0.5 for each of torch's threads)
BUSY_WAIT = 0.2

Snapshot = dict[str, tuple[int, int]]  # thread id -> (ns run, ns waited)


def _fields(tid: str, name: str) -> list[str]:
    """The whitespace-separated fields of a thread's file (after the command name in `stat`,
    which may hold spaces); none when the thread ended meanwhile."""
    try:
        with open(f"{_TASKS}/{tid}/{name}") as f:
            text = f.read()
    except OSError:
        return []
    return (text.rpartition(")")[2] if name == "stat" else text).split()


def _tids() -> list[str] | None:
    try:
        return os.listdir(_TASKS)
    except OSError:
        return None


def busy(cpu_wait: float | None) -> bool:
    """A waited share that says other processes held the CPUs."""
    return cpu_wait is not None and cpu_wait > BUSY_WAIT


def snapshot() -> Snapshot | None:
    """Run and wait times of every thread of this process now; None where Linux does not say."""
    out: Snapshot = {}
    for tid in _tids() or ():
        fields = _fields(tid, "schedstat")
        if len(fields) >= 2 and fields[0].isdigit() and fields[1].isdigit():
            out[tid] = (int(fields[0]), int(fields[1]))
    return out or None


@dataclass
class CpuWait:
    """Run and wait time accumulated over windows (`start`, then `stop`)."""

    run_ns: int = 0
    wait_ns: int = 0
    _open: Snapshot | None = None
    measured: bool = False

    def start(self) -> None:
        self._open = snapshot()

    def stop(self) -> None:
        before, self._open = self._open, None
        after = snapshot()
        if before is None or after is None:
            return
        for tid, (run, wait) in after.items():
            run0, wait0 = before.get(tid, (0, 0))  # a thread started in the window: all of it
            self.run_ns += max(0, run - run0)
            self.wait_ns += max(0, wait - wait0)
        self.measured = True

    @property
    def share(self) -> float | None:
        """Of the time the threads wanted a CPU, the share they waited for one; None when not
        measured (or when they never ran)."""
        total = self.run_ns + self.wait_ns
        return self.wait_ns / total if self.measured and total > 0 else None


def _activity() -> dict[str, tuple[str, str]] | None:
    """Per other thread of this process: its state letter and its schedstat line."""
    me = str(threading.get_native_id())
    tids = _tids()
    if tids is None:
        return None
    out = {}
    for tid in tids:
        stat, sched = _fields(tid, "stat"), _fields(tid, "schedstat")
        if tid != me and stat and sched:
            out[tid] = (stat[0], " ".join(sched))
    return out


def settle_threads(timeout_s: float = 1.0, interval_s: float = 0.002) -> bool:
    """Wait until every other thread of this process is asleep and stays so for `interval_s`:
    none runnable (state R: running, or waiting on a run queue), none that ran meanwhile (a
    thread waiting for the GIL sleeps, and runs once this one sleeps). A collective's worker
    thread drops its last reference to a tensor only after the waiter has been told the
    collective is done; on a busy machine it may wait a while for a CPU to do so. True when
    settled, False after `timeout_s` (a thread that never rests) or where Linux does not say."""
    deadline = time.monotonic() + timeout_s
    before = _activity()
    while before is not None:
        time.sleep(interval_s)
        now = _activity()
        if now is None:
            return False
        if now == before and all(state != "R" for state, _ in now.values()):
            return True
        if time.monotonic() > deadline:
            return False
        before = now
    return False
