"""One process, plain PyTorch, run inside the launcher process: the reference every distributed backend must
agree with. Checkpoints are one ``state.pt``: {"model": state dict (trained parameters only for LoRA),
"optimizer", "scheduler"}."""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from launcher.backends.base import (BackendKind, MakeModel, Reader, clip_and_step, load_pt, make_optimizer,
                                    trainable)
from launcher.checkpoint import CheckpointError
from launcher.config import Config
from launcher.model import compute_dtype
from launcher.planner import MemoryPlan, ModelShape
from launcher.safe_load import torch_load

if TYPE_CHECKING:
    from launcher.runspec import RunSpec


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
        state = torch_load(directory / "state.pt", where=directory / "state.pt", map_location=self.device)
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


class SingleReader:
    """``state.pt`` with the module's state_dict under "model"."""

    kind = "single-process state.pt"

    def __init__(self, ckpt: Path):
        self.path = ckpt / "state.pt"
        self._sd: dict[str, torch.Tensor] | None = None
        self._shapes = {k: v.shape for k, v in self._open().items()}

    def _open(self) -> dict[str, torch.Tensor]:
        if self._sd is None:
            state = load_pt(self.path)
            if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
                raise CheckpointError(f"{self.path} has no 'model' state: it was not written by this project's "
                                      f"single backend, or it is damaged. Merge another checkpoint of this run.")
            self._sd = state["model"]
        return self._sd

    def shapes(self) -> dict[str, torch.Size]:
        return dict(self._shapes)

    def get(self, name: str) -> torch.Tensor:
        return self._open()[name]

    def release(self) -> None:
        self._sd = None


class Single(BackendKind):
    name = "single"
    in_process = True
    supports_qlora = True
    layout = "state.pt for backend=single"

    def runtime(self, cfg: Config) -> SingleBackend:
        return SingleBackend(cfg)

    def workers_per_node(self, cfg: Config) -> int:
        return 1

    def world_size(self, cfg: Config, nproc_per_node: int) -> int:
        return 1

    def worker_command(self, cfg: Config, spec: RunSpec) -> list[str]:
        # What `python -m launcher` runs in its own process (printed by dry_run=true, usable by hand).
        return [sys.executable, "-m", "launcher.train", spec.run_dir]

    def memory_plan(self, cfg: Config, shape: ModelShape, b: int, cuda: bool, plan: MemoryPlan) -> MemoryPlan:
        phi = shape.trainable
        cache = 2 * shape.trainable_matmul if b < 4 else 0  # autocast's bf16 copies of the trainable weights
        params = 4 * shape.params + cache
        notes = []
        if cfg.finetune.method == "qlora":  # the frozen body in NF4 with double quantisation: ~0.53 byte per weight
            params -= (4 - 0.53) * shape.frozen_body_matmul
            notes.append("QLoRA: frozen linear weights counted at 4 bits")
        return replace(plan, strategy="single process", parameters=params, gradients=4 * phi, optimizer=8 * phi,
                       step_temp=4 * phi, notes=notes)

    def holds(self, ckpt: Path) -> bool:
        return (ckpt / "state.pt").is_file()

    def read_checkpoint(self, ckpt: Path) -> Reader:
        return SingleReader(ckpt)


BACKEND = Single()
