"""The token loss of a packed micro-batch, without ever holding full-vocabulary logits.

The plain path (``model(...).logits`` then ``cross_entropy(logits.float())``) holds ``[tokens × vocab]`` logits,
their fp32 copy, the fp32 log-softmax saved for backward and fp32 gradients: at 8k tokens and a 128k vocabulary
about 4 GB each, more than the rest of a small model's step. The chunked path runs the model as usual, but for
that one call the output head's forward is replaced by a function that

1. keeps only the supervised positions of the hidden states it receives (prompt tokens have no loss, so they
   need no logits at all);
2. runs the head's own forward on a fixed number of chunks of those positions and sums DeepSpeed's
   ``chunked_cross_entropy`` over them (fp32 arithmetic, a Triton kernel on CUDA, blocks of rows elsewhere;
   Gemma's logit soft-capping applied first). Each chunk runs under activation checkpointing: its logits are
   freed after the forward and recomputed in backward, so about one chunk of logits and its gradient exist at
   a time;
3. returns logits for no position, so the model's own post-processing has nothing to do.

The head is still called once, by the model, as a module: every wrapper's hooks stay in charge of its weight.
ZeRO-3 gathers it for this forward and, through a hook on the head's output (the loss is made to depend on the
empty logits for this), again for its backward, where the chunks are recomputed; FSDP2 likewise (Accelerate puts
the head in a unit of its own) and reduces its gradient once. Calling the head separately, once per chunk, after
the model's forward crashed FSDP2 (a chunk's backward ran after the unit had reduced and freed its parameters for
an earlier chunk) and would gather the weight under ZeRO-3 once per chunk.

Why not DeepSpeed's ``TiledFusedLogitsLoss``: it computes the head's weight gradient inside the forward with an
incoming gradient of 1, so the loop's scaling (``× world / supervised tokens``) never reaches that gradient
(measured: 10× too large for a loss scaled by 0.1), and its per-chunk weight gradients are separate reductions,
which ZeRO-2 refuses for a head tied to the input embeddings. Checkpointed chunks are one autograd graph: one
gradient accumulation per parameter, exactly as in the plain path.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from deepspeed.runtime.chunked_cross_entropy import chunked_cross_entropy
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
    cap = getattr(inner.config, "final_logit_softcapping", None)  # Gemma 2/3 squash logits before the loss
    own_forward = type(head).forward.__get__(head)  # the head's computation, without the wrappers' hooks
    losses: list[torch.Tensor] = []
    loss_head = partial(_head_with_loss, own_forward, batch["labels"].flatten(), chunks, cap, losses)
    with _forward_replaced(head, loss_head):
        logits = model(**forward_kwargs(batch)).logits  # no positions: the loss was computed inside the head
    # Adding the (empty) logits puts the loss behind the hooks that wrappers put on the head's output: ZeRO-3 and
    # FSDP2 then gather the head's weight for its backward before the chunks are recomputed.
    return losses[0] + logits.sum()


def _head_with_loss(own_forward: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor, chunks: int,
                    cap: float | None, losses: list[torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    """The head's forward for one call: Σ loss of the supervised positions into ``losses``, logits of none."""
    keep = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    flat, targets = hidden.flatten(0, 1).index_select(0, keep), labels.index_select(0, keep)
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, y in zip(flat.tensor_split(chunks), targets.tensor_split(chunks)):
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, own_forward, h, y, cap, use_reentrant=False)
        else:
            total = total + _chunk_loss(own_forward, h, y, cap)
    losses.append(total)
    return own_forward(hidden[:, :0])


def _chunk_loss(own_forward: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor,
                cap: float | None) -> torch.Tensor:
    logits = own_forward(hidden)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return chunked_cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


@contextmanager
def _forward_replaced(module: torch.nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
    """Make one call of ``module`` run ``forward`` instead, hooks included (see the module docstring)."""
    saved = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face causal LM inside DeepSpeed's engine and PEFT's wrapper (FSDP2 wraps in place)."""
    model = getattr(model, "module", model)  # DeepSpeed engine
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    return model
