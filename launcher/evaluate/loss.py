"""Held-out evaluation: the loss over the whole eval set, with the training loss's masking and normalisation.

The eval loss is Σ token losses / supervised tokens over every eval row on every rank (one reduction at the end),
so it does not depend on world size, micro-batch size or packing, exactly like the training loss. Rows are dealt
round-robin to ranks; a rank that runs out does a forward on a placeholder batch whose loss is discarded, because
sharded backends (ZeRO-3, FSDP) need every rank in every forward.
"""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Callable

import datasets
import torch

from launcher.attention import attention_of
from launcher.packing import collate, count_tokens, load_plan, plan_path, varlen_attention
from launcher.runspec import RunSpec
from launcher.sequence import data_parallel

LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def eval_source(spec: RunSpec) -> tuple[Path, str] | None:
    """(prepared directory, split) of the eval data: a validation dataset if one was prepared, else the
    ``dataset.val_size`` hold-out; None when there is no eval data."""
    if spec.eval_data_path:
        base, split = Path(spec.eval_data_path), "train"
    elif spec.data_path:
        base, split = Path(spec.data_path), "eval"
    else:
        return None
    return (base, split) if plan_path(base, split).is_file() else None


class Evaluator:
    """Evaluates a model on the prepared eval rows; every rank calls :meth:`run` together."""

    def __init__(self, base: Path, split: str, micro_batch_size: int, rank: int, world_size: int, pad_id: int,
                 flatten: bool = False, shard: tuple[int, int] = (0, 1)):
        self.ds = datasets.load_from_disk(str(base / split))
        plan = load_plan(plan_path(base, split))
        rows = [plan.row(r).tolist() for r in range(len(plan))]
        chunks = [rows[i:i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
        self.mine = chunks[rank::world_size]
        self.forwards = math.ceil(len(chunks) / world_size)  # the same on every rank
        self.placeholder = chunks[0]
        self.pad_id, self.flatten, self.shard = pad_id, flatten, shard  # rank/world: data-parallel (see RowLoader)
        self.n_rows = len(rows)

    @classmethod
    def from_config(cls, cfg: Any, spec: RunSpec, rank: int, world_size: int, pad_id: int) -> "Evaluator | None":
        src = eval_source(spec)
        if src is None:
            return None
        (dp_rank, dp_world), shard = data_parallel(rank, world_size, cfg.parallel.sequence)
        return cls(*src, cfg.eval.micro_batch_size or cfg.train.micro_batch_size, dp_rank, dp_world, pad_id,
                   flatten=varlen_attention(attention_of(cfg)), shard=shard)

    @torch.no_grad()
    def run(self, model: torch.nn.Module, loss_fn: LossFn, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor],
            device: torch.device, autocast: AbstractContextManager | None = None) -> dict[str, float]:
        """{loss, supervised_tokens, tokens, seconds}; the model is put back into training mode afterwards."""
        t0 = time.time()
        model.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # Σ token losses, supervised, tokens
        try:
            for i in range(self.forwards):
                real = i < len(self.mine)
                chunk = self.mine[i] if real else self.placeholder
                batch = {k: v.to(device) for k, v in self._collate(chunk).items()}
                with autocast or nullcontext():
                    loss_sum = loss_fn(model, batch)
                if real:
                    counts = count_tokens(batch)
                    totals += torch.tensor([float(loss_sum), counts.supervised, counts.tokens], dtype=torch.float64,
                                           device=device)
        finally:
            model.train()
        loss_sum, sup, tok = all_reduce_sum(totals).tolist()
        return {"loss": loss_sum / max(sup, 1.0), "supervised_tokens": int(sup), "tokens": int(tok),
                "seconds": time.time() - t0}

    def _collate(self, chunk: list[list[int]]) -> dict[str, torch.Tensor]:
        """One micro-batch of packed rows (one Arrow read), as the training loader builds it."""
        flat = [i for row in chunk for i in row]
        cols = self.ds[flat]
        recs = iter({"input_ids": i, "labels": lab} for i, lab in zip(cols["input_ids"], cols["labels"]))
        return collate([[next(recs) for _ in row] for row in chunk], self.pad_id, flatten=self.flatten,
                       shard=self.shard)
