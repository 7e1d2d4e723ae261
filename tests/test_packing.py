"""Packing as pure logic: bin packing against a plain reference, the row-plan file, collation and RowLoader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from launcher.binpack import best_fit_decreasing, pack_rows, subset_sum_fill
from launcher.packing import RowLoader, collate, load_plan, pack_dataset, pack_lengths, plan_path, record_lengths
from launcher.templates import IGNORE_INDEX


def reference_bfd_fills(lengths: list[int], capacity: int) -> list[int]:
    """Textbook sequential best fit decreasing, O(n × rows): the sorted row fills it reaches."""
    fills: list[int] = []
    for n in sorted(lengths, reverse=True):
        fits = [b for b, f in enumerate(fills) if f + n <= capacity]
        if fits:
            best = max(fits, key=lambda b: fills[b])
            fills[best] += n
        else:
            fills.append(n)
    return sorted(fills)


def rows_of(offsets: np.ndarray, indices: np.ndarray) -> list[list[int]]:
    return [indices[offsets[r]:offsets[r + 1]].tolist() for r in range(len(offsets) - 1)]


def assert_valid_plan(lengths: np.ndarray, offsets: np.ndarray, indices: np.ndarray, capacity: int) -> None:
    assert sorted(indices.tolist()) == list(range(len(lengths))), "every record exactly once"
    assert all(lengths[row].sum() <= capacity for row in rows_of(offsets, indices))


@pytest.mark.parametrize("shape", ["uniform", "long_tail", "few_lengths"])
def test_grouped_best_fit_decreasing_equals_the_textbook_algorithm(shape: str) -> None:
    rng = np.random.default_rng(0)
    for _ in range(60):
        cap = int(rng.integers(16, 300))
        n = int(rng.integers(1, 300))
        if shape == "uniform":
            lengths = rng.integers(1, cap + 1, n)
        elif shape == "long_tail":
            lengths = np.minimum(cap, rng.lognormal(np.log(cap / 6), 1.0, n).astype(int) + 1)
        else:
            lengths = rng.choice([1, 2, 3, cap // 3, cap // 2, cap], n)
        offsets, indices = best_fit_decreasing(lengths, cap)
        assert_valid_plan(lengths, offsets, indices, cap)
        fills = sorted(int(lengths[row].sum()) for row in rows_of(offsets, indices))
        assert fills == reference_bfd_fills(lengths.tolist(), cap)


def test_best_fit_decreasing_rejects_overlong_and_empty_records() -> None:
    with pytest.raises(ValueError, match="record 1 has 600 tokens"):
        best_fit_decreasing([10, 600], 512)
    with pytest.raises(ValueError, match="record 0 is empty"):
        best_fit_decreasing([0, 5], 512)
    offsets, indices = best_fit_decreasing([], 512)
    assert offsets.tolist() == [0] and indices.tolist() == []


def test_subset_sum_fill_closes_the_gaps_best_fit_decreasing_leaves() -> None:
    # Lengths like the shipped sample (73-289 tokens): no record is short enough to fill best fit's gaps.
    lengths = np.random.default_rng(1).integers(73, 290, 2000)
    cap = 1024
    bound = -(-int(lengths.sum()) // cap)
    bfd_rows = len(best_fit_decreasing(lengths, cap)[0]) - 1
    offsets, indices, work = subset_sum_fill(lengths, cap)
    assert_valid_plan(lengths, offsets, indices, cap)
    assert bfd_rows > bound + 3, "this input must be hard for best fit decreasing, or the test proves nothing"
    assert len(offsets) - 1 <= bound + 1 and work > 0


def test_pack_rows_refines_only_what_helps_and_is_deterministic() -> None:
    rng = np.random.default_rng(2)
    narrow = rng.integers(73, 290, 3000)
    offsets, indices = pack_rows(narrow, 1024)
    assert_valid_plan(narrow, offsets, indices, 1024)
    assert len(offsets) - 1 <= -(-int(narrow.sum()) // 1024) + 1
    again = pack_rows(narrow, 1024)
    assert np.array_equal(again[0], offsets) and np.array_equal(again[1], indices)
    # A tiny work budget still gives a valid plan (best fit decreasing, partly refined).
    o2, i2 = pack_rows(narrow, 1024, shard_records=200, work_budget=1)
    assert_valid_plan(narrow, o2, i2, 1024)
    assert len(o2) - 1 >= len(offsets) - 1


def test_long_tailed_lengths_pack_above_99_5_percent() -> None:
    rng = np.random.default_rng(3)
    for cap in (1024, 4096):
        lengths = np.clip(rng.lognormal(np.log(300), 1.0, 20_000).astype(int), 8, cap)
        plan = pack_lengths(lengths, cap)
        assert_valid_plan(lengths, plan.offsets, plan.indices, cap)
        assert plan.stats.efficiency >= 0.995, plan.stats.describe()


def test_unpacked_plan_is_one_record_per_row() -> None:
    plan = pack_lengths([5, 7, 3], 16, packing=False)
    assert rows_of(plan.offsets, plan.indices) == [[0], [1], [2]]
    assert plan.stats.rows == 3 and plan.stats.records_per_row == 1.0
    with pytest.raises(ValueError):
        pack_lengths([5, 70], 16, packing=False)


def test_stats_and_plan_file_round_trip(tmp_path) -> None:
    import datasets

    ids = [[1] * n for n in (5, 9, 3, 12, 7)]
    ds = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    assert record_lengths(ds).tolist() == [5, 9, 3, 12, 7]
    assert record_lengths(ds.select([3, 0])).tolist() == [12, 5], "respects a dataset's index mapping"
    with_len = ds.add_column("length", [50, 90, 30, 120, 70])
    assert record_lengths(with_len).tolist() == [50, 90, 30, 120, 70], "a `length` column is used as is"

    stats = pack_dataset(ds, 16, True, plan_path(tmp_path, "train"))
    plan = load_plan(plan_path(tmp_path, "train"))
    assert plan.stats == stats
    assert stats.records == 5 and stats.tokens == 36 and stats.rows == len(plan) == 3
    assert stats.efficiency == pytest.approx(36 / 48) and stats.padding_fraction == pytest.approx(12 / 48)
    assert stats.records_per_row == pytest.approx(5 / 3) and stats.optimal_rows == 3
    d = stats.as_dict()
    assert {"efficiency", "records_per_row", "padding_fraction", "rows", "records"} <= set(d)
    assert "packing efficiency 75.00%" in stats.describe()


def test_record_lengths_read_arrow_columns_never_one_record_at_a_time(monkeypatch) -> None:
    """At 1M records a per-record read took ~50 s (datasets 5: a numpy-formatted column is a lazy ``Column`` that
    numpy walks record by record); the lengths must come from Arrow in bulk, with or without an index mapping."""
    import datasets
    from datasets.arrow_dataset import Column

    def per_record(*args, **kwargs):
        raise AssertionError("record_lengths read a column one record at a time")

    monkeypatch.setattr(Column, "__iter__", per_record)
    monkeypatch.setattr(Column, "__getitem__", per_record)
    lens = [5, 9, 3, 12, 7, 1, 4]
    ds = datasets.Dataset.from_dict({"input_ids": [[1] * n for n in lens]})
    with_len = ds.add_column("length", [10 * n for n in lens])
    order = [6, 2, 0, 5, 3]
    for batch_size in (2, 100_000):  # input_ids are read in batches: the batch size must not change the result
        assert record_lengths(ds, batch_size).tolist() == lens
        assert record_lengths(ds.select(order), batch_size).tolist() == [lens[i] for i in order]
    assert record_lengths(with_len.select(order)).tolist() == [10 * lens[i] for i in order]
    assert record_lengths(with_len.select([])).dtype == np.int64 and len(record_lengths(ds.select([]))) == 0


def test_collate_shifts_labels_inside_each_record_and_pads_as_its_own_sequence() -> None:
    a = {"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX, 2, 3]}
    b = {"input_ids": [4, 5], "labels": [IGNORE_INDEX, 5]}
    batch = collate([[a, b], [b]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [4, 5, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    # Record a's last token must not learn to predict record b's first token.
    assert batch["labels"].tolist() == [[2, 3, IGNORE_INDEX, 5, IGNORE_INDEX],
                                        [5, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    assert int(batch["num_tokens"]) == 7
    # Sequence boundaries over the tokens row after row, the padding being a sequence of its own.
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 7, 10] and int(batch["max_length_q"]) == 3


def test_flattened_batch_carries_the_boundaries_transformers_would_derive() -> None:
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    a = {"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX, 2, 3]}
    b = {"input_ids": [4, 5], "labels": [IGNORE_INDEX, 5]}
    batch = collate([[a, b], [b]], pad_id=0, flatten=True)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 4, 5]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert batch["cu_seq_lens_q"].tolist() == cu_q.tolist() == [0, 3, 5, 7]
    assert torch.equal(batch["cu_seq_lens_k"], batch["cu_seq_lens_q"])
    assert int(batch["max_length_q"]) == int(max_q) == 3 and int(batch["num_tokens"]) == 7


# --------------------------------------------------------------------------------------------- RowLoader
def _dataset(n: int):
    """Record i is the token i+1 repeated, so a batch tells which records it holds."""
    import datasets

    rng = np.random.default_rng(n)
    ids = [[i + 1] * int(rng.integers(1, 20)) for i in range(n)]
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})


def _records_in(batch: dict[str, torch.Tensor]) -> set[int]:
    ids, pos = batch["input_ids"].flatten(), batch["position_ids"].flatten()
    starts = (pos == 0) & (ids != 0)
    return {int(t) - 1 for t in ids[starts]}


@pytest.mark.parametrize("n_records", [37, 50, 61])
@pytest.mark.parametrize("mbs", [1, 2, 3])
def test_rowloader_gives_every_rank_the_same_count_and_disjoint_rows(n_records: int, mbs: int) -> None:
    ds = _dataset(n_records)
    plan = pack_lengths(record_lengths(ds), 32)
    for world in (1, 2, 3, 4):
        loaders = [RowLoader(ds, plan, mbs, rank, world, seed=7, pad_id=0) for rank in range(world)]
        assert len({ld.batches_per_epoch for ld in loaders}) == 1
        assert loaders[0].batches_per_epoch == len(plan) // (world * mbs)
        for epoch in (0, 1):
            batches = [list(ld.batches(epoch)) for ld in loaders]
            assert len({len(b) for b in batches}) == 1, "same number of micro-batches on every rank"
            rows = [r for ld in loaders for i in range(ld.batches_per_epoch) for r in ld.batch_rows(epoch, i)]
            assert len(rows) == len(set(rows)), f"world {world}: a row was given twice in epoch {epoch}"
            assert len(rows) == loaders[0].batches_per_epoch * world * mbs
            # The batches hold exactly the records of their rows.
            for ld, bs in zip(loaders, batches):
                for i, b in enumerate(bs):
                    want = {int(x) for r in ld.batch_rows(epoch, i) for x in plan.row(int(r))}
                    assert _records_in(b) == want


def test_rowloader_order_changes_per_epoch_and_repeats_for_the_same_seed() -> None:
    ds = _dataset(80)
    plan = pack_lengths(record_lengths(ds), 32)
    a, b = (RowLoader(ds, plan, 2, 0, 2, seed=3, pad_id=0) for _ in range(2))
    c = RowLoader(ds, plan, 2, 0, 2, seed=4, pad_id=0)
    assert np.array_equal(a.epoch_order(0), b.epoch_order(0))
    assert not np.array_equal(a.epoch_order(0), a.epoch_order(1))
    assert not np.array_equal(a.epoch_order(0), c.epoch_order(0))
    first = [batch["input_ids"] for batch in a.batches(1)]
    second = [batch["input_ids"] for batch in b.batches(1)]
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    resumed = list(a.batches(1, start=2))
    assert all(torch.equal(x["input_ids"], y) for x, y in zip(resumed, first[2:]))


def test_rowloader_refuses_data_too_small_for_the_world() -> None:
    ds = _dataset(3)
    plan = pack_lengths(record_lengths(ds), 64)
    with pytest.raises(ValueError, match="micro_batch_size"):
        RowLoader(ds, plan, 2, 0, 4, seed=0, pad_id=0)
