"""DeepSpeed ZeRO (stage 2 or 3, optional offload), configured by a JSON in ds_configs/ whose "auto" values are
filled from the Hydra config. Workers are started by the `deepspeed` CLI (see launcher/__main__.py).

Checkpoints keep DeepSpeed's own layout (consolidate with ``deepspeed.utils.zero_to_fp32``); for LoRA they hold
only the trained parameters, the frozen base being ``model.name_or_path``. See launcher/checkpoint.py.
"""

from __future__ import annotations

import json
import os
import warnings
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from launcher.backends import MakeModel, ProcessGroupMixin, collective_timeout, make_optimizer, trainable
from launcher.config import Config, ConfigError, resolve_path
from launcher.model import compute_dtype


def fill_ds_config(cfg: Config, world_size: int, hidden_size: int | None = None) -> dict[str, Any]:
    """Read ``backend.ds_config`` and replace its "auto" values from the Hydra config.

    An explicit value that contradicts the Hydra config is an error naming both, never silently preferred.
    Bucket sizes derived from ``hidden_size`` are tuning knobs, not Hydra values: only "auto" ones are filled.
    """
    path = resolve_path(cfg.backend.ds_config or "")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}, line {err.lineno}: not valid JSON ({err.msg}).") from None
    t = cfg.train
    bf16 = compute_dtype(cfg.model) == torch.bfloat16
    from_hydra = {
        ("train_micro_batch_size_per_gpu",): (t.micro_batch_size, "train.micro_batch_size"),
        ("gradient_accumulation_steps",): (t.grad_accum, "train.grad_accum"),
        ("train_batch_size",): (t.micro_batch_size * t.grad_accum * world_size,
                                "train.micro_batch_size × train.grad_accum × world size"),
        ("gradient_clipping",): (cfg.optimizer.max_grad_norm, "optimizer.max_grad_norm"),
        ("bf16", "enabled"): (bf16, "model.dtype"),
        ("fp16", "enabled"): (False, "model.dtype (float16 is not supported; use bfloat16)"),
    }
    derived = {}
    if hidden_size:
        derived = {("zero_optimization", "reduce_bucket_size"): hidden_size * hidden_size,
                   ("zero_optimization", "stage3_prefetch_bucket_size"): int(0.9 * hidden_size * hidden_size),
                   ("zero_optimization", "stage3_param_persistence_threshold"): 10 * hidden_size}
    errors = []
    for keys, (value, source) in from_hydra.items():
        node = _node(ds, keys)
        current = node.get(keys[-1], "auto")
        if current == "auto":
            node[keys[-1]] = value
        elif current != value:
            errors.append(f"{'.'.join(keys)}={current!r} in {path} contradicts {source}={value!r}; "
                          f"set it to \"auto\" or change the Hydra value")
    for keys, value in derived.items():
        node = _node(ds, keys)
        if node.get(keys[-1], "auto") == "auto":
            node[keys[-1]] = value
    if "optimizer" in ds or "scheduler" in ds:
        errors.append(f"{path} defines its own optimizer/scheduler; remove them: the launcher builds AdamW and "
                      f"the warmup+cosine schedule from the `optimizer` config group")
    if errors:
        raise ConfigError("DeepSpeed config problems:\n  - " + "\n  - ".join(errors))
    if cfg.parallel.sequence > 1:
        # DeepSpeed checks the batch size against the world twice: zero.Init counts every rank, the engine (given
        # the sequence-parallel groups) data-parallel ranks only. Left out, it is derived in both.
        del ds["train_batch_size"]
    # The launcher's AdamW works with offload too; DeepSpeed otherwise insists on its own compiled CPU Adam.
    ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds


def _node(ds: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The dict that holds ``keys[-1]`` (created if missing)."""
    for k in keys[:-1]:
        ds = ds.setdefault(k, {})
    return ds


class DeepSpeedBackend(ProcessGroupMixin):
    def __init__(self, cfg: Config):
        import deepspeed

        # DeepSpeed calls torch collectives that torch 2.13 deprecates; every rank would print the same warnings,
        # which no user of this launcher can act on.
        warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
        self.cfg = cfg
        cuda = torch.cuda.is_available()
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=collective_timeout(cfg))
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", 0))
        if cuda:
            torch.cuda.set_device(local)
        self.device = torch.device(f"cuda:{local}" if cuda else "cpu")
        self.mpu = None
        if cfg.parallel.sequence > 1:  # rows split over groups of ranks (launcher/sequence.py)
            from launcher.sequence import setup

            self.mpu = setup(cfg)

    def build(self, make_model: MakeModel, total_steps: int) -> torch.nn.Module:
        import deepspeed
        from transformers import AutoConfig
        from transformers.integrations import HfDeepSpeedConfig

        from launcher.model import model_dir

        hf_cfg = AutoConfig.from_pretrained(model_dir(self.cfg.model))
        self.ds_config = fill_ds_config(self.cfg, self.world_size, getattr(hf_cfg, "hidden_size", None))
        # While this object lives, from_pretrained builds the model under zero.Init: each rank materialises only
        # its shard, so host memory holds about one copy of the model, not one per rank.
        self._hf_ds = HfDeepSpeedConfig(self.ds_config)
        # DeepSpeed keeps the weights in the compute dtype and float32 masters inside its optimizer.
        model = make_model(compute_dtype(self.cfg.model), False)
        opt, sched = make_optimizer(self.cfg, trainable(model), total_steps)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                               config=self.ds_config, mpu=self.mpu)
        return self.engine

    def autocast(self) -> AbstractContextManager:
        return nullcontext()  # the engine runs the module in its own dtype

    def backward(self, loss: torch.Tensor) -> None:
        # The loop normalises by the step's supervised-token count itself; DeepSpeed must not divide by grad_accum.
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()  # a no-op until the gradient-accumulation boundary

    def step(self) -> float:
        # engine.step() already ran at the boundary inside backward(); nothing left but to report.
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def param_counts(self) -> tuple[int, int]:
        params = list(self.engine.module.parameters())
        if hasattr(params[0], "ds_tensor"):  # ZeRO-3: each rank holds a partition of every parameter
            return sum(p.ds_tensor.numel() for p in params), sum(p.ds_numel for p in params)
        n = sum(p.numel() for p in params)
        return n, n

    def save(self, directory: Path) -> None:
        # The tag is the directory name, so the layout is DeepSpeed's own: zero_to_fp32 consolidates it.
        # save_latest=False: the `latest` file would name the temporary directory.
        self.engine.save_checkpoint(str(directory.parent), tag=directory.name, save_latest=False,
                                    exclude_frozen_parameters=self.cfg.finetune.method != "full")

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(directory.parent), tag=directory.name, load_module_strict=self.cfg.finetune.method == "full",
            load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {directory}")
