"""GPU check of packed attention on a ~1B-parameter Llama: correctness, speed, memory, MFU and the memory planner.

    bash bench/gpu_check.sh                              # on a GPU machine (installs the carried wheels first)
    python bench/gpu_check.py --device cpu --tiny        # the same logic on CPU with a tiny model (~1 min)

A Llama with Llama-3.2-1B's shape (hidden 2048, 16 layers, GQA 32/8 heads, vocabulary 128,256: 1.24B parameters)
is built from its config on the device (random weights, nothing downloaded) with float32 master weights and bf16
autocast, and trained with the launcher's own pieces: ``SingleBackend`` (backend=single: AdamW, clipping),
``collate`` / ``forward_backward`` on rows that ``pack_lengths`` planned from records of long-tailed random lengths
(random tokens, the first 30 % of each record unsupervised). It then reports:

1. **packed vs unpacked loss** on the same records, before any training: packed rows through ``packed`` and
   through ``sdpa`` (transformers' block-diagonal mask) against one record per row through ``sdpa``; they must
   agree within bf16 tolerance (1e-2 relative; 1e-5 in float32 on CPU);
2. **speed and memory** of ``packed`` vs ``sdpa`` vs ``flash_attention_2`` (when flash-attn is installed) on the
   same micro-batches: real tokens/s over the measured steps after warm-up, peak ``torch.cuda.max_memory_allocated``,
   model FLOPs (launcher.metrics.FlopCounter, each record's own attention) and MFU against the GPU's bf16 peak;
3. **the memory planner's estimate** (launcher.planner.estimate for this config and attention) against that peak;
4. **a long row** (``--long`` tokens, default 16,384; one record, every position supervised: the loss's worst
   case) trained with ``packed`` attention, the chunked loss (launcher/loss.py, ``train.loss_chunk_tokens`` 2048,
   DeepSpeed's Triton kernel on CUDA) against the plain full-logits loss: the loss of both before training
   (must agree within bf16 tolerance), peak memory and tokens/s of a training step of each.

Everything goes to one JSON file (``--out``; default ``$OUT/gpu_check.json`` when ``$OUT`` is set, else
``outputs/gpu_check.json``), and a short table to stdout. Exit status 1 if a loss check fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launcher.attention import PACKED, kernel  # noqa: E402 - after the path setup above
from launcher.backends.single import SingleBackend  # noqa: E402
from launcher.config import (BackendConfig, Config, DatasetConfig, FinetuneConfig, ModelConfig,  # noqa: E402
                             OptimizerConfig, TemplateConfig, TrainerConfig)
from launcher.loss import loss_chunks  # noqa: E402
from launcher.metrics import FlopCounter, device_peak_flops  # noqa: E402
from launcher.packing import collate, pack_lengths, varlen_attention  # noqa: E402
from launcher.planner import estimate, load_shape  # noqa: E402
from launcher.templates import IGNORE_INDEX  # noqa: E402
from launcher.train import forward_backward, token_loss_sum  # noqa: E402

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=8192,
                rope_theta=500000.0, tie_word_embeddings=True)
TINY = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=False)


def make_records(n: int, cutoff: int, vocab: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Records of long-tailed lengths (log-normal around cutoff/8, 8..cutoff tokens) of random tokens."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(cutoff / 8), 0.8, n), 8, cutoff).astype(int)
    out = []
    for n_tok in lengths:
        ids = rng.integers(3, vocab, n_tok).tolist()
        prompt = max(1, int(0.3 * n_tok))
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def set_attention(model: torch.nn.Module, attn: str) -> None:
    model.set_attn_implementation(attn)
    assert model.config._attn_implementation == attn, (model.config._attn_implementation, attn)


def loss_of(model: torch.nn.Module, batch: dict[str, torch.Tensor], autocast) -> float:
    with torch.no_grad(), autocast:
        total = token_loss_sum(model, batch)
    return float(total) / int((batch["labels"] != IGNORE_INDEX).sum())


def loss_check(model, backend, rows: list[list[dict]], device: torch.device, tol: float) -> dict:
    """The same records' loss packed (packed / sdpa attention) and unpacked (sdpa), before any training."""
    to = lambda b: {k: v.to(device) for k, v in b.items()}  # noqa: E731
    recs = [r for row in rows for r in row]
    out = {}
    for name, attn, batch in (("unpacked_sdpa", "sdpa", collate([[r] for r in recs], 0)),
                              ("packed_packed_flat", PACKED, collate(rows, 0, flatten=True)),
                              ("packed_packed_batched", PACKED, collate(rows, 0)),
                              ("packed_sdpa_mask", "sdpa", collate(rows, 0))):
        set_attention(model, attn)
        out[name] = loss_of(model, to(batch), backend.autocast())
    ref = out["unpacked_sdpa"]
    out["max_rel_diff"] = max(abs(v - ref) / abs(ref) for k, v in out.items() if k != "unpacked_sdpa")
    out["tolerance"], out["ok"] = tol, out["max_rel_diff"] <= tol
    return out


def measure(model, backend, cfg: Config, attn: str, batches_rows: list[list[list[dict]]], warmup: int,
            device: torch.device, peak: float | None) -> dict:
    """Train on the micro-batches with ``attn``: tokens/s, peak memory and MFU of the steps after warm-up."""
    set_attention(model, attn)
    flatten = varlen_attention(attn)
    counter = FlopCounter.from_model(model)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds = tokens = flops = 0.0
    for i, rows in enumerate(batches_rows):
        batch = {k: v.to(device) for k, v in collate(rows, 0, flatten=flatten).items()}
        if i == warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync()
        t0 = time.perf_counter()
        forward_backward(model, [batch], backend, backend.autocast())
        backend.step()
        sync()
        if i >= warmup:
            seconds += time.perf_counter() - t0
            f, n = counter.batch(batch, pad_id=0)
            flops, tokens = flops + f, tokens + n
    cfg.model.attn_implementation = attn
    plan = estimate(cfg, load_shape(cfg), 1, cuda=device.type == "cuda")
    measured = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"kernel": kernel(device, torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32)
            if attn == PACKED else attn,
            "steps": len(batches_rows) - warmup, "seconds": round(seconds, 4), "tokens": int(tokens),
            "tokens_per_s": tokens / seconds, "flops_per_s": flops / seconds,
            "mfu": flops / seconds / peak if peak else None,
            "peak_allocated_bytes": measured, "planner_total_bytes": plan.total,
            "planner_activation_bytes": plan.activations + plan.transient,
            "planner_over_measured": plan.total / measured if measured else None}


def long_row(model, backend, length: int, chunk_tokens: int, vocab: int, device: torch.device, tol: float,
             steps: int = 2) -> dict:
    """One row of ``length`` tokens (one record, all supervised), packed attention: plain vs chunked loss."""
    set_attention(model, PACKED)
    ids = torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(1)).tolist()
    batch = {k: v.to(device) for k, v in collate([[{"input_ids": ids, "labels": ids}]], 0, flatten=True).items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out: dict = {"tokens": length, "chunk_tokens": chunk_tokens}
    loss_fns = {name: partial(token_loss_sum, chunks=chunks)
                for name, chunks in (("plain", 0), ("chunked", loss_chunks(chunk_tokens, length, 1)))}
    with torch.no_grad(), backend.autocast():  # both on the same weights, before either trains
        before = {name: float(fn(model, batch)) / (length - 1) for name, fn in loss_fns.items()}
    for name, loss_fn in loss_fns.items():
        forward_backward(model, [batch], backend, backend.autocast(), loss_fn)  # warm-up
        backend.step()
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            forward_backward(model, [batch], backend, backend.autocast(), loss_fn)
            backend.step()
        sync()
        seconds = time.perf_counter() - t0
        out[name] = {"chunks": loss_fn.keywords["chunks"], "loss_before": before[name],
                     "tokens_per_s": steps * length / seconds,
                     "peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
    ref = out["plain"]["loss_before"]
    out["rel_diff"] = abs(out["chunked"]["loss_before"] - ref) / abs(ref)
    out["tolerance"], out["ok"] = tol, out["rel_diff"] <= tol
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model (for testing this script on CPU)")
    ap.add_argument("--cutoff", type=int, default=None, help="row length (default 4096; 256 with --tiny)")
    ap.add_argument("--mbs", type=int, default=2, help="rows per micro-batch")
    ap.add_argument("--steps", type=int, default=8, help="measured steps per attention")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--long", type=int, default=None, help="long-row tokens (default 16384; 1024 with --tiny); 0: skip")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    cutoff = args.cutoff or (256 if args.tiny else 4096)
    dims = TINY if args.tiny else LLAMA_1B
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    out_path = Path(args.out or Path(os.environ.get("OUT", ROOT / "outputs")) / "gpu_check.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    from transformers import AutoModelForCausalLM, LlamaConfig

    attns = [PACKED, "sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])
    n_batches = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        hf = LlamaConfig(**dims, use_cache=False)
        hf.save_pretrained(tmp)  # what the planner reads, like a model folder's config.json
        cfg = Config(model=ModelConfig(name_or_path=tmp, init="random", dtype=dtype),
                     dataset=DatasetConfig(cutoff_len=cutoff, packing=True), backend=BackendConfig(name="single"),
                     finetune=FinetuneConfig(method="full"), template=TemplateConfig(name="none"),
                     train=TrainerConfig(micro_batch_size=args.mbs, max_steps=n_batches * len(attns)),
                     optimizer=OptimizerConfig(lr=1e-5, warmup_ratio=0.0))
        records = make_records(60 * args.mbs * n_batches, cutoff, dims["vocab_size"])
        plan = pack_lengths([len(r["input_ids"]) for r in records], cutoff)
        rows = [[records[int(i)] for i in plan.row(r)] for r in range(len(plan))]
        batches_rows = [rows[i * args.mbs:(i + 1) * args.mbs] for i in range(n_batches)]

        t0 = time.time()
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(hf, attn_implementation=PACKED, dtype=torch.float32)
        backend = SingleBackend(cfg)
        model = backend.build(lambda dtype, empty: model, cfg.train.max_steps)
        model.train()
        build_s = time.time() - t0
        name, peak = device_peak_flops(device)
        result: dict = {
            "device": name, "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "python": platform.python_version(), "params": sum(p.numel() for p in model.parameters()),
            "model": dims, "dtype": dtype, "cutoff_len": cutoff, "micro_batch_size": args.mbs,
            "peak_flops": peak, "build_seconds": round(build_s, 1), "packing": plan.stats.as_dict(),
            "loss_check": loss_check(model, backend, rows[:2], device, 1e-2 if dtype == "bfloat16" else 1e-5)}
        result["attention"] = {}
        for attn in attns:
            result["attention"][attn] = measure(model, backend, cfg, attn, batches_rows, args.warmup, device, peak)
            print(f"{attn}: {json.dumps(result['attention'][attn])}", flush=True)
        long = args.long if args.long is not None else (1024 if args.tiny else 16384)
        if long:
            result["long_row"] = long_row(model, backend, long, 2048 if not args.tiny else 256, dims["vocab_size"],
                                          device, 1e-2 if dtype == "bfloat16" else 1e-5)
            print(f"long row: {json.dumps(result['long_row'])}", flush=True)
    ref = result["attention"]["sdpa"]["tokens_per_s"]
    result["packed_over_sdpa_tokens_per_s"] = result["attention"][PACKED]["tokens_per_s"] / ref
    out_path.write_text(json.dumps(result, indent=1))

    lc = result["loss_check"]
    print(f"\n{name}, torch {torch.__version__}, {result['params'] / 1e9:.2f}B parameters, {dtype}, rows of "
          f"≤{cutoff} ({plan.stats.records_per_row:.1f} records per row), micro-batch {args.mbs}")
    print(f"loss unpacked/sdpa {lc['unpacked_sdpa']:.5f}; packed: packed {lc['packed_packed_flat']:.5f} (flat), "
          f"{lc['packed_packed_batched']:.5f} (batched), sdpa+mask {lc['packed_sdpa_mask']:.5f}; max rel. diff "
          f"{lc['max_rel_diff']:.1e} ({'ok' if lc['ok'] else 'FAILED'}, tolerance {lc['tolerance']:.0e})")
    print(f"{'attention':<20} {'kernel':<20} {'tokens/s':>10} {'MFU':>7} {'peak GiB':>9} {'planner GiB':>12}")
    for attn, r in result["attention"].items():
        gib = lambda b: f"{b / 2**30:.2f}" if b else "-"  # noqa: E731
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
        print(f"{attn:<20} {r['kernel']:<20} {r['tokens_per_s']:>10,.0f} {mfu:>7} {gib(r['peak_allocated_bytes']):>9} "
              f"{gib(r['planner_total_bytes']):>12}")
    print(f"packed / sdpa tokens/s: {result['packed_over_sdpa_tokens_per_s']:.2f}x")
    ok = lc["ok"]
    if "long_row" in result:
        lr = result["long_row"]
        ok = ok and lr["ok"]
        print(f"long row of {lr['tokens']:,} tokens, packed attention: loss plain {lr['plain']['loss_before']:.5f}, "
              f"chunked {lr['chunked']['loss_before']:.5f} ({lr['rel_diff']:.1e}, {'ok' if lr['ok'] else 'FAILED'})")
        for name in ("plain", "chunked"):
            r = lr[name]
            gib = f"{r['peak_allocated_bytes'] / 2**30:.2f} GiB" if r["peak_allocated_bytes"] else "-"
            print(f"  {name:<8} loss ({r['chunks']} chunks): {r['tokens_per_s']:,.0f} tokens/s, peak {gib}")
    print(f"results: {out_path}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
