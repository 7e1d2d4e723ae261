"""What the checkpoint integrity checks cost: hash speed, and seconds to write and to verify the manifest of a
1 GB checkpoint (launcher/integrity.py), plus the weights-only opening of its pickles (launcher/safe_load.py).

    .venv/bin/python bench/bench_manifest.py                # 1 GB in 4 files of 256 MB (like 4 ranks' shards)
    .venv/bin/python bench/bench_manifest.py --gb 4 --files 8

The files are torch.save'd tensors (what a single-process checkpoint holds), written to a temporary directory
and read back once before timing, so the figures are for files in the page cache (a save has just written them;
a resume after a restart may read them from disk first, at the disk's speed). The hash rates of the candidate
algorithms are measured on one core over a 256 MB buffer in memory.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def hash_rate(name: str, buf: bytes) -> float:
    t0 = time.perf_counter()
    h = hashlib.new(name)
    view = memoryview(buf)
    for i in range(0, len(buf), 8 << 20):
        h.update(view[i:i + (8 << 20)])
    return len(buf) / (time.perf_counter() - t0)


def main() -> None:
    import torch

    from launcher.integrity import verify, write_manifest
    from launcher.safe_load import check_checkpoint

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--files", type=int, default=4)
    args = ap.parse_args()

    buf = os.urandom(256 << 20)
    for name in ("sha256", "blake2b", "sha1"):
        print(f"{name:8s} {hash_rate(name, buf) / 1e9:.2f} GB/s (one core)")
    total = int(args.gb * (1 << 30))
    with tempfile.TemporaryDirectory(dir=ROOT / ".cache" if (ROOT / ".cache").is_dir() else None) as tmp:
        ckpt = Path(tmp) / "step-1"
        ckpt.mkdir()
        for i in range(args.files):
            torch.save({"w": torch.randn(total // args.files // 4)}, ckpt / f"shard-{i}.pt")
        size = sum(f.stat().st_size for f in ckpt.iterdir())
        for f in ckpt.iterdir():  # into the page cache, as right after a save
            f.read_bytes()
        t0 = time.perf_counter()
        write_manifest(ckpt)
        t_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        verify(ckpt)
        t_verify = time.perf_counter() - t0
        t0 = time.perf_counter()
        check_checkpoint(ckpt)
        t_pickles = time.perf_counter() - t0
    gb = size / 1e9
    print(f"checkpoint {size / 2**30:.2f} GiB in {args.files} files, {os.cpu_count()} cores")
    for what, t in (("write manifest (save)", t_write), ("verify manifest", t_verify)):
        print(f"{what:22s} {t:6.2f} s  {gb / t:.2f} GB/s  = {t / gb * 1.0737:.2f} s per GiB")
    print(f"open pickles (safe)    {t_pickles:6.2f} s")


if __name__ == "__main__":
    main()
