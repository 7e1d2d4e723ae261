"""Write an export: plan the output tensors (names, shapes, dtype, shards) from the checkpoint and the model
skeletons, then write them tensor by tensor (LoRA deltas added by PEFT's own layers), with config.json,
generation_config.json and the tokenizer carrying the training template as ``chat_template``.
"""

from __future__ import annotations

import gc
import hashlib
import json
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from transformers import AutoModelForCausalLM, GenerationConfig

from launcher.backends.base import Reader
from launcher.chat_jinja import to_jinja
from launcher.checkpoint import CheckpointError
from launcher.config import Config, ConfigError, MergeConfig
from launcher.export.locate import base_name, check_complete, is_adapter, lora_layers, tied_groups, uses_lora
from launcher.model import load_tokenizer
from launcher.templates import Template

MANIFEST = "manifest.json"


@dataclass
class ExportPlan:
    """What the export writes and from where."""

    out_dtype: torch.dtype
    adapter_only: bool
    # output tensor name -> (checkpoint tensor name, LoRA layer module name or "")
    tensors: dict[str, tuple[str, str]] = field(default_factory=dict)
    shapes: dict[str, torch.Size] = field(default_factory=dict)  # output tensor name -> shape
    source: dict[str, str] = field(default_factory=dict)  # training module name -> checkpoint name
    parameters: int = 0  # parameters of the exported model (tied ones once)


def make_plan(cfg: Config, mcfg: MergeConfig, reader: Reader, trained: torch.nn.Module, base: torch.nn.Module,
              hf_config: Any, where: Path) -> ExportPlan:
    source = check_complete(reader, trained, where)
    lora = uses_lora(cfg)
    plan = ExportPlan(out_dtype=output_dtype(mcfg, hf_config), adapter_only=lora and not mcfg.lora, source=source)
    layers = lora_layers(trained)
    shapes = reader.shapes()
    if plan.adapter_only:
        names = [n for n in trained.state_dict() if is_adapter(n)]
        plan.tensors = {n: (source[n], "") for n in names}
        plan.shapes = {n: shapes[source[n]] for n in names}
        plan.parameters = sum(p.numel() for p in trained.parameters())
        return plan
    # Output names are the base model's: a LoRA-wrapped weight is read from its `.base_layer` and merged; a module
    # in lora_modules_to_save is its trained copy (its frozen `.original_module` is not exported).
    to_train: dict[str, str] = {}
    for name in trained.state_dict():
        if lora and "lora_" in name:
            continue
        out = base_name(name) if lora else name
        if ".original_module." not in name or out not in to_train:
            to_train[out] = name
    base_names = list(base.state_dict())
    dropped = {n for group in tied_groups(base) for n in group[1:]}  # saved once; from_pretrained re-ties
    for out in base_names:
        if out in dropped:
            continue
        if out not in to_train:  # the PEFT naming rule did not hold: a bug, not a user error
            raise RuntimeError(f"no checkpoint tensor maps to {out}")
        train_name = to_train[out]
        layer = train_name.rsplit(".base_layer.", 1)[0] if ".base_layer." in train_name else ""
        plan.tensors[out] = (source[train_name], layer if layer in layers else "")
        plan.shapes[out] = shapes[source[train_name]]
    plan.parameters = sum(p.numel() for p in base.parameters())
    return plan


def output_dtype(mcfg: MergeConfig, hf_config: Any) -> torch.dtype:
    if mcfg.dtype != "auto":
        return getattr(torch, mcfg.dtype)
    d = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) and d.is_floating_point else torch.float32


def load_lora(reader: Reader, trained: torch.nn.Module, source: dict[str, str]) -> None:
    """Put the (small) LoRA tensors into the meta skeleton, so PEFT's layers can compute their deltas."""
    sd = {n: reader.get(s).float() for n, s in source.items() if "lora_" in n}  # small: rank × width
    trained.load_state_dict(sd, strict=False, assign=True)


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


RELEASE_BYTES = 256 << 20  # drop the source's mapped pages after reading this much


def write_safetensors(path: Path, shapes: dict[str, torch.Size], dtype: torch.dtype,
                      produce: Callable[[str], torch.Tensor], metadata: dict[str, str]) -> None:
    """Write one safetensors file tensor by tensor: the header first (every shape is known from the plan), then
    each tensor's bytes as ``produce`` makes it, so only one tensor is in memory at a time. safetensors' own
    ``save_file`` needs all tensors of a file at once; the format is documented and small (8-byte header length,
    JSON header with data offsets, raw little-endian data), and verification reads the files back with the
    safetensors library itself."""
    assert sys.byteorder == "little", "safetensors stores little-endian data"
    size = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, shape in shapes.items():
        n = shape.numel() * size
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # keep the data 8-byte aligned, as safetensors does
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for name, shape in shapes.items():
            t = produce(name)
            if t.shape != shape or t.dtype != dtype:  # the plan and the checkpoint disagree: never write it
                raise RuntimeError(f"{name}: produced {tuple(t.shape)} {t.dtype}, planned {tuple(shape)} {dtype}")
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)


def write_weights(plan: ExportPlan, reader: Reader, trained: torch.nn.Module, out: Path, max_shard_size: str,
                  log: Any = print) -> list[str]:
    """Write the planned tensors as (sharded) safetensors in the output dtype, one tensor in memory at a time."""
    layers = lora_layers(trained)
    meta = {o: torch.empty(plan.shapes[o], dtype=plan.out_dtype, device="meta") for o in plan.tensors}
    split = split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_size,
                                               filename_pattern="model{suffix}.safetensors")
    read = [0]

    def produce(o: str) -> torch.Tensor:
        src, layer = plan.tensors[o]
        t = reader.get(src)
        read[0] += t.numel() * t.element_size()
        if layer:  # W + scale · B·A, computed by PEFT's own layer (fan_in_fan_out, rsLoRA scaling, ...)
            t = t.float() + layers[layer].get_delta_weight("default").float()
        t = t.to(plan.out_dtype)
        if t.numel() == 0 or not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{o} (from {src}) is {'empty' if t.numel() == 0 else 'not finite (NaN/inf)'} in the "
                                  f"checkpoint: training diverged or the file is damaged. Merge an earlier checkpoint.")
        if read[0] >= RELEASE_BYTES:
            reader.release()  # pages of the memory-mapped checkpoint read so far leave this process
            read[0] = 0
        return t

    files = list(split.filename_to_tensors)
    for fname, names in split.filename_to_tensors.items():
        t0 = time.time()
        if hasattr(reader, "prefetch"):
            reader.prefetch([plan.tensors[o][0] for o in names])
        write_safetensors(out / fname, {o: plan.shapes[o] for o in names}, plan.out_dtype, produce,
                          {"format": "pt"})
        gc.collect()
        if len(files) > 1:
            log(f"  wrote {fname} ({len(names)} tensors, {time.time() - t0:.1f}s)")
    if split.is_sharded:
        index = {"metadata": {**split.metadata}, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        files.append("model.safetensors.index.json")
    return files


def write_adapter(plan: ExportPlan, reader: Reader, trained: torch.nn.Module, base_dir: Path | str, out: Path) -> None:
    """``merge.lora=false``: the adapter alone, written by PEFT itself (adapter_config.json + safetensors)."""
    sd = {n: reader.get(src).to(plan.out_dtype) for n, (src, _) in plan.tensors.items()}
    trained.load_state_dict(sd, strict=False, assign=True)
    for c in trained.peft_config.values():
        c.base_model_name_or_path = str(base_dir)
    trained.save_pretrained(str(out), safe_serialization=True)


def stop_token_ids(tokenizer: Any, stop_words: list[str], where: str) -> list[int]:
    vocab = tokenizer.get_vocab()
    missing = [w for w in stop_words if w not in vocab]
    if missing:
        raise ConfigError(f"template.stop_words {missing} are not tokens of the tokenizer ({where}): a stop word "
                          f"must be one token, e.g. <|eot_id|> for llama3; fix the template or the tokenizer.")
    return [vocab[w] for w in stop_words]


def write_tokenizer_and_configs(cfg: Config, plan: ExportPlan, hf_config: Any, base_dir: Path | str, out: Path) -> dict:
    """config.json, generation_config.json and the tokenizer with the training template as chat_template."""
    tokenizer = load_tokenizer(cfg.model)
    original_eos = tokenizer.eos_token_id
    # bos/eos are baked into the Jinja text as literal tokens, so replacing the eos below does not change it.
    tokenizer.chat_template = to_jinja(Template(cfg.template, tokenizer))
    stops = stop_token_ids(tokenizer, list(cfg.template.stop_words), str(base_dir))
    if cfg.template.replace_eos and cfg.template.stop_words:
        tokenizer.eos_token = cfg.template.stop_words[0]  # `generate` with the bare tokenizer stops at a turn end
    tokenizer.save_pretrained(str(out))
    try:
        gen = GenerationConfig.from_pretrained(base_dir)
    except OSError:
        gen = GenerationConfig.from_model_config(hf_config)
    old = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    eos = list(dict.fromkeys([*stops, tokenizer.eos_token_id, original_eos, *old]))
    gen.eos_token_id = [e for e in eos if e is not None]
    gen.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    gen.save_pretrained(str(out))
    if not plan.adapter_only:
        hf_config.dtype = plan.out_dtype
        hf_config.architectures = hf_config.architectures or [type_name(hf_config)]
        hf_config.save_pretrained(str(out))
    return {"eos_token_id": gen.eos_token_id, "stop_words": list(cfg.template.stop_words)}


def type_name(hf_config: Any) -> str:
    return AutoModelForCausalLM._model_mapping[type(hf_config)].__name__


def file_hashes(folder: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            h = hashlib.sha256()
            with p.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
            out[str(p.relative_to(folder))] = {"sha256": h.hexdigest(), "bytes": p.stat().st_size}
    return out

