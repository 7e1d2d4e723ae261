"""How close the memory planner's estimate is to the measured peak, on CPU.

For each configuration this trains a few steps with the real launcher and compares the planner's per-device
total (memory_plan.json) with the measured peak (summary.json: resident-set high-water mark during training minus
the resident set before the model was built, maximum over ranks). Prints one line per configuration and the ratio
estimate/measured. Runs take 3 steps each; the whole set takes several minutes on 2 cores.

    .venv/bin/python bench/planner_accuracy.py [--quick] [--model DIR] [--data DIR]
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

LARGER = {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8,
          "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 32000}


def larger_model(src: Path, out: Path) -> Path:
    """A ~56M-parameter Llama built from the tiny model's tokenizer and a wider, deeper config.json."""
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (out / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(LARGER)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out


def measure(overrides: list[str], out: Path, extra_env: dict[str, str] | None = None) -> tuple[float, float]:
    """(estimated bytes per device, measured peak bytes) for one short training run."""
    # glibc's dynamic mmap threshold keeps freed medium-sized tensors in the heap, which inflates the resident set
    # of a CPU run by up to ~40% over the live tensors; a fixed threshold makes RSS track live memory, which is
    # what the planner estimates (and what a GPU's max_memory_allocated reports).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", **(extra_env or {})}
    r = subprocess.run([sys.executable, "-m", "launcher", *overrides, f"output_dir={out}", "train.max_steps=3",
                        "train.log_every=1", "train.grad_accum=1", "logger.plot=false"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    (plan_file,) = out.rglob("memory_plan.json")
    plan = json.loads(plan_file.read_text())
    summary = json.loads((plan_file.parent / "summary.json").read_text())
    return plan["total"], summary["peak_host_bytes"]


CONFIGS = {
    "tiny single mbs1": (False, ["backend=single"]),
    "tiny single mbs4": (False, ["backend=single", "train.micro_batch_size=4"]),
    "larger single mbs2": (True, ["backend=single", "train.micro_batch_size=2"]),
    "larger single mbs2 ckpt": (True, ["backend=single", "train.micro_batch_size=2",
                                       "model.gradient_checkpointing=true"]),
    "larger single lora mbs2": (True, ["backend=single", "train.micro_batch_size=2", "finetune=lora"]),
    "tiny zero3x2 mbs2": (False, ["backend=deepspeed_zero3", "launcher.nproc_per_node=2",
                                  "train.micro_batch_size=2"]),
    "larger zero3x2 mbs2": (True, ["backend=deepspeed_zero3", "launcher.nproc_per_node=2",
                                   "train.micro_batch_size=2"]),
    "tiny fsdp2x2 mbs2": (False, ["backend=fsdp", "launcher.nproc_per_node=2", "train.micro_batch_size=2"]),
    "larger fsdp2x2 mbs2": (True, ["backend=fsdp", "launcher.nproc_per_node=2", "train.micro_batch_size=2"]),
}
QUICK = ["tiny single mbs4", "larger single mbs2", "larger zero3x2 mbs2"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="three configurations only")
    ap.add_argument("--model", default=str(ROOT / "models" / "tiny_llama"))
    ap.add_argument("--data", default="data")
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        big = larger_model(Path(args.model), Path(tmp) / "larger_llama")
        names = args.only or (QUICK if args.quick else list(CONFIGS))
        print(f"{'configuration':<28}{'estimate':>12}{'measured':>12}{'ratio':>8}")
        for i, name in enumerate(names):
            larger, overrides = CONFIGS[name]
            model = big if larger else Path(args.model)
            est, got = measure([f"model.name_or_path={model}", "model.init=random", f"dataset.dir={args.data}",
                                *overrides], Path(tmp) / f"run{i}")
            print(f"{name:<28}{est / 2**20:>10.1f}Mi{got / 2**20:>10.1f}Mi{est / got:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
