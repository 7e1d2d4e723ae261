"""Cross-field checks of a composed config: :func:`validate` gathers every problem into one :class:`ConfigError`.

The schema (launcher/config.py's dataclasses) rejects unknown keys and wrong types when Hydra composes; what needs
more than one field, the data registry or the backend (its ``validate`` hook) is checked here, before anything
runs, and each message names the key and the fix.
"""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards

from launcher import backends
from launcher.attention import SEQUENCE_PARALLEL_ATTENTION
from launcher.config import Config, ConfigError, MergeConfig, OptimizerConfig, resolve_path
from launcher.mixing import problems as mix_problems


def _choice(errors: list[str], key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        errors.append(f"{key}={value!r} is not one of {', '.join(allowed)}.")


def _qlora_problems(cfg: Config) -> list[str]:
    """QLoRA stores the frozen base in 4 bits with bitsandbytes kernels, which exist only for GPUs (whether the
    backend can hold 4-bit weights is the backend's check)."""
    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        return ["finetune.method=qlora needs a CUDA GPU and the bitsandbytes package (pip install bitsandbytes); "
                "this machine has " + ("no CUDA GPU" if not torch.cuda.is_available() else "no bitsandbytes")
                + ". Use finetune=lora instead."]
    return []


def _unknown_datasets(cfg: Config) -> list[str]:
    """Names in dataset.names / eval.datasets that dataset_info.json lacks (a missing or broken registry is
    reported by launcher.data, with its path)."""
    info_path = resolve_path(cfg.dataset.dir) / "dataset_info.json"
    try:
        known = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(known, dict):
        return []
    e = []
    for key, names in (("dataset.names", cfg.dataset.names), ("eval.datasets", cfg.eval.datasets)):
        unknown = [n for n in names if n not in known]
        if unknown:
            fix = " (and dataset.weights with it)" if key == "dataset.names" and cfg.dataset.weights else ""
            e.append(f"{key}: {', '.join(map(repr, unknown))} not in {info_path}, which has "
                     f"{', '.join(sorted(known))}. Fix {key}{fix} or add the entry.")
    return e


def validate(cfg: Config) -> None:
    """Check cross-field rules; raise one ConfigError listing every problem with its fix."""
    e: list[str] = []
    _choice(e, "model.init", cfg.model.init, ("pretrained", "random"))
    _choice(e, "model.dtype", cfg.model.dtype, ("auto", "float32", "bfloat16"))
    _choice(e, "model.attn_implementation", cfg.model.attn_implementation,
            ("auto", "packed", "sdpa", "eager", "flash_attention_2", "flash_attention_3"))
    _choice(e, "finetune.method", cfg.finetune.method, ("full", "lora", "qlora"))
    _choice(e, "dataset.overlong", cfg.dataset.overlong, ("truncate", "drop", "cut_prompt"))
    _choice(e, "dataset.on_error", cfg.dataset.on_error, ("raise", "skip"))
    _choice(e, "train.nonfinite", cfg.train.nonfinite, ("stop", "skip"))
    if cfg.train.nonfinite == "skip" and cfg.backend.name == "deepspeed":
        e.append("train.nonfinite=skip needs backend=single or fsdp: DeepSpeed applies the update before the "
                 "gradient norm is known. Use train.nonfinite=stop and resume from the last good checkpoint.")
    _choice(e, "template.system_position", cfg.template.system_position, ("turn", "first_user", "last_user"))
    e += backends.config_problems(cfg)
    if cfg.backend.timeout_minutes <= 0:
        e.append(f"backend.timeout_minutes={cfg.backend.timeout_minutes} must be positive, e.g. 30.")
    if cfg.finetune.method == "qlora":
        e += _qlora_problems(cfg)
    if cfg.finetune.method in ("lora", "qlora"):
        f = cfg.finetune
        if f.lora_rank < 1:
            e.append(f"finetune.lora_rank={f.lora_rank} must be at least 1, e.g. 8 or 16.")
        if f.lora_alpha <= 0:
            e.append(f"finetune.lora_alpha={f.lora_alpha} must be positive (often twice lora_rank).")
        if not 0 <= f.lora_dropout < 1:
            e.append(f"finetune.lora_dropout={f.lora_dropout} must be in [0, 1).")
        if not f.lora_target:
            e.append("finetune.lora_target is empty: name modules (e.g. [q_proj,v_proj]) or use [all-linear].")
    if cfg.dataset.cutoff_len < 16:
        e.append(f"dataset.cutoff_len={cfg.dataset.cutoff_len} is too small: use at least 16 tokens.")
    if not cfg.dataset.names:
        e.append("dataset.names is empty: name at least one entry of dataset_info.json, "
                 "e.g. dataset.names=[text2sql_ko].")
    e += mix_problems(cfg.dataset) + _unknown_datasets(cfg)
    if cfg.dataset.val_size < 0:
        e.append(f"dataset.val_size={cfg.dataset.val_size} is negative: use a fraction below 1 or a count.")
    for key in ("micro_batch_size", "grad_accum", "log_every"):
        if getattr(cfg.train, key) < 1:
            e.append(f"train.{key}={getattr(cfg.train, key)} must be at least 1.")
    if cfg.parallel.sequence < 1:
        e.append(f"parallel.sequence={cfg.parallel.sequence} must be at least 1.")
    elif cfg.parallel.sequence > 1:  # the backend's part: launcher.backends (config_problems)
        if cfg.model.attn_implementation not in SEQUENCE_PARALLEL_ATTENTION:
            e.append(f"parallel.sequence={cfg.parallel.sequence} needs model.attn_implementation=sdpa or auto (got "
                     f"{cfg.model.attn_implementation!r}): the sequence-parallel attention keeps packed records "
                     f"apart with sdpa and a block-diagonal mask.")
    if cfg.train.loss_chunk_tokens < 0:
        e.append(f"train.loss_chunk_tokens={cfg.train.loss_chunk_tokens} is negative: use a chunk size such as 2048, "
                 f"or 0 for the plain loss over full logits.")
    if cfg.train.max_steps <= 0 and cfg.train.epochs <= 0:
        e.append("train.epochs and train.max_steps are both non-positive: set train.epochs=1 or train.max_steps=N.")
    if cfg.optimizer.lr <= 0:
        e.append(f"optimizer.lr={cfg.optimizer.lr} must be positive, e.g. optimizer.lr=1e-4.")
    _validate_optimizer(cfg.optimizer, e)
    if cfg.launcher.nproc_per_node is not None and cfg.launcher.nproc_per_node < 1:
        e.append(f"launcher.nproc_per_node={cfg.launcher.nproc_per_node} must be at least 1.")
    if cfg.launcher.nnodes > 1 and cfg.launcher.master_port is None:
        e.append("launcher.master_port is unset for a multi-node run: every node must use the same port "
                 "(slurm/train.sh derives one from the job id).")
    if cfg.launcher.preflight_timeout < 1:
        e.append(f"launcher.preflight_timeout={cfg.launcher.preflight_timeout} must be at least 1 second.")
    if not 0 <= cfg.launcher.node_rank < max(cfg.launcher.nnodes, 1):
        e.append(f"launcher.node_rank={cfg.launcher.node_rank} must be below launcher.nnodes={cfg.launcher.nnodes}.")
    if "{{content}}" not in cfg.template.user or "{{content}}" not in cfg.template.assistant:
        e.append(f"template {cfg.template.name!r}: the user and assistant slots must contain {{{{content}}}}.")
    e += validate_merge(cfg.merge)
    _validate_monitoring(cfg, e)
    if e:
        raise ConfigError("Invalid configuration:\n  - " + "\n  - ".join(e))


def validate_merge(m: MergeConfig) -> list[str]:
    """Problems with the ``merge`` section (also checked by ``python -m launcher.merge`` for its overrides)."""
    e: list[str] = []
    _choice(e, "merge.dtype", m.dtype, ("auto", "float32", "bfloat16", "float16"))
    try:
        split_torch_state_dict_into_shards({}, max_shard_size=m.max_shard_size)  # the parser the export uses
    except ValueError:
        e.append(f"merge.max_shard_size={m.max_shard_size!r} is not a size: use e.g. 5GB, 500MB or 100KB.")
    if m.atol <= 0 or m.atol_low_precision <= 0:
        e.append("merge.atol and merge.atol_low_precision must be positive.")
    if m.max_new_tokens < 1:
        e.append(f"merge.max_new_tokens={m.max_new_tokens} must be at least 1.")
    if m.ask.endswith((".json", ".jsonl")) and not resolve_path(m.ask).is_file():
        e.append(f"merge.ask={m.ask!r} does not exist: name a JSON file of held-out records, an entry of "
                 f"dataset_info.json, or merge.ask=''.")
    return e


def _validate_optimizer(o: OptimizerConfig, e: list[str]) -> None:
    """AdamW's own ranges, checked here so that no worker starts only to fail inside torch's optimizer."""
    if len(o.betas) != 2:
        e.append(f"optimizer.betas={list(o.betas)} needs two values, e.g. [0.9,0.999].")
    elif not all(0 <= b < 1 for b in o.betas):
        e.append(f"optimizer.betas={list(o.betas)}: both must be in [0, 1), e.g. [0.9,0.999].")
    if not o.eps > 0:
        e.append(f"optimizer.eps={o.eps} must be positive, e.g. 1e-8.")
    if not o.weight_decay >= 0:
        e.append(f"optimizer.weight_decay={o.weight_decay} must be 0 or positive, e.g. 0.01.")
    if not 0 <= o.min_lr_ratio <= 1:
        e.append(f"optimizer.min_lr_ratio={o.min_lr_ratio} must be in [0, 1] (the final learning rate as a "
                 f"fraction of optimizer.lr), e.g. 0.1.")
    if not 0 <= o.warmup_ratio < 1:
        e.append(f"optimizer.warmup_ratio={o.warmup_ratio} must be in [0, 1) (the fraction of the run's steps "
                 f"spent warming up), e.g. 0.03.")
    if not o.max_grad_norm >= 0:
        e.append(f"optimizer.max_grad_norm={o.max_grad_norm} must be 0 (no clipping) or positive, e.g. 1.0.")


def _validate_monitoring(cfg: Config, e: list[str]) -> None:
    """Checks for the logger, eval and planner groups."""
    _choice(e, "logger.wandb.mode", cfg.logger.wandb.mode, ("online", "offline"))
    _choice(e, "logger.progress", cfg.logger.progress, ("auto", "bar", "lines"))
    if cfg.logger.peak_flops is not None and cfg.logger.peak_flops <= 0:
        e.append(f"logger.peak_flops={cfg.logger.peak_flops} must be positive (FLOP/s of one device, e.g. 989e12).")
    if cfg.logger.wandb.init_timeout <= 0:
        e.append(f"logger.wandb.init_timeout={cfg.logger.wandb.init_timeout} must be positive seconds.")
    if cfg.eval.steps < 0:
        e.append(f"eval.steps={cfg.eval.steps} is negative: use 0 (evaluate at the end) or N (every N steps).")
    if cfg.eval.micro_batch_size is not None and cfg.eval.micro_batch_size < 1:
        e.append(f"eval.micro_batch_size={cfg.eval.micro_batch_size} must be at least 1 (or null).")
    if cfg.eval.datasets and cfg.dataset.val_size:
        e.append(f"eval.datasets={list(cfg.eval.datasets)} and dataset.val_size={cfg.dataset.val_size} are both "
                 f"set: use one validation source (dataset.val_size=0 to keep every training record).")
    if cfg.eval.steps and not cfg.eval.datasets and not cfg.dataset.val_size:
        e.append(f"eval.steps={cfg.eval.steps} but there is no eval data: set dataset.val_size=0.05 (hold out 5% "
                 f"of the records) or eval.datasets=[NAME] (an entry of dataset_info.json).")
    if not 0 < cfg.planner.usable_fraction <= 1:
        e.append(f"planner.usable_fraction={cfg.planner.usable_fraction} must be in (0, 1].")
