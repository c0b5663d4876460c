"""Compute off the server's worker thread, on a thread that ends with it.

The worker thread (``scheduler.py``) does the server's compute. A CPU build of PyTorch runs parallel work on OpenMP
(libgomp), which keeps a pool of threads for every thread that ever ran parallel work, until that thread ends. Once
the pools hold more threads than the machine has cores, libgomp stops spinning between parallel regions, and every
region of the worker's (each elementwise op of a forward) pays a sleep and a wake-up. The model loaded on the main
thread, which lives as long as the server, or a relevance gate's embedding run on the event loop's thread, would
leave such a pool behind; run on a passing thread, their pool goes with it. ``python bench/bench_admission.py
--threads`` measures what a pool left behind costs the worker's prefill.
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

T = TypeVar("T")


def on_passing_thread(fn: Callable[[], T], name: str = "engrain-compute") -> T:
    """``fn()`` run on a new thread that ends with it; its result returned, its exception raised, here."""
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller as it is
            out["error"] = exc

    thread = threading.Thread(target=run, name=name)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]
