"""Checkpoint integrity: a manifest of every file's size and SHA-256, written before ``COMPLETE`` and checked
before any library reads a byte of the checkpoint (resume, in the launcher before workers start; merge), together
with the weights-only opening of every pickle in it (:func:`check`, launcher/safe_load.py).

A checkpoint whose files differ from its manifest in any way (a file missing, added, cut short, overwritten in
the middle) is refused with the file named. SHA-256 because it was the fastest of hashlib's strong hashes here
(SHA extensions; bench/bench_manifest.py); files are hashed on several threads (hashlib releases the GIL).
``resume=auto`` skips damaged checkpoints loudly (:func:`pick_intact`), so a Slurm requeue after one bad save
continues from the one before instead of crash-looping.

A resumed run must also read the data its checkpoint was trained on (:func:`check_same_data`): the checkpoint
records the prepared data's key, the run directory the SHA-256 of each data file (``data_sources.json``).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from launcher.checkpoint import COMPLETE, CheckpointError, complete_checkpoints, read_state, resume_checkpoint
from launcher.config import Config
from launcher.data import SOURCES
from launcher.safe_load import check_checkpoint

MANIFEST = "MANIFEST.json"
ALGORITHM = "sha256"
_CHUNK = 8 << 20


def _hash(path: Path) -> str:
    h = hashlib.new(ALGORITHM)
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _files(ckpt: Path) -> list[str]:
    """Every file (or link) of the checkpoint except the marker and the manifest, as sorted relative paths."""
    out = (str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() or p.is_symlink())
    return sorted(n for n in out if n not in (COMPLETE, MANIFEST))


def _hash_all(ckpt: Path, names: list[str]) -> list[str]:
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, max(len(names), 1))) as pool:
        return list(pool.map(lambda n: _hash(ckpt / n), names))


def write_manifest(ckpt: Path) -> None:
    """Record size and hash of every file in ``ckpt`` (call after every rank has written, before COMPLETE)."""
    names = _files(ckpt)
    files = {n: {"size": (ckpt / n).stat().st_size, ALGORITHM: h} for n, h in zip(names, _hash_all(ckpt, names))}
    tmp = ckpt / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"algorithm": ALGORITHM, "files": files}, indent=1))
    os.replace(tmp, ckpt / MANIFEST)


def _damaged(ckpt: Path, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {ckpt} is damaged: {what}. It cannot be trusted: resume or merge "
                           f"another checkpoint of this run (resume=auto picks the newest intact one).")


def verify(ckpt: Path) -> None:
    """Raise :class:`CheckpointError` naming the first file that differs from the manifest."""
    path = ckpt / MANIFEST
    if not path.is_file():
        raise _damaged(ckpt, f"it has no {MANIFEST} (written by an older version of the launcher, or deleted), "
                             f"so its files cannot be checked")
    try:
        manifest = json.loads(path.read_text())
        if manifest["algorithm"] != ALGORITHM:
            raise ValueError(manifest["algorithm"])
        files = {str(k): (int(v["size"]), str(v[ALGORITHM])) for k, v in manifest["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise _damaged(ckpt, f"{path} cannot be read") from None
    on_disk = set(_files(ckpt))
    for name in sorted(on_disk - set(files)):
        raise _damaged(ckpt, f"{ckpt / name} is not one of the files it was saved with")
    for name, (size, _) in files.items():
        p = ckpt / name
        if name not in on_disk:
            raise _damaged(ckpt, f"{p} is missing")
        if p.is_symlink():
            raise _damaged(ckpt, f"{p} is a symbolic link; saves write plain files")
        if p.stat().st_size != size:
            raise _damaged(ckpt, f"{p} has {p.stat().st_size:,} bytes but was saved with {size:,} (cut short or "
                                 f"overwritten)")
    names = sorted(files)
    for name, got in zip(names, _hash_all(ckpt, names)):
        if got != files[name][1]:
            raise _damaged(ckpt, f"{ckpt / name} has other contents than it was saved with (its {ALGORITHM} "
                                 f"differs): it was overwritten or corrupted")


def check(ckpt: Path) -> None:
    """Everything checked before a checkpoint is read: its files against the manifest, then every pickle in it
    opened weights-only (launcher/safe_load.py). Raises :class:`CheckpointError` naming the file."""
    verify(ckpt)
    check_checkpoint(ckpt)


def pick_intact(run_dir: Path, say: Callable[[str], None]) -> None:
    """For ``resume=auto``: move damaged checkpoints newer than the newest intact one aside (to
    ``checkpoints/damaged-step-N``), saying so loudly, so that resuming continues from the newest intact one.
    Raises if no complete checkpoint is intact (a fresh start would silently drop the run's progress)."""
    done = complete_checkpoints(run_dir)
    for ckpt in reversed(done):
        try:
            check(ckpt)
            return
        except CheckpointError as err:
            aside = ckpt.with_name(f"damaged-{ckpt.name}")
            n = 2
            while aside.exists():
                aside, n = ckpt.with_name(f"damaged-{ckpt.name}-{n}"), n + 1
            os.rename(ckpt, aside)
            say(f"WARNING: {err}")
            say(f"WARNING: moved it to {aside}; resume=auto goes on with the checkpoint before it")
    if done:
        raise CheckpointError(f"no checkpoint in {run_dir / 'checkpoints'} is intact (see the warnings above): "
                              f"resume=never with a new hydra.run.dir starts again from step 0.")


def checked_resume(cfg: Config, run_dir: Path, world_size: int, say: Callable[[str], None]) -> Path | None:
    """The launcher's choice of checkpoint to resume from, verified against its manifest before any worker
    starts: ``resume=auto`` falls back to the newest intact one; an explicit damaged one is refused."""
    if cfg.resume == "auto":
        pick_intact(run_dir, say)
    ckpt = resume_checkpoint(cfg, run_dir, world_size)
    if ckpt is not None and cfg.resume != "auto":
        check(ckpt)
    return ckpt


DATA_RECORD = "data_sources.json"  # in the run directory: the prepared data the run trains on, file by file


def _sources(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def check_same_data(cfg: Config, ckpt: Path | None, data_path: Path, run_dir: Path,
                    say: Callable[[str], None]) -> None:
    """Refuse to resume ``ckpt`` on other data than it was trained on (its data cursor and packing plan point
    into that data), listing the files that changed, unless ``resume_new_data=true``; then record the data."""
    new = _sources(data_path / SOURCES)
    if ckpt is not None:
        old_key = read_state(ckpt).data_key
        if old_key and old_key != new.get("key"):
            old = _sources(run_dir / DATA_RECORD)
            if old.get("key") != old_key:  # recorded by an older start: the cache may still hold it
                old = _sources(data_path.parent / f"data-{old_key}" / SOURCES)
            a, b = old.get("files", {}), new.get("files", {})
            changed = [f"{f} ({'added' if f not in a else 'removed' if f not in b else 'changed'})"
                       for f in sorted(set(a) | set(b)) if a.get(f) != b.get(f)]
            what = (f"these data files changed: {', '.join(changed)}" if changed else
                    "the data files are the same but are prepared differently (tokenizer files or the launcher's "
                    "data preparation code changed)" if a else "the data differs (the old file list is gone)")
            if not cfg.resume_new_data:
                raise CheckpointError(
                    f"{ckpt} was trained on other data than this run would read: {what}. Its data cursor and "
                    f"packing plan point into the old data. Restore the old data to continue exactly, or pass "
                    f"resume_new_data=true to continue this model on the new data, its data cursor started again "
                    f"at the beginning.")
            say(f"WARNING: resume_new_data=true: {what}; continuing {ckpt} on the new data, with the data cursor "
                f"started again at its beginning")
    tmp = run_dir / f".{DATA_RECORD}.tmp"
    tmp.write_text(json.dumps(new, indent=1))
    os.replace(tmp, run_dir / DATA_RECORD)
