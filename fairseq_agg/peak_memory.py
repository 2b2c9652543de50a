"""The peak tensor memory of a piece of work, as the benchmarks measure it (``scripts/bench.py``,
``examples/bench_hf.py``). torch only.

On CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated at the start. On CPU, where
torch keeps no such counter: the running sum of the allocations and frees that torch's profiler
records (``profile_memory``: every tensor allocation, kernel temporaries included) at its
highest. So it is exact and never negative, whatever the allocator keeps or returns to the OS,
unlike resident-set growth. The two differ only by memory allocated before the start and freed
during the work, which the CPU figure does not subtract (the profiler sees no allocation of it).
"""

import os
from typing import Callable, Optional

import torch

__all__ = ["PeakMemory", "peak_live_bytes"]


class PeakMemory:
    """Measures from :meth:`start` to :meth:`stop` (or over a ``with`` block), which returns the
    peak bytes (also kept as ``peak_bytes``); for work that a callback opens and closes, such as
    one step of a training loop."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak_bytes: Optional[int] = None
        self._profiler = None
        self._base = 0

    def start(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        from torch.profiler import ProfilerActivity, profile

        # kineto reports its own start and stop on stderr at every level below 6
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
        self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profiler.start()
        return self

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return self.peak_bytes
        self._profiler.stop()
        # "[memory]" events are allocations (positive bytes) and frees (negative), in the order
        # of their timestamps; sorted() keeps the recorded order of events with equal ones
        events = sorted((e for e in self._profiler.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns())
        self._profiler = None
        if not events:
            raise RuntimeError("torch's profiler recorded no allocation or free during the work: "
                               "its peak memory is unknown")
        live = peak = 0
        for event in events:
            live += event.nbytes()
            peak = max(peak, live)
        self.peak_bytes = peak
        return peak

    def __enter__(self) -> "PeakMemory":
        return self.start()

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.stop()
        elif self._profiler is not None:
            self._profiler.stop()  # the work's own error is the one to see
            self._profiler = None


def peak_live_bytes(run: Callable[[], object], device) -> int:
    """Peak bytes of the tensor memory that ``run()`` allocates and holds at once."""
    with PeakMemory(device) as meter:
        run()
    return meter.peak_bytes
