"""The packed attention function (launcher/attention.py) against transformers' masked sdpa path: same outputs and
gradients on packed rows, flattened or batched, with records of every length from 1 to the row width."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from launcher.attention import PACKED, kernel, packed_attention, resolve
from launcher.packing import boundaries

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16


class _Attn(torch.nn.Module):
    """What the attention functions read from the calling module (a Llama attention layer with GQA)."""

    num_key_value_groups = HEADS // KV_HEADS
    is_causal = True


def _layout(rows: list[list[int]], flatten: bool) -> tuple[list[int], int, int]:
    """(sequence lengths row after row with padding as a sequence, batch, width), as collate lays them out."""
    if flatten:
        seqs = [n for row in rows for n in row]
        return seqs, 1, sum(seqs)
    width = max(sum(row) for row in rows)
    seqs = [n for row in rows for n in row + ([width - sum(row)] if sum(row) < width else [])]
    return seqs, len(rows), width


def _reference_mask(seqs: list[int], b: int, width: int, window: int | None) -> torch.Tensor:
    """The block-diagonal causal mask (b, 1, width, width) that transformers builds for sdpa from position ids."""
    seg = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor(seqs)).view(b, width)
    pos = torch.cat([torch.arange(n) for n in seqs]).view(b, width)
    allowed = (seg[:, :, None] == seg[:, None, :]) & (pos[:, :, None] >= pos[:, None, :])
    if window is not None:
        allowed &= pos[:, :, None] - pos[:, None, :] < window
    return allowed[:, None]


def _compare(rows: list[list[int]], flatten: bool, window: int | None = None) -> None:
    seqs, b, width = _layout(rows, flatten)
    g = torch.Generator().manual_seed(sum(seqs) + b)
    q, k, v = (torch.randn(b, h, width, HEAD_DIM, generator=g, dtype=torch.float64).float().requires_grad_()
               for h in (HEADS, KV_HEADS, KV_HEADS))
    grad_out = torch.randn(b, width, HEADS, HEAD_DIM, generator=g)
    module = _Attn()
    bounds = boundaries(seqs)
    got, _ = packed_attention(module, q, k, v, None, scaling=HEAD_DIM ** -0.5, sliding_window=window,
                              cu_seq_lens_q=bounds["cu_seq_lens_q"], max_length_q=int(bounds["max_length_q"]))
    got_grads = torch.autograd.grad(got, (q, k, v), grad_out)
    want, _ = sdpa_attention_forward(module, q, k, v, _reference_mask(seqs, b, width, window),
                                     scaling=HEAD_DIM ** -0.5)
    want_grads = torch.autograd.grad(want, (q, k, v), grad_out)
    assert got.shape == want.shape == (b, width, HEADS, HEAD_DIM)
    assert (got - want).abs().max() <= 1e-5
    for name, a, w in zip("qkv", got_grads, want_grads):
        assert (a - w).abs().max() <= 1e-5, f"gradient of {name}"


WIDTH = 12
# Every record length from 1 to WIDTH: rows [l, WIDTH - l] and a row that is one record of WIDTH tokens.
EVERY_LENGTH = [[n, WIDTH - n] for n in range(1, WIDTH)] + [[WIDTH]]


@pytest.mark.parametrize("flatten", [True, False])
def test_equals_masked_sdpa_forward_and_backward_for_every_record_length(flatten: bool) -> None:
    _compare(EVERY_LENGTH, flatten)


@pytest.mark.parametrize("flatten", [True, False])
def test_equals_masked_sdpa_with_padded_rows_and_single_token_records(flatten: bool) -> None:
    _compare([[1, 1, 5, 1], [9], [3, 1]], flatten)  # padded rows (batched layout), records of length 1


@pytest.mark.parametrize("flatten", [True, False])
def test_sliding_window_matches_transformers_window(flatten: bool) -> None:
    _compare([[7, 2, 3], [12]], flatten, window=4)


def test_without_boundaries_each_row_is_one_causal_sequence() -> None:
    q, k, v = (torch.randn(2, h, 6, HEAD_DIM) for h in (HEADS, KV_HEADS, KV_HEADS))
    got, _ = packed_attention(_Attn(), q, k, v, None)
    want, _ = sdpa_attention_forward(_Attn(), q, k, v, None)
    assert (got - want).abs().max() <= 1e-6


def test_auto_is_packed_only_for_packed_rows_and_cpu_runs_per_record() -> None:
    assert resolve("auto", packing=True) == PACKED and resolve("auto", packing=False) == "sdpa"
    assert resolve("eager", packing=True) == "eager"
    assert kernel(torch.device("cpu"), torch.bfloat16) == kernel(torch.device("cpu"), torch.float32) == \
        "sdpa per record"
    assert kernel(torch.device("cuda"), torch.float32) == "sdpa per record"  # the varlen kernels need 16-bit


def test_soft_capped_logits_are_refused_with_the_fix() -> None:
    q, k, v = (torch.randn(1, h, 4, HEAD_DIM) for h in (HEADS, KV_HEADS, KV_HEADS))
    with pytest.raises(ValueError, match="attn_implementation=eager"):
        packed_attention(_Attn(), q, k, v, None, softcap=30.0, **{"cu_seq_lens_q": torch.tensor([0, 4])})


def test_a_model_trained_with_packed_attention_saves_a_config_plain_transformers_loads(tmp_path) -> None:
    """The attention choice is not written to config.json: merged/exported folders load with from_pretrained alone."""
    from transformers import AutoModelForCausalLM

    from launcher.config import ModelConfig
    from launcher.model import load_model, materialize

    cfg = ModelConfig(name_or_path="models/tiny_llama", init="random")
    materialize(cfg)
    model = load_model(cfg, packing=True)
    assert model.config._attn_implementation == PACKED
    model.save_pretrained(tmp_path)
    assert PACKED not in (tmp_path / "config.json").read_text()
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"

