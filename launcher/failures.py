"""Failure reports: each rank records how it ended in ``<run_dir>/errors/rank-R.txt``, and the launcher names the
rank that failed first from those records.

A record is a header line ``<unix time> <kind>`` and the details. Kinds:

- ``error``: a Python exception in the training process (the details are its traceback);
- ``signal``: the training process was killed by a signal (``kill -9``, the kernel's out-of-memory killer, a
  native crash); written by its supervisor (launcher/worker.py), since a killed process writes nothing;
- ``peer_lost``: the rank failed only because another rank vanished (a collective lost its connection).

The first rank that failed by itself is the one to name: ``peer_lost`` records are consequences. Records are
read defensively: an empty or garbled file (a full disk) still gives a report.
"""

from __future__ import annotations

import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

ERRORS_DIR = "errors"
KINDS = ("error", "signal", "peer_lost")
# What collectives raise when the other side of a connection is gone (gloo, NCCL, torch's TCP store).
_PEER_LOST = re.compile(r"Connection (reset|closed) by peer|Broken pipe|ncclRemoteError|remote process exited|"
                        r"communicator was aborted|DistNetworkError|Socket Timeout|recvValue|Connection refused",
                        re.IGNORECASE)


@dataclass
class RankRecord:
    rank: str
    time: float
    kind: str
    text: str
    path: Path

    @property
    def summary(self) -> str:
        lines = [x for x in self.text.strip().splitlines() if x.strip()]
        return lines[-1].strip() if lines else "(no details: the error file was empty)"


def lost_peer(err: BaseException) -> bool:
    """Whether ``err`` says a peer of a collective vanished (so this rank is not the one to blame)."""
    names = {type(e).__name__ for e in _chain(err)}
    return bool(names & {"DistNetworkError"}) or any(_PEER_LOST.search(text_of(e)) for e in _chain(err))


def text_of(err: BaseException) -> str:
    try:
        return str(err)
    except Exception:  # a library's __str__ that fails on its own arguments must not hide the error
        return type(err).__name__


def _chain(err: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur: BaseException | None = err
    while cur is not None and len(out) < 10:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def write_record(run_dir: str | Path, rank: str, kind: str, text: str, when: float | None = None) -> Path | None:
    """Record how ``rank`` ended, unless it already has a record (the first one is the cause). Never raises:
    on a full disk the record is lost, not the report."""
    path = Path(run_dir) / ERRORS_DIR / f"rank-{rank}.txt"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "x", encoding="utf-8") as f:
            f.write(f"{time.time() if when is None else when} {kind}\n{text}")
        return path
    except OSError:
        return None


def read_records(run_dir: Path) -> list[RankRecord]:
    """Every rank's record, oldest first; tolerant of empty, truncated or garbled files."""
    out = []
    for f in sorted((Path(run_dir) / ERRORS_DIR).glob("rank-*.txt")):
        try:
            head, _, text = f.read_text(encoding="utf-8", errors="replace").partition("\n")
            stamp = f.stat().st_mtime
        except OSError:
            continue
        fields = head.split()
        try:
            stamp = float(fields[0])
        except (IndexError, ValueError):
            text = f"{head}\n{text}" if head.strip() else text
        kind = fields[1] if len(fields) > 1 and fields[1] in KINDS else "error"
        out.append(RankRecord(f.stem.split("-", 1)[1], stamp, kind, text, f))
    return sorted(out, key=lambda r: r.time)


def signal_name(signum: int) -> str:
    try:
        return f"{signal.Signals(signum).name} ({signum})"
    except ValueError:
        return f"signal {signum}"


def _exit_signal(rc: int) -> int | None:
    """The signal an exit status stands for: negative (Python's subprocess) or 128 + N (a shell)."""
    if rc < 0:
        return -rc
    if 128 < rc < 160:
        return rc - 128
    if rc > 256 - 65:  # sys.exit(-N) of a launcher in between: 256 - N
        return 256 - rc
    return None


def failure_report(run_dir: Path, rc: int) -> list[str]:
    """Lines that name the rank that failed first, and how; ranks that only lost a peer are one line."""
    records = read_records(run_dir)
    own = [r for r in records if r.kind != "peer_lost"]
    lines = []
    if own:
        first = own[0]
        lines.append(f"workers failed (exit code {rc}); rank {first.rank} failed first: {first.summary}")
        if first.kind == "error":
            lines.append(f"its full traceback is above and in {first.path}")
    else:
        sig = _exit_signal(rc)
        how = (f"a worker was killed by {signal_name(sig)}" if sig else "a worker crashed without a Python error")
        lines.append(f"workers failed with exit code {rc} ({how}; no rank recorded an error of its own, see above)")
    lost = [r.rank for r in records if r.kind == "peer_lost"]
    if lost:
        lines.append(f"rank{'s' if len(lost) > 1 else ''} {', '.join(lost)} then stopped because a peer vanished "
                     f"(e.g. {next(r for r in records if r.kind == 'peer_lost').summary[:160]})")
    return lines


def killed_text(signum: int) -> str:
    """The record of a training process killed by ``signum``."""
    why = {signal.SIGKILL: "kill -9, or the kernel's out-of-memory killer (see `dmesg`)",
           signal.SIGSEGV: "a native crash; the stack printed by faulthandler is above",
           signal.SIGABRT: "a native abort; the message above it says why",
           signal.SIGBUS: "a native crash, often a full /dev/shm"}.get(signum, "sent by another process")
    return f"killed by {signal_name(signum)}: {why}"
