"""Time and peak memory of a computation, each measured in a fresh Python process (Linux).

A child runs the measured code after one warm-up call, having reset its resident high-water
mark (``/proc/self/clear_refs``); the peak above the resident memory at that point is the
computation's peak. Large buffers come from mmap (``MALLOC_MMAP_THRESHOLD_``) and go back to
the system when freed, so that the high-water mark measures this computation alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

# The child's prelude: ``timed_peak(fn, repeats)`` -> {"seconds": median, "peak_mb": ...}
PRELUDE = r"""
import json, sys, time
import torch


def status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def timed_peak(fn, repeats):
    fn()  # warm-up: kernels, thread pools, gradient buffers
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the resident high-water mark
    base = status_kb("VmRSS")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"seconds": sorted(times)[len(times) // 2],
            "peak_mb": (status_kb("VmHWM") - base) / 1024}
"""


def run_child(body: str, *args, timeout: int = 3600) -> dict:
    """Run ``PRELUDE + body`` with ``args`` as ``sys.argv[1:]``; it prints one JSON line."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, "-c", PRELUDE + body, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])
