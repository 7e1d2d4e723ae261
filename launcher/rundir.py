"""One run directory, one run: a unique name for every new run, a lock held by its launcher, and a clean-up that
removes only what this process created.

- ``${unique_dir:<path>}`` (used by ``hydra.run.dir`` in conf/config.yaml) creates ``<path>`` atomically, or
  ``<path>-2``, ``-3``, ... when another launcher started in the same second got ``<path>`` first.
- :func:`hold_run_dir` takes an exclusive ``flock`` on ``<run_dir>/.launcher.lock`` for the launcher's lifetime
  (the kernel releases it however the process ends). A second live launcher on the same directory is refused,
  with the first one's pid and host.
- :func:`remove_created` undoes a rejected or dry run: entries that existed before this process are kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator

from omegaconf import OmegaConf

from launcher.config import ConfigError

LOCK_NAME = ".launcher.lock"
HYDRA_OWN = (".hydra", "__main__.log")  # what Hydra writes into a run directory before our code runs
STARTED = time.time()


class RunDirBusy(ConfigError):
    """Another live launcher holds this run directory."""


def unique_dir(path: str) -> str:
    """``path``, created now; if it exists already, the first free ``path-N`` (created now)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        candidate = path if n == 1 else f"{path}-{n}"
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            continue
    raise ConfigError(f"{path}: 1000 run directories with this name exist; set hydra.run.dir.")


def register_resolver() -> None:
    # use_cache: Hydra resolves hydra.run.dir more than once; every time must give the same directory.
    if not OmegaConf.has_resolver("unique_dir"):
        OmegaConf.register_new_resolver("unique_dir", unique_dir, use_cache=True)


@contextlib.contextmanager
def hold_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock while the block runs; refuse if another live launcher holds it."""
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split() or ["?", "?"]
            raise RunDirBusy(
                f"{run_dir} is in use by another launcher (pid {holder[0]} on host {holder[-1]}): two runs in one "
                f"directory would overwrite each other's checkpoints. Wait for it to end, or pass another "
                f"hydra.run.dir.") from None
        except OSError as err:  # a filesystem without flock (some network mounts): go on, unprotected
            print(f"[launcher] warning: cannot lock {path} ({err}); make sure no other launcher uses {run_dir}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def entries(run_dir: Path) -> set[str]:
    return set(os.listdir(run_dir)) if run_dir.is_dir() else set()


def remove_created(run_dir: Path, before: set[str], out_root: Path) -> None:
    """Remove what this process added to ``run_dir`` (``before``: its entries when our code started, after Hydra
    wrote its own files, which go too when written by this process); then the directory itself and the empty
    ``outputs/<name>/`` folders above it, if nothing else is left in them."""
    for name in entries(run_dir):
        p = run_dir / name
        stamp = p / "overrides.yaml" if name == ".hydra" else p
        mine = name not in before or (name in (*HYDRA_OWN, LOCK_NAME) and stamp.exists()
                                      and stamp.stat().st_mtime >= STARTED - 1)
        if mine:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    for d in (run_dir.resolve(), *run_dir.resolve().parents):
        if d != run_dir.resolve() and out_root not in d.parents or any(d.iterdir()):
            break
        d.rmdir()
