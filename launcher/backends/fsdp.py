"""PyTorch FSDP2 (``fully_shard``) set up by Accelerate, started with ``accelerate launch`` and the file named by
``backend.accelerate_config`` (accelerate_configs/fsdp2.yaml: full shard, one unit per decoder layer).

Accelerate turns the config file into ``FSDP_*`` environment variables and a :class:`FullyShardedDataParallelPlugin`;
its ``fsdp2_prepare_model`` wraps the decoder layers and, with ``fsdp_cpu_ram_efficient_loading``, lets rank 0
alone read the weights (the other ranks build the model on the meta device) and broadcast each shard. The optimizer
is created afterwards on the sharded parameters, and checkpoints are torch.distributed.checkpoint (DCP) directories
(layout in launcher/checkpoint.py).

On a machine without GPUs Accelerate forms a gloo process group but does not enable FSDP (it would train with each
rank holding the whole model); torch FSDP2 itself works with gloo on CPU, so the plugin is installed by hand there.
:meth:`FSDPBackend.build` checks that every parameter really is sharded, so this can never degrade silently.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import torch

from launcher.backends import (MakeModel, ProcessGroupMixin, clip_and_step, collective_timeout, make_optimizer,
                               trainable)
from launcher.config import Config, ConfigError
from launcher.model import compute_dtype


def check_accelerate_config(path: Path) -> None:
    """Refuse an Accelerate config this backend would not honour (the launcher calls this before any worker)."""
    from omegaconf import OmegaConf

    try:
        acc = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as err:  # YAML syntax errors name the line themselves
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    fsdp = acc.get("fsdp_config") or {}
    wanted = {"distributed_type": (acc.get("distributed_type"), "FSDP"),
              "fsdp_config.fsdp_version": (fsdp.get("fsdp_version"), 2),
              "fsdp_config.fsdp_state_dict_type": (fsdp.get("fsdp_state_dict_type", "SHARDED_STATE_DICT"),
                                                   "SHARDED_STATE_DICT")}
    errors = [f"{key}: {have!r} in {path} must be {want!r} for backend=fsdp (FSDP2 with sharded DCP checkpoints; "
              f"`python -m launcher.merge` writes the full model)" for key, (have, want) in wanted.items()
              if str(have) != str(want)]
    if str(acc.get("use_cpu", False)).lower() == "true":
        errors.append(f"use_cpu: true in {path}: Accelerate would then not shard at all; remove it (the backend "
                      f"runs FSDP2 on CPU by itself when there is no GPU)")
    if errors:
        raise ConfigError("Accelerate config problems:\n  - " + "\n  - ".join(errors))


class FSDPBackend(ProcessGroupMixin):
    def __init__(self, cfg: Config):
        from accelerate import Accelerator, FullyShardedDataParallelPlugin
        from accelerate.utils import DistributedType, InitProcessGroupKwargs
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() != "true":
            raise RuntimeError("backend=fsdp workers must be started by `accelerate launch` with an FSDP config "
                               "file; `python -m launcher backend=fsdp` does that.")
        self.cfg = cfg
        plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables `accelerate launch` set
        if plugin.fsdp_version != 2:
            raise RuntimeError(f"{cfg.backend.accelerate_config} asks for fsdp_version {plugin.fsdp_version}; "
                               f"this backend runs FSDP2 only (fsdp_version: 2).")
        self.dtype = compute_dtype(cfg.model)
        if self.dtype != torch.float32:
            # Compute in bf16, but reduce gradients and keep masters in float32 (bf16 sums lose too much).
            plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32)
        cuda = torch.cuda.is_available()
        self.acc = Accelerator(cpu=not cuda, fsdp_plugin=plugin,
                               kwargs_handlers=[InitProcessGroupKwargs(timeout=collective_timeout(cfg))])
        state = self.acc.state
        if not cuda and state.distributed_type == DistributedType.MULTI_CPU:
            state.distributed_type = DistributedType.FSDP  # see the module docstring
            state.fsdp_plugin = plugin
        if state.distributed_type != DistributedType.FSDP or not self.acc.is_fsdp2:
            raise RuntimeError(f"Accelerate set up {state.distributed_type}, not FSDP2: refusing to train unsharded.")
        self.plugin = plugin
        self.rank, self.world_size, self.device = self.acc.process_index, self.acc.num_processes, self.acc.device

    def build(self, make_model: MakeModel, total_steps: int) -> torch.nn.Module:
        from accelerate.utils import fsdp2_apply_ac, fsdp2_prepare_model
        from torch.distributed.tensor import DTensor

        # float32 masters; with cpu_ram_efficient_loading only rank 0 reads the weights.
        empty = bool(self.plugin.cpu_ram_efficient_loading) and self.rank != 0
        model = make_model(torch.float32, empty)
        if self.plugin.activation_checkpointing:  # fsdp_activation_checkpointing in the Accelerate config
            model = fsdp2_apply_ac(self.acc, model)
        model = fsdp2_prepare_model(self.acc, model)
        unsharded = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
        if unsharded:
            raise RuntimeError(f"FSDP2 left {len(unsharded)} parameters unsharded, e.g. {unsharded[0]}")
        self.model = model
        # Created after sharding, so it holds (and its state is) this rank's shards only.
        self.opt, self.sched = make_optimizer(self.cfg, trainable(model), total_steps)
        return model

    @contextmanager
    def generating(self, model: torch.nn.Module) -> Iterator[None]:
        """FSDP2 gathers the root's own parameters (embeddings, norm, head) in the root's forward, which a wrapped
        model's ``generate`` bypasses (PEFT calls the inner model): hold them gathered while generating. The
        decoder layers gather their own in their forwards as usual."""
        state = model._get_fsdp_state()
        state._lazy_init()  # the root must be initialised as root before any inner module runs forward
        model.unshard()
        try:
            yield
        finally:
            model.reshard()

    def autocast(self) -> AbstractContextManager:
        return nullcontext()  # FSDP2's MixedPrecisionPolicy casts the gathered parameters itself

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()  # FSDP2 reduce-scatters (averages) the gradients of each unit as backward passes it

    def step(self) -> float:
        return clip_and_step(self.cfg, self.model, self.opt, self.sched)

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def param_counts(self) -> tuple[int, int]:
        params = list(self.model.parameters())
        return sum(p.to_local().numel() for p in params), sum(p.numel() for p in params)

    def _options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # LoRA: the frozen base is on disk already (model.name_or_path); save and restore the adapters only.
        lora = self.cfg.finetune.method != "full"
        return StateDictOptions(ignore_frozen_params=lora, strict=not lora)

    def save(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        opts = self._options()
        dcp.save(get_model_state_dict(self.model, options=opts), checkpoint_id=str(directory / "model"))
        dcp.save(get_optimizer_state_dict(self.model, self.opt, options=opts),
                 checkpoint_id=str(directory / "optimizer"))
        if self.rank == 0:
            torch.save(self.sched.state_dict(), directory / "scheduler.pt")

    def load(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict)

        opts = self._options()
        model_sd = get_model_state_dict(self.model, options=opts)
        dcp.load(model_sd, checkpoint_id=str(directory / "model"))
        set_model_state_dict(self.model, model_sd, options=opts)
        # get_optimizer_state_dict creates the AdamW state (with a zero-lr step) so DCP has tensors to fill.
        optim_sd = get_optimizer_state_dict(self.model, self.opt, options=opts)
        dcp.load(optim_sd, checkpoint_id=str(directory / "optimizer"))
        set_optimizer_state_dict(self.model, self.opt, optim_sd, options=opts)
        self.sched.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
