"""Packing: whole tokenised records into rows of at most ``cutoff_len`` tokens, and rows into micro-batches.

Three rules keep packed training equal to unpacked training:

* Each record keeps its own ``position_ids`` (restarting at 0) and its labels are shifted *inside* the record, so
  no token is ever trained to predict the first token of the next record.
* The model is called with ``position_ids``, the sequence boundaries :func:`collate` computed from the row plan
  (``cu_seq_lens_*``), ``use_cache=False`` and **no** attention mask (:func:`packed_forward`). The default
  ``packed`` attention (launcher/attention.py) computes each record's own blocks from the boundaries and no mask
  is built; flash-attention runs its varlen kernel on them (both take a micro-batch flattened into one row,
  because transformers only goes varlen for a batch of one); sdpa and eager ignore them and get a block-diagonal
  causal mask that transformers derives from the position ids. With the KV cache on, or a 2-D all-ones mask,
  records attend to each other (tests/test_packed_training.py pins this).
* Some architectures ignore packed position ids (measured with transformers 5.23: OPT, Bloom, Falcon); the worker
  checks the real model once at start with :func:`isolation_leak` and refuses to train if records leak.

The row plan is two integer arrays (CSR style): row ``r`` holds records ``indices[offsets[r]:offsets[r + 1]]``. The
bin packing that makes it (pure functions of the lengths) is launcher/binpack.py.
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import pyarrow.compute as pc
import torch

from launcher.attention import PACKED
from launcher.binpack import pack_rows
from launcher.templates import IGNORE_INDEX

# Attention implementations that keep packed records apart given our batches (packed and flash-attention through
# the sequence boundaries, the others through the mask transformers builds from position_ids). Whether a given
# *architecture* honours them is checked on the real model by isolation_leak().
ISOLATING_ATTENTION = (PACKED, "sdpa", "eager", "flash_attention_2", "flash_attention_3")


def varlen_attention(attn_implementation: str) -> bool:
    """Whether micro-batches are flattened into one row with sequence boundaries: flash-attention needs it
    (transformers runs its varlen kernel only for a batch of one; with more rows records would attend to each
    other), and for ``packed`` it drops the padding of shorter rows from every layer's work."""
    return attn_implementation == PACKED or attn_implementation.startswith("flash_attention")


# Relative logit change a record may show when the record packed before it is replaced; isolated models give 0.
LEAK_TOLERANCE = 1e-3


# --------------------------------------------------------------------------------------------- row plan
@dataclass
class PackStats:
    """What packing did; printed by the launcher at start and kept in the run summary."""

    rows: int
    records: int
    tokens: int
    cutoff_len: int
    packing: bool
    max_records_per_row: int
    seconds: float = 0.0

    @property
    def slots(self) -> int:
        return self.rows * self.cutoff_len

    @property
    def efficiency(self) -> float:
        """Real tokens over token slots (rows × cutoff_len)."""
        return self.tokens / max(self.slots, 1)

    @property
    def padding_fraction(self) -> float:
        """Share of the rows' token slots that would be padding (1 - efficiency). Micro-batches are padded only
        to their longest row, so training pads less; each step logs its measured ``padding_fraction``."""
        return 1.0 - self.efficiency

    @property
    def records_per_row(self) -> float:
        return self.records / max(self.rows, 1)

    @property
    def optimal_rows(self) -> int:
        """No packing can use fewer rows than ceil(tokens / cutoff_len)."""
        return -(-self.tokens // self.cutoff_len)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "slots": self.slots, "efficiency": round(self.efficiency, 6),
                "padding_fraction": round(self.padding_fraction, 6),
                "records_per_row": round(self.records_per_row, 3), "optimal_rows": self.optimal_rows}

    def describe(self) -> str:
        """One line for the launcher's start-up log."""
        if not self.packing:
            return (f"{self.rows:,} rows, one record each, {self.tokens / max(self.records, 1):.0f} tokens per "
                    f"record on average (packing off: micro-batches are padded to their longest record)")
        return (f"{self.rows:,} rows of ≤{self.cutoff_len}: packing efficiency {self.efficiency:.2%} "
                f"(best possible {self.tokens / max(self.optimal_rows * self.cutoff_len, 1):.2%}), "
                f"{self.records_per_row:.1f} records per row (max {self.max_records_per_row}), "
                f"{self.padding_fraction:.2%} padding")


@dataclass
class RowPlan:
    """Which records make up each row: row ``r`` is ``indices[offsets[r]:offsets[r + 1]]``."""

    offsets: np.ndarray
    indices: np.ndarray
    stats: PackStats

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, r: int) -> np.ndarray:
        return self.indices[self.offsets[r]:self.offsets[r + 1]]


def record_lengths(ds: Any, batch_size: int = 100_000) -> np.ndarray:
    """Token count of every record of a tokenised ``datasets.Dataset``, read from Arrow without Python objects.

    Always through the Arrow format: with datasets 5 a numpy-formatted column is a lazy ``Column`` that numpy reads
    one record at a time (about a minute for a million records). Without a ``length`` column the list lengths of
    ``input_ids`` are read ``batch_size`` records at a time, so an index mapping (``select``, ``shuffle``) never
    gathers every token into memory at once.
    """
    if "length" in ds.column_names:
        return ds.with_format("arrow")["length"].to_numpy().astype(np.int64)
    ids = ds.select_columns(["input_ids"]).with_format("arrow")
    parts = [pc.list_value_length(b["input_ids"]).to_numpy() for b in ids.iter(batch_size=batch_size)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def pack_lengths(lengths: Sequence[int] | np.ndarray, cutoff_len: int, packing: bool = True) -> RowPlan:
    """The row plan for records of these lengths: best fit decreasing, or one record per row."""
    t0 = time.perf_counter()
    lengths = np.asarray(lengths, dtype=np.int64)
    if packing:
        offsets, indices = pack_rows(lengths, cutoff_len)
    else:
        if len(lengths) and lengths.max() > cutoff_len:
            raise ValueError(f"record {int(np.argmax(lengths))} is longer than cutoff_len={cutoff_len}")
        offsets, indices = np.arange(len(lengths) + 1, dtype=np.int64), np.arange(len(lengths), dtype=np.int64)
    per_row = np.diff(offsets)
    stats = PackStats(rows=len(per_row), records=len(lengths), tokens=int(lengths.sum()), cutoff_len=cutoff_len,
                      packing=packing, max_records_per_row=int(per_row.max()) if len(per_row) else 0,
                      seconds=round(time.perf_counter() - t0, 3))
    return RowPlan(offsets, indices, stats)


def save_plan(plan: RowPlan, out: Path) -> None:
    """Write the plan as one uncompressed ``.npz`` (written to a temporary name, then renamed)."""
    buf = io.BytesIO()
    np.savez(buf, offsets=plan.offsets, indices=plan.indices, stats=np.array(json.dumps(asdict(plan.stats))))
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out)


def load_plan(path: Path) -> RowPlan:
    with np.load(path, allow_pickle=False) as f:
        return RowPlan(f["offsets"], f["indices"], PackStats(**json.loads(str(f["stats"]))))


def plan_path(data_dir: str | Path, split: str = "train") -> Path:
    """Where prepared data keeps the row plan of a split."""
    return Path(data_dir) / f"{split}_rows.npz"


def pack_dataset(ds: Any, cutoff_len: int, packing: bool, out: Path) -> PackStats:
    """Pack a tokenised split (whole dataset at once) and write its row plan to ``out``."""
    plan = pack_lengths(record_lengths(ds), cutoff_len, packing)
    save_plan(plan, out)
    return plan.stats


# --------------------------------------------------------------------------------------------- batches
def collate(records: Sequence[Sequence[dict[str, Sequence[int]]]], pad_id: int,
            flatten: bool = False, shard: tuple[int, int] = (0, 1)) -> dict[str, torch.Tensor]:
    """Rows of records -> ``input_ids``, pre-shifted ``labels``, per-record ``position_ids`` and the sequence
    boundaries.

    ``labels[t]`` is the target for the token after ``input_ids[t]`` within the same record (-100 at each
    record's last token and on padding), so the loss needs no further shifting. Rows are padded to the longest;
    padding gets positions of its own (0, 1, ...), so it is a sequence that attends to nothing real.

    ``flatten=True`` concatenates all rows into one row without padding. Either way the batch carries the
    boundaries of its sequences over its tokens taken row after row (``cu_seq_lens_*``, padding counted as a
    sequence, and ``max_length_*``), which transformers hands to the attention function: the ``packed`` and
    flash-attention kernels compute each sequence on its own; sdpa and eager ignore them.
    ``num_tokens`` counts the real (non-padding) tokens.

    ``shard=(k, n)`` (sequence parallelism): rows are padded at the tail to a multiple of ``n`` tokens and only
    their ``k``-th of ``n`` equal slices is returned, ``num_tokens`` counting the real tokens of that slice. Labels
    were shifted inside each record before slicing, so a record crossing a slice boundary keeps its targets. Such a
    slice carries no sequence boundaries: the sequence-parallel attention finds the records of the whole row from
    the gathered position ids (launcher.sequence).
    """
    recs = [rec for row in records for rec in row]
    lens = [len(rec["input_ids"]) for rec in recs]
    ids = np.concatenate([np.asarray(rec["input_ids"], dtype=np.int64) for rec in recs])
    labels = np.concatenate([np.r_[np.asarray(rec["labels"][1:], dtype=np.int64), IGNORE_INDEX] for rec in recs])
    pos = np.concatenate([np.arange(n, dtype=np.int64) for n in lens])
    n_tokens = torch.tensor(len(ids))
    if flatten:
        return {"input_ids": torch.from_numpy(ids)[None], "labels": torch.from_numpy(labels)[None],
                "position_ids": torch.from_numpy(pos)[None], "num_tokens": n_tokens, **boundaries(lens)}
    row_lens = [sum(len(rec["input_ids"]) for rec in row) for row in records]
    piece, pieces = shard
    width = -(-max(row_lens) // pieces) * pieces
    out_ids = np.full((len(records), width), pad_id, dtype=np.int64)
    out_labels = np.full((len(records), width), IGNORE_INDEX, dtype=np.int64)
    out_pos = np.tile(np.arange(width, dtype=np.int64), (len(records), 1))
    start, seqs = 0, []
    for r, (row, n) in enumerate(zip(records, row_lens)):
        out_ids[r, :n], out_labels[r, :n], out_pos[r, :n] = ids[start:start + n], labels[start:start + n], \
            pos[start:start + n]
        out_pos[r, n:] = np.arange(width - n)
        start += n
        seqs += [len(rec["input_ids"]) for rec in row] + ([width - n] if n < width else [])
    if pieces > 1:
        part = slice(piece * width // pieces, (piece + 1) * width // pieces)
        out_ids, out_labels, out_pos = out_ids[:, part], out_labels[:, part], out_pos[:, part]
        n_tokens = torch.tensor(sum(max(0, min(m, part.stop) - part.start) for m in row_lens))
        return {"input_ids": torch.from_numpy(np.ascontiguousarray(out_ids)),
                "labels": torch.from_numpy(np.ascontiguousarray(out_labels)),
                "position_ids": torch.from_numpy(np.ascontiguousarray(out_pos)), "num_tokens": n_tokens}
    return {"input_ids": torch.from_numpy(out_ids), "labels": torch.from_numpy(out_labels),
            "position_ids": torch.from_numpy(out_pos), "num_tokens": n_tokens, **boundaries(seqs)}


def boundaries(lengths: Sequence[int]) -> dict[str, torch.Tensor]:
    """transformers' varlen keyword arguments for consecutive sequences of these lengths (queries = keys)."""
    cu = torch.tensor(np.r_[0, np.cumsum(lengths)], dtype=torch.int32)
    longest = torch.tensor(max(lengths))
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


class TokenCounts(NamedTuple):
    """What one collated micro-batch holds: the one definition training, evaluation and metrics count with.

    ``tokens`` are the records' tokens (padding excluded), ``supervised`` those with a label, ``slots`` the
    positions computed on (padding included: ``padding_fraction = 1 - tokens / slots``) and ``rows`` the packed
    rows, which could hold ``rows × cutoff_len`` tokens (:attr:`PackStats.slots`; ``tokens`` over that is the
    packing efficiency)."""

    tokens: int
    supervised: int
    slots: int
    rows: int


def count_tokens(batch: dict[str, torch.Tensor]) -> TokenCounts:
    ids = batch["input_ids"]
    return TokenCounts(int(batch["num_tokens"]), int((batch["labels"] != IGNORE_INDEX).sum()), ids.numel(),
                       ids.shape[0])


def packed_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a collated batch (see :func:`forward_kwargs`)."""
    return model(**forward_kwargs(batch)).logits


def forward_kwargs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Forward arguments of a collated batch: position ids and sequence boundaries, no KV cache and no attention
    mask, so records stay apart.

    Never add a 2-D attention mask or leave the cache on here: transformers then ignores the packed position ids
    and every record attends to the ones before it in its row.
    """
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
                              "use_cache": False}
    if "cu_seq_lens_q" in batch:  # absent only from a sequence-parallel slice (see collate)
        kwargs.update(cu_seq_lens_q=batch["cu_seq_lens_q"], cu_seq_lens_k=batch["cu_seq_lens_k"],
                      max_length_q=int(batch["max_length_q"]), max_length_k=int(batch["max_length_k"]))
    return kwargs


def isolation_leak(model: torch.nn.Module, vocab_size: int, device: torch.device, flatten: bool = False,
                   shard: tuple[int, int] = (0, 1)) -> float:
    """How much one packed record's logits change when the record before it in the row is replaced (relative).

    Two rows ``[A, B]`` and ``[A', B]`` of the same shape go through :func:`packed_forward` together; if the model
    keeps records apart, B's logits are identical in both (0.0 measured with transformers 5.23 for Llama, Mistral,
    Qwen2, Gemma, GPT-2 and GPT-NeoX, eager and sdpa, float32 and bfloat16), and far from it when B sees A (0.004-0.3 for
    OPT, Bloom, Falcon with sdpa; packed attention, which needs no mask, keeps OPT's records apart).
    Every rank must call this (under ZeRO-3 the forward gathers parameters collectively). With sequence
    parallelism (``shard``) each rank measures the part of B its slice of the rows holds (0.0 if none).
    """
    g = torch.Generator().manual_seed(1234)
    a, a2, b = (torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in (12, 12, 10))
    rows = [[{"input_ids": a, "labels": a}, {"input_ids": b, "labels": b}],
            [{"input_ids": a2, "labels": a2}, {"input_ids": b, "labels": b}]]
    batch = {k: v.to(device) for k, v in collate(rows, pad_id=0, flatten=flatten, shard=shard).items()}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = packed_forward(model, batch).float().reshape(2, batch["input_ids"].numel() // 2, -1)
    finally:
        model.train(was_training)
    width = logits.shape[1]
    b_here = slice(max(0, 12 - shard[0] * width), max(0, 22 - shard[0] * width))  # B's positions in this slice
    if b_here.start >= min(b_here.stop, width):
        return 0.0
    scale = logits.abs().max().clamp_min(1e-6)
    return float((logits[0, b_here] - logits[1, b_here]).abs().max() / scale)


class RowLoader:
    """Deterministic micro-batches for one rank: rows shuffled per epoch from the seed, split evenly.

    Every rank gets the same number of micro-batches per epoch (the few rows that do not divide evenly are left
    out of that epoch, a different few each epoch), so no rank waits on a collective the others never reach.
    Within an epoch the ranks' rows are disjoint. Position is a plain counter (epoch, index), so resuming needs
    no replay.
    """

    def __init__(self, ds: Any, rows: RowPlan, micro_batch_size: int, rank: int, world: int, seed: int,
                 pad_id: int, flatten: bool = False, shard: tuple[int, int] = (0, 1)):
        # ``rank``/``world``: data-parallel; ranks of one sequence-parallel group get the same rows and take
        # slice ``shard`` of them (see collate).
        self.ds, self.rows, self.mbs, self.shard = ds, rows, micro_batch_size, shard
        self.rank, self.world, self.seed, self.pad_id, self.flatten = rank, world, seed, pad_id, flatten
        self.batches_per_epoch = len(rows) // (world * micro_batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(rows)} rows cannot give each of {world} ranks a micro-batch of "
                             f"{micro_batch_size}; use more data or a smaller train.micro_batch_size")

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The row order of ``epoch``: a permutation drawn from (seed, epoch) alone."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

    def batch_rows(self, epoch: int, index: int, order: np.ndarray | None = None) -> np.ndarray:
        """Rows of this rank's micro-batch ``index`` in ``epoch``."""
        order = self.epoch_order(epoch) if order is None else order
        start = (index * self.world + self.rank) * self.mbs
        return order[start:start + self.mbs]

    def batches(self, epoch: int, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches ``start..`` of ``epoch`` for this rank."""
        order = self.epoch_order(epoch)
        for b in range(start, self.batches_per_epoch):
            rows = [self.rows.row(int(r)) for r in self.batch_rows(epoch, b, order)]
            flat = np.concatenate(rows).tolist()
            cols = self.ds[flat]  # one Arrow read per micro-batch
            recs = [{"input_ids": i, "labels": l} for i, l in zip(cols["input_ids"], cols["labels"])]
            grouped, k = [], 0
            for r in rows:
                grouped.append(recs[k:k + len(r)])
                k += len(r)
            yield collate(grouped, self.pad_id, self.flatten, self.shard)
