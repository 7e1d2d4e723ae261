"""The token loss of a packed micro-batch, without ever holding full-vocabulary logits.

The plain path (``model(...).logits`` then ``cross_entropy(logits.float())``) holds ``[tokens × vocab]`` logits,
their fp32 copy, the fp32 log-softmax saved for backward and fp32 gradients: at 8k tokens and a 128k vocabulary
about 4 GB each, more than the rest of a small model's step. The chunked path instead

1. runs the model with ``logits_to_keep`` empty, so its own output head computes nothing, and takes the final
   hidden states from the decoder (a forward hook: the call still goes through whatever wraps the model --
   DeepSpeed's engine, FSDP2's root, PEFT -- so their hooks run as usual);
2. keeps only the supervised positions (prompt tokens have no loss, so they need no logits at all);
3. calls the output head *module* on a fixed number of chunks of those positions and sums DeepSpeed's
   ``chunked_cross_entropy`` over them (fp32 arithmetic, a Triton kernel on CUDA, blocks of rows elsewhere).
   Each chunk runs under activation checkpointing: its logits are freed after the forward and recomputed in
   backward, so at most about one chunk of logits and its gradient exist at a time.

Why not DeepSpeed's ``TiledFusedLogitsLoss``: it computes the head's weight gradient inside the forward with an
incoming gradient of 1, so the loop's scaling (``× world / supervised tokens``) never reaches that gradient
(measured: 10× too large for a loss scaled by 0.1), and its per-chunk weight gradients are separate reductions,
which ZeRO-2 refuses for a head tied to the input embeddings. Checkpointed chunks are one autograd graph: one
gradient accumulation per parameter, exactly as in the plain path.

The number of chunks depends only on the config (never on the data), because under ZeRO-3 every head call
gathers its weight collectively, and every rank must make the same calls.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from deepspeed.runtime.chunked_cross_entropy import chunked_cross_entropy
from torch.distributed.fsdp import FSDPModule
from torch.utils.checkpoint import checkpoint

from launcher.packing import forward_kwargs, packed_forward
from launcher.templates import IGNORE_INDEX


def loss_chunks(chunk_tokens: int, cutoff_len: int, micro_batch_size: int) -> int:
    """How many head calls a micro-batch's loss makes: enough that none exceeds ``chunk_tokens`` positions even
    when every token of every row is supervised; 0 means the plain path (``chunk_tokens`` 0)."""
    if chunk_tokens <= 0:
        return 0
    return max(1, math.ceil(cutoff_len * micro_batch_size / chunk_tokens))


def plain_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ cross-entropy over supervised tokens from the model's full logits (labels already shifted per record)."""
    logits = packed_forward(model, batch)
    return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunks: int = 0) -> torch.Tensor:
    """Σ cross-entropy over supervised tokens; ``chunks`` > 0 uses the chunked path (module docstring), which gives
    the plain path's loss and gradients up to summation order."""
    if chunks <= 0:
        return plain_loss_sum(model, batch)
    inner = unwrap(model)
    head = inner.get_output_embeddings()
    labels = batch["labels"].flatten()
    keep = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    captured: list[torch.Tensor] = []
    hook = inner.get_decoder().register_forward_hook(lambda _m, _a, out: captured.append(_last_hidden(out)))
    try:
        model(**forward_kwargs(batch), logits_to_keep=torch.empty(0, dtype=torch.long, device=keep.device))
    finally:
        hook.remove()
    hidden = captured[-1].flatten(0, 1).index_select(0, keep)
    targets = labels.index_select(0, keep)
    gathered = model.unshard if isinstance(model, FSDPModule) else None  # FSDP2's root holds the head: _head_loss
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, y in zip(hidden.tensor_split(chunks), targets.tensor_split(chunks)):
        if torch.is_grad_enabled():
            total = total + checkpoint(_head_loss, head, h, y, gathered, use_reentrant=False)
        else:
            total = total + _head_loss(head, h, y, gathered)
    if gathered is not None and not torch.is_grad_enabled():
        model.reshard()
    return total


def _head_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
               unshard: Callable[[], Any] | None) -> torch.Tensor:
    """Σ cross-entropy of one chunk of positions. The head is called as a module so that ZeRO-3's hooks gather its
    weight; under FSDP2 the root (which owns the head) re-gathers its parameters here, because it resharded them
    when its forward ended and, in backward, this recompute runs before the root's own backward hook would."""
    if unshard is not None:
        unshard()
    logits = head(hidden)
    return chunked_cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def _last_hidden(out: Any) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face causal LM inside DeepSpeed's engine and PEFT's wrapper (FSDP2 wraps in place)."""
    model = getattr(model, "module", model)  # DeepSpeed engine
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    return model
