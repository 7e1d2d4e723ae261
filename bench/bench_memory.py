"""Per-rank peak memory of ZeRO-3 and FSDP2 at 1 and 2 ranks against the ideal (model states / N), and tokens/s
per backend, on a Llama of a few hundred MB built locally (weights drawn from a seed; nothing is downloaded).

    .venv/bin/python bench/bench_memory.py                  # ~150M parameters (600 MB in fp32), 4 steps each
    .venv/bin/python bench/bench_memory.py --hidden 512 --layers 4 --steps 2    # a quick look

Every configuration trains the same global batch (2 rows of ``--cutoff`` tokens per step) through the real
launcher, in fp32 with AdamW. Full fine-tuning keeps 16 bytes of model state per parameter (weights, gradients,
two Adam moments), so the ideal per rank is 16 × parameters / N. A worker's memory is measured as its peak resident
memory minus its resident memory just before the model was built (imports, data and process-group setup are the
same for every backend and are left out). On a GPU machine the CUDA peak is reported as well.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [  # (label, backend, ranks)
    ("1 process", "single", 1),
    ("ZeRO-2", "deepspeed_zero2", 2),
    ("ZeRO-3", "deepspeed_zero3", 1),
    ("ZeRO-3", "deepspeed_zero3", 2),
    ("FSDP2", "fsdp", 1),
    ("FSDP2", "fsdp", 2),
]


def make_model(hidden: int, layers: int, out: Path) -> Path:
    """A Llama config of the requested size next to the shipped tiny tokenizer."""
    src = ROOT / "models" / "tiny_llama"
    cfg = json.loads((src / "config.json").read_text())
    heads = max(1, hidden // 64)
    cfg.update(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=int(hidden * 2.75) // 64 * 64,
               num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=64)
    d = out / f"bench_llama_h{hidden}_l{layers}"
    d.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy(f, d / f.name)
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    return d


def run(model: Path, backend: str, ranks: int, steps: int, cutoff: int, out: Path) -> dict:
    run_dir = out / f"{backend}-{ranks}"
    overrides = [f"model.name_or_path={model}", "model.init=random", "model.dtype=float32", f"backend={backend}",
                 f"train.max_steps={steps}", f"dataset.cutoff_len={cutoff}", "train.micro_batch_size=1",
                 f"train.grad_accum={2 // ranks}", "train.save_steps=0", "train.save_total_limit=1",
                 "merge.after_train=false", f"hydra.run.dir={run_dir}"]
    if backend != "single":
        overrides.append(f"launcher.nproc_per_node={ranks}")
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "launcher", *overrides], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if r.returncode != 0:
        raise SystemExit(f"{backend} × {ranks} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    steps_ = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary["tokens_per_s"] = statistics.median(s["tokens_per_s"] for s in steps_[1:] or steps_)
    summary["wall_s"] = time.time() - t0
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cutoff", type=int, default=256)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        model = make_model(args.hidden, args.layers, Path(tmp))
        rows = []
        for label, backend, ranks in CONFIGS:
            s = run(model, backend, ranks, args.steps, args.cutoff, Path(tmp))
            mem = s["memory_mb_per_rank"]
            used = [p - b for p, b in zip(mem["peak"], mem["before_model"])]
            total = s["params_per_rank"]["total"]
            rows.append((label, backend, ranks, total, used, mem["device_peak"], s["tokens_per_s"], s["wall_s"]))
            print(f"  {label} × {ranks}: done in {s['wall_s']:.0f}s", file=sys.stderr, flush=True)

    total = rows[0][3]
    states_mb = 16 * total / 2**20
    print(f"\nmodel: {total / 1e6:.0f}M parameters ({4 * total / 2**20:.0f} MB fp32), model states "
          f"(weights + grads + Adam) {states_mb:.0f} MB; {args.steps} steps of 2 × {args.cutoff} tokens\n")
    print("| backend | ranks | per-rank memory used, MB (peak RSS − RSS before the model) | ideal states/N, MB "
          "| used / ideal | tokens/s |")
    print("|---|---|---|---|---|---|")
    for label, backend, ranks, _, used, dev, tps, _ in rows:
        ideal = states_mb / ranks
        worst = max(used)
        gpu = f" (GPU peak {', '.join(f'{d:.0f}' for d in dev)})" if any(dev) else ""
        print(f"| {label} | {ranks} | {', '.join(f'{u:.0f}' for u in used)}{gpu} | {ideal:.0f} "
              f"| {worst / ideal:.2f} | {tps:,.0f} |")


if __name__ == "__main__":
    main()
