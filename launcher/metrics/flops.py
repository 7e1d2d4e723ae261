"""Model FLOPs of a training step, and the peak FLOP/s of the device it runs on (for MFU).

Model FLOPs of one optimizer step are counted from the architecture and the actual batch (not the 6·N rule of
thumb over padded slots). Per real token:

* matmuls: ``2·N_lin`` forward, ``2·N_lin`` for input gradients, ``2·N_lin_trainable`` for weight gradients,
  where ``N_lin`` counts the weights of every ``nn.Linear`` (LoRA adapters and ``lm_head`` included,
  embedding lookups and norms excluded). Full fine-tuning gives the familiar ``6·N_lin``; LoRA about ``4·N_lin``.
* causal attention: ``12 · layers · heads · head_dim · c`` (QKᵀ and AV, forward and twice that backward),
  where ``c = position + 1`` is the token's actual context inside its packed record. Sliding windows are ignored.

Gradient-checkpointing recomputation is not counted (that would be hardware FLOPs utilisation, not MFU).
``MFU = model FLOPs / step time / (world size × peak)`` with the peak dense bf16 FLOP/s of the GPU from
:data:`PEAK_BF16_FLOPS` (or ``logger.peak_flops``). On CPU (no meaningful peak) the achieved FLOP/s is reported
and MFU is left out.
"""

from __future__ import annotations

import re

import torch

from launcher.packing import count_tokens
from launcher.templates import IGNORE_INDEX

# Peak dense (no 2:4 sparsity) bf16 tensor-core FLOP/s per device, from the vendors' data sheets. Keys are matched
# as whole words in the lower-cased torch.cuda.get_device_name(), first match wins, so specific names come first.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("gb200", 2.5e15),
    ("b200", 2.25e15),
    ("gh200", 989e12),
    ("h200 nvl", 836e12),
    ("h200", 989e12),
    ("h100 nvl", 835e12),
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # SXM
    ("h800 pcie", 756e12),
    ("h800", 989e12),
    ("h20", 148e12),
    ("a100", 312e12),
    ("a800", 312e12),
    ("l40s", 362e12),
    ("l40", 181e12),
    ("l4", 121e12),
    ("a10g", 70e12),  # AWS' A10 variant; NVIDIA publishes no sheet, ≈70 TFLOP/s is the commonly quoted figure
    ("a10", 125e12),
    ("a30", 165e12),
    ("a40", 150e12),
    ("rtx 6000 ada", 364e12),
    ("rtx a6000", 155e12),
    ("5090", 209.5e12),  # GeForce figures: fp32 accumulate, which is what PyTorch's bf16 matmuls use
    ("4090", 165.2e12),
    ("3090", 71e12),
    ("mi325x", 1307e12),
    ("mi300x", 1307e12),
    ("mi250x", 383e12),
    ("mi250", 362e12),
]


def peak_flops_for(name: str) -> float | None:
    """Peak dense bf16 FLOP/s for a GPU name as CUDA reports it (e.g. "NVIDIA H100 80GB HBM3"), or None."""
    low = name.lower()
    for key, flops in PEAK_BF16_FLOPS:
        if re.search(rf"(?<![a-z0-9]){re.escape(key)}(?![a-z0-9])", low):
            return flops
    return None


def device_peak_flops(device: torch.device, override: float | None = None) -> tuple[str, float | None]:
    """(device name, peak bf16 FLOP/s or None): None on CPU and for GPUs missing from the table."""
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, override or peak_flops_for(name)


# --------------------------------------------------------------------------------------------- FLOPs
def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a DeepSpeed engine and/or PEFT wrapper."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _numel(p: torch.nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", 0) or p.numel())  # ZeRO-3 leaves an empty tensor and keeps the size here


class FlopCounter:
    """Model FLOPs of a training step from the architecture and the step's batches (see the module docstring)."""

    def __init__(self, linear: int, linear_trainable: int, layers: int, heads: int, head_dim: int):
        self.linear, self.linear_trainable = linear, linear_trainable
        self.attn_coeff = 12 * layers * heads * head_dim

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "FlopCounter":
        inner = _unwrap(model)
        linear = trainable = 0
        seen: set[int] = set()
        for m in inner.modules():
            if isinstance(m, torch.nn.Linear) and id(m.weight) not in seen:
                seen.add(id(m.weight))
                n = _numel(m.weight)
                linear += n
                trainable += n if m.weight.requires_grad else 0
        c = inner.config
        c = getattr(c, "text_config", None) or c
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        return cls(linear, trainable, c.num_hidden_layers, heads, head_dim)

    def per_token_matmul(self) -> int:
        return 4 * self.linear + 2 * self.linear_trainable

    def batch(self, batch: dict[str, torch.Tensor], pad_id: int) -> tuple[float, int]:
        """(model FLOPs, real tokens) of one collated micro-batch; trailing padding counts for neither."""
        n_real = count_tokens(batch).tokens
        context = float(((batch["position_ids"] + 1) * real_token_mask(batch, pad_id)).sum())
        return float(self.per_token_matmul() * n_real + self.attn_coeff * context), n_real


def real_token_mask(batch: dict[str, torch.Tensor], pad_id: int) -> torch.Tensor:
    """1 for real tokens, 0 for the padding that collate appends to short rows.

    Padding is the row's last segment (its position ids restart at 0) when it holds only ``pad_id`` and no label;
    a real record always has a supervised token, so it is never mistaken for padding."""
    ids, pos, labels = batch["input_ids"], batch["position_ids"], batch["labels"]
    width = ids.shape[1]
    idx = torch.arange(width, device=ids.device).expand_as(ids)
    start = torch.where(pos == 0, idx, torch.zeros_like(idx)).amax(dim=1, keepdim=True)
    tail = idx >= start
    is_pad_tail = ((ids == pad_id) | ~tail).all(dim=1, keepdim=True) & ((labels == IGNORE_INDEX) | ~tail).all(
        dim=1, keepdim=True) & (start > 0)
    return (~(tail & is_pad_tail)).long()
