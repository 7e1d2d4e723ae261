"""The chunked loss (launcher/loss.py) equals the plain full-logits loss, in value and in every gradient."""

from __future__ import annotations

import pytest
import torch

from launcher.config import FinetuneConfig, ModelConfig
from launcher.loss import loss_chunks, plain_loss_sum, token_loss_sum
from launcher.packing import collate
from launcher.templates import IGNORE_INDEX


def tiny(tied: bool = False, lora: bool = False) -> torch.nn.Module:
    """The embedded tiny Llama (seeded weights), optionally with its head tied to the embeddings, or LoRA."""
    from launcher.model import apply_finetune, load_model, materialize

    cfg = ModelConfig(name_or_path="models/tiny_llama", init="random")
    materialize(cfg)
    model = load_model(cfg, torch.float32)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    if lora:
        torch.manual_seed(0)
        model = apply_finetune(model, FinetuneConfig(method="lora", lora_target=["q_proj", "v_proj", "lm_head"]))
    return model


def batch(flatten: bool = False) -> dict[str, torch.Tensor]:
    """Two padded rows of packed records; prompts (first tokens of each record) masked as in real data."""
    g = torch.Generator().manual_seed(0)
    recs = []
    for n in (40, 23, 57, 9, 31):
        ids = torch.randint(0, 4000, (n,), generator=g).tolist()
        recs.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 2) + ids[n // 2:]})
    return collate([recs[:3], recs[3:]], pad_id=0, flatten=flatten)


def loss_and_grads(model: torch.nn.Module, b: dict[str, torch.Tensor], chunks: int):
    model.zero_grad(set_to_none=True)
    loss = token_loss_sum(model, b, chunks)
    (loss * 0.37).backward()  # a scale like the loop's world / supervised tokens must reach every gradient
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["full", "tied", "lora"])
@pytest.mark.parametrize("chunks", [1, 3, 7])
def test_chunked_loss_equals_plain(kind: str, chunks: int) -> None:
    model = tiny(tied=kind == "tied", lora=kind == "lora")
    b = batch()
    ref_loss, ref_grads = loss_and_grads(model, b, 0)
    loss, grads = loss_and_grads(model, b, chunks)
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=0), (loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    diff = sum(float((g - ref_grads[n]).double().norm() ** 2) for n, g in grads.items()) ** 0.5
    norm = sum(float(g.double().norm() ** 2) for g in ref_grads.values()) ** 0.5
    assert diff <= 1e-6 * norm, f"relative gradient difference {diff / norm:.2e}"
    for name, g in grads.items():  # and no single parameter far off (fp32 rounding alone reaches ~1e-6 here)
        rel = (g - ref_grads[name]).norm() / ref_grads[name].norm().clamp_min(1e-30)
        assert rel <= 5e-6, f"{name}: relative gradient difference {rel:.2e}"


def test_chunked_loss_without_grad_and_flattened() -> None:
    """Evaluation (no autograd), flash-attention's flattened rows, and more chunks than supervised positions (empty
    chunks: every rank makes the same head calls whatever its data) give the plain loss too."""
    model = tiny().eval()
    for flatten in (False, True):
        b = batch(flatten)
        with torch.no_grad():
            for chunks in (2, 400):
                assert torch.allclose(token_loss_sum(model, b, chunks), plain_loss_sum(model, b), rtol=1e-6, atol=0)


def test_chunk_count_depends_on_config_only() -> None:
    """Under ZeRO-3 every head call is a collective gather: the count must not depend on a rank's data."""
    assert loss_chunks(0, 4096, 2) == 0
    assert loss_chunks(2048, 4096, 1) == 2
    assert loss_chunks(2048, 4097, 1) == 3
    assert loss_chunks(100000, 16, 1) == 1
