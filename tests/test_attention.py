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


def _windowed_sdpa(q, k, v, cu, scale, left: int, right: int) -> torch.Tensor:
    """What a varlen kernel computes, on (tokens, heads, dim): key j is seen by query i when i-left <= j <= i+right
    (-1: unbounded), within each sequence of ``cu``; the stand-in for the CUDA-only kernels below."""
    bounds, outs = cu.tolist(), []
    for s, e in zip(bounds[:-1], bounds[1:]):
        qi, ki, vi = (t[s:e].transpose(0, 1) for t in (q, k, v))
        ki, vi = (t.repeat_interleave(qi.shape[0] // t.shape[0], dim=0) for t in (ki, vi))
        d = torch.arange(e - s)[:, None] - torch.arange(e - s)[None, :]  # i - j
        allowed = (d >= -right if right >= 0 else torch.ones_like(d, dtype=torch.bool)) & \
            (d <= left if left >= 0 else torch.ones_like(d, dtype=torch.bool))
        outs.append(torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, attn_mask=allowed, scale=scale))
    return torch.cat(outs, dim=1).transpose(0, 1)


def _torch_varlen_2_13(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                       window_size=(-1, -1), enable_gqa=False):
    assert cu_seq_q.dtype == torch.int32 and q.dim() == 3 and (enable_gqa or k.shape[1] == q.shape[1])
    return _windowed_sdpa(q, k, v, cu_seq_q, scale, *window_size)


def _torch_varlen_2_10(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None, scale=None):
    assert k.shape[1] == q.shape[1], "no GQA in this signature: heads must be repeated"
    return _windowed_sdpa(q, k, v, cu_seq_q, scale, -1, 0 if is_causal else -1)


def _flash_attn_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False,
                       window_size=(-1, -1), softcap=0.0):
    assert causal and softcap == 0.0 and dropout_p == 0.0
    return _windowed_sdpa(q, k, v, cu_q, softmax_scale, window_size[0], 0)


@pytest.mark.parametrize("kernel_name,fake", [("torch varlen_attn", _torch_varlen_2_13),
                                              ("torch varlen_attn", _torch_varlen_2_10),
                                              ("flash_attn varlen", _flash_attn_varlen)])
@pytest.mark.parametrize("flatten", [True, False])
def test_cuda_kernel_calls_lay_out_tokens_and_windows_as_the_kernels_expect(kernel_name, fake, flatten,
                                                                           monkeypatch) -> None:
    """The varlen kernels run on CUDA only; here each is replaced by a CPU function with its signature and
    semantics, to check what packed_attention hands them (layout, boundaries, causality, window, GQA) for torch
    2.10-2.11's and 2.13's varlen_attn signatures and flash-attn's."""
    import inspect

    import launcher.attention as attention

    monkeypatch.setattr(attention, "kernel", lambda *a: kernel_name)
    monkeypatch.setattr(attention, "_torch_varlen", lambda: (fake, frozenset(inspect.signature(fake).parameters)))
    monkeypatch.setattr(attention, "_flash_attn", lambda: fake)
    _compare(EVERY_LENGTH, flatten)
    if fake is not _torch_varlen_2_10:  # that signature has no window: packed_attention computes per record
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



def test_the_gpu_check_runs_its_checks_on_cpu(tmp_path) -> None:
    """bench/gpu_check.py (run on a lent GPU, never in CI) with a tiny model on CPU: every path it takes on the GPU
    but the kernels runs, and its loss checks (packed = unpacked, chunked = plain on a long row) pass."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--tiny", "--steps", "1",
                        "--warmup", "1", "--long", "512", "--out", str(out)], cwd=root, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["loss_check"]["ok"] and result["long_row"]["ok"]
    assert result["long_row"]["chunked"]["chunks"] == 2 and result["long_row"]["plain"]["chunks"] == 0
    assert set(result["attention"]) >= {PACKED, "sdpa"}
