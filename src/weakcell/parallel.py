"""Process pools that are safe to start from any parent.

Workers start with "spawn", never "fork": a forked child inherits the parent's OpenMP / OpenCV / torch
thread pools in whatever state they were (a lock held by a thread that does not exist in the child), and
then hangs — seen in the test suite once torch had run before a cache build. Spawn costs an import per
worker (about a second), paid once per pool.
"""

from __future__ import annotations

import multiprocessing
import os
from multiprocessing.context import SpawnContext


def pool_context() -> SpawnContext:
    """The multiprocessing context every pool of the kit uses."""
    return multiprocessing.get_context("spawn")


def n_workers(requested: int, n_tasks: int) -> int:
    """``requested`` processes (0 = one per core), never more than there are tasks."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(requested or cores, n_tasks))
