"""What every backend provides, and what backends share.

:class:`BackendKind` is the launcher-side half of a backend (one instance per module, ``BACKEND``): how its
workers are started, what it checks in the config, what one device holds (memory-model terms), and how to read
its checkpoints offline. :class:`Backend` is the worker-side half the training loop drives: it wraps the model,
steps the optimizer and writes checkpoints; the loop never branches on which one it has.
"""

from __future__ import annotations

import os
import sys
from contextlib import AbstractContextManager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from launcher.checkpoint import CheckpointError
from launcher.config import Config, resolve_path
from launcher.planner import MemoryPlan, ModelShape
from launcher.safe_load import torch_load

if TYPE_CHECKING:
    from launcher.runspec import RunSpec  # (imported for annotations only: launcher.config imports this package)

# make_model(dtype, empty): the model with its fine-tuning method applied, master weights in ``dtype``; with
# ``empty=True`` parameters stay on the meta device (a rank that receives its shard from rank 0).
MakeModel = Callable[[torch.dtype, bool], torch.nn.Module]


# --------------------------------------------------------------------------------------------- worker side
class Backend(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def build(self, make_model: MakeModel, total_steps: int) -> torch.nn.Module:
        """Create the model (sharded as the backend does it), optimizer and schedule; return the module to call."""

    def autocast(self) -> AbstractContextManager:
        """The context the forward pass runs in (mixed precision, where the backend does not do it itself)."""

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of ``loss``; the loop has already normalised it for the whole optimizer step."""

    def step(self) -> float:
        """Apply one optimizer and schedule step, zero the gradients; return the gradient norm before clipping."""

    def lr(self) -> float: ...

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor: ...

    def generating(self, model: torch.nn.Module) -> AbstractContextManager:
        """The context ``model.generate`` runs in (every rank enters it together)."""

    def param_counts(self) -> tuple[int, int]:
        """(parameter elements this rank holds, parameter elements of the whole model)."""

    def save(self, directory: Path) -> None:
        """Write model, optimizer and schedule state into ``directory`` (all ranks call this)."""

    def load(self, directory: Path) -> None:
        """Restore what :meth:`save` wrote (all ranks call this, after :meth:`build`)."""

    def barrier(self) -> None: ...

    def close(self) -> None: ...


def collective_timeout(cfg: Config) -> timedelta:
    """How long a collective may wait for a peer: a rank that hangs fails the job instead of hanging it."""
    return timedelta(minutes=cfg.backend.timeout_minutes)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def clip_and_step(cfg: Config, model: torch.nn.Module, opt: torch.optim.Optimizer, sched) -> float:
    """Clip gradients to ``optimizer.max_grad_norm`` (0: no clipping), step optimizer and schedule, zero the
    gradients; return the norm before clipping (for FSDP2 the norm over every rank's shards). A non-finite norm
    with ``train.nonfinite=skip`` leaves weights and optimizer state as they were."""
    clip = cfg.optimizer.max_grad_norm
    norm = torch.nn.utils.clip_grad_norm_(trainable(model), clip if clip > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor (FSDP2): its local value covers this rank's shards only
        norm = norm.full_tensor()
    if torch.isfinite(norm) or cfg.train.nonfinite == "stop":  # stop: the loop stops, and saves nothing of it
        opt.step()
        sched.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)


class ProcessGroupMixin:
    """What every multi-process backend does the same way with torch.distributed's default group."""

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(t)
        return t

    def barrier(self) -> None:
        torch.distributed.barrier()

    def close(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # no rank tears the group down while another still talks to it
            torch.distributed.destroy_process_group()


def make_optimizer(cfg: Config, params: list[torch.nn.Parameter], total_steps: int):
    """AdamW and its linear-warmup + cosine schedule, shared by every backend."""
    o = cfg.optimizer
    opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    sched = get_cosine_with_min_lr_schedule_with_warmup(
        opt, num_warmup_steps=int(o.warmup_ratio * total_steps), num_training_steps=total_steps,
        min_lr_rate=o.min_lr_ratio)
    return opt, sched


# --------------------------------------------------------------------------------------------- offline reading
class Reader(Protocol):
    """Random access to the tensors of a training checkpoint, by the training module's parameter names."""

    kind: str

    def shapes(self) -> dict[str, torch.Size]:
        """Every tensor the checkpoint holds (model weights only), by name."""

    def get(self, name: str) -> torch.Tensor:
        """The full tensor (master precision when the checkpoint has masters); may share memory with the file."""

    def release(self) -> None:
        """Drop memory-mapped pages read so far (the next get() maps the files again)."""


def damaged(path: Path, err: BaseException) -> CheckpointError:
    text = str(err).strip().splitlines()
    first = text[0] if text else type(err).__name__
    return CheckpointError(f"{path} cannot be read ({first}): the file is damaged or was cut short (disk full, or "
                           f"the job was killed while saving). Merge another checkpoint of this run (pass its "
                           f"checkpoints/step-N folder) or train again from the last good one.")


def load_pt(path: Path) -> Any:
    """torch.load weights-only (launcher/safe_load.py: DeepSpeed's enums allow-listed, nothing else) and
    memory-mapped (pages are read only when a tensor is used); damage becomes a CheckpointError."""
    try:
        return torch_load(path, where=path, map_location="cpu", mmap=True)
    except CheckpointError:
        raise
    except Exception as err:
        raise damaged(path, err) from None


# --------------------------------------------------------------------------------------------- launcher side
def cli(name: str) -> str:
    """The CLI that sits next to this interpreter, so an un-activated venv works too."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def config_file_problems(key: str, value: str | None, what: str, where: str) -> list[str]:
    """``backend.<key>``, the backend's own config file: set, and a file that exists."""
    if not value:
        return [f"backend.{key} is empty: name {what}."]
    if not resolve_path(value).is_file():
        return [f"backend.{key}={value!r} does not exist: use {where} or an absolute path."]
    return []


class BackendKind:
    """One backend as the launcher, the memory planner and the merge see it (each module's ``BACKEND``)."""

    name: str = ""
    in_process = False  # run the worker inside the launcher process (no worker command is spawned)
    supports_qlora = False  # 4-bit frozen weights (bitsandbytes) cannot be sharded
    supports_sequence_parallel = False  # parallel.sequence > 1: rows split over ranks (launcher/sequence.py)
    layout = ""  # the files of its checkpoints, for an error that lists every layout

    def runtime(self, cfg: Config) -> Backend:
        """The worker-side backend (called in each worker)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ starting the workers
    def workers_per_node(self, cfg: Config) -> int:
        return cfg.launcher.nproc_per_node or torch.cuda.device_count() or 2

    def world_size(self, cfg: Config, nproc_per_node: int) -> int:
        return nproc_per_node * max(cfg.launcher.nnodes, 1)

    def worker_command(self, cfg: Config, spec: RunSpec) -> list[str]:
        """The exact command that starts this node's workers (``spec``: where, and the rendezvous)."""
        raise NotImplementedError

    def worker_env(self, cfg: Config, nproc: int) -> dict[str, str]:
        env = dict(os.environ)
        threads = cfg.launcher.omp_num_threads or max(1, (os.cpu_count() or 1) // nproc)
        # Without this each CPU worker starts one thread per core and they fight (≈15× slower on 2 cores).
        env.setdefault("OMP_NUM_THREADS", str(threads))
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env["LAUNCHER_PID"] = str(os.getpid())  # the ranks' supervisors (launcher/worker.py) end them if it dies
        return env

    def after_workers(self, cfg: Config, spec: RunSpec) -> None:
        """Clean up what the workers' libraries leave behind once they have exited."""

    # ------------------------------------------------------------------ config
    def config_problems(self, cfg: Config) -> list[str]:
        """This backend's part of :func:`launcher.validate.validate` (messages name the key and the fix)."""
        problems = []
        if cfg.finetune.method == "qlora" and not self.supports_qlora:
            problems.append(f"finetune.method=qlora runs with backend=single only (4-bit weights cannot be sharded "
                            f"by backend.name={self.name!r} here); use finetune=lora with a sharded backend.")
        if cfg.parallel.sequence > 1 and not self.supports_sequence_parallel:
            problems.append(f"parallel.sequence={cfg.parallel.sequence} is not supported with backend.name="
                            f"{self.name!r} (rows are split with DeepSpeed's Ulysses attention and process groups); "
                            f"use backend=deepspeed_zero3 (it shards model states like FSDP2 full shard) with "
                            f"launcher.nproc_per_node >= {cfg.parallel.sequence}.")
        return problems

    def check_config(self, cfg: Config, world_size: int) -> None:
        """Check the backend's own config file (DeepSpeed JSON, Accelerate YAML) before any worker starts, so a
        contradiction is a plain ConfigError rather than a traceback in every rank."""

    # ------------------------------------------------------------------ memory model
    def memory_plan(self, cfg: Config, shape: ModelShape, b: int, cuda: bool, plan: MemoryPlan) -> MemoryPlan:
        """``plan`` (activations filled in) with this backend's model states per device (launcher/planner.py)."""
        raise NotImplementedError

    def memory_tips(self, cfg: Config, plan: MemoryPlan) -> list[str]:
        """How this backend could hold less per device (for the planner's refusal)."""
        return ["backend=deepspeed_zero3 (shards parameters, gradients and optimizer states over the GPUs)"]

    # ------------------------------------------------------------------ checkpoints
    def holds(self, ckpt: Path) -> bool:
        """Whether ``ckpt`` holds model weights in this backend's layout."""
        raise NotImplementedError

    def read_checkpoint(self, ckpt: Path) -> Reader:
        """A reader of the model weights in ``ckpt`` (one process, no process group, memory-mapped)."""
        raise NotImplementedError
