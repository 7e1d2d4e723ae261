"""``python -m launcher.inspect_data [-n N] [overrides]``: see exactly what a training job would train on.

Composes the same config as ``python -m launcher`` (same Hydra overrides), prepares the data the same way (and so
reuses or fills the same cache), then prints statistics — records read, used, dropped for errors (by reason) and
for length, tokens, the supervised-token fraction, per dataset the records available and used, repeats and token
share, a length histogram — and N prepared samples with the trained tokens marked: green on a terminal, inside ⟦…⟧
otherwise. Everything outside the marks has label -100.

The launcher writes the same report (without colour) to ``<run_dir>/data_report.txt`` at every training start.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from launcher.data import DataStats
from launcher.mixing import mix_table
from launcher.templates import IGNORE_INDEX

TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"
GREEN, DIM, RESET = "\033[1;32m", "\033[2m", "\033[0m"


def render_sample(input_ids: list[int], labels: list[int], tokenizer: Any, color: bool) -> str:
    """The tokens of one prepared record as text, trained spans marked (colour, or ⟦…⟧ brackets)."""
    spans: list[tuple[bool, list[int]]] = []
    for tid, lab in zip(input_ids, labels):
        trained = lab != IGNORE_INDEX
        if spans and spans[-1][0] == trained:
            spans[-1][1].append(tid)
        else:
            spans.append((trained, [tid]))
    out = []
    for trained, ids in spans:
        text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if color:
            out.append(f"{GREEN if trained else DIM}{text}{RESET}")
        else:
            out.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained else text)
    return "".join(out)


def histogram(lengths: Any, cutoff_len: int, bins: int = 8, width: int = 40) -> list[str]:
    """A text histogram of record lengths in equal-width bins up to cutoff_len."""
    import numpy as np

    lengths = np.asarray(lengths)
    if not len(lengths):
        return ["  (no records)"]
    counts, edges = np.histogram(lengths, bins=bins, range=(0, max(cutoff_len, int(lengths.max()))))
    top = max(int(counts.max()), 1)
    lines = []
    for c, lo, hi in zip(counts, edges[:-1], edges[1:]):
        lines.append(f"  {int(lo):>6}–{int(hi):<6} {'█' * round(width * c / top):<{width}} {int(c)}")
    return lines


def report(data_path: Path, stats: DataStats, tokenizer: Any, cutoff_len: int, samples: int = 3,
           color: bool = False) -> str:
    """Statistics and ``samples`` rendered records of a prepared dataset directory."""
    import datasets

    from launcher.packing import record_lengths

    train = datasets.load_from_disk(str(data_path / "train"))
    lines = [f"prepared data: {data_path}", ""]
    per = ", ".join(f"{k} {v}" for k, v in stats.per_dataset.items())
    lines.append(f"records read:        {stats.records}" + (f" ({per})" if per else ""))
    lines.append(f"used for training:   {stats.used}")
    lines.append(f"held out for eval:   {stats.eval_records}")
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(stats.error_reasons.items()))
    lines.append(f"dropped for errors:  {stats.dropped_errors}" + (f" ({reasons})" if reasons else ""))
    lines.append(f"dropped for length:  {stats.dropped_overlong} (no trained token fits cutoff_len={cutoff_len}, "
                 f"or longer with dataset.overlong=drop, or replies alone too long with cut_prompt)")
    lines.append(f"truncated:           {stats.truncated} (earlier turns dropped to fit)")
    lines.append(f"prompt cut:          {stats.prompt_cut} (replies whole, user text cut to fit: "
                 f"dataset.overlong=cut_prompt)")
    frac = stats.supervised_tokens / max(stats.tokens, 1)
    lines.append(f"tokens:              {stats.tokens:,} ({stats.supervised_tokens:,} supervised, {frac:.1%})")
    lines += mix_table(stats.mix)
    lines.append("")
    lines.append("record lengths (tokens):")
    lines += histogram(record_lengths(train), cutoff_len)  # from Arrow in bulk, not per record
    for err in stats.errors:
        lines.append(f"skipped: {err}")
    n = min(samples, len(train))
    if n:
        legend = ("green = trained (has a loss), dim = masked (-100)" if color
                  else f"{TRAINED_OPEN}…{TRAINED_CLOSE} = trained (has a loss); the rest is masked (-100)")
        lines += ["", f"{n} of {len(train)} training records ({legend}):"]
        for i in range(n):
            row = train[i]
            lines += ["", f"--- record {i}: {row['length']} tokens, "
                          f"{sum(x != IGNORE_INDEX for x in row['labels'])} trained ---",
                      render_sample(row["input_ids"], row["labels"], tokenizer, color)]
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, data_path: Path, stats: DataStats, tokenizer: Any, cutoff_len: int) -> Path:
    """Save the (colourless) report into the run directory; called by the launcher at every training start."""
    path = Path(run_dir) / "data_report.txt"
    path.write_text(report(data_path, stats, tokenizer, cutoff_len), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launcher.inspect_data",
        description="Prepare the data of a training job (same Hydra overrides as `python -m launcher`) and show "
                    "statistics and rendered samples with trained tokens marked.")
    parser.add_argument("-n", "--samples", type=int, default=3, help="records to print (default 3)")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. template=qwen dataset.names=[a,b]")
    args = parser.parse_args(argv)

    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from launcher.config import PROJECT_ROOT, ConfigError, register_configs, resolve_path, to_object
    from launcher.data import prepare
    from launcher.model import check_available, load_tokenizer
    from launcher.registry import DataError
    from launcher.templates import TemplateError
    from launcher.validate import validate

    register_configs()
    try:
        with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3"):
            HydraConfig.instance().set_config(compose("config", overrides=args.overrides, return_hydra_config=True))
            cfg = to_object(compose("config", overrides=args.overrides))
        validate(cfg)
        check_available(cfg.model)
        import datasets
        import transformers

        transformers.utils.logging.set_verbosity_error()
        tokenizer = load_tokenizer(cfg.model)
        data_path, stats, hit = prepare(cfg.dataset, cfg.template, tokenizer, resolve_path(cfg.model.name_or_path),
                                        cfg.train.seed)
        datasets.disable_progress_bars()
    except (HydraException, OmegaConfBaseException, ConfigError, DataError, TemplateError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    print(("reused cached data" if hit else "prepared data") + f" (template {cfg.template.name}, "
          f"cutoff_len {cfg.dataset.cutoff_len})", file=sys.stderr)
    sys.stdout.write(report(data_path, stats, tokenizer, cfg.dataset.cutoff_len, args.samples, color))
    return 0


if __name__ == "__main__":
    sys.exit(main())
