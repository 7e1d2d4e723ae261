"""Packed attention: each packed record attends to itself only, and only its own blocks are computed.

With ``sdpa`` or ``eager``, transformers keeps packed records apart by building a block-diagonal mask from the
position ids; the kernel then still computes every cross-record block of a row (L² per row, where the records need
Σ lᵢ²), building the mask costs ~15 % of a 1024-token step on CPU, and on a GPU any mask switches sdpa off its flash
kernel and costs O(L²) memory per row. This module registers ``"packed"`` with transformers' ``AttentionInterface``
(so every model that calls attention through the interface can use it). No *mask* function is registered under
that name, so transformers builds no mask at all (``masking_utils`` returns ``None`` for custom implementations)
and the function works from the sequence boundaries that :func:`launcher.packing.collate` computed once per
micro-batch from the row plan (``cu_seq_lens_q``/``max_length_q``, which transformers forwards to attention):

* CUDA with bf16/fp16: flash-attention's varlen kernel when the ``flash_attn`` package is installed, otherwise
  torch's built-in ``torch.nn.attention.varlen.varlen_attn`` (a flash kernel shipped with torch, nothing to compile);
* everywhere else (CPU, float32): causal ``scaled_dot_product_attention`` on each record's slice.

The boundaries may cover one flattened row or several rows of equal width (padding is a sequence of its own); a
record never spans two rows. Called without boundaries (a plain forward) each row is one causal sequence; a
padding mask would be ignored, which is why unpacked training, generation and export load ``sdpa`` instead
(:func:`resolve`), and generation inside a packed training run switches to it (:func:`unpacked`).
"""

from __future__ import annotations

import importlib.util
import inspect
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

PACKED = "packed"


def resolve(attn_implementation: str, packing: bool) -> str:
    """The attention implementation to load: ``"auto"`` is :data:`PACKED` for packed rows, ``sdpa`` otherwise."""
    if attn_implementation == "auto":
        return PACKED if packing else "sdpa"
    return attn_implementation


# Settings of model.attn_implementation that sequence parallelism runs with: its Ulysses wrapper replaces sdpa.
SEQUENCE_PARALLEL_ATTENTION = ("auto", "sdpa")


def attention_of(cfg: Any) -> str:
    """The attention implementation a run's model loads with (``cfg``: a launcher ``Config``). With sequence
    parallelism ``auto`` is sdpa: DeepSpeed's Ulysses wrapper is installed in its place and keeps packed records
    apart itself (launcher.sequence)."""
    return resolve(cfg.model.attn_implementation, cfg.dataset.packing and cfg.parallel.sequence == 1)


@lru_cache(maxsize=None)
def _torch_varlen() -> tuple[Any, frozenset[str]] | None:
    """torch's varlen_attn and its keyword names (they changed between torch releases), or None without it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


@lru_cache(maxsize=None)
def _flash_attn() -> Any:
    if importlib.util.find_spec("flash_attn") is None:
        return None
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


def kernel(device: torch.device, dtype: torch.dtype, dropout: float = 0.0) -> str:
    """Which kernel :func:`packed_attention` runs for tensors on ``device`` in ``dtype`` (logged at start)."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        if _flash_attn() is not None:
            return "flash_attn varlen"
        if _torch_varlen() is not None and dropout == 0.0:
            return "torch varlen_attn"
    return "sdpa per record"


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     sliding_window: int | None = None, softcap: float | None = None,
                     cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal attention within each sequence of ``cu_seq_lens_q``; transformers' attention-interface signature.

    ``query`` is (batch, heads, tokens, head_dim), ``key``/``value`` (batch, kv_heads, tokens, head_dim); the
    boundaries index the batch's tokens row after row. Returns (batch, tokens, heads, head_dim) like ``sdpa``.
    """
    b, heads, n, d = query.shape
    if cu_seq_lens_q is None:  # not a packed call: each row is one sequence
        if key.shape[2] != n:  # decoding with a KV cache (not training): sdpa needs no mask for one new token
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, softcap=softcap, **kwargs)
        cu_seq_lens_q, max_length_q = torch.arange(0, b * n + 1, n, dtype=torch.int32, device=query.device), n
    if softcap is not None and _flash_attn() is None:
        raise ValueError(f"{type(module).__name__} soft-caps its attention logits, which only flash-attention's "
                         f"kernel supports among packed kernels; set model.attn_implementation=eager.")
    if kwargs.get("s_aux") is not None or not kwargs.get("is_causal", getattr(module, "is_causal", True)):
        raise ValueError(f"{type(module).__name__} is not plain causal attention (attention sinks or bidirectional); "
                         f"packed attention cannot run it: set model.attn_implementation=sdpa or eager.")
    name = kernel(query.device, query.dtype, dropout)
    if name == "sdpa per record":
        return _per_record(query, key, value, cu_seq_lens_q.tolist(), scaling, dropout, sliding_window), None
    # The varlen kernels take (tokens, heads, head_dim); q/k/v come from (b, n, heads, d) views, so this is a view.
    q, k, v = (t.transpose(1, 2).reshape(b * t.shape[2], t.shape[1], d) for t in (query, key, value))
    cu, longest = cu_seq_lens_q.to(device=query.device, dtype=torch.int32), int(max_length_q)
    window = sliding_window if sliding_window is not None and sliding_window < longest else None
    if name == "flash_attn varlen":
        out = _flash_attn()(q, k, v, cu, cu, longest, longest, dropout_p=dropout, softmax_scale=scaling,
                            causal=True, window_size=(window - 1, 0) if window else (-1, -1),
                            softcap=softcap or 0.0)
    else:
        varlen_attn, params = _torch_varlen()
        extra: dict[str, Any] = {"scale": scaling}
        if "window_size" in params:  # torch >= 2.11: causality is a (left, right) window
            extra["window_size"] = (window - 1, 0) if window else (-1, 0)
        elif window:
            return _per_record(query, key, value, cu_seq_lens_q.tolist(), scaling, dropout, sliding_window), None
        else:
            extra["is_causal"] = True
        if k.shape[1] != heads:
            if "enable_gqa" in params:
                extra["enable_gqa"] = True
            else:
                k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
        out = varlen_attn(q, k, v, cu, cu, longest, longest, **extra)
    return out.view(b, n, heads, d), None


def _per_record(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: list[int],
                scale: float | None, dropout: float, window: int | None) -> torch.Tensor:
    """Causal sdpa on each sequence's own (1, heads, l, head_dim) slice (4-D, so CPU takes its flash kernel)."""
    b, heads, n, d = query.shape
    if bounds[-1] != b * n:
        raise ValueError(f"packed attention got sequence boundaries for {bounds[-1]} tokens but a batch of "
                         f"{b} × {n}; the boundaries must come from the same collate call as the tokens")
    gqa = key.shape[1] != heads
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        row, lo = divmod(start, n)
        hi = lo + end - start
        q, k, v = (t[row:row + 1, :, lo:hi] for t in (query, key, value))
        mask = None
        if window is not None and end - start > window:  # transformers' sliding window: 0 <= q - kv < window
            i = torch.arange(end - start, device=query.device)
            mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale,
                                                   is_causal=mask is None, enable_gqa=gqa))
    # (1, heads, b·n, d) -> (b, n, heads, d), the layout sdpa_attention_forward returns
    return torch.cat(outs, dim=2).view(heads, b, n, d).permute(1, 2, 0, 3)


AttentionInterface.register(PACKED, packed_attention)


@contextmanager
def unpacked(model: torch.nn.Module) -> Iterator[None]:
    """Run a model trained with packed attention on plain batches (generation: left padding and a KV cache) with
    sdpa, which honours the padding mask the packed function ignores; restored afterwards. ``model`` may be
    wrapped (DeepSpeed engine, PEFT, FSDP2): its outermost transformers model is switched."""
    hf = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if hf is None or hf.config._attn_implementation != PACKED:
        yield
        return
    hf.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        hf.set_attn_implementation(PACKED)
