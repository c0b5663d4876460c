"""Progress of long work (ingest, synthesis, indexing, training): a rich bar on a terminal, plain lines in a log."""

from __future__ import annotations

import sys
import time

LOG_EVERY_S = 60.0  # how often progress is written as a plain line where stderr is a file, not a terminal


class Progress:
    """A rich progress bar (done of total, a line of info, elapsed, ETA) on stderr; silent when not shown.

    Where stderr is not a terminal (nohup, a CI log, a batch job) rich draws nothing until the bar closes, so a run
    of hours would show nothing; there a plain line with the same numbers is written every ``LOG_EVERY_S``."""

    def __init__(self, show: bool, total: int, start: int, label: str) -> None:
        self.show, self.total, self.start, self.label = show, total, start, label
        self.completed = start
        if show:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.console = Console(stderr=True)
            self.bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                TimeRemainingColumn(), console=self.console)
            self.task = self.bar.add_task(label, total=total, completed=start, info="")
            self.t0 = self.logged = time.monotonic()

    def __enter__(self):
        if self.show:
            self.bar.__enter__()
        return self

    def __exit__(self, *a):
        if self.show:
            self.bar.__exit__(*a)
        return False

    def update(self, completed: int, info: str = "") -> None:
        self.completed = completed
        if not self.show:
            return
        self.bar.update(self.task, completed=completed, info=info)
        now = time.monotonic()
        if not self.console.is_terminal and now - self.logged >= LOG_EVERY_S and completed < self.total:
            self.logged = now
            self.console.print(plain_progress(self.label, completed, self.total, self.start, now - self.t0, info),
                               soft_wrap=True, highlight=False)

    def set_total(self, total: int) -> None:
        """A new end: a run whose plan changed on the way (``train.max_minutes``)."""
        self.total = total
        if self.show:
            self.bar.update(self.task, total=total)

    def advance(self, k: int = 1, info: str = "") -> None:
        """``k`` more done: for work counted as it finishes (a file, a batch of embeddings) rather than in total."""
        self.update(self.completed + k, info)


def plain_progress(label: str, completed: int, total: int, start: int, elapsed: float, info: str = "") -> str:
    """'train lora 120/1095 (11%) loss 1.78 · elapsed 0:06:54 · ETA 0:56:10' (ETA from this sitting's pace)."""
    done = completed - start
    eta = _clock(elapsed / done * (total - completed)) if done > 0 else "?"
    text = f"{label} {completed}/{total} ({100 * completed / max(1, total):.0f}%)"
    return f"{text} {info} · elapsed {_clock(elapsed)} · ETA {eta}" if info else \
        f"{text} · elapsed {_clock(elapsed)} · ETA {eta}"


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def note(msg: str) -> None:
    """A one-line status message on stderr (what a long job is doing and why), apart from the answers on stdout."""
    print(msg, file=sys.stderr, flush=True)
