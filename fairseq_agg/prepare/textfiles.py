"""Line counting, batching and progress bars shared by the preparation tools."""

import collections
import itertools
import os
import sys
from typing import Callable, Iterable, Iterator, List

from tqdm import tqdm

BATCH_LINES = 1000


def count_lines(path: str) -> int:
    """Lines of a text file (a last line without a newline counts), read in binary chunks."""
    count, last = 0, b"\n"
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


def batches(items: Iterable, size: int = BATCH_LINES) -> Iterator[List]:
    iterator = iter(items)
    while True:
        batch = list(itertools.islice(iterator, size))
        if not batch:
            return
        yield batch


def progress(total: int, desc: str) -> tqdm:
    """A line-count progress bar on stderr; in a log file (not a terminal) it is redrawn every
    30 s instead of continuously."""
    return tqdm(
        total=total, desc=desc, unit=" lines", unit_scale=True, file=sys.stderr,
        mininterval=1.0 if sys.stderr.isatty() else 30.0, dynamic_ncols=True,
    )


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def ordered_map(pool, function: Callable, items: Iterable, ahead: int) -> Iterator:
    """``map(function, items)`` on a multiprocessing pool (or in this process when ``pool`` is
    None), in order, with at most ``ahead`` items in flight: ``Pool.imap`` would read its whole
    input into memory ahead of the workers, a corpus of several GB here."""
    if pool is None:
        yield from map(function, items)
        return
    pending = collections.deque()
    for item in items:
        pending.append(pool.apply_async(function, (item,)))
        if len(pending) >= ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()
