"""Sequence parallelism (``parallel.sequence=N``) with DeepSpeed's Ulysses (ALST) attention.

Every packed row is split into N equal slices, one per rank of a sequence-parallel group (rows are padded at the
tail to a multiple of N; labels were shifted inside each record first, so a record crossing a slice boundary
keeps its targets: see ``launcher.packing.collate``). Embeddings, MLPs, norms and the loss run on the local slice;
in each attention layer DeepSpeed's ``UlyssesSPAttentionHF`` exchanges sequence for heads with an all-to-all, so
each rank attends over the whole row for 1/N of the heads, and back. The groups and the all-to-all are
DeepSpeed's own (``deepspeed.runtime.sequence_parallel``); the engine gets them as its ``mpu``.

The attention the wrapper calls after the all-to-all is the launcher's packed attention (launcher.attention:
per-record causal sdpa on CPU, a varlen flash kernel on CUDA) over the records that the gathered position ids
delimit (a record starts where its position is 0), so packed records stay apart and only their own blocks are
computed, with no O(L²) mask: the wrapper itself drops masks and would otherwise run plain causal attention over
the whole row, letting each record see the ones before it (the worker's start-up leak check runs sharded too and
would refuse that).

The loss needs nothing special: each rank sums its slice's token losses, and the step's supervised-token count is
summed over all ranks, as without sequence parallelism. Model states stay sharded over the whole world.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from launcher.attention import packed_attention
from launcher.config import Config, ConfigError


def data_parallel(rank: int, world: int, sequence: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((data-parallel rank, data-parallel world), (slice, slices)) of a rank when every row is split over
    ``sequence`` consecutive ranks (DeepSpeed's sequence-parallel groups are ranks kN..kN+N-1)."""
    return (rank // sequence, world // sequence), (rank % sequence, sequence)


def check(cfg: Config, world: int) -> None:
    """Refuse, before any worker starts, a sequence degree this world or model cannot run (the backend and the
    attention are checked with the rest of the config in ``launcher.validate.validate``)."""
    from transformers import AutoConfig

    from launcher.model import model_dir

    n = cfg.parallel.sequence
    if n <= 1:
        return
    arch = AutoConfig.from_pretrained(model_dir(cfg.model), trust_remote_code=cfg.model.trust_remote_code)
    arch = arch.get_text_config()
    heads, kv_heads = arch.num_attention_heads, getattr(arch, "num_key_value_heads", arch.num_attention_heads)
    problems = []
    if world % n:
        problems.append(f"it must divide the number of workers, {world} (launcher.nproc_per_node × launcher.nnodes)")
    if heads % n:
        problems.append(f"it must divide the model's {heads} attention heads (each rank attends with heads / N)")
    if kv_heads % n and n % kv_heads:
        problems.append(f"it must divide the model's {kv_heads} key/value heads, or be a multiple of them")
    if problems:
        raise ConfigError(f"parallel.sequence={n}: " + "; ".join(problems) + ". Choose a degree that does, or "
                          f"parallel.sequence=1.")


def packed_after_all_to_all(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """The attention the Ulysses wrapper calls on whole rows: :func:`launcher.attention.packed_attention` over the
    records that the (gathered) position ids delimit, so only each record's own blocks are computed and no
    ``[rows, 1, L, L]`` mask is built (that mask is what kept per-rank memory from halving)."""
    cu, longest = _boundaries(kwargs.pop("position_ids"))
    kwargs.pop("cu_seq_lens_q", None), kwargs.pop("max_length_q", None)  # a slice's own; the row's are above
    return packed_attention(module, query, key, value, None, cu_seq_lens_q=cu, max_length_q=longest, **kwargs)


_last: list[tuple[torch.Tensor, tuple[torch.Tensor, int]]] = []  # (position ids, boundaries) of the latest layer


def _boundaries(pos: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sequence boundaries over a ``[rows, L]`` batch's tokens row after row, and the longest sequence: a record
    (or a row's tail padding, which collate numbers 0, 1, ...) starts where its position is 0, and every row
    starts one. All layers of a forward see the same positions, so they share one computation."""
    if _last and _last[0][0].shape == pos.shape and torch.equal(_last[0][0], pos):
        return _last[0][1]
    starts = pos == 0
    starts[:, 0] = True
    at = starts.flatten().nonzero().flatten()
    cu = torch.cat([at, at.new_tensor([pos.numel()])]).to(torch.int32)
    result = cu, int((cu[1:] - cu[:-1]).max())
    _last[:] = [(pos, result)]
    return result


def setup(cfg: Config) -> Any:
    """Install DeepSpeed's Ulysses attention for this process (before the model is built); returns the groups
    object (``mpu``) that ``deepspeed.initialize`` takes.

    Like ``UlyssesSPAttentionHF.register_with_transformers``, but with one wrapper per batch size (the wrapper
    checks a fixed one, and the start-up leak check and evaluation use other sizes than training) and with
    :func:`packed_after_all_to_all` as the attention it calls after the all-to-all.
    """
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers import AutoConfig
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from launcher.model import model_dir

    mpu.initialize_sequence_parallel(sequence_parallel_size=cfg.parallel.sequence)
    arch = AutoConfig.from_pretrained(model_dir(cfg.model), trust_remote_code=cfg.model.trust_remote_code)
    arch = arch.get_text_config()
    wrappers: dict[int, UlyssesSPAttentionHF] = {}

    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: Any, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        if _whole:  # generation: each rank decodes its own prompts, whole (see whole_sequences)
            return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
        rows = query.shape[0]
        if rows not in wrappers:
            wrappers[rows] = UlyssesSPAttentionHF(
                attn=packed_after_all_to_all, batch_size=rows, attn_head_count=arch.num_attention_heads,
                attn_head_size=getattr(arch, "head_dim", None) or arch.hidden_size // arch.num_attention_heads,
                kv_head_count=arch.num_key_value_heads, num_hidden_layers=arch.num_hidden_layers,
                process_group=mpu.get_sequence_parallel_group(), seq_length_is_variable=True)
        # The mask transformers built covers this rank's slice only; the boundaries come from the row's positions.
        return wrappers[rows](module, query, key, value, None, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = attention
    return mpu


_whole: list[bool] = []  # non-empty inside whole_sequences()


@contextmanager
def whole_sequences() -> Iterator[None]:
    """Inside, attention runs on whole sequences: transformers' own sdpa, with the padding mask and the KV cache,
    instead of the Ulysses wrapper. For generation, where every rank decodes its own prompts (their lengths differ
    from rank to rank, and the wrapper's all-gather of position ids needs equal slices: it aborted the job)."""
    _whole.append(True)
    try:
        yield
    finally:
        _whole.pop()
