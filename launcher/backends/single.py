"""One process, plain PyTorch: the reference every distributed backend must agree with."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from launcher.backends import MakeModel, clip_and_step, make_optimizer, trainable
from launcher.config import Config
from launcher.model import compute_dtype


class SingleBackend:
    rank, world_size = 0, 1

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def build(self, make_model: MakeModel, total_steps: int) -> torch.nn.Module:
        # float32 master weights; bf16 math comes from autocast()
        self.model = make_model(torch.float32, False).to(self.device)
        self.opt, self.sched = make_optimizer(self.cfg, trainable(self.model), total_steps)
        return self.model

    def generating(self, model: torch.nn.Module) -> AbstractContextManager:
        return nullcontext()

    def autocast(self) -> AbstractContextManager:
        dtype = compute_dtype(self.cfg.model)
        return nullcontext() if dtype == torch.float32 else torch.autocast(self.device.type, dtype=dtype)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        return clip_and_step(self.cfg, self.model, self.opt, self.sched)

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def param_counts(self) -> tuple[int, int]:
        n = sum(p.numel() for p in self.model.parameters())
        return n, n

    def _saved_keys(self) -> set[str]:
        """Every weight for full fine-tuning; only the trained ones (adapters) for LoRA: the base is on disk."""
        if self.cfg.finetune.method == "full":
            return set(self.model.state_dict())
        return {n for n, p in self.model.named_parameters() if p.requires_grad}

    def save(self, directory: Path) -> None:
        keys = self._saved_keys()
        model = {k: v for k, v in self.model.state_dict().items() if k in keys}
        torch.save({"model": model, "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()},
                   directory / "state.pt")

    def load(self, directory: Path) -> None:
        state = torch.load(directory / "state.pt", map_location=self.device, weights_only=True)
        missing = self._saved_keys() - set(state["model"])
        if missing:
            raise RuntimeError(f"{directory}/state.pt lacks {len(missing)} weights, e.g. {sorted(missing)[0]}")
        self.model.load_state_dict(state["model"], strict=False)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass
