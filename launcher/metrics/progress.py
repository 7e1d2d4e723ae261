"""Console progress on rank 0: a progress bar with ETA on a terminal, plain periodic lines in log files (Slurm),
for training steps and for the ``datasets`` bars of data preparation."""

from __future__ import annotations

import math
import os
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

from datasets.utils import tqdm as hf_tqdm
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

def progress_mode(setting: str = "auto", stream: Any = None) -> str:
    """"bar" on a terminal, "lines" otherwise (Slurm logs, pipes, CI)."""
    if setting != "auto":
        return setting
    stream = stream or sys.stdout
    return "bar" if getattr(stream, "isatty", lambda: False)() and os.environ.get("TERM") != "dumb" else "lines"


class Progress:
    """A rank-0 progress indicator with ETA.

    ``bar``: a rich progress bar; lines printed through :meth:`print` appear above it. ``lines``: no bar, only a
    plain line every ``every_s`` seconds (and at the end), so a log file gets a few readable lines, not a redraw per
    step. ``every_s=None`` leaves lines mode silent (the caller prints its own periodic lines).
    """

    def __init__(self, total: int, desc: str, mode: str = "auto", enabled: bool = True,
                 every_s: float | None = 30.0, stream: Any = None, unit: str = ""):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.mode = progress_mode(mode, self.stream)
        self.done = 0
        self.start = self.last_line = time.time()
        self._bar = None
        if enabled and self.mode == "bar":
            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                     TextColumn("{task.fields[info]}"),
                                     console=Console(file=self.stream), transient=False)
            self._task = self._bar.add_task(desc, total=total, info="")
            self._bar.start()

    def eta(self) -> float:
        rate = self.done / max(time.time() - self.start, 1e-9)
        return (self.total - self.done) / rate if rate > 0 else float("nan")

    def update(self, n: int = 1, info: str = "") -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, advance=n, info=info)
        elif self.every_s is not None and (time.time() - self.last_line >= self.every_s or self.done >= self.total):
            self.last_line = time.time()
            pct = 100 * self.done / max(self.total, 1)
            print(f"{self.desc}: {self.done:,}/{self.total:,}{self.unit} ({pct:.0f}%), "
                  f"elapsed {duration(time.time() - self.start)}, eta {duration(self.eta())}"
                  + (f"  {info}" if info else ""), file=self.stream, flush=True)

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


@contextmanager
def library_progress(mode: str = "auto", every_s: float = 30.0, enabled: bool = True) -> Iterator[None]:
    """While preparing data: keep the ``datasets`` progress bars (they have an ETA) on a terminal; elsewhere turn
    each bar into a plain line every ``every_s`` seconds and one when it completes, so a Slurm log gets a few
    readable lines instead of a carriage-return redraw per batch. ``enabled=False`` (other nodes) silences them."""
    if enabled and progress_mode(mode, sys.stderr) == "bar":
        yield
        return

    def display(bar: Any, msg: str | None = None, pos: int | None = None) -> bool:
        now = time.time()
        if not hasattr(bar, "_line_at"):  # tqdm's first refresh, from its __init__
            bar._line_at, bar._line_done = now, False
            return True
        done = bar.total is not None and bar.n >= bar.total
        if enabled and (now - bar._line_at >= every_s or done and not bar._line_done):
            bar._line_at, bar._line_done = now, done
            bar.fp.write(bar.format_meter(**{**bar.format_dict, "ncols": 0}).strip() + "\n")
            bar.fp.flush()
        return True

    original = hf_tqdm.display
    hf_tqdm.display = display
    try:
        yield
    finally:
        hf_tqdm.display = original


def duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
