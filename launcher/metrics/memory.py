"""Memory of this process, read in one place: resident host memory now and at its peak, and the device's peak.

Host: the resident set (``VmRSS``) and its high-water mark (``VmHWM``), which :func:`reset_peak_memory` restarts
(Linux's ``clear_refs``) so that model loading does not hide the steady state; :func:`lifetime_peak_rss` is the
kernel's ``ru_maxrss``, which nothing resets. Resident memory counts memory-mapped file pages too (Arrow data,
checkpoint shards being read). Device: ``torch.cuda.max_memory_allocated`` (what tensors held).
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

GIB = 1024**3
MIB = 1024**2


def lifetime_peak_rss() -> int:
    """The most resident bytes this process has held since it started (never reset)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def host_rss() -> tuple[int, int]:
    """(current, peak) resident bytes of this process (peak since start or the last reset)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        peak = lifetime_peak_rss()
        return peak, peak


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak counters afresh (host: Linux's clear_refs "5"; elsewhere the lifetime peak stays)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def device_peak(device: torch.device) -> int:
    """Peak bytes allocated by tensors on ``device`` since the last reset (0 off CUDA)."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0
