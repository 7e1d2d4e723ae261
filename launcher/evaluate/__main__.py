"""``python -m launcher.evaluate <merged folder | run dir | checkpoint> [--base] [key=value ...]``: answer the
held-out prompts with a finished model and score them, as training does (launcher/evaluate/generation.py).

The run's ``config.yaml`` gives the template, the data folder and the ``eval.generate`` settings; ``key=value``
arguments override the latter (with or without the ``eval.generate.`` prefix)::

    python -m launcher.evaluate outputs/tiny_llama-full/2026-11-23_12-00-00            # its last checkpoint
    python -m launcher.evaluate outputs/.../2026-11-23_12-00-00 --base                  # the model before training
    python -m launcher.evaluate outputs/.../merged/step-137 max_samples=50 metrics=[sql_exec]
    python -m launcher.evaluate outputs/.../checkpoints/step-100 datasets=[text2sql_ko_heldout]

A merged folder is evaluated with the settings of the run it came from (its manifest.json names it), or of
``--run RUN_DIR``. It runs in one process (on the GPU if there is one). Results go to
``<run_dir>/evaluate/<base|step-N|merged-NAME>/``: ``eval_generations.jsonl`` (one line per prompt: id, reference,
prediction, metrics) and ``metrics.jsonl`` (the averages); the table is printed. Exit codes: 0 done; 2 a problem
with the input (model, config, data), named in the message.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from launcher.checkpoint import CheckpointError
from launcher.config import Config, ConfigError, GenerateConfig, load_run_config
from launcher.registry import DataError
from launcher.evaluate.generation import (GENERATIONS_FILE, GenerationEval, append_generations, check_config,
                                          load_prompts)
from launcher.export import consolidated_state_dict, find_checkpoint
from launcher.model import load_model, load_tokenizer, materialize
from launcher.templates import Template
from launcher.train import build_model


def say(msg: str) -> None:
    print(f"[evaluate] {msg}", file=sys.stderr, flush=True)


def apply_overrides(base: GenerateConfig, overrides: list[str]) -> GenerateConfig:
    """``key=value`` (or ``eval.generate.key=value``) on top of the run's ``eval.generate``, typed by its schema."""
    bad = [o for o in overrides if "=" not in o]
    keys = ", ".join(GenerateConfig.__dataclass_fields__)
    if bad:
        raise ConfigError(f"{' '.join(bad)}: settings are key=value, e.g. max_samples=50 (keys: {keys}).")
    dotlist = [o.removeprefix("+").removeprefix("eval.generate.") for o in overrides]
    try:
        g = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(base), OmegaConf.from_dotlist(dotlist)))
    except OmegaConfBaseException as err:
        raise ConfigError(f"{str(err).splitlines()[0]} (eval.generate keys: {keys}).") from None
    assert isinstance(g, GenerateConfig)
    return g


def merged_run(folder: Path, run: str | None) -> tuple[Path, int | None]:
    """The run directory a merged folder came from (its manifest, or ``--run``) and its step."""
    manifest = folder / "manifest.json"
    info = json.loads(manifest.read_text()).get("source", {}) if manifest.is_file() else {}
    run_dir = Path(run) if run else Path(info["run_dir"]) if info.get("run_dir") else None
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{folder} does not name a run directory with a config.yaml (no manifest.json from "
                          f"`python -m launcher.merge`, or the run was moved): pass the run whose template and data "
                          f"to use with --run RUN_DIR.")
    return run_dir, info.get("step")


def load_checkpoint_model(cfg: Config, ckpt: Path) -> torch.nn.Module:
    """The trained model of a checkpoint of any backend, in one process (LoRA merged into the base)."""
    model = build_model(cfg, torch.float32, False)
    state = consolidated_state_dict(ckpt)
    missing = {n for n, p in model.named_parameters() if p.requires_grad} - set(state)
    if missing:
        raise CheckpointError(f"{ckpt} lacks {len(missing)} trained weights of this run's model, e.g. "
                              f"{sorted(missing)[0]}: it belongs to another model or is damaged.")
    model.load_state_dict(state, strict=cfg.finetune.method == "full")
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def resolve(path: Path, base: bool, run: str | None) -> tuple[Config, Any, Path, str, int]:
    """(run config, model loader, run directory, output label, step) for a merged folder, run dir or checkpoint."""
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        from launcher.chat import load

        run_dir, step = merged_run(path, run)
        return load_run_config(run_dir), lambda cfg: load(path)[0], run_dir, f"merged-{path.name}", step or 0
    src = find_checkpoint(path)
    if base:
        def load_base(cfg: Config) -> torch.nn.Module:
            materialize(cfg.model)
            return load_model(cfg.model, torch.float32)

        return src.cfg, load_base, src.run_dir, "base", 0
    return src.cfg, lambda cfg: load_checkpoint_model(cfg, src.checkpoint), src.run_dir, f"step-{src.step}", src.step


def run(args: argparse.Namespace) -> int:
    cfg, loader, run_dir, label, step = resolve(Path(args.source).expanduser().resolve(), args.base, args.run)
    cfg.eval.generate = apply_overrides(cfg.eval.generate, args.settings)
    check_config(cfg.eval.generate)
    if not cfg.eval.generate.datasets:
        raise ConfigError("no held-out datasets to answer: pass datasets=[NAME] (an entry of the run's "
                          "dataset_info.json, e.g. text2sql_ko_heldout).")
    template = Template(cfg.template, load_tokenizer(cfg.model))
    prompts = load_prompts(cfg, template)
    out = Path(args.out) if args.out else run_dir / "evaluate" / label
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()
    model = loader(cfg).to(device)
    say(f"{label}: model loaded in {time.time() - t0:.1f}s; answering {len(prompts)} prompts of "
        f"{', '.join(cfg.eval.generate.datasets)}")
    result = GenerationEval(prompts, template, cfg.eval.generate, 0, 1, device, cfg.train.seed).run(model, step)
    assert result is not None
    out.mkdir(parents=True, exist_ok=True)
    (out / GENERATIONS_FILE).unlink(missing_ok=True)
    append_generations(out / GENERATIONS_FILE, result)
    (out / "metrics.jsonl").write_text(json.dumps({"step": step, "model": label, **result.flat()}) + "\n")
    print("\n".join(result.table()), flush=True)
    say(f"{len(result.rows)} answers in {result.seconds:.1f}s ({result.records_per_s:.2f} records/s): "
        f"{out / GENERATIONS_FILE}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launcher.evaluate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("source", help="a merged folder, a run directory (its last checkpoint) or a checkpoint")
    ap.add_argument("settings", nargs="*", help="eval.generate overrides, key=value")
    ap.add_argument("--base", action="store_true", help="evaluate the run's model before training")
    ap.add_argument("--run", help="the run whose template and data a merged folder is evaluated with")
    ap.add_argument("--out", help="output folder (default: <run_dir>/evaluate/<base|step-N|merged-NAME>)")
    args = ap.parse_intermixed_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        return run(args)
    except (ConfigError, DataError, CheckpointError) as err:
        say(f"error: {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
