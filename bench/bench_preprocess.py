"""Preprocessing: records/s of ``launcher.data.prepare`` with 1 and 2 tokenising processes, and its scaling.

    python bench/bench_preprocess.py [--records 20000] [--num-proc 2] [--rounds 2]
    python bench/bench_preprocess.py --scale 250000,500000,1000000 [--num-proc 2] [--work-dir /tmp]

Generates a LLaMA-Factory data folder of N records (alpaca with history, and multi-turn sharegpt, Korean and
English, in JSON lines), then prepares it from scratch (empty cache) using the tiny tokenizer and the llama3
template.

Default mode: ``dataset.num_proc=1`` against ``dataset.num_proc=P``, printing records/s and their ratio. The
settings alternate for ``--rounds`` rounds in this one process and each keeps its best time, so the ratio is
comparable even on a shared machine. A last run shows the cache hit time.

``--scale``: one preparation per size (records about 1.5x longer, ~250 tokens each, so 1M records are ~250M
tokens), each in a fresh process from an empty cache, while this process samples the memory of that process and
its ``datasets.map`` workers (proportional set size: anonymous and file-backed pages) and the cache's
size on disk. Prints time, records/s, tokens, peak memory, disk, packing efficiency, and time per record
relative to the smallest size: 1.00 everywhere means time grows linearly.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_data(folder: Path, n: int, seed: int = 0, scale: float = 1.0) -> None:
    """n records: half alpaca (some with history), half sharegpt (2-3 turns), written line by line (no list of
    records is built, so a million cost no memory). ``scale`` multiplies the words per sentence (1.0: about 170
    tokens per record with the tiny tokenizer and the llama3 template; 1.5: about 250)."""
    rng = random.Random(seed)
    words = ["직원", "부서", "급여", "나이", "테이블", "조회", "employees", "salary", "department", "average",
             "SELECT", "COUNT(*)", "WHERE", "GROUP BY", "서울", "부산", "매출", "고객", "주문", "합계"]

    def sentence(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(round(k * scale)))

    with (folder / "alpaca.jsonl").open("w", encoding="utf-8") as f:
        for i in range(n // 2):
            rec = {"instruction": sentence(rng.randint(5, 25)), "input": sentence(rng.randint(0, 40)),
                   "output": sentence(rng.randint(5, 60))}
            if i % 5 == 0:
                rec["history"] = [[sentence(8), sentence(12)]]
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    with (folder / "sharegpt.jsonl").open("w", encoding="utf-8") as f:
        for _ in range(n - n // 2):
            turns = []
            for _ in range(rng.randint(1, 3)):
                turns += [{"from": "human", "value": sentence(rng.randint(5, 30))},
                          {"from": "gpt", "value": sentence(rng.randint(5, 50))}]
            f.write(json.dumps({"conversations": turns, "system": sentence(6)}, ensure_ascii=False) + "\n")
    (folder / "dataset_info.json").write_text(json.dumps({
        "bench_alpaca": {"file_name": "alpaca.jsonl"},
        "bench_sharegpt": {"file_name": "sharegpt.jsonl", "formatting": "sharegpt",
                           "columns": {"messages": "conversations", "system": "system"}}}))


def load_template_and_tokenizer() -> tuple[Any, Any, Path]:
    """The llama3 template config, the tiny tokenizer and its folder."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from launcher.config import TemplateConfig

    tok_dir = ROOT / "models" / "tiny_llama"
    template = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TemplateConfig),
                                                   OmegaConf.load(ROOT / "conf" / "template" / "llama3.yaml")))
    return template, AutoTokenizer.from_pretrained(tok_dir), tok_dir


def dataset_config(data: Path, cache: Path, num_proc: int) -> Any:
    from launcher.config import DatasetConfig

    return DatasetConfig(dir=str(data), names=["bench_alpaca", "bench_sharegpt"], cutoff_len=1024,
                         num_proc=num_proc, cache_dir=str(cache))


def compare_num_proc(args: argparse.Namespace) -> None:
    """Default mode: num_proc=1 against num_proc=P, alternating, best time of each."""
    import datasets

    from launcher.data import prepare

    datasets.disable_progress_bars()
    template, tokenizer, tok_dir = load_template_and_tokenizer()
    work = Path(tempfile.mkdtemp(prefix="bench-preprocess-", dir=args.work_dir))
    try:
        make_data(work, args.records)
        best: dict[str, float] = {}
        # Alternate the two settings and keep each one's best time: on a shared machine a single pair of runs
        # can land on different background loads.
        runs = [(r, n) for r in range(args.rounds) for n in (1, args.num_proc)] + [(args.rounds, args.num_proc)]
        for r, num_proc in runs:
            cfg = dataset_config(work, work / f"cache-{num_proc}-{min(r, args.rounds - 1)}", num_proc)
            t0 = time.perf_counter()
            _, stats, hit = prepare(cfg, template, tokenizer, tok_dir, 0)
            dt = time.perf_counter() - t0
            label = "cache hit" if hit else f"num_proc={num_proc}"
            best[label] = min(best.get(label, float("inf")), dt)
            print(f"{label:>12}: {stats.records} records, {stats.tokens:,} tokens in {dt:6.2f}s = "
                  f"{stats.records / dt:8.0f} records/s")
        one, many = best["num_proc=1"], best[f"num_proc={args.num_proc}"]
        print(f"best of {args.rounds}: num_proc=1 {args.records / one:.0f} records/s, num_proc={args.num_proc} "
              f"{args.records / many:.0f} records/s, speed-up {one / many:.2f}x (cache hit: {best['cache hit']:.2f}s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------------------------- scale mode
def disk_usage(path: Path) -> int:
    """Bytes of the regular files under ``path`` (0 when it does not exist)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # datasets renames and deletes files while we walk
                pass
    return total


def tree_pss(pid: int) -> tuple[int, int, int]:
    """(anonymous, file-backed, processes): proportional set size (``/proc/<pid>/smaps_rollup``) summed over
    ``pid`` and its descendants.

    PSS splits each shared page among the processes mapping it, so the forked map workers' copy-on-write share of
    the parent (torch, transformers) counts once, not once per process. Anonymous pages are the processes' own
    memory (Python objects, numpy arrays, Arrow buffers built in memory); file-backed pages include the
    memory-mapped Arrow files, which the kernel can drop and re-read whenever memory is short.
    """
    import psutil

    anon = file = count = 0
    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0, 0
    for proc in procs:
        try:
            text = Path(f"/proc/{proc.pid}/smaps_rollup").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited between listing and reading
        fields = {k: int(v.split()[0]) * 1024 for k, v in
                  (line.split(":", 1) for line in text.splitlines()[1:] if ":" in line)}
        if "Pss_Anon" in fields:
            anon += fields["Pss_Anon"]
            file += fields["Pss_File"] + fields.get("Pss_Shmem", 0)
            count += 1
    return anon, file, count


def scale_child(data: Path, cache: Path, num_proc: int, result: Path) -> None:
    """One preparation of ``data`` into the empty ``cache``; writes its figures to ``result`` as JSON."""
    import datasets

    from launcher.data import prepare
    from launcher.metrics.memory import lifetime_peak_rss
    from launcher.packing import load_plan, plan_path

    datasets.disable_progress_bars()
    template, tokenizer, tok_dir = load_template_and_tokenizer()
    rss_before = lifetime_peak_rss()
    t0 = time.perf_counter()
    out, stats, hit = prepare(dataset_config(data, cache, num_proc), template, tokenizer, tok_dir, 0)
    seconds = time.perf_counter() - t0
    assert not hit, f"{cache} was not empty"
    pack = load_plan(plan_path(out, "train")).stats
    result.write_text(json.dumps({
        "seconds": seconds, "records": stats.records, "used": stats.used, "tokens": stats.tokens,
        "truncated": stats.truncated, "dropped": stats.dropped_overlong + stats.dropped_errors,
        "rows": pack.rows, "efficiency": pack.efficiency, "pack_seconds": pack.seconds,
        # ru_maxrss (KiB on Linux) counts every resident page, memory-mapped Arrow pages included. SELF is this
        # process; CHILDREN the largest of its reaped descendants (the datasets.map workers).
        "maxrss_before": rss_before, "maxrss_self": lifetime_peak_rss(),
        "maxrss_children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "prepared_bytes": disk_usage(out), "arrow_bytes": disk_usage(out / "train")}))


def run_size(n: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Generate n records, prepare them in a fresh process, sample its memory and disk; the merged figures."""
    data, cache, result = work / f"data-{n}", work / f"cache-{n}", work / f"result-{n}.json"
    data.mkdir()
    t0 = time.perf_counter()
    make_data(data, n, scale=args.length_scale)
    gen_s = time.perf_counter() - t0
    data_bytes = disk_usage(data)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(data), str(cache), str(result),
                             "--num-proc", str(args.num_proc)], env=env)
    peak = {"anon": 0, "file": 0, "total": 0, "procs": 0, "disk": 0}
    last_disk = 0.0
    while proc.poll() is None:
        anon, file, count = tree_pss(proc.pid)
        peak["anon"], peak["file"] = max(peak["anon"], anon), max(peak["file"], file)
        peak["total"], peak["procs"] = max(peak["total"], anon + file), max(peak["procs"], count)
        if time.perf_counter() - last_disk > 1:
            peak["disk"], last_disk = max(peak["disk"], disk_usage(cache)), time.perf_counter()
        time.sleep(0.5)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"preparing {n} records failed (exit {proc.returncode})")
    fig = json.loads(result.read_text())
    fig.update(n=n, wall=wall, gen_seconds=gen_s, data_bytes=data_bytes, load_before=load_before,
               load_after=os.getloadavg(), peak=peak)
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    return fig


def scale(args: argparse.Namespace) -> None:
    sizes = [int(x) for x in args.scale.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-preprocess-scale-", dir=args.work_dir))
    mib, gib = 1 << 20, 1 << 30
    figs = []
    try:
        for n in sizes:
            print(f"{n:,} records: generating, then preparing with dataset.num_proc={args.num_proc} "
                  f"(load average {os.getloadavg()[0]:.1f})", flush=True)
            fig = run_size(n, args, work)
            figs.append(fig)
            p = fig["peak"]
            print(f"{n:,} records: {fig['tokens']:,} tokens, prepare {fig['seconds']:.1f}s "
                  f"({fig['records'] / fig['seconds']:.0f} records/s; process {fig['wall']:.1f}s), "
                  f"peak tree PSS {p['total'] / mib:.0f} MiB (anon {p['anon'] / mib:.0f}, "
                  f"file {p['file'] / mib:.0f}, {p['procs']} processes), "
                  f"ru_maxrss self {fig['maxrss_self'] / mib:.0f} MiB / workers "
                  f"{fig['maxrss_children'] / mib:.0f} MiB, "
                  f"disk peak {p['disk'] / gib:.2f} GiB -> prepared {fig['prepared_bytes'] / gib:.2f} GiB, "
                  f"data files {fig['data_bytes'] / gib:.2f} GiB (generated in {fig['gen_seconds']:.0f}s), "
                  f"{fig['rows']:,} rows at {fig['efficiency']:.2%}, packing {fig['pack_seconds']:.2f}s, "
                  f"load {fig['load_before'][0]:.1f} -> {fig['load_after'][0]:.1f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = figs[0]["seconds"] / figs[0]["records"]
    print("\n| records | tokens | prepare time | records/s | time/record vs smallest | peak PSS, process tree "
          "(anon + file-backed) | ru_maxrss main / largest worker | Arrow train split on disk (cache peak during) | "
          "packing |")
    print("|---:|---:|---:|---:|---:|---|---|---|---|")
    for f in figs:
        p = f["peak"]
        print(f"| {f['records']:,} | {f['tokens'] / 1e6:.1f}M | {f['seconds']:.0f} s | "
              f"{f['records'] / f['seconds']:,.0f} | {f['seconds'] / f['records'] / base:.2f} | "
              f"{p['total'] / mib:,.0f} MiB ({p['anon'] / mib:,.0f} + {p['file'] / mib:,.0f}) | "
              f"{f['maxrss_self'] / mib:,.0f} / {f['maxrss_children'] / mib:,.0f} MiB | "
              f"{f['arrow_bytes'] / gib:.2f} GiB ({p['disk'] / gib:.2f} GiB) | "
              f"{f['efficiency']:.2%}, {f['pack_seconds']:.2f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="runs per setting, alternating; best time counts")
    parser.add_argument("--scale", help="comma-separated record counts: one fresh preparation per size")
    parser.add_argument("--length-scale", type=float, default=1.5,
                        help="--scale mode: words per sentence relative to the default mode (1.5: ~250 tokens)")
    parser.add_argument("--work-dir", default=None, help="where data and caches go (default: the temp dir)")
    parser.add_argument("--child", nargs=3, metavar=("DATA", "CACHE", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        scale_child(*(Path(x) for x in args.child[:2]), args.num_proc, Path(args.child[2]))
    elif args.scale:
        scale(args)
    else:
        compare_num_proc(args)


if __name__ == "__main__":
    main()
