"""Peak host memory of the merge step on a ~1 GB model, against DeepSpeed's own consolidation in the same run.

    .venv/bin/python bench/bench_merge.py                 # ~250M-parameter Llama: 1.0 GB in float32
    .venv/bin/python bench/bench_merge.py --layers 4      # a quicker, smaller run

It trains the model for one step with 2 DeepSpeed ZeRO-3 CPU workers through the real launcher (so the
checkpoint is exactly what training writes), then runs, each in its own process:

* ``python -m launcher.merge RUN merge.verify=false dtype=D`` for float32 and bfloat16 (the streaming export);
* the usual recipe: DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` → ``load_state_dict`` →
  ``.to(D)`` → ``save_pretrained`` (what most fine-tuning tools do after ZeRO-3);
* a process that only imports the same libraries (their resident memory is the same for every row);
* ``python -m launcher.merge RUN dtype=bfloat16`` with verification, whose reload process reports its own peak.

Peak RSS is the kernel's high-water mark (``ru_maxrss``), which counts memory-mapped checkpoint pages too;
"anon" is the peak of anonymous memory (RssAnon, sampled every 10 ms), the part that cannot be dropped under
memory pressure. Ratios are taken against the size of the written weights and against the usual recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PY = sys.executable

NAIVE = r"""
import sys, torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from transformers import AutoConfig, AutoModelForCausalLM
ckpt, base, out, dtype = sys.argv[1:]
sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.rsplit('/', 1)[0]), tag=ckpt.rsplit('/', 1)[1])
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base), dtype=torch.float32)
model.load_state_dict(sd)
del sd
model.to(getattr(torch, dtype)).save_pretrained(out)
"""

IMPORTS = "import torch, transformers, peft, deepspeed, launcher.export, launcher.merge"


def measure(cmd: list[str], env: dict[str, str]) -> dict:
    """Run ``cmd``; return seconds, peak RSS and sampled peak anonymous memory (MiB)."""
    t0 = time.time()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        anon, status = 0, Path(f"/proc/{proc.pid}/status")
        while True:
            pid, code, usage = os.wait4(proc.pid, os.WNOHANG)  # reaping here keeps the child's own ru_maxrss
            if pid:
                break
            try:
                anon = max([anon] + [int(x.split()[1]) for x in status.read_text().splitlines()
                                     if x.startswith("RssAnon:")])
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
            time.sleep(0.01)
        proc.returncode = rc = os.waitstatus_to_exitcode(code)
        log.seek(0)
        out = log.read()
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}):\n{out[-3000:]}")
    return {"seconds": time.time() - t0, "peak_rss": usage.ru_maxrss / 1024, "peak_anon": anon / 1024,
            "output": out}


def weights_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20


def make_model(where: Path, args: argparse.Namespace) -> Path:
    cfg = json.loads((ROOT / args.tokenizer / "config.json").read_text())
    cfg.update(hidden_size=args.hidden, num_hidden_layers=args.layers, intermediate_size=args.intermediate,
               num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256), head_dim=64,
               vocab_size=args.vocab)
    where.mkdir(parents=True, exist_ok=True)
    for f in (ROOT / args.tokenizer).iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja") or f.name == "special_tokens_map.json":
            shutil.copy(f, where / f.name)
    (where / "config.json").write_text(json.dumps(cfg, indent=1))
    return where


def main() -> None:
    from launcher.preflight import free_port

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--tokenizer", default="models/tiny_llama", help="folder with config.json + tokenizer files")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--work", default=".cache/bench/merge", help="scratch folder (deleted at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--reuse", action="store_true", help="reuse the run a --keep run left there (no training)")
    args = ap.parse_args()

    work = (ROOT / args.work).resolve()
    reuse = args.reuse and any((work / "runs").rglob("summary.json"))
    if not reuse:
        shutil.rmtree(work, ignore_errors=True)
    for old in work.glob("ours-*"):
        shutil.rmtree(old)
    shutil.rmtree(work / "verified", ignore_errors=True)
    model = make_model(work / "model", args)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "TOKENIZERS_PARALLELISM": "false", "LAUNCHER_CACHE": str(work / "cache")}
    if not reuse:
        print(f"training 1 step of {model} with 2 ZeRO-3 workers ...", flush=True)
        measure([PY, "-m", "launcher", f"model.name_or_path={model}", "model.init=random",
                 f"dataset.dir={args.data_dir}", "dataset.max_samples=8", "dataset.cutoff_len=512",
                 "train.max_steps=1", "train.grad_accum=1", "launcher.nproc_per_node=2",
                 f"launcher.master_port={free_port()}", "merge.after_train=false", f"output_dir={work / 'runs'}"],
                env)
    (summary,) = (work / "runs").rglob("summary.json")
    run = summary.parent
    ckpt = Path(json.loads(summary.read_text())["checkpoint"])
    ckpt_mb = sum(p.stat().st_size for p in ckpt.iterdir()) / 2**20
    rows = []
    base_rss = measure([PY, "-c", IMPORTS], env)
    print(f"imports alone: peak RSS {base_rss['peak_rss']:.0f} MiB", flush=True)
    for dtype in ("float32", "bfloat16"):
        out = work / f"ours-{dtype}"
        ours = measure([PY, "-m", "launcher.merge", str(run), "merge.verify=false", f"dtype={dtype}",
                        f"output_dir={out}"], env)
        naive_out = work / f"naive-{dtype}"
        naive = measure([PY, "-c", NAIVE, str(ckpt), str(model), str(naive_out), dtype], env)
        size = weights_mb(out)
        rows.append((dtype, size, ours, naive, weights_mb(naive_out)))
        shutil.rmtree(naive_out)
    verified = measure([PY, "-m", "launcher.merge", str(run), "dtype=bfloat16", f"output_dir={work / 'verified'}"],
                       env)
    manifest = json.loads((work / "verified" / "manifest.json").read_text())
    v = manifest["verification"]

    n = manifest["parameters"]
    print(f"\nmodel: {n / 1e6:.0f}M parameters, checkpoint {ckpt_mb:.0f} MiB on disk ({ckpt.name}, 2 ranks)")
    print(f"imports alone (torch, transformers, peft, deepspeed): peak RSS {base_rss['peak_rss']:.0f} MiB\n")
    print("| output | weights MiB | merge peak RSS | merge peak anon | (peak RSS − imports) / weights "
          "| usual recipe peak RSS | ours / usual | merge s | usual s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype, size, ours, naive, naive_size in rows:
        print(f"| {dtype} | {size:.0f} | {ours['peak_rss']:.0f} MiB | {ours['peak_anon']:.0f} MiB "
              f"| {(ours['peak_rss'] - base_rss['peak_rss']) / size:.2f} | {naive['peak_rss']:.0f} MiB "
              f"| {ours['peak_rss'] / naive['peak_rss']:.2f} | {ours['seconds']:.1f} | {naive['seconds']:.1f} |")
    print(f"\nwith verification (bfloat16): {verified['seconds']:.1f}s in all; the reload process peaked at "
          f"{v['peak_rss_mb']} MiB; max logit difference vs the float32 training-time weights "
          f"{v['max_logit_diff']:.3e} (largest reference logit {v['reference_max_logit']:.2f}, argmax agreement "
          f"{v['argmax_agreement']:.1%})")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
