"""Long-context memory: the chunked loss against the plain one, and sequence parallelism against none.

Loss (default): peak memory and tokens/s of one training step, chunked loss (launcher/loss.py) vs the plain
full-logits loss, on a Llama with a 128k vocabulary (Llama 3's 128,256) built locally from a seed.

    .venv/bin/python bench/bench_long_context.py                          # cutoff 4096 and 8192, ~2 min on CPU
    .venv/bin/python bench/bench_long_context.py --cutoff 2048 --steps 1  # a quick look
    .venv/bin/python bench/bench_long_context.py --dtype bfloat16         # on a GPU

Sequence parallelism (``--sequence``): per-rank peak memory and tokens/s of the real launcher, DeepSpeed ZeRO-3 on
2 workers, rows of ``--cutoff`` tokens of the shipped RAG sample (data/rag_ko.json), parallel.sequence=1 (each rank
a whole row) vs 2 (each rank half of one row), tiny model, gradient checkpointing off.

    .venv/bin/python bench/bench_long_context.py --sequence --cutoff 16384 --steps 2   # ~2 min on CPU

Each configuration runs in a fresh process (so the CPU peak, ru_maxrss, is its own): it builds the model, runs one
warm-up step, then ``--steps`` timed steps of forward + backward on one row of ``--cutoff`` tokens in which a
fraction ``--supervised`` of the positions has a label (1.0: the worst case for the loss; RAG records are mostly
prompt). Reported per configuration: peak memory above the memory held before the first step (model, gradients
allocated by the warm-up step are included in the baseline) -- the part of a step that the loss changes -- and
tokens/s. On a GPU the CUDA allocator's peak is used, on CPU the process's resident peak.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one(cutoff: int, chunk: int, hidden: int, layers: int, vocab: int, supervised: float, steps: int,
        dtype: str) -> dict:
    """Measure one configuration in this process."""
    import psutil
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from launcher.loss import loss_chunks, token_loss_sum
    from launcher.packing import collate
    from launcher.templates import IGNORE_INDEX

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    heads = max(1, hidden // 64)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=cutoff,
                      use_cache=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(device=device, dtype=getattr(torch, dtype))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (cutoff,), generator=g).tolist()
    n_prompt = int(round(cutoff * (1 - supervised)))
    batch = collate([[{"input_ids": ids, "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:]}]], pad_id=0)
    batch = {k: v.to(device) for k, v in batch.items()}
    chunks = loss_chunks(chunk, cutoff, 1)

    def step() -> None:
        loss = token_loss_sum(model, batch, chunks)
        (loss / max(1, cutoff - n_prompt)).backward()

    step()  # warm-up: gradients exist from here on, as in training
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = psutil.Process().memory_info().rss
    t0 = time.time()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    dt = (time.time() - t0) / steps
    return {"cutoff": cutoff, "loss": "plain" if chunk == 0 else f"chunked ({chunk})", "device": device.type,
            "step_peak_mb": round((peak - base) / 2**20, 1), "tokens_per_s": round(cutoff / dt, 1)}


def sequence_runs(cutoff: int, steps: int, out: Path) -> list[dict]:
    """parallel.sequence 1 and 2 through the real launcher; per-rank peaks from summary.json."""
    import os
    import statistics

    rows = []
    for n in (1, 2):
        run_dir = out / f"sp{n}"
        overrides = ["dataset=rag_ko", "template=llama3_rag", f"dataset.cutoff_len={cutoff}",
                     "backend=deepspeed_zero3", "launcher.nproc_per_node=2", f"parallel.sequence={n}",
                     f"train.max_steps={steps}", f"train.grad_accum={n}", "merge.after_train=false",
                     "model.dtype=float32", "planner.force=true", f"hydra.run.dir={run_dir}",
                     "eval.generate.datasets=[]", "eval.generate.before=false"]
        # glibc keeps freed blocks below its (adaptive, up to 32 MiB) mmap threshold in the heap, so the resident
        # peak would count its fragmentation too; with every block over 64 KiB mapped and unmapped on its own, the
        # resident peak follows the tensors actually alive.
        r = subprocess.run([sys.executable, "-m", "launcher", *overrides], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"})
        if r.returncode != 0:
            raise SystemExit(f"parallel.sequence={n} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        summary = json.loads((run_dir / "summary.json").read_text())
        mem = summary["memory_mb_per_rank"]
        records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steps_ = [x for x in records if "tokens_per_s" in x]
        rows.append({"sequence": n, "cutoff": cutoff,
                     "peak_above_model_mb": [round(p - b, 1) for p, b in zip(mem["peak"], mem["before_model"])],
                     "device_peak_mb": mem["device_peak"],
                     "tokens_per_s": round(statistics.median(x["tokens_per_s"] for x in steps_), 1)})
        print(json.dumps(rows[-1]), flush=True)
    one, two = (max(r["peak_above_model_mb"]) for r in rows)
    print(f"per-rank peak above the model, cutoff {cutoff}: sequence 2 / sequence 1 = {two:.0f} / {one:.0f} MB "
          f"= {two / one:.2f}x; tokens/s {rows[1]['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cutoff", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--chunk", type=int, default=2048, help="train.loss_chunk_tokens of the chunked runs")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--supervised", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--sequence", action="store_true", help="sequence degree 1 vs 2 instead of the loss")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sequence:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            sequence_runs(args.cutoff[0], args.steps, Path(tmp))
        return
    common = [f"--hidden={args.hidden}", f"--layers={args.layers}", f"--vocab={args.vocab}",
              f"--supervised={args.supervised}", f"--steps={args.steps}", f"--dtype={args.dtype}"]
    if args.one:
        print(json.dumps(one(args.cutoff[0], args.chunk, args.hidden, args.layers, args.vocab, args.supervised,
                             args.steps, args.dtype)))
        return
    rows = []
    for cutoff in args.cutoff:
        for chunk in (0, args.chunk):
            r = subprocess.run([sys.executable, __file__, "--one", f"--cutoff={cutoff}", f"--chunk={chunk}", *common],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"cutoff {cutoff}, chunk {chunk} failed:\n{r.stderr[-3000:]}")
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nhidden {args.hidden}, {args.layers} layers, vocab {args.vocab:,}, {args.dtype}, "
          f"{args.supervised:.0%} of positions supervised, gradient checkpointing on")
    print(f"{'cutoff':>7} {'loss':>16} {'step peak MB':>13} {'tokens/s':>9}")
    for r in rows:
        print(f"{r['cutoff']:>7} {r['loss']:>16} {r['step_peak_mb']:>13} {r['tokens_per_s']:>9}")


if __name__ == "__main__":
    main()
