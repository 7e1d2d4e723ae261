"""Training throughput, packed rows vs the unpadded-batch baseline, same data and model, interleaved in one run.

    .venv/bin/python bench/bench_throughput.py                 # 2 DeepSpeed ZeRO-3 CPU workers, ~2-3 min
    .venv/bin/python bench/bench_throughput.py --rounds 2      # quicker, noisier

The data is the shipped sample prepared twice by the real preparation code: packed (``dataset.packing=true``,
rows of up to ``cutoff_len`` tokens, ``--mbs`` rows per micro-batch) and the baseline (``dataset.packing=false``:
one record per row, micro-batches padded to their longest record, with as many records per micro-batch as the
packed rows hold on average, so both process the same records per step).

One ``deepspeed`` launch starts 2 CPU workers that build the model through the worker's backend and train with
the worker's own pieces (RowLoader, ``forward_backward``, ``backend.step``), alternating blocks of
``--block`` optimizer steps packed / baseline for ``--rounds`` rounds, so load from other processes on the
machine hits both alike (one launch per variant measured 1.3x and 2.6x back to back on a shared machine).
The first block of each variant is warm-up and left out.

Throughput is supervised tokens per second of step time (data, forward, backward, optimizer); the result is the
ratio packed / baseline. Padding is the share of the token slots that were padding.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(run_dir: Path, base_data: str, base_mbs: int, rounds: int, block: int) -> None:
    """One rank: alternate packed and baseline blocks of steps on one model; rank 0 writes the totals."""
    import datasets
    import torch

    from launcher.backends import make_backend
    from launcher.config import load_run_config
    from launcher.model import apply_finetune, load_model, load_tokenizer
    from launcher.packing import RowLoader, load_plan, plan_path
    from launcher.runspec import load_run_spec
    from launcher.train import forward_backward, micro_batches

    cfg, spec = load_run_config(run_dir), load_run_spec(run_dir)
    torch.manual_seed(cfg.train.seed)
    backend = make_backend(cfg)
    pad = load_tokenizer(cfg.model).pad_token_id
    streams = {}
    for name, data, mbs in (("packed", spec.data_path, cfg.train.micro_batch_size),
                            ("unpacked", base_data, base_mbs)):
        ds = datasets.load_from_disk(str(Path(data) / "train"))
        loader = RowLoader(ds, load_plan(plan_path(data)), mbs, backend.rank, backend.world_size, cfg.train.seed, pad)
        streams[name] = micro_batches(loader)
    model = backend.build(lambda: apply_finetune(load_model(cfg.model, torch.float32), cfg.finetune),
                          2 * rounds * block)
    model.train()
    totals = {name: {"seconds": 0.0, "steps": 0, "supervised_tokens": 0.0, "tokens": 0.0, "slots": 0.0}
              for name in streams}
    for rnd in range(rounds):
        for name, stream in streams.items():
            for _ in range(block):
                t0 = time.perf_counter()
                batches = [{k: v.to(backend.device) for k, v in next(stream).items()}
                           for _ in range(cfg.train.grad_accum)]
                step = forward_backward(model, batches, backend)
                backend.step()
                dt = time.perf_counter() - t0
                if rnd > 0:  # the first block of each variant is warm-up
                    t = totals[name]
                    t["seconds"] += dt
                    t["steps"] += 1
                    for k in ("supervised_tokens", "tokens", "slots"):
                        t[k] += step[k]
    if backend.rank == 0:
        (run_dir / "bench.json").write_text(json.dumps(totals))
    backend.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4, help="packed/baseline alternations (the first is warm-up)")
    ap.add_argument("--block", type=int, default=3, help="optimizer steps per block")
    ap.add_argument("--cutoff", type=int, default=512)
    ap.add_argument("--mbs", type=int, default=2, help="packed rows per micro-batch")
    ap.add_argument("--gas", type=int, default=2)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--worker", nargs=5, metavar=("RUN_DIR", "BASE_DATA", "BASE_MBS", "ROUNDS", "BLOCK"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run_dir, base_data, base_mbs, rounds, block = args.worker
        worker(Path(run_dir), base_data, int(base_mbs), int(rounds), int(block))
        return

    from dataclasses import replace

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from launcher.__main__ import quiet_libraries
    from launcher.backends import backend_for
    from launcher.config import register_configs, to_object
    from launcher.data import prepare
    from launcher.model import load_tokenizer, materialize
    from launcher.packing import load_plan, plan_path
    from launcher.preflight import free_port
    from launcher.runspec import RunSpec
    from launcher.validate import validate

    register_configs()
    overrides = ["backend=deepspeed_zero3", f"dataset.cutoff_len={args.cutoff}", f"train.micro_batch_size={args.mbs}",
                 f"train.grad_accum={args.gas}", "launcher.omp_num_threads=1", "name=bench", "output_dir=unused"]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = to_object(compose("config", overrides=overrides))
    validate(cfg)
    quiet_libraries()
    materialize(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    tok_dir = ROOT / cfg.model.name_or_path
    packed_data, _, _ = prepare(cfg.dataset, cfg.template, tokenizer, tok_dir, cfg.train.seed)
    base_data, _, _ = prepare(replace(cfg.dataset, packing=False), cfg.template, tokenizer, tok_dir, cfg.train.seed)
    stats = load_plan(plan_path(packed_data)).stats
    base_mbs = max(1, round(stats.records_per_row * args.mbs))

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        RunSpec(run_dir=str(run_dir), nproc_per_node=args.nproc, world_size=args.nproc,
                data_path=str(packed_data)).write()
        ds_cli = Path(sys.executable).parent / "deepspeed"
        cmd = [str(ds_cli), "--num_gpus", str(args.nproc), "--master_port", str(free_port()), "--no_local_rank",
               "--log_level", "warning", __file__, "--worker", str(run_dir), str(base_data), str(base_mbs),
               str(args.rounds), str(args.block)]
        t0 = time.time()
        env = backend_for(cfg).worker_env(cfg, args.nproc)
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"workers failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        totals = json.loads((run_dir / "bench.json").read_text())
    wall = time.time() - t0

    print(f"{args.nproc} workers (DeepSpeed ZeRO-3, CPU), tiny Llama, shipped sample, cutoff {args.cutoff}, "
          f"grad_accum {args.gas}; {args.rounds - 1} measured rounds of {args.block} steps per variant, "
          f"interleaved ({wall:.0f}s wall)")
    print(f"packed rows: {stats.describe()}")
    print(f"{'variant':<36} {'sup tok/s':>10} {'tok/s':>8} {'padding':>8} {'s/step':>7}")
    rates = {}
    for name, label in (("packed", f"packed, {args.mbs} rows/micro-batch"),
                        ("unpacked", f"unpacked, {base_mbs} records/micro-batch")):
        t = totals[name]
        rates[name] = t["supervised_tokens"] / t["seconds"]
        print(f"{label:<36} {rates[name]:>10,.0f} {t['tokens'] / t['seconds']:>8,.0f} "
              f"{1 - t['tokens'] / t['slots']:>8.1%} {t['seconds'] / t['steps']:>7.2f}")
    print(f"packed / unpacked supervised tokens per second: {rates['packed'] / rates['unpacked']:.2f}x")
    print("json:", json.dumps({"totals": totals, "unpacked_mbs": base_mbs,
                               "ratio": rates["packed"] / rates["unpacked"]}))


if __name__ == "__main__":
    main()
