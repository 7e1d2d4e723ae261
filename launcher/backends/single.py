"""One process, plain PyTorch: the reference every distributed backend must agree with."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from launcher.backends import make_optimizer
from launcher.config import Config


class SingleBackend:
    rank, world_size = 0, 1

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def build(self, make_model: Callable[[], torch.nn.Module], total_steps: int) -> torch.nn.Module:
        self.model = make_model().to(self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt, self.sched = make_optimizer(self.cfg, params, total_steps)
        return self.model

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        clip = self.cfg.optimizer.max_grad_norm
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return float(norm)

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                    "scheduler": self.sched.state_dict()}, directory / "state.pt")

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass
