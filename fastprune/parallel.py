"""Independent CPU jobs, one per core: many small torch ops scale better side by side than split across cores."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from tqdm.auto import tqdm

T = TypeVar("T")
R = TypeVar("R")


def map_per_core(fn: Callable[[T], R], items: Sequence[T], desc: str) -> list[R]:
    """``[fn(x) for x in items]``, run on as many threads as torch uses, each torch op single-threaded.

    Each job's result is what it would be alone on one thread (no op is split across threads), whatever the
    number of cores. Torch releases the GIL inside its ops, so the threads run in parallel.
    """
    threads = torch.get_num_threads()

    def job(x: T) -> R:
        torch.set_num_threads(1)  # this thread's own setting (OpenMP keeps one per thread)
        return fn(x)

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            futures = [pool.submit(job, x) for x in items]
            for future in tqdm(futures, desc=desc, disable=None, leave=False):
                future.result()
        return [f.result() for f in futures]
    finally:
        torch.set_num_threads(threads)
