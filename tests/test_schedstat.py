from __future__ import annotations

import subprocess
import sys

import pytest

from batchprobe.schedstat import BUSY_WAIT, CpuWait, snapshot

from helpers import crowded_cpu

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux schedstat")

# a child that spins for half a second and prints the share of it its thread waited for a CPU
SPIN = """
import time
from batchprobe.schedstat import CpuWait
w = CpuWait()
w.start()
end = time.perf_counter() + 0.5
while time.perf_counter() < end:
    pass
w.stop()
print(w.share)
"""


def test_every_thread_of_this_process_is_counted() -> None:
    """Every thread of the process is read, this one and one started inside the window (a
    thread unknown at the start counts from nothing), and the window's figures are in range."""
    import threading

    started, done = threading.Event(), threading.Event()
    native: list[int] = []

    def work() -> None:
        native.append(threading.get_native_id())
        sum(range(10**6))
        started.set()
        done.wait()

    w = CpuWait()
    w.start()
    t = threading.Thread(target=work)
    t.start()
    started.wait()
    during = snapshot()
    done.set()
    t.join()
    w.stop()
    assert during is not None and str(native[0]) in during
    me = snapshot()
    assert me is not None and str(threading.get_native_id()) in me
    assert w.measured and w.run_ns > 0 and w.share is not None and 0 <= w.share <= 1


def test_a_crowded_cpu_shows_as_waiting() -> None:
    """Two busy processes on the child's only CPU: it gets about a third of it and waits for
    the rest, however fast the machine (the kernel shares a CPU fairly)."""
    with crowded_cpu(hogs=2) as pin:
        out = subprocess.run(
            [sys.executable, "-c", SPIN], capture_output=True, text=True, preexec_fn=pin, timeout=60
        )
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) > BUSY_WAIT


def test_nothing_measured_says_none() -> None:
    w = CpuWait()
    assert w.share is None
