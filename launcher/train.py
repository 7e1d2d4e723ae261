"""The worker: ``python -m launcher.train <run_dir>``, started once per rank by the backend's launcher.

It reads the resolved config the launcher wrote (it never recomposes Hydra config), builds everything in a fixed
order, then runs a short loop. The loss of an optimizer step is the sum of token losses over every micro-batch
on every rank, divided by the number of supervised tokens in that whole step, so packing, micro-batch size and
world size do not change it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from launcher.backends import Backend, make_backend
from launcher.config import Config, load_run_config
from launcher.metrics import MetricsLogger
from launcher.model import apply_finetune, compute_dtype, load_model, load_tokenizer
from launcher.packing import (ISOLATING_ATTENTION, LEAK_TOLERANCE, RowLoader, RowPlan, isolation_leak, load_plan,
                              packed_forward, plan_path, varlen_attention)
from launcher.templates import IGNORE_INDEX


def load_rows(cfg: Config, split: str = "train") -> RowPlan:
    """The row plan the launcher wrote for ``split`` (which records make up each row)."""
    return load_plan(plan_path(cfg.data_path, split))


def plan_steps(n_rows: int, cfg: Config, world_size: int) -> tuple[int, int]:
    """(optimizer steps, micro-batches per epoch per rank) for this data and config."""
    per_epoch = n_rows // (world_size * cfg.train.micro_batch_size)
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps, per_epoch
    return max(1, int(cfg.train.epochs * per_epoch / cfg.train.grad_accum)), per_epoch


def token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy over supervised tokens (labels are already shifted inside each record)."""
    logits = packed_forward(model, batch)
    return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def forward_backward(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], backend: Backend,
                     autocast: Any = None) -> dict[str, float]:
    """Forward and backward over one optimizer step's micro-batches (this rank's share of the step).

    The step's loss is Σ token losses / supervised tokens of the *whole* step, all micro-batches on all ranks:
    the counts are all-reduced first, and each micro-batch's summed loss is scaled by that one denominator. A mean
    per micro-batch (or per rank) would weight tokens by how their micro-batch happened to be filled, so packing
    would change the loss; here packed and unpadded batches of the same records give the same loss and gradients.
    Returns the step's loss and its token counts (summed over ranks).
    """
    autocast = autocast or nullcontext()
    counts = torch.tensor([sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches),
                           sum(int(b["num_tokens"]) for b in batches),
                           sum(b["input_ids"].numel() for b in batches)], dtype=torch.float64, device=backend.device)
    n_sup, n_tok, n_slots = backend.all_reduce_sum(counts).tolist()
    loss_total = torch.zeros((), dtype=torch.float64, device=backend.device)
    for b in batches:
        with autocast:
            loss_sum = token_loss_sum(model, b)
        # Backends average gradients over ranks, hence × world_size: the result is Σ token losses / n_sup.
        backend.backward(loss_sum * backend.world_size / max(n_sup, 1.0))
        loss_total += loss_sum.detach().double()
    loss = float(backend.all_reduce_sum(loss_total)) / max(n_sup, 1.0)
    return {"loss": loss, "supervised_tokens": n_sup, "tokens": n_tok, "slots": n_slots}


def refuse_leaking_packing(model: torch.nn.Module, cfg: Config, vocab_size: int, backend: Backend) -> None:
    """Stop before training if this model lets packed records attend to each other (checked on the real model)."""
    flatten = varlen_attention(cfg.model.attn_implementation)
    leak = isolation_leak(model, vocab_size, backend.device, flatten=flatten)
    if leak <= LEAK_TOLERANCE:
        return
    if backend.rank != 0:
        raise SystemExit(2)
    raise SystemExit(
        f"model {cfg.model.name_or_path} with model.attn_implementation={cfg.model.attn_implementation} lets packed "
        f"records attend to each other: in a start-up check, replacing one record changed the logits of the record "
        f"packed after it by {leak:.1e} (relative; isolated models give 0). Training on packed rows would mix "
        f"records. Set dataset.packing=false (one record per row; the loss is the same, only slower), or use a "
        f"model whose transformers implementation separates packed sequences by position_ids (Llama, Mistral, "
        f"Qwen2, Gemma, GPT-NeoX do; OPT, Bloom, Falcon do not).")


def micro_batches(loader: RowLoader, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """An endless stream of micro-batches across epochs, starting at global micro-batch ``start``."""
    epoch, idx = divmod(start, loader.batches_per_epoch)
    while True:
        yield from loader.batches(epoch, idx)
        epoch, idx = epoch + 1, 0


def save_checkpoint(backend: Backend, run_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Write ``checkpoints/step-N`` atomically: into a temporary directory, then one rename, then prune."""
    root = run_dir / "checkpoints"
    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    if backend.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    backend.barrier()
    backend.save(tmp)
    backend.barrier()
    if backend.rank == 0:
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        (tmp / "COMPLETE").write_text(str(step))
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        done = sorted((p for p in root.glob("step-*") if (p / "COMPLETE").is_file()),
                      key=lambda p: int(p.name.split("-")[1]))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    backend.barrier()
    return final


def run(run_dir: str | Path) -> dict:
    """Train as configured in ``run_dir/config.yaml``; returns the summary (rank 0 also writes summary.json)."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    if cfg.dataset.packing and cfg.model.attn_implementation not in ISOLATING_ATTENTION:
        raise SystemExit(f"model.attn_implementation={cfg.model.attn_implementation!r} cannot keep packed records "
                         f"apart; use one of {', '.join(ISOLATING_ATTENTION)} or dataset.packing=false.")
    torch.manual_seed(cfg.train.seed)
    backend = make_backend(cfg)
    dtype = compute_dtype(cfg.model)
    tokenizer = load_tokenizer(cfg.model)

    import datasets

    ds = datasets.load_from_disk(str(Path(cfg.data_path) / "train"))
    rows = load_rows(cfg)
    loader = RowLoader(ds, rows, cfg.train.micro_batch_size, backend.rank, backend.world_size, cfg.train.seed,
                       tokenizer.pad_token_id, flatten=varlen_attention(cfg.model.attn_implementation))
    total_steps, _ = plan_steps(len(rows), cfg, backend.world_size)

    # DeepSpeed keeps bf16 weights itself; the plain backends keep float32 masters and autocast.
    load_dtype = dtype if cfg.backend.name == "deepspeed" else torch.float32
    model = backend.build(lambda: apply_finetune(load_model(cfg.model, load_dtype), cfg.finetune), total_steps)
    model.train()
    autocast = (torch.autocast(backend.device.type, dtype=dtype)
                if dtype != torch.float32 and cfg.backend.name != "deepspeed" else nullcontext())

    if cfg.dataset.packing:
        refuse_leaking_packing(model, cfg, len(tokenizer), backend)

    metrics = MetricsLogger(run_dir, backend.rank, total_steps, cfg.train.log_every)
    stream = micro_batches(loader)
    gas = cfg.train.grad_accum
    slots = 0.0
    for step in range(1, total_steps + 1):
        t0 = time.time()
        batches = [{k: v.to(backend.device) for k, v in next(stream).items()} for _ in range(gas)]
        totals = forward_backward(model, batches, backend, autocast)
        grad_norm = backend.step()
        dt = time.time() - t0
        slots += totals["slots"]
        metrics.log_step(step, {"loss": totals["loss"], "lr": backend.lr(), "grad_norm": grad_norm,
                                "tokens": int(totals["tokens"]), "supervised_tokens": int(totals["supervised_tokens"]),
                                "padding_fraction": 1 - totals["tokens"] / max(totals["slots"], 1.0),
                                "step_time": dt, "tokens_per_s": totals["tokens"] / dt})
        if cfg.train.save_steps and step % cfg.train.save_steps == 0 and step < total_steps:
            save_checkpoint(backend, run_dir, step, {"step": step, "micro_batch": step * gas},
                            cfg.train.save_total_limit)

    ckpt = save_checkpoint(backend, run_dir, total_steps, {"step": total_steps, "micro_batch": total_steps * gas},
                           cfg.train.save_total_limit)
    summary = metrics.summary(total_steps, {"world_size": backend.world_size, "checkpoint": str(ckpt),
                                            "packing": rows.stats.as_dict(),
                                            "padding_fraction": round(1 - metrics.tokens / max(slots, 1.0), 6)})
    if backend.rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    backend.close()
    return summary


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m launcher.train <run_dir>")
    run(args[0])


if __name__ == "__main__":
    main()
