"""Checkpoints: what a run needs to continue exactly where it stopped, written so that a half-written one is never read.

A checkpoint is written into ``checkpoints/.tmp-step-N`` by every rank, then rank 0 adds ``trainer_state.json`` and
the ``COMPLETE`` marker and renames it to ``checkpoints/step-N`` (one atomic rename), then prunes to the newest
``train.save_total_limit``. Only directories named ``step-N`` that hold ``COMPLETE`` are ever resumed from or
exported; anything else (a ``.tmp-*`` left by a killed job) is ignored and cleaned up.

Layout of ``<run_dir>/checkpoints/step-N/``::

    COMPLETE               the step number; written last
    trainer_state.json     {"step", "micro_batch" (data cursor: micro-batches each rank consumed), "world_size",
                            "backend", "finetune"}
    rng/rank-R.json        rank R's Python, NumPy, torch (and CUDA) RNG states (JSON: nothing is unpickled)
    MANIFEST.json          size and SHA-256 of every other file (launcher/integrity.py), written before COMPLETE
    adapter_config.json    LoRA only: the PEFT config; the frozen base is model.name_or_path of <run_dir>/config.yaml
    ...                    model, optimizer and schedule in the backend's own layout: each module in
                           launcher/backends/ describes its layout and reads it offline (``read_checkpoint``)

:class:`CheckpointError` is the one error for a checkpoint that is missing, incomplete or damaged, raised by resume
and by the merge alike.

Stopping early: SIGTERM, SIGUSR1 (and a first Ctrl-C) make every worker finish its current optimizer step, save a
checkpoint and exit; the launcher then exits with :data:`STOPPED_EXIT_CODE` so a batch script can requeue the job.
Running the same command with ``hydra.run.dir=<run_dir>`` (``resume=auto``, the default) continues from the newest
complete checkpoint and reproduces the per-step losses of an uninterrupted run exactly.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import random
import re
import shutil
import signal
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from launcher.backends import backend_for
from launcher.config import Config, ConfigError, flatten, resolve_path
from launcher.failures import text_of
from launcher.runspec import load_run_spec

if TYPE_CHECKING:
    from launcher.backends.base import Backend

# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry". The launcher exits with it after
# workers stopped on SIGTERM/SIGUSR1 (a checkpoint was saved, or no progress was lost): requeue and resume.
STOPPED_EXIT_CODE = 75
COMPLETE = "COMPLETE"
FULL_DISK_BYTES = 64 << 20  # a save that fails with less than this free on its filesystem failed for lack of space
_STEP_DIR = re.compile(r"step-(\d+)")


class CheckpointError(ConfigError):
    """A checkpoint that is missing, incomplete or damaged, or cannot be resumed from; the message says which file
    and what to do."""


@dataclass
class TrainState:
    """Where training stands, beyond what the backend saves (model, optimizer, schedule)."""

    step: int = 0  # optimizer steps done
    micro_batch: int = 0  # micro-batches each rank has consumed: the data cursor (RowLoader needs no replay)
    world_size: int = 1
    backend: str = ""
    finetune: str = ""
    data_key: str = ""  # which prepared data the cursor points into (the cache key of data_path)


# --------------------------------------------------------------------------------------------- finding
def step_of(ckpt: Path) -> int:
    """N of a ``step-N`` directory; -1 for any other name."""
    m = _STEP_DIR.fullmatch(ckpt.name)
    return int(m.group(1)) if m else -1


def is_complete(ckpt: Path) -> bool:
    return (ckpt / COMPLETE).is_file()


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """``checkpoints/step-N`` directories, complete or not, oldest first."""
    return sorted((p for p in (Path(run_dir) / "checkpoints").glob("step-*") if step_of(p) >= 0), key=step_of)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """``checkpoints/step-N`` directories holding the COMPLETE marker, oldest first."""
    return [p for p in checkpoint_dirs(run_dir) if is_complete(p)]


def read_state(ckpt: Path) -> TrainState:
    return TrainState(**json.loads((ckpt / "trainer_state.json").read_text()))


def resume_checkpoint(cfg: Config, run_dir: Path, world_size: int) -> Path | None:
    """The checkpoint this run continues from (None: start at step 0), after checking it can be used.

    The launcher calls this before any worker starts, so a wrong ``resume`` value or a checkpoint written by a
    different number of ranks fails with a plain message; every worker calls it again to find the same directory.
    """
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        done = complete_checkpoints(run_dir)
        if not done:
            return None
        ckpt = done[-1]
    else:
        ckpt = resolve_path(cfg.resume)
        if not is_complete(ckpt):
            raise CheckpointError(
                f"resume={cfg.resume!r}: {ckpt} is not a complete checkpoint (no {COMPLETE} marker). Pass a "
                f"checkpoints/step-N directory of an earlier run, resume=auto, or resume=never.")
    state = read_state(ckpt)
    if state.world_size != world_size:
        raise CheckpointError(
            f"{ckpt} was written by {state.world_size} ranks but this run has {world_size}; its sharded optimizer "
            f"state and data position only fit the same number. Resume with launcher.nproc_per_node × "
            f"launcher.nnodes = {state.world_size}, or start a new run directory.")
    backend = backend_for(cfg).name
    if state.backend != backend or state.finetune != cfg.finetune.method:
        raise CheckpointError(
            f"{ckpt} was written by backend={state.backend}, finetune={state.finetune}; this run uses "
            f"backend={backend}, finetune={cfg.finetune.method}. Use the same ones to resume.")
    return ckpt


# User settings a resumed run may change: where/how it runs and how long, not what or how it learns.
_MAY_CHANGE = ("launcher.", "merge.", "train.max_steps", "train.epochs", "train.save_steps",
               "train.save_total_limit", "train.log_every", "resume", "dry_run", "output_dir", "name",
               "dataset.num_proc", "dataset.cache_dir", "backend.timeout_minutes",
               "logger.", "planner.", "eval.",  # monitoring never changes the training math
               "resume_new_data")  # checked by launcher.integrity.check_same_data instead


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(changes that break an exact continuation, harmless changes) between two user configs as composed, as
    ``key: old -> new`` lines. Keys only one side has (a field added by a newer version) are harmless. What the
    launcher decides at each start (run directory, data paths, ports) is in the run spec, not compared here."""
    a, b = flatten(old), flatten(new)
    breaking, harmless = [], []
    for key in sorted(set(a) & set(b)):
        if a[key] != b[key]:
            line = f"{key}: {a[key]!r} -> {b[key]!r}"
            (harmless if any(key == m or (m.endswith(".") and key.startswith(m)) for m in _MAY_CHANGE)
             else breaking).append(line)
    return breaking, harmless


# --------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states as JSON-able values: stored without pickle."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": list(random.getstate()), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
             "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def _byte_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_byte_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_byte_tensor(s) for s in state["cuda"]])


# --------------------------------------------------------------------------------------------- save / load
def _adapter_config(model: torch.nn.Module) -> Any:
    """The PEFT config of a (possibly engine-wrapped) LoRA model, or None."""
    for m in (model, getattr(model, "module", None)):
        if m is not None and hasattr(m, "peft_config"):
            return m.peft_config["default"]
    return None


def save_checkpoint(backend: Backend, model: torch.nn.Module, run_dir: Path, state: TrainState,
                    keep: int) -> Path:
    """Write ``checkpoints/step-N`` atomically: into a temporary directory, then one rename, then prune."""
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step-{state.step}", root / f".tmp-step-{state.step}"
    with _space_checked(tmp, run_dir, state.step):
        if backend.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        backend.barrier()
        backend.save(tmp)
        (tmp / "rng" / f"rank-{backend.rank}.json").write_text(json.dumps(rng_state()))
        backend.barrier()
        if backend.rank == 0:
            if (adapter := _adapter_config(model)) is not None:
                adapter.save_pretrained(tmp)
            (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1))
            from launcher.integrity import write_manifest  # (imports this module)

            write_manifest(tmp)  # size and hash of every file, checked before anything reads them
            (tmp / COMPLETE).write_text(str(state.step))
    if backend.rank == 0:
        if final.exists():  # only when re-saving a step after a resume; the new one is as good
            shutil.rmtree(final)
        os.rename(tmp, final)
        done = complete_checkpoints(run_dir)
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    backend.barrier()
    return final


@contextlib.contextmanager
def _space_checked(tmp: Path, run_dir: Path, step: int) -> Iterator[None]:
    """A save that fails for lack of space removes its partial directory and stops with a message that names
    the directory, the bytes needed and the bytes free (the previous checkpoint stays usable)."""
    try:
        yield
    except BaseException as err:  # DCP's CheckpointException is a BaseException
        try:
            free = shutil.disk_usage(tmp.parent).free
        except OSError:
            free = 1 << 62
        # torch.save reports a full disk as "iostream error" / "unexpected pos", without the errno: an error
        # with almost nothing free on that filesystem is taken for what it is.
        nearly_full = free < FULL_DISK_BYTES and (isinstance(err, Exception) or "Checkpoint" in type(err).__name__)
        if not (out_of_space(err) or nearly_full):
            raise
        written = _bytes_in(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        done = complete_checkpoints(run_dir)
        need = max(written, _bytes_in(done[-1]) if done else 0)
        raise SystemExit(
            f"no space left on device for checkpoint step-{step} in {tmp.parent}: it needs about {need:,} bytes "
            f"and {free:,} were free. The partial save was removed; "
            + (f"{done[-1]} is intact (resume=auto continues from it)" if done else "no earlier checkpoint exists")
            + ". Free space there, or lower train.save_total_limit.") from None


def _bytes_in(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()) if directory.is_dir() else 0


def out_of_space(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it, or the per-rank failures DCP wraps) is a full disk."""
    seen: list[BaseException] = []
    todo: list[BaseException] = [err]
    while todo and len(seen) < 50:
        e = todo.pop()
        seen.append(e)
        todo += [x for x in (e.__cause__, e.__context__) if x is not None and x not in seen]
        for x in getattr(e, "failures", {}).values():  # DCP: {rank: (exception, traceback)}
            x = x[0] if isinstance(x, tuple) and x else x
            if isinstance(x, BaseException):
                todo.append(x)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in text_of(e) or "PytorchStreamWriter failed writing file" in text_of(e):
            return True
    return False


def resume(backend: Backend, run_dir: Path, cfg: Config) -> TrainState:
    """Restore model, optimizer, schedule, data position and RNG from the checkpoint to continue from, if any."""
    ckpt = resume_checkpoint(cfg, run_dir, backend.world_size)
    if backend.rank == 0:  # leftovers of a save that was interrupted: never read, now removed
        for tmp in (Path(run_dir) / "checkpoints").glob(".tmp-step-*"):
            shutil.rmtree(tmp, ignore_errors=True)
    data_key = Path(load_run_spec(run_dir).data_path).name.removeprefix("data-")
    if ckpt is None:
        return TrainState(world_size=backend.world_size, backend=backend_for(cfg).name, finetune=cfg.finetune.method,
                          data_key=data_key)
    backend.load(ckpt)
    state = read_state(ckpt)
    if state.data_key and state.data_key != data_key:  # the launcher refused this unless resume_new_data=true
        if not cfg.resume_new_data:
            raise CheckpointError(f"{ckpt} was trained on other prepared data ({state.data_key}, now {data_key}).")
        if backend.rank == 0:
            print(f"resume_new_data=true: the data changed since {ckpt}; the data cursor starts again at the "
                  f"beginning of the new data", flush=True)
        state.micro_batch = 0
    state.data_key = data_key
    set_rng_state(json.loads((ckpt / "rng" / f"rank-{backend.rank}.json").read_text()))
    if backend.rank == 0:
        _trim_metrics(Path(run_dir) / "metrics.jsonl", state.step)
        print(f"resumed from {ckpt} (step {state.step})", flush=True)
    backend.barrier()
    return state


def _trim_metrics(path: Path, step: int) -> None:
    """Drop metric lines of steps after the checkpoint: the resumed run logs them again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True)
            if json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------- stopping
class StopRequest:
    """SIGTERM, SIGUSR1 or a first SIGINT ask this worker to finish its step, save and stop (a second SIGINT
    interrupts at once). Ranks agree through :meth:`requested`, so all stop after the same step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt
        if self.received is None:
            print(f"received {signal.Signals(signum).name}: finishing this step, then saving a checkpoint",
                  flush=True)
        self.received = signum

    def requested(self, backend: Backend) -> bool:
        """Whether any rank was asked to stop (one tiny all-reduce per step)."""
        flag = torch.tensor([0.0 if self.received is None else 1.0], device=backend.device)
        return bool(backend.all_reduce_sum(flag).item() > 0)

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
