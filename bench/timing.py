"""The one timer the benchmarks share: median wall time of a step, synchronised on CUDA.

The scripts run as ``python bench/NAME.py``, so this folder is on ``sys.path`` and they import it as ``timing``.
"""

import statistics
import time
from collections.abc import Callable

import torch


def median_seconds(step: Callable[[], object], warmup: int, iters: int, device: torch.device) -> float:
    """Median seconds of ``step()`` over ``iters`` calls after ``warmup`` calls.

    The median, not the mean, so that one call slowed by another process on a shared machine does not move the
    figure; on CUDA each call is bracketed by ``synchronize`` so that queued kernels are counted where they run.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
