"""Packing: whole tokenised records into rows of at most ``cutoff_len`` tokens, and rows into micro-batches.

Each record keeps its own ``position_ids`` (restarting at 0) and its labels are shifted *inside* the record, so
no token is ever trained to predict the first token of the next record. With ``position_ids`` and no attention
mask, transformers builds a block-diagonal causal mask (sdpa, eager) or uses varlen kernels (flash-attention),
so records in one row never attend to each other; tests/test_packing.py checks this against unpacked logits.
"""

from __future__ import annotations

import bisect
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from launcher.templates import IGNORE_INDEX

# Attention implementations for which transformers separates packed sequences given position_ids.
ISOLATING_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bin-pack item indices by length: longest first, each into the fullest bin it still fits.

    ``O(n log n)``: bins are bucketed by remaining capacity, and a sorted list of the non-empty capacities finds
    the tightest fit by bisection.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free_sizes: list[int] = []  # sorted distinct remaining capacities that have at least one bin
    by_free: dict[int, list[int]] = {}
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"record {i} has {n} tokens, more than the capacity {capacity}")
        k = bisect.bisect_left(free_sizes, n)
        if k == len(free_sizes):
            b, free = len(bins), capacity
            bins.append([])
        else:
            free = free_sizes[k]
            b = by_free[free].pop()
            if not by_free[free]:
                del by_free[free]
                free_sizes.pop(k)
        bins[b].append(i)
        free -= n
        if free > 0:
            if free not in by_free:
                by_free[free] = []
                bisect.insort(free_sizes, free)
            by_free[free].append(b)
    return bins


@dataclass
class PackStats:
    rows: int
    records: int
    tokens: int
    slots: int

    @property
    def efficiency(self) -> float:
        """Real tokens over token slots (rows × cutoff_len)."""
        return self.tokens / max(self.slots, 1)


def pack_dataset(ds: Any, cutoff_len: int, packing: bool, out: Path) -> PackStats:
    """Write the row plan (lists of record indices) for a tokenised split to ``out``."""
    lengths = [len(x) for x in ds["input_ids"]]
    rows = best_fit_decreasing(lengths, cutoff_len) if packing else [[i] for i in range(len(lengths))]
    stats = PackStats(len(rows), len(lengths), sum(lengths), len(rows) * cutoff_len)
    out.write_text(json.dumps({"cutoff_len": cutoff_len, "rows": rows}))
    return stats


def collate(records: Sequence[Sequence[dict[str, list[int]]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of records -> padded ``input_ids``, pre-shifted ``labels`` and per-record ``position_ids``.

    ``labels[t]`` is the target for the token after ``input_ids[t]`` within the same record (-100 at each
    record's last token and on padding), so the loss needs no further shifting.
    """
    rows_ids, rows_labels, rows_pos = [], [], []
    for row in records:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for rec in row:
            ids += rec["input_ids"]
            labels += list(rec["labels"][1:]) + [IGNORE_INDEX]
            pos += range(len(rec["input_ids"]))
        rows_ids.append(ids)
        rows_labels.append(labels)
        rows_pos.append(pos)
    width = max(map(len, rows_ids))
    for ids, labels, pos in zip(rows_ids, rows_labels, rows_pos):
        pad = width - len(ids)
        ids += [pad_id] * pad
        labels += [IGNORE_INDEX] * pad
        pos += range(pad)  # padding is a sequence of its own: it attends to nothing real
    return {
        "input_ids": torch.tensor(rows_ids, dtype=torch.long),
        "labels": torch.tensor(rows_labels, dtype=torch.long),
        "position_ids": torch.tensor(rows_pos, dtype=torch.long),
    }


class RowLoader:
    """Deterministic micro-batches for one rank: rows shuffled per epoch from the seed, split evenly.

    Every rank gets the same number of micro-batches per epoch (the few rows that do not divide evenly are left
    out of that epoch, a different few each epoch), so no rank waits on a collective the others never reach.
    Position is a plain counter (epoch, index), so resuming needs no replay.
    """

    def __init__(self, ds: Any, rows: list[list[int]], micro_batch_size: int, rank: int, world: int, seed: int,
                 pad_id: int):
        self.ds, self.rows, self.mbs = ds, rows, micro_batch_size
        self.rank, self.world, self.seed, self.pad_id = rank, world, seed, pad_id
        self.batches_per_epoch = len(rows) // (world * micro_batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(rows)} rows cannot give each of {world} ranks a micro-batch of "
                             f"{micro_batch_size}; use more data or a smaller train.micro_batch_size")

    def epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def batches(self, epoch: int, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches ``start..`` of ``epoch`` for this rank."""
        order = self.epoch_order(epoch)
        per_step = self.world * self.mbs
        for b in range(start, self.batches_per_epoch):
            chunk = order[b * per_step + self.rank * self.mbs: b * per_step + (self.rank + 1) * self.mbs]
            yield collate([[self.ds[i] for i in self.rows[r]] for r in chunk], self.pad_id)
