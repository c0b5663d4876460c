"""The quantized decode step under ``torch.compile``: inductor fuses the step's many small ops (two norms, the rotary
embedding, cache writes and one query's attention per layer) into C++ kernels, where the eager step pays Python and
dispatch time for each.

It is paid for once per process: the first step compiles (slowly on a small CPU; the benchmark below times it), and
inductor keeps its kernels under ``ENGRAIN_HOME/inductor`` for the next process. So it is worth it where many answers follow one
load (a server, a benchmark run) and is off unless ``model.compile_decode`` asks for it. Where compiling fails (no
C++ compiler, an op inductor cannot lower) the eager step takes over for the rest of the process, with a note.
Greedy tokens can differ from the eager step's by rounding, as bf16's differ from fp32's.
Speed and compile time: ``python bench/bench_compiled_decode.py``.
"""

from __future__ import annotations

import os

import torch

from ..progress import note

ATTRIBUTE = "engrain_compile_decode"  # on the model: True where it was loaded to compile its decode steps
_compiled: dict = {}  # the eager forward -> its compiled form (one per process)
_failed: set = set()


def wanted(model) -> bool:
    return bool(getattr(model, ATTRIBUTE, False))


def run(forward, *args):
    """``forward(*args)`` through its compiled form; the eager ``forward`` once compiling has failed."""
    if forward in _failed:
        return forward(*args)
    if forward not in _compiled:
        from ..home import engrain_home

        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(engrain_home() / "inductor"))
        # dynamic: the cache offset and the batch's rows change every step; one graph serves them all.
        _compiled[forward] = torch.compile(forward, dynamic=True)
    try:
        return _compiled[forward](*args)
    except Exception as exc:  # noqa: BLE001 - inductor and dynamo raise many kinds; the eager step is always right
        _failed.add(forward)
        note(f"engrain: compiling the decode step failed ({type(exc).__name__}); decoding without it. "
             "Set model.compile_decode: false to skip the attempt.")
        return forward(*args)

