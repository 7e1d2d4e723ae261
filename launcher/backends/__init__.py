"""Backends: how a worker wraps the model, steps the optimizer and writes checkpoints.

The training loop talks only to :class:`Backend`; it never branches on which one it has. The implementations:
``single.py`` (one process, plain PyTorch: the reference), ``deepspeed.py`` (ZeRO-2/3, optional offload) and
``fsdp.py`` (Accelerate + torch FSDP2).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from datetime import timedelta
from pathlib import Path
from typing import Callable, Protocol

import torch

from launcher.config import Config

# make_model(dtype, empty): the model with its fine-tuning method applied, master weights in ``dtype``; with
# ``empty=True`` parameters stay on the meta device (a rank that receives its shard from rank 0).
MakeModel = Callable[[torch.dtype, bool], torch.nn.Module]


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


def make_backend(cfg: Config) -> Backend:
    if cfg.backend.name == "deepspeed":
        from launcher.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(cfg)
    if cfg.backend.name == "fsdp":
        from launcher.backends.fsdp import FSDPBackend

        return FSDPBackend(cfg)
    from launcher.backends.single import SingleBackend

    return SingleBackend(cfg)


def check_backend_config(cfg: Config, world_size: int) -> None:
    """The backend's own config file (DeepSpeed JSON, Accelerate YAML), checked by the launcher before any worker
    starts, so a contradiction is a plain ConfigError rather than a traceback in every rank."""
    from launcher.config import resolve_path

    if cfg.backend.name == "deepspeed":
        from launcher.backends.deepspeed import fill_ds_config

        fill_ds_config(cfg, world_size)
    elif cfg.backend.name == "fsdp":
        from launcher.backends.fsdp import check_accelerate_config

        check_accelerate_config(resolve_path(cfg.backend.accelerate_config))


def collective_timeout(cfg: Config) -> timedelta:
    """How long a collective may wait for a peer: a rank that hangs fails the job instead of hanging it."""
    return timedelta(minutes=cfg.backend.timeout_minutes)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def clip_and_step(cfg: Config, model: torch.nn.Module, opt: torch.optim.Optimizer, sched) -> float:
    """Clip gradients to ``optimizer.max_grad_norm`` (0: no clipping), step optimizer and schedule, zero the
    gradients; return the norm before clipping (for FSDP2 the norm over every rank's shards)."""
    clip = cfg.optimizer.max_grad_norm
    norm = torch.nn.utils.clip_grad_norm_(trainable(model), clip if clip > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor (FSDP2): its local value covers this rank's shards only
        norm = norm.full_tensor()
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
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    o = cfg.optimizer
    opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    sched = get_cosine_with_min_lr_schedule_with_warmup(
        opt, num_warmup_steps=int(o.warmup_ratio * total_steps), num_training_steps=total_steps,
        min_lr_rate=o.min_lr_ratio)
    return opt, sched
