"""Packing: bins respect capacity, labels never cross records, packed logits equal unpacked ones."""

from __future__ import annotations

import random

import pytest
import torch

from launcher.packing import best_fit_decreasing, collate
from launcher.templates import IGNORE_INDEX


def test_best_fit_decreasing_respects_capacity_and_keeps_every_item() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(1, 300) for _ in range(2000)]
    bins = best_fit_decreasing(lengths, 512)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    lower_bound = -(-sum(lengths) // 512)
    assert len(bins) <= lower_bound * 1.02 + 1


def test_best_fit_decreasing_rejects_overlong_items() -> None:
    with pytest.raises(ValueError):
        best_fit_decreasing([10, 600], 512)


def test_collate_shifts_labels_inside_each_record() -> None:
    a = {"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX, 2, 3]}
    b = {"input_ids": [4, 5], "labels": [IGNORE_INDEX, 5]}
    batch = collate([[a, b], [b]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [4, 5, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    # Record a's last token must not learn to predict record b's first token.
    assert batch["labels"].tolist() == [[2, 3, IGNORE_INDEX, 5, IGNORE_INDEX],
                                        [5, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]


def _tiny_model(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_logits_equal_each_record_alone(attn: str) -> None:
    model = _tiny_model(attn)
    rng = random.Random(1)
    records = [[rng.randrange(128) for _ in range(n)] for n in (7, 13, 5)]
    row = [{"input_ids": r, "labels": r} for r in records]
    batch = collate([row], pad_id=0)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for r in records:
            alone = model(input_ids=torch.tensor([r]), use_cache=False).logits[0]
            assert torch.allclose(packed[start:start + len(r)], alone, atol=1e-5), f"{attn} leaks across records"
            start += len(r)
