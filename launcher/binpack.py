"""Bin packing of record lengths into rows of at most ``capacity`` tokens: the algorithms behind the row plan.

Pure functions of the lengths (no tokens, no I/O), so the plan depends only on the data. :func:`pack_rows` is
what training uses: :func:`best_fit_decreasing` over the whole dataset, then the rows it left least full
re-packed by :func:`subset_sum_fill`. Both return the plan CSR style: row ``r`` holds record indices
``indices[offsets[r]:offsets[r + 1]]``. launcher/packing.py turns the plan into rows and micro-batches.
"""

from __future__ import annotations

import bisect
from typing import Sequence

import numpy as np


def best_fit_decreasing(lengths: Sequence[int] | np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Bin-pack records by length: longest first, each into the fullest row it still fits (best fit decreasing).

    Returns ``(offsets, indices)``: row ``r`` holds record indices ``indices[offsets[r]:offsets[r + 1]]``.

    Equal lengths are placed as a group, and all rows with the same free space are interchangeable, so the loop
    runs once per (distinct length, free-space bucket) visited, not once per record: 1M records take about a
    second. The result is the one sequential best fit decreasing gives, up to which of several equally full rows
    a record lands in.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if n == 0:
        return np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    too_long = np.flatnonzero(lengths > capacity)
    if len(too_long):
        i = int(too_long[0])
        raise ValueError(f"record {i} has {lengths[i]} tokens, more than the row capacity {capacity} "
                         f"({len(too_long)} such records); truncate or drop them before packing")
    if lengths.min() < 1:
        raise ValueError(f"record {int(np.argmin(lengths))} is empty; drop it before packing")

    order = np.argsort(-lengths, kind="stable")  # longest first, ties by index: deterministic
    sorted_len = lengths[order]
    starts = np.flatnonzero(np.r_[True, sorted_len[1:] != sorted_len[:-1]])
    counts = np.diff(np.r_[starts, n])
    bin_of = np.empty(n, dtype=np.int64)  # row of the record at sorted position p

    free_sizes: list[int] = []  # ascending distinct free capacities (> 0) that some row has
    by_free: dict[int, list[int]] = {}  # free capacity -> rows with exactly that much room
    n_bins = 0

    def add(rows: list[int], free: int) -> None:
        if free <= 0 or not rows:
            return  # a full row takes nothing more: stop tracking it
        if free not in by_free:
            by_free[free] = []
            bisect.insort(free_sizes, free)
        by_free[free].extend(rows)

    for start, count in zip(starts.tolist(), counts.tolist()):
        size = int(sorted_len[start])
        pos, left = start, count
        while left:
            j = bisect.bisect_left(free_sizes, size)
            if j == len(free_sizes):  # nothing fits: open rows, each taking as many of these records as fit
                per = capacity // size
                new = -(-left // per)
                rows = list(range(n_bins, n_bins + new))
                n_bins += new
                bin_of[pos:pos + left] = np.repeat(np.arange(rows[0], rows[0] + new), per)[:left]
                last = left - (new - 1) * per
                add(rows[:-1], capacity - per * size)
                add(rows[-1:], capacity - last * size)
                break
            free = free_sizes[j]
            bucket = by_free[free]
            # The tightest rows have `free` room; one of them takes records until less than `size` is left
            # (per records), then the next such row does the same.
            per = free // size
            if left >= per * len(bucket):
                taken, rest = bucket, []
                del by_free[free]
                free_sizes.pop(j)
                partial: list[int] = []
                used = per * len(taken)
            else:
                full, rem = divmod(left, per)
                keep = len(bucket) - full - (1 if rem else 0)
                taken, partial, rest = bucket[keep + (1 if rem else 0):], bucket[keep:keep + (1 if rem else 0)], \
                    bucket[:keep]
                by_free[free] = rest
                used = left
            bin_of[pos:pos + per * len(taken)] = np.repeat(np.asarray(taken, dtype=np.int64), per)
            if partial:
                bin_of[pos + per * len(taken):pos + used] = partial[0]
            pos, left = pos + used, left - used
            add(taken, free - per * size)
            if partial:
                add(partial, free - (used - per * len(taken)) * size)
    by_row = np.argsort(bin_of, kind="stable")
    offsets = np.zeros(n_bins + 1, dtype=np.int64)
    np.cumsum(np.bincount(bin_of, minlength=n_bins), out=offsets[1:])
    return offsets, order[by_row]


def subset_sum_fill(lengths: Sequence[int] | np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Row by row: the longest record left, then the subset of the others that fills the row most exactly.

    Best fit decreasing leaves a gap in almost every row when no record is short enough to close it (the shipped
    data: 73-289 tokens per record, 97.7 % at cutoff 1024). Choosing each row's records by subset sum closes
    those gaps (99.9 %, the ceil(tokens / cutoff) bound, on the same data) at a cost of one bounded-knapsack pass
    per row over the distinct lengths: fine for tens of thousands of records, too slow for millions, so
    :func:`pack_rows` uses it only on the rows best fit decreasing left least full.
    Returns ``(offsets, indices)`` like :func:`best_fit_decreasing`, and the work done (knapsack items visited).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    work = 0
    order = np.argsort(-lengths, kind="stable")
    vals, first, counts = np.unique(-lengths[order], return_index=True, return_counts=True)
    vals, first, left = (-vals).tolist(), first.tolist(), counts.tolist()  # distinct lengths, longest first
    used = [0] * len(vals)
    rows: list[np.ndarray] = []
    g0 = 0
    while True:
        while g0 < len(vals) and not left[g0]:
            g0 += 1
        if g0 == len(vals):
            break
        take = {g0: 1}
        left[g0] -= 1
        room = capacity - vals[g0]
        # Bounded knapsack over the remaining records by binary splitting of each length's count; reachable sums
        # are the bits of a Python int, one snapshot per item so the chosen subset can be read back.
        items: list[tuple[int, int]] = []
        for g in range(g0, len(vals)):
            v = vals[g]
            if v > room or not left[g]:
                continue
            m, k = min(left[g], room // v), 1
            while m:
                t = min(k, m)
                items.append((g, t))
                m, k = m - t, 2 * k
        work += len(items)
        mask = (1 << (room + 1)) - 1
        reach, snaps = 1, [1]
        for g, t in items:
            reach = (reach | (reach << (t * vals[g]))) & mask
            snaps.append(reach)
        target = reach.bit_length() - 1
        # Walking back from the shortest lengths, skip an item whenever the rest still reaches the target: the row
        # takes long records and leaves short ones for later rows' gaps.
        for s in range(len(items), 0, -1):
            if not (snaps[s - 1] >> target) & 1:
                g, t = items[s - 1]
                take[g] = take.get(g, 0) + t
                target -= t * vals[g]
        row = []
        for g, t in take.items():
            left[g] -= t - (1 if g == g0 else 0)
            row.append(order[first[g] + used[g]:first[g] + used[g] + t])
            used[g] += t
        rows.append(np.concatenate(row))
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    return offsets, (np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)), work


def pack_rows(lengths: Sequence[int] | np.ndarray, capacity: int, shard_records: int = 20_000,
              work_budget: int = 3_000_000) -> tuple[np.ndarray, np.ndarray]:
    """Best fit decreasing over the whole dataset, then its rows that are not full re-packed by
    :func:`subset_sum_fill`, least full first, in shards of about ``shard_records`` records; a shard's new rows
    replace its old ones when they are fewer.

    On long-tailed data best fit decreasing is already within a few rows of the ceil(tokens / cutoff) bound and
    the refinement touches only those rows; on narrow length distributions it recovers the 1-3 % that best fit
    decreasing leaves. No shard starts once ``work_budget`` knapsack items have been visited (about 1 s per
    million), so the cost stays bounded on millions of records; the result depends only on the lengths.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets, indices = best_fit_decreasing(lengths, capacity)
    bound = -(-int(lengths.sum()) // capacity)
    if len(offsets) - 1 <= bound:
        return offsets, indices
    per_row = np.diff(offsets)
    slack = capacity - np.add.reduceat(lengths[indices], offsets[:-1])
    open_rows = np.argsort(-slack, kind="stable")
    open_rows = open_rows[slack[open_rows] > 0]
    ends = np.cumsum(per_row[open_rows])  # records in the first k open rows
    keep = np.ones(len(per_row), dtype=bool)
    new_rows: list[np.ndarray] = []
    n_rows, work, k = len(per_row), 0, 0
    while k < len(open_rows) and work < work_budget and n_rows > bound:
        stop = max(k + 1, int(np.searchsorted(ends, (ends[k - 1] if k else 0) + shard_records, side="right")))
        shard = open_rows[k:stop]
        k = stop
        pool = np.concatenate([indices[offsets[r]:offsets[r + 1]] for r in shard])
        sub_off, sub_idx, w = subset_sum_fill(lengths[pool], capacity)
        work += w
        if len(sub_off) - 1 < len(shard):
            keep[shard] = False
            new_rows += [pool[sub_idx[sub_off[r]:sub_off[r + 1]]] for r in range(len(sub_off) - 1)]
            n_rows -= len(shard) - (len(sub_off) - 1)
    if keep.all():
        return offsets, indices
    sizes = np.r_[per_row[keep], [len(r) for r in new_rows]].astype(np.int64)
    new_off = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=new_off[1:])
    return new_off, np.concatenate([indices[np.repeat(keep, per_row)], *new_rows])
