"""Packing efficiency, packing time and memory, against baselines measured in the same run.

    .venv/bin/python bench/bench_packing.py            # everything (~1 min on 2 cores)
    .venv/bin/python bench/bench_packing.py --quick    # skip the 1M-record scale runs

Efficiency is real tokens / token slots (rows × cutoff_len). "bound" is the most any packing can reach,
tokens / (ceil(tokens / cutoff) × cutoff). Each table compares, on the same lengths:

* ``launcher``: :func:`launcher.binpack.pack_rows` (best fit decreasing over the whole set, then subset-sum
  refinement of the rows it left not full) - what training uses;
* ``bfd``: best fit decreasing alone;
* ``greedy/1000``: the common practice of packing each 1000-record ``datasets.map`` batch on its own, by greedy
  knapsack (each row takes the longest record left that still fits; re-implemented here as the baseline).

Datasets: the shipped sample (data/text2sql_ko.json, tokenised by the real preparation code, llama3 template) and
generated long-tailed lengths (log-normal, median 300 tokens, sigma 1, at least 8 tokens; records longer than the
cutoff are truncated to it, as ``dataset.overlong=truncate`` does). Scale runs pack 0.25M, 0.5M and 1M generated
lengths (long-tailed, and uniform 73-289 tokens like the shipped sample), each in a fresh process, and report the best of three times and the process's peak resident memory
above what it held before packing (read from /proc after resetting the peak).
"""

from __future__ import annotations

import argparse
import bisect
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launcher.binpack import best_fit_decreasing, pack_rows  # noqa: E402


def long_tailed(n: int, cutoff: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(300), 1.0, n).astype(np.int64), 8, cutoff)


def greedy_chunks(lengths: np.ndarray, cutoff: int, chunk: int = 1000) -> int:
    """Rows used when each chunk of records is packed alone, each row taking the longest record left that fits."""
    rows = 0
    for start in range(0, len(lengths), chunk):
        left = sorted(lengths[start:start + chunk].tolist())
        while left:
            room, rows = cutoff, rows + 1
            while left:
                k = bisect.bisect_right(left, room) - 1
                if k < 0:
                    break
                room -= left.pop(k)
    return rows


def shipped_lengths() -> np.ndarray:
    """Token counts of the shipped sample, through launcher.data.prepare (the code training runs)."""
    import datasets

    from launcher.config import DatasetConfig, TemplateConfig
    from launcher.data import prepare
    from launcher.model import load_tokenizer
    from launcher.config import ModelConfig
    from launcher.packing import record_lengths
    from omegaconf import OmegaConf

    datasets.disable_progress_bars()  # (preparation shows its own bars on stderr)
    tcfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TemplateConfig),
                                               OmegaConf.load(ROOT / "conf/template/llama3.yaml")))
    mcfg = ModelConfig(name_or_path=str(ROOT / "models/tiny_llama"), init="random")
    with tempfile.TemporaryDirectory() as cache:
        dcfg = DatasetConfig(dir=str(ROOT / "data"), cutoff_len=4096, cache_dir=cache)
        path, _, _ = prepare(dcfg, tcfg, load_tokenizer(mcfg), ROOT / "models/tiny_llama", seed=42)
        return record_lengths(datasets.load_from_disk(str(path / "train")))


def table(name: str, lengths: np.ndarray, cutoffs: list[int]) -> list[dict]:
    out = []
    total = int(lengths.sum())
    print(f"\n{name}: {len(lengths):,} records, {total:,} tokens, "
          f"lengths {lengths.min()}-{lengths.max()} (median {int(np.median(lengths))})")
    print(f"{'cutoff':>7} {'launcher':>9} {'rows':>7} {'time':>7} {'bfd':>8} {'greedy/1000':>12} {'bound':>8} "
          f"{'rec/row':>8}")
    for cutoff in cutoffs:
        lens = np.minimum(lengths, cutoff)
        total = int(lens.sum())
        t0 = time.perf_counter()
        offsets, _ = pack_rows(lens, cutoff)
        dt = time.perf_counter() - t0
        rows = len(offsets) - 1
        bfd_rows = len(best_fit_decreasing(lens, cutoff)[0]) - 1
        greedy_rows = greedy_chunks(lens, cutoff)
        bound_rows = -(-total // cutoff)
        eff = {k: total / (r * cutoff) for k, r in
               (("launcher", rows), ("bfd", bfd_rows), ("greedy", greedy_rows), ("bound", bound_rows))}
        print(f"{cutoff:>7} {eff['launcher']:>9.2%} {rows:>7,} {dt:>6.2f}s {eff['bfd']:>8.2%} "
              f"{eff['greedy']:>12.2%} {eff['bound']:>8.2%} {len(lens) / rows:>8.1f}")
        out.append({"dataset": name, "cutoff": cutoff, "rows": rows, "seconds": round(dt, 3),
                    **{k: round(v, 5) for k, v in eff.items()}})
    return out


SCALE = r"""
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from bench.bench_packing import long_tailed
import torch
from launcher.metrics.memory import MIB, host_rss, reset_peak_memory
from launcher.packing import pack_lengths
n, cutoff, shape = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
lengths = long_tailed(n, cutoff, seed=1) if shape == "long-tailed" else np.random.default_rng(1).integers(73, 290, n)
before = host_rss()[0]
reset_peak_memory(torch.device("cpu"))  # the peak (VmHWM) restarts from the current RSS
times = []
for i in range(3):  # the best of three times (the machine is shared); memory from the first run
    t0 = time.perf_counter()
    plan = pack_lengths(lengths, cutoff)
    times.append(time.perf_counter() - t0)
    if i == 0:
        peak = host_rss()[1]
        efficiency = plan.stats.efficiency
    del plan
dt = min(times)
print(json.dumps({"records": n, "cutoff": cutoff, "shape": shape, "seconds": round(dt, 3), "efficiency": efficiency,
                  "rss_before_mib": round(before / MIB, 1), "peak_extra_mib": round((peak - before) / MIB, 1)}))
"""


def scale(n: int, cutoff: int, shape: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCALE, str(ROOT), str(n), str(cutoff), shape], capture_output=True,
                         text=True, check=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="skip the 0.25M-1M scale runs")
    args = ap.parse_args()
    results = []
    results += table("shipped sample (text2sql_ko, llama3 template)", shipped_lengths(), [512, 1024, 4096])
    results += table("generated long-tailed, 20k records", long_tailed(20_000, 1 << 20), [1024, 4096])
    results += table("generated long-tailed, 100k records", long_tailed(100_000, 1 << 20, seed=2), [1024, 4096])
    if not args.quick:
        print("\nscale (fresh process each; peak = resident memory above the pre-packing level):")
        print(f"{'lengths':<12} {'records':>9} {'cutoff':>7} {'time':>8} {'efficiency':>11} {'peak extra':>11} "
              f"{'us/record':>10}")
        for shape, cutoff in (("long-tailed", 1024), ("long-tailed", 4096), ("73-289", 1024)):
            for n in (250_000, 500_000, 1_000_000):
                r = scale(n, cutoff, shape)
                results.append({"scale": r})
                print(f"{shape:<12} {n:>9,} {cutoff:>7} {r['seconds']:>7.2f}s {r['efficiency']:>11.2%} "
                      f"{r['peak_extra_mib']:>8.1f} MiB {r['seconds'] / n * 1e6:>10.2f}")
    print("\njson:", json.dumps(results))


if __name__ == "__main__":
    main()
