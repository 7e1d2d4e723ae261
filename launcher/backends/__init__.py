"""Backends: how a worker wraps the model, steps the optimizer and writes checkpoints.

The training loop talks only to :class:`Backend`; it never branches on which one it has.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

import torch

from launcher.config import Config


class Backend(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def build(self, make_model: Callable[[], torch.nn.Module], total_steps: int) -> torch.nn.Module:
        """Create the model (sharded as the backend does it), optimizer and schedule; return the module to call."""

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of ``loss``; the loop has already normalised it for the whole optimizer step."""

    def step(self) -> float:
        """Apply one optimizer and schedule step, zero the gradients; return the gradient norm before clipping."""

    def lr(self) -> float: ...

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor: ...

    def save(self, directory: Path) -> None:
        """Write model and optimizer state into ``directory`` (all ranks call this)."""

    def barrier(self) -> None: ...

    def close(self) -> None: ...


def make_backend(cfg: Config) -> Backend:
    if cfg.backend.name == "deepspeed":
        from launcher.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(cfg)
    from launcher.backends.single import SingleBackend

    return SingleBackend(cfg)


def make_optimizer(cfg: Config, params: list[torch.nn.Parameter], total_steps: int):
    """AdamW and its linear-warmup + cosine schedule, shared by every backend."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    o = cfg.optimizer
    opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    sched = get_cosine_with_min_lr_schedule_with_warmup(
        opt, num_warmup_steps=int(o.warmup_ratio * total_steps), num_training_steps=total_steps,
        min_lr_rate=o.min_lr_ratio)
    return opt, sched
