"""Generation-eval throughput (records/s) per backend: the worker's own evaluation, through the real launcher.

    .venv/bin/python bench/bench_generate.py                                  # single vs ZeRO-3 × 2, ~2 min
    .venv/bin/python bench/bench_generate.py --backends single zero3 fsdp --records 64 --max-new-tokens 64

Each backend runs ``python -m launcher`` on the tiny model with one training step and
``eval.generate.before=true``: the held-out prompts are answered before and after that step, by every rank of the
backend (global batches dealt to ranks, ``synced_gpus``), and gathered on rank 0. The nearly untrained model never
emits a stop word, so every answer is ``--max-new-tokens`` long and the backends do the same work. The figure is
the evaluations' own wall time from metrics.jsonl (``generate/seconds``, both evaluations), not the launch. Every
process runs one thread (``OMP_NUM_THREADS=1``, what the launcher gives each of 2 workers on 2 cores), so the
single process uses one core and ZeRO-3 × 2 two.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = {"single": ["backend=single"],
            "zero2": ["backend=deepspeed_zero2", "launcher.nproc_per_node=2"],
            "zero3": ["backend=deepspeed_zero3", "launcher.nproc_per_node=2"],
            "fsdp": ["backend=fsdp", "launcher.nproc_per_node=2"]}


def measure(backend: str, records: int, max_new_tokens: int, batch_size: int, out: Path) -> dict:
    run_dir = out / backend
    cmd = [sys.executable, "-m", "launcher", *BACKENDS[backend], f"hydra.run.dir={run_dir}", "train.max_steps=1",
           "train.grad_accum=1", "dataset.max_samples=40", "model.dtype=float32", "merge.after_train=false",
           "eval.generate.before=true", f"eval.generate.max_samples={records}",
           f"eval.generate.max_new_tokens={max_new_tokens}", f"eval.generate.batch_size={batch_size}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"{backend} failed:\n{r.stderr[-3000:]}")
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "generate/seconds" in line]
    seconds = sum(e["generate/seconds"] for e in evals)
    return {"backend": backend, "evaluations": len(evals), "records": records, "seconds": round(seconds, 2),
            "records_per_s": round(len(evals) * records / seconds, 3),
            "new_tokens_per_s": round(len(evals) * records * max_new_tokens / seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", nargs="+", default=["single", "zero3"], choices=list(BACKENDS))
    ap.add_argument("--records", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_generate_") as tmp:
        for b in args.backends:
            print(json.dumps(measure(b, args.records, args.max_new_tokens, args.batch_size, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
