"""Training throughput against LLaMA-Factory 0.9.5 at matched settings, all variants interleaved in one run.

    .venv/bin/python bench/bench_vs_llamafactory.py --setup            # once: LLaMA-Factory's own venv (~3 min, PyPI)
    .venv/bin/python bench/bench_vs_llamafactory.py --rounds 2          # the figures (~15-25 min on 2 cores)
    .venv/bin/python bench/bench_vs_llamafactory.py --rounds 1 --steps 4 --warmup 1   # smoke run

Both tools train the same weights (the embedded tiny Llama, materialised once by the launcher and loaded by
LLaMA-Factory from that folder), on the same LLaMA-Factory data folder (``data/``, dataset ``text2sql_ko``, template
llama3), cutoff 1024, float32, micro-batch 1, no gradient accumulation, packing on, gradient checkpointing off,
AdamW, on one process and on DeepSpeed ZeRO-3 × 2 (CPU, gloo; OMP threads = cores / processes for both tools, or
``--threads``: on a busy machine two threads per process can be several times slower than one).

Variants, one process launch each, run in the same order every round so machine load hits all alike:

* ``launcher``: ``python -m launcher`` with the default attention for packed rows (``packed``: each record's own
  blocks, no mask);
* ``launcher-sdpa``: the same with ``model.attn_implementation=sdpa`` (the old path: a block-diagonal mask built
  from the position ids, every cross-record block computed and masked) -- the same-run A/B;
* ``lf-neat``: LLaMA-Factory ``neat_packing: true`` (its block-diagonal 4-D mask; records stay apart);
* ``lf-plain``: LLaMA-Factory ``packing: true`` alone (no mask: packed records attend to each other, which trains
  on contaminated context; the speed reference a user is offered).

Throughput is real (non-padding) tokens per second of training-step wall time after ``--warmup`` steps: for the
launcher from its ``metrics.jsonl`` (``time`` and ``tokens`` per step, summed over ranks), for LLaMA-Factory from a
callback's timestamp at each step end and the non-padding tokens its trainer received (LLaMA-Factory pads every
packed row to cutoff + 1). Start-up and data preparation are outside the window for both. The 1-minute load
average is printed with every run: other work on the machine makes absolute figures noisy; compare the ratios.

LLaMA-Factory lives in its own venv (``--lf-venv``, default /work/lf-venv), created by ``--setup``: torch 2.13.0
(CPU) first, then ``llamafactory==0.9.5`` and ``deepspeed`` with a constraints file pinning torch; its
``torchvision``/``torchaudio`` wheels are CUDA-linked and fail to import on a CPU torch, so they are removed and
``torchaudio`` (imported at the top of LLaMA-Factory's multimodal plugin, unused for text) is stubbed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LF_VERSION = "0.9.5"
TORCH_VERSION = "2.13.0"
DS_VERSION = "0.19.8"
# LLaMA-Factory's DeepSpeed ZeRO-3 settings: the same ZeRO options as ds_configs/zero3.json, HF "auto" values for
# the batch, and the bucket sizes the launcher's "auto" resolves to (filled in lf_args).
LF_ZERO3 = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
            "zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                                  "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                  "stage3_param_persistence_threshold": "auto",
                                  "stage3_gather_16bit_weights_on_model_save": False},
            "steps_per_print": 1000000}
VARIANTS = ("launcher", "launcher-sdpa", "lf-neat", "lf-plain")


# --------------------------------------------------------------------------------------------- setup
def setup(lf_venv: Path) -> None:
    """Create LLaMA-Factory's venv (CPU torch pinned), remove its CUDA-linked vision/audio wheels, stub torchaudio."""
    py = lf_venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(lf_venv)], check=True)
    constraints = lf_venv / "constraints.txt"
    constraints.write_text(f"torch=={TORCH_VERSION}\n")
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True)
    subprocess.run([*pip, "-c", str(constraints), f"llamafactory=={LF_VERSION}"], check=True)
    subprocess.run([*pip, "--no-build-isolation", "-c", str(constraints), f"deepspeed=={DS_VERSION}"], check=True,
                   env={**os.environ, "DS_BUILD_OPS": "0"})
    subprocess.run([str(py), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio"], check=True)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "torchaudio.py").write_text(
        '"""Stub: the torchaudio wheel is CUDA-linked; LLaMA-Factory imports it only for audio data."""\n')
    subprocess.run([str(py), "-c", "import llamafactory.train.tuner, deepspeed"], check=True)
    print(f"LLaMA-Factory {LF_VERSION} ready in {lf_venv}")


# --------------------------------------------------------------------------------------------- LF side
def lf_worker(spec_path: str) -> None:
    """Runs inside LLaMA-Factory's venv (one per rank): train, recording (step, time, real tokens) at each step."""
    import transformers
    from llamafactory.train.tuner import run_exp

    spec = json.loads(Path(spec_path).read_text())
    seen, log = [0], []
    train_step = transformers.Trainer.training_step

    def counting_step(self, model, inputs, *args, **kwargs):
        seen[0] += int((inputs["input_ids"] != spec["pad_id"]).sum())
        return train_step(self, model, inputs, *args, **kwargs)

    transformers.Trainer.training_step = counting_step
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # On CPU, DeepSpeed inside HF Trainer otherwise sets up its own world of one (its CPU accelerator asks for
        # oneCCL): start its communication on gloo first, as the launcher's DeepSpeed backend does.
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            log.append([state.global_step, time.perf_counter(), seen[0]])

    run_exp(args=spec["args"], callbacks=[Clock()])
    Path(f"{spec['out']}.rank{os.environ.get('RANK', '0')}").write_text(json.dumps(log))


def lf_args(model_dir: Path, out: Path, neat: bool, steps: int, world: int, seed: int) -> dict:
    args = {"model_name_or_path": str(model_dir), "stage": "sft", "do_train": True, "finetuning_type": "full",
            "dataset_dir": str(ROOT / "data"), "dataset": "text2sql_ko", "template": "llama3", "cutoff_len": 1024,
            "packing": True, "neat_packing": neat, "overwrite_cache": True, "output_dir": str(out),
            "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1, "learning_rate": 2e-5,
            "lr_scheduler_type": "cosine", "warmup_ratio": 0.03, "max_steps": steps, "logging_steps": 1000000,
            "save_strategy": "no", "report_to": "none", "use_cpu": True, "disable_gradient_checkpointing": True,
            "flash_attn": "sdpa", "bf16": False, "fp16": False, "dataloader_num_workers": 0, "seed": seed,
            "plot_loss": False, "overwrite_output_dir": True}
    if world > 1:
        # The bucket sizes the launcher fills its "auto" entries with (HF's rules, the reduce bucket not below a
        # floor), so that both tools run the same ZeRO-3 settings.
        from launcher.backends.deepspeed import auto_buckets

        hidden = json.loads((model_dir / "config.json").read_text())["hidden_size"]
        zero3 = {**LF_ZERO3, "zero_optimization": {**LF_ZERO3["zero_optimization"], **auto_buckets(hidden)}}
        (out / "zero3.json").write_text(json.dumps(zero3))
        args["deepspeed"] = str(out / "zero3.json")
    return args


def threads_per_process(world: int, threads: int | None) -> int:
    """What the launcher gives each worker by default (cores / workers), unless set for every variant."""
    return threads or max(1, (os.cpu_count() or 2) // world)


def run_lf(lf_venv: Path, model_dir: Path, pad_id: int, neat: bool, world: int, steps: int, tmp: Path,
           port: int, threads: int | None) -> list[list[float]]:
    """One LLaMA-Factory launch; [[step, time, real tokens of all ranks so far], ...]."""
    spec = {"args": lf_args(model_dir, tmp, neat, steps, world, 42), "out": str(tmp / "clock"), "pad_id": pad_id}
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_process(world, threads)), "DISABLE_VERSION_CHECK": "1",
           "HF_HUB_OFFLINE": "1", "WANDB_DISABLED": "true", "PYTHONPATH": "", "DS_ACCELERATOR": "cpu",
           # its DeepSpeed's compiled ops apart from the launcher's: sharing one folder rebuilt them every launch
           "TORCH_EXTENSIONS_DIR": str(lf_venv / "torch_extensions")}
    if world == 1:
        cmd = [str(lf_venv / "bin" / "python"), __file__, "--lf-worker", str(tmp / "spec.json")]
    else:
        cmd = [str(lf_venv / "bin" / "torchrun"), "--nproc_per_node", str(world), "--master_port", str(port),
               __file__, "--lf-worker", str(tmp / "spec.json")]
    r = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        sys.exit(f"LLaMA-Factory failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    logs = [json.loads((tmp / f"clock.rank{rank}").read_text()) for rank in range(world)]
    # Ranks step together (collectives every step): rank 0's clock, every rank's tokens.
    return [[s, t, sum(log[i][2] for log in logs)] for i, (s, t, _) in enumerate(logs[0])]


# --------------------------------------------------------------------------------------------- launcher side
def run_launcher(attn: str, world: int, steps: int, tmp: Path, port: int, threads: int | None) -> list[list[float]]:
    """One ``python -m launcher`` run; [[step, time, real tokens of all ranks so far], ...] from metrics.jsonl."""
    backend = ["backend=single"] if world == 1 else ["backend=deepspeed_zero3", f"launcher.nproc_per_node={world}",
                                                     f"launcher.master_port={port}"]
    overrides = [*backend, "model=tiny_llama", "model.dtype=float32", f"model.attn_implementation={attn}",
                 "model.gradient_checkpointing=false", "template=llama3", "dataset.dir=data",
                 "dataset.names=[text2sql_ko]", "dataset.cutoff_len=1024", "dataset.packing=true",
                 "train.micro_batch_size=1", "train.grad_accum=1", f"train.max_steps={steps}", "train.log_every=1",
                 "train.seed=42", "merge.after_train=false", "logger.plot=false", f"output_dir={tmp}",
                 "eval.generate.datasets=[]", "eval.generate.before=false",
                 f"launcher.omp_num_threads={threads_per_process(world, threads)}"]
    # backend=single trains inside the launcher's own process, which launcher.omp_num_threads does not reach (it
    # sets the workers' environment): give the process the same thread count through its environment.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads_per_process(world, threads))}
    r = subprocess.run([sys.executable, "-m", "launcher", *overrides], cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=3600)
    if r.returncode != 0:
        sys.exit(f"launcher failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    (metrics,) = tmp.rglob("metrics.jsonl")
    out, total = [], 0
    for line in metrics.read_text().splitlines():
        m = json.loads(line)
        if "loss" in m and "tokens" in m and "eval_loss" not in m:
            total += m["tokens"]
            out.append([m["step"], m["time"], total])
    return out


def rate(clock: list[list[float]], warmup: int) -> dict:
    """Real tokens per second between the end of step ``warmup`` and the last step."""
    (s0, t0, n0), (s1, t1, n1) = clock[warmup - 1], clock[-1]
    return {"steps": int(s1 - s0), "seconds": round(t1 - t0, 3), "tokens": int(n1 - n0),
            "tokens_per_s": (n1 - n0) / (t1 - t0)}


# --------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", action="store_true", help="create LLaMA-Factory's venv and exit")
    ap.add_argument("--lf-venv", type=Path, default=Path("/work/lf-venv"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per launch")
    ap.add_argument("--warmup", type=int, default=3, help="first steps of each launch left out")
    ap.add_argument("--worlds", default="1,2", help="process counts to run (1: single, 2: ZeRO-3 × 2)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP threads per process for every variant (default: cores / processes, both tools)")
    ap.add_argument("--out", type=Path, default=None, help="JSON with every run (default: print only)")
    ap.add_argument("--lf-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.lf_worker:
        lf_worker(args.lf_worker)
        return
    if args.setup:
        setup(args.lf_venv)
        return
    if not (args.lf_venv / "bin" / "llamafactory-cli").exists():
        sys.exit(f"no LLaMA-Factory venv at {args.lf_venv}: run {Path(__file__).name} --setup first")
    if args.warmup < 1 or args.steps <= args.warmup:
        sys.exit("need 1 <= --warmup < --steps")
    sys.path.insert(0, str(ROOT))
    from launcher.config import ModelConfig
    from launcher.model import load_tokenizer, materialize
    from launcher.preflight import free_port

    tiny = ModelConfig(name_or_path="models/tiny_llama", init="random", init_seed=0)
    model_dir = materialize(tiny)  # the launcher's seeded weights, which LLaMA-Factory loads too
    pad_id = load_tokenizer(tiny).pad_token_id
    worlds = [int(w) for w in args.worlds.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    runs: list[dict] = []
    print(f"{os.cpu_count()} cores; {args.rounds} rounds × {len(worlds) * len(variants)} launches, {args.steps} steps "
          f"each ({args.warmup} warm-up); tiny Llama, data/text2sql_ko, cutoff 1024, float32, micro-batch 1, packing")
    print(f"{'round':>5} {'world':>5} {'variant':<14} {'tok/s':>8} {'steps':>5} {'s':>7} {'load1':>6}", flush=True)
    for rnd in range(args.rounds):
        for world in worlds:
            for v in variants:
                with tempfile.TemporaryDirectory(prefix=f"bench-{v}-") as tmp:
                    if v.startswith("launcher"):
                        clock = run_launcher("sdpa" if v == "launcher-sdpa" else "auto", world, args.steps, Path(tmp),
                                             free_port(), args.threads)
                    else:
                        clock = run_lf(args.lf_venv, model_dir, pad_id, v == "lf-neat", world, args.steps, Path(tmp),
                                       free_port(), args.threads)
                load = os.getloadavg()[0]
                r = {"round": rnd + 1, "world": world, "variant": v, **rate(clock, args.warmup), "load1": load}
                runs.append(r)
                print(f"{r['round']:>5} {world:>5} {v:<14} {r['tokens_per_s']:>8,.0f} {r['steps']:>5} "
                      f"{r['seconds']:>7.1f} {load:>6.1f}", flush=True)

    print("\nratios (launcher's default packed attention over each; per round, then the median):")
    summary = {}
    for world in worlds:
        ours = {r["round"]: r["tokens_per_s"] for r in runs if r["world"] == world and r["variant"] == "launcher"}
        for other in variants[1:] if variants[:1] == ["launcher"] else []:
            theirs = {r["round"]: r["tokens_per_s"] for r in runs if r["world"] == world and r["variant"] == other}
            ratios = [ours[k] / theirs[k] for k in sorted(ours) if k in theirs]
            summary[f"world{world}/launcher_over_{other}"] = statistics.median(ratios)
            label = "one process" if world == 1 else f"ZeRO-3 × {world}"
            print(f"  {label:<12} launcher / {other:<14} " + "  ".join(f"{x:.2f}x" for x in ratios)
                  + f"   median {statistics.median(ratios):.2f}x")
    if args.out:
        args.out.write_text(json.dumps({"runs": runs, "ratios": summary, "args": vars(args) | {
            "lf_venv": str(args.lf_venv), "out": str(args.out)}}, indent=1))


if __name__ == "__main__":
    main()
