"""Metrics on rank 0: a console line every ``log_every`` steps, ``metrics.jsonl`` in the run directory, and the
end-of-run summary."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


class MetricsLogger:
    def __init__(self, run_dir: Path, rank: int, total_steps: int, log_every: int):
        self.enabled = rank == 0
        self.total_steps, self.log_every = total_steps, log_every
        self.path = run_dir / "metrics.jsonl"
        self.start = time.time()
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.tokens = self.supervised = 0
        self._file = self.path.open("a", encoding="utf-8") if self.enabled else None

    def log_step(self, step: int, metrics: dict[str, Any]) -> None:
        """Record one optimizer step (``step`` counts from 1)."""
        self.tokens += metrics.get("tokens", 0)
        self.supervised += metrics.get("supervised_tokens", 0)
        loss = metrics.get("loss")
        if loss is not None and math.isfinite(loss):
            self.first_loss = loss if self.first_loss is None else self.first_loss
            self.last_loss = loss
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time() - self.start, 3), **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if step % self.log_every == 0 or step == self.total_steps or step == 1:
            elapsed = time.time() - self.start
            eta = elapsed / step * (self.total_steps - step)
            print(f"step {step:>5}/{self.total_steps}  loss {loss:.4f}  lr {metrics['lr']:.2e}  "
                  f"grad_norm {metrics['grad_norm']:.3f}  tok/s {metrics['tokens_per_s']:,.0f}  "
                  f"eta {eta:,.0f}s", flush=True)

    def summary(self, steps: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        s = {
            "steps": steps,
            "tokens": self.tokens,
            "supervised_tokens": self.supervised,
            "train_seconds": round(time.time() - self.start, 1),
            "first_loss": self.first_loss,
            "last_loss": self.last_loss,
            **(extra or {}),
        }
        if self.enabled:
            self._file.close()
        return s
