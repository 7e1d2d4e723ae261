"""``python -m launcher.worker <run_dir>``: one rank's supervisor, what the ``deepspeed`` / ``accelerate`` CLIs start.

It runs the training process (``python -m launcher.train <run_dir>``) as its child and stays small (standard
library only), for three things only a parent can do:

- **Name a killed rank.** A process killed by a signal (``kill -9``, the out-of-memory killer, a native crash)
  cannot say so itself; its parent sees the signal and records it in ``errors/rank-R.txt``
  (launcher/failures.py), so the launcher names that rank instead of a peer that merely lost contact with it.
- **End with the launcher.** The ``deepspeed`` and ``accelerate`` launchers sit between ``python -m launcher`` and
  the ranks and do not notice when it dies (``kill -9``, a lost node). This process watches the launcher's pid
  (``LAUNCHER_PID``, set by the launcher) and then kills its rank, which would otherwise train on unwatched, and
  removes the rank's DeepSpeed shared-memory buffers.
- **Die together.** The child gets ``PR_SET_PDEATHSIG``: if this process is killed, so is its rank.

Stop signals (SIGTERM, SIGUSR1, SIGINT) are passed to the child, which finishes its step and saves.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from launcher.failures import killed_text, write_record

PR_SET_PDEATHSIG = 1


def remove_shm_buffers(addr: str, port: int | str | None) -> None:
    """Delete the shared-memory all-reduce buffers DeepSpeed's CPU backend leaves in /dev/shm (66 MiB per rank,
    held in RAM until deleted). They are named after the rendezvous address and port, so only this job's go."""
    for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{addr}_{port}_*"):
        leftover.unlink(missing_ok=True)


def _die_with(parent: int) -> None:
    """In the child, before exec: be killed when this supervisor dies (any way it dies)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def _wait_for_exit(pid: int) -> None:
    """Block until process ``pid`` has exited (a pidfd cannot be fooled by pid reuse)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError:  # kernel without pidfd: poll
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)
    select.select([fd], [], [])
    os.close(fd)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m launcher.worker <run_dir>")
    run_dir, rank = args[0], os.environ.get("RANK", "0")
    me = os.getpid()
    child = subprocess.Popen([sys.executable, "-u", "-m", "launcher.train", run_dir], preexec_fn=lambda: _die_with(me))
    orphaned = threading.Event()

    def forward(signum: int, _frame) -> None:
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, forward)

    def watch_launcher(pid: int) -> None:
        _wait_for_exit(pid)
        if child.poll() is None:
            orphaned.set()
            print(f"[rank {rank}] the launcher (pid {pid}) is gone: ending this rank", file=sys.stderr, flush=True)
            child.kill()

    if os.environ.get("LAUNCHER_PID", "").isdigit():
        threading.Thread(target=watch_launcher, args=(int(os.environ["LAUNCHER_PID"]),), daemon=True).start()
    rc = child.wait()
    if orphaned.is_set():
        remove_shm_buffers(os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""))
        return 1
    if rc < 0:
        write_record(run_dir, rank, "signal", killed_text(-rc), when=time.time())
        return 128 - rc
    return rc


if __name__ == "__main__":
    sys.exit(main())
