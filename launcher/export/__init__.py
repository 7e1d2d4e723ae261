"""Export: a training checkpoint -> a verified, deployable Hugging Face model folder.

Three stages, each checkable on its own:

* **Locate and read** (``locate.py``). Find the checkpoint (a run directory's newest complete one, or a
  ``checkpoints/step-N`` folder) and open it with the reader of the backend that wrote it (launcher/backends/:
  DeepSpeed ZeRO-2/3 rank files, FSDP2's torch.distributed.checkpoint folder, the single-process ``state.pt``),
  which gathers one full tensor at a time from memory-mapped files, so nothing holds the whole model; a LoRA
  checkpoint that saved only what it trained gets its frozen base from the base model's safetensors. Before any
  byte is written the checkpoint is checked against the model that ``config.yaml`` describes: a missing rank file,
  a missing or misshapen tensor, a file cut short, or files from different saves is a clear
  :class:`~launcher.checkpoint.CheckpointError`.
* **Write** (``write.py``). Output files are planned by size (``merge.max_shard_size``), then written tensor by
  tensor in the chosen dtype, LoRA deltas added on the way (PEFT's own ``get_delta_weight``), so peak host memory
  stays below one copy of the model in the output dtype (BENCHMARKS.md, "Merge"). Next to the weights:
  ``config.json``, the tokenizer with the training template as ``chat_template``, ``generation_config.json`` whose
  ``eos_token_id`` lists the template's stop words, and ``manifest.json`` (source, step, config hash, parameter
  count, file hashes, verification results). With ``merge.lora=false`` a LoRA run is written as a PEFT adapter
  folder.
* **Verify** (``verify.py``). A fresh interpreter reloads the folder with ``from_pretrained`` and checks it
  against the checkpoint (weights, logits, chat template, a generated reply).

Everything is written into a hidden temporary folder that is renamed into place only after verification passed,
so a failed or interrupted export never leaves a folder that looks complete.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
import transformers

from launcher.config import MergeConfig, resolve_path
from launcher.export.locate import (Source, base_model_dir, consolidated_state_dict, find_checkpoint, open_source,
                                    skeletons, uses_lora)
from launcher.export.verify import VerificationError, peak_rss_mb, run_verification
from launcher.export.write import (MANIFEST, file_hashes, load_lora, make_plan, write_adapter,
                                   write_tokenizer_and_configs, write_weights)

__all__ = ["ExportResult", "VerificationError", "consolidated_state_dict", "export", "find_checkpoint"]


@dataclass
class ExportResult:
    out_dir: Path
    manifest: dict


def default_output(src: Source, mcfg: MergeConfig) -> Path:
    if mcfg.output_dir:
        return resolve_path(mcfg.output_dir)
    kind = "adapter" if uses_lora(src.cfg) and not mcfg.lora else "merged"
    return src.run_dir / kind / f"step-{src.step}"


def export(path: str | Path, mcfg: MergeConfig | None = None, log: Any = print) -> ExportResult:
    """Export the checkpoint at ``path`` (run directory or checkpoint folder); return the final folder and manifest.

    Raises CheckpointError (input problems, nothing written), VerificationError (the written folder failed the checks;
    it is removed)."""
    src = find_checkpoint(path)
    mcfg = mcfg or src.cfg.merge
    final = default_output(src, mcfg)
    t0 = time.time()
    base_dir = base_model_dir(src.cfg)
    trained, base, hf_config = skeletons(src.cfg, base_dir)
    reader = open_source(src, trained, base_dir)
    layout = reader.kind
    plan = make_plan(src.cfg, mcfg, reader, trained, base, hf_config, src.checkpoint)
    if uses_lora(src.cfg) and not plan.adapter_only:
        load_lora(reader, trained, plan.source)
    log(f"merging {src.checkpoint} ({reader.kind}, step {src.step}) -> {final} "
        f"[{str(plan.out_dtype).removeprefix('torch.')}, {plan.parameters:,} parameters"
        f"{', LoRA merged' if uses_lora(src.cfg) and not plan.adapter_only else ''}"
        f"{', adapter only' if plan.adapter_only else ''}]")
    made_parent = not final.parent.exists()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if plan.adapter_only:
            write_adapter(plan, reader, trained, base_dir, tmp)
        else:
            write_weights(plan, reader, trained, tmp, mcfg.max_shard_size, log)
        del reader, trained, base
        gc.collect()
        gen_info = write_tokenizer_and_configs(src.cfg, plan, hf_config, base_dir, tmp)
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():  # safetensors creates 0600 files; a model folder is meant to be shared
            f.chmod(0o666 & ~umask)
        written = time.time() - t0
        manifest = {
            "format": "launcher-export/1",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "source": {"run_dir": str(src.run_dir), "checkpoint": str(src.checkpoint), "step": src.step,
                       "layout": layout},
            "config_sha256": hashlib.sha256((src.run_dir / "config.yaml").read_bytes()).hexdigest(),
            "base_model": str(base_dir),
            "template": src.cfg.template.name,
            "finetune": src.cfg.finetune.method,
            "lora": ("adapter" if plan.adapter_only else "merged") if uses_lora(src.cfg) else None,
            "dtype": str(plan.out_dtype).removeprefix("torch."),
            "parameters": plan.parameters,
            "generation": gen_info,
            "files": file_hashes(tmp),
            "verification": None,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__},
        }
        if mcfg.verify:
            manifest["verification"] = run_verification(src, mcfg, tmp, plan, log)
        manifest["seconds"] = {"write": round(written, 1), "total": round(time.time() - t0, 1)}
        manifest["peak_rss_mb"] = {"export_process": peak_rss_mb(),
                                   "verification_process": (manifest["verification"] or {}).get("peak_rss_mb")}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
        _replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if made_parent and not any(final.parent.iterdir()):
            final.parent.rmdir()
        raise
    return ExportResult(final, manifest)


def _replace(tmp: Path, final: Path) -> None:
    """Move the finished folder into place; an older export at the same path is replaced only now."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

