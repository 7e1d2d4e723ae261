"""PyTorch FSDP2 (``fully_shard``) set up by Accelerate, started with ``accelerate launch`` and the file named by
``backend.accelerate_config`` (accelerate_configs/fsdp2.yaml: full shard, one unit per decoder layer).

Accelerate turns the config file into ``FSDP_*`` environment variables and a :class:`FullyShardedDataParallelPlugin`;
its ``fsdp2_prepare_model`` wraps the decoder layers and, with ``fsdp_cpu_ram_efficient_loading``, lets rank 0
alone read the weights (the other ranks build the model on the meta device) and broadcast each shard. The optimizer
is created afterwards on the sharded parameters.

Checkpoints are torch.distributed.checkpoint (DCP) directories, sharded by rank, keyed by the parameter names of
the unwrapped (PEFT) model, float32: ``model/`` and ``optimizer/`` (``.metadata`` + ``__R_0.distcp``; for LoRA only
the trained parameters) and ``scheduler.pt``. :class:`DcpReader` reads ``model/`` for the merge, in one process.

On a machine without GPUs Accelerate forms a gloo process group but does not enable FSDP (it would train with each
rank holding the whole model); torch FSDP2 itself works with gloo on CPU, so the plugin is installed by hand there.
:meth:`FSDPBackend.build` checks that every parameter really is sharded, so this can never degrade silently.
"""

from __future__ import annotations

import os
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.utils import DistributedType, InitProcessGroupKwargs, fsdp2_apply_ac, fsdp2_prepare_model
from omegaconf import OmegaConf
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

from launcher.backends.base import (BackendKind, MakeModel, ProcessGroupMixin, Reader, cli, clip_and_step,
                                    collective_timeout, config_file_problems, damaged, make_optimizer, trainable)
from launcher.checkpoint import CheckpointError
from launcher.config import Config, ConfigError, resolve_path
from launcher.model import compute_dtype
from launcher.planner import MemoryPlan, ModelShape
from launcher.safe_load import SafePlanner, SafeReader, torch_load

if TYPE_CHECKING:
    from launcher.runspec import RunSpec


def check_accelerate_config(path: Path) -> None:
    """Refuse an Accelerate config this backend would not honour (the launcher calls this before any worker)."""
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

    def _options(self) -> StateDictOptions:
        # LoRA: the frozen base is on disk already (model.name_or_path); save and restore the adapters only.
        lora = self.cfg.finetune.method != "full"
        return StateDictOptions(ignore_frozen_params=lora, strict=not lora)

    def save(self, directory: Path) -> None:
        opts = self._options()
        dcp.save(get_model_state_dict(self.model, options=opts), checkpoint_id=str(directory / "model"))
        dcp.save(get_optimizer_state_dict(self.model, self.opt, options=opts),
                 checkpoint_id=str(directory / "optimizer"))
        if self.rank == 0:
            torch.save(self.sched.state_dict(), directory / "scheduler.pt")

    def load(self, directory: Path) -> None:
        opts = self._options()
        model_sd = get_model_state_dict(self.model, options=opts)
        dcp.load(model_sd, storage_reader=SafeReader(directory / "model"), planner=SafePlanner())
        set_model_state_dict(self.model, model_sd, options=opts)
        # get_optimizer_state_dict creates the AdamW state (with a zero-lr step) so DCP has tensors to fill.
        optim_sd = get_optimizer_state_dict(self.model, self.opt, options=opts)
        dcp.load(optim_sd, storage_reader=SafeReader(directory / "optimizer"), planner=SafePlanner())
        set_optimizer_state_dict(self.model, self.opt, optim_sd, options=opts)
        self.sched.load_state_dict(torch_load(directory / "scheduler.pt", where=directory / "scheduler.pt"))


class DcpReader:
    """A torch.distributed.checkpoint folder (``step-N/model``: ``.metadata`` + one ``.distcp`` per rank), read by
    DCP's own loader without a process group, a batch of tensors at a time (``prefetch``)."""

    kind = "FSDP2 torch.distributed.checkpoint"

    def __init__(self, folder: Path):
        self.folder = folder
        if not (folder / ".metadata").is_file():
            raise CheckpointError(f"{folder} has no .metadata file, so the sharded (FSDP) save did not finish; "
                                  f"merge another checkpoint of this run.")
        try:
            md = SafeReader(str(folder)).read_metadata()
        except CheckpointError:
            raise
        except Exception as err:
            raise damaged(folder / ".metadata", err) from None
        self._meta = {k: v for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
        need: dict[str, int] = {}
        for info in (md.storage_data or {}).values():
            need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
        missing = sorted(p for p in need if not (folder / p).is_file())
        if missing:
            raise CheckpointError(f"{folder} lacks {', '.join(missing)} (one file per rank): a rank did not finish "
                                  f"saving or a file was deleted; merge another checkpoint of this run.")
        short = sorted(p for p, n in need.items() if (folder / p).stat().st_size < n)
        if short:
            raise CheckpointError(f"{folder / short[0]} is shorter than its index says: the file was cut short (disk "
                                  f"full, or the job was killed while saving). Merge another checkpoint of this run.")
        self._cache: dict[str, torch.Tensor] = {}

    def shapes(self) -> dict[str, torch.Size]:
        return {k: torch.Size(v.size) for k, v in self._meta.items()}

    def prefetch(self, names: list[str]) -> None:
        want = {n: torch.empty(self._meta[n].size, dtype=self._meta[n].properties.dtype)
                for n in names if n not in self._cache}
        if want:
            try:
                with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                    warnings.simplefilter("ignore", UserWarning)
                    dcp.load(want, storage_reader=SafeReader(str(self.folder)), planner=SafePlanner(), no_dist=True)
            except CheckpointError:
                raise
            except Exception as err:
                raise damaged(self.folder, err) from None
            self._cache.update(want)

    def get(self, name: str) -> torch.Tensor:
        self.prefetch([name])
        return self._cache.pop(name)

    def release(self) -> None:
        self._cache.clear()


class FSDP(BackendKind):
    name = "fsdp"
    layout = "model/ for FSDP"

    def runtime(self, cfg: Config) -> FSDPBackend:
        return FSDPBackend(cfg)

    def worker_command(self, cfg: Config, spec: RunSpec) -> list[str]:
        bf16 = compute_dtype(cfg.model) == torch.bfloat16
        # Everything that differs per run goes on the command line; the shipped file holds the FSDP2 settings.
        return [cli("accelerate"), "launch", "--config_file", str(resolve_path(cfg.backend.accelerate_config)),
                "--num_processes", str(spec.world_size), "--num_machines", str(spec.nnodes),
                "--machine_rank", str(cfg.launcher.node_rank), "--main_process_ip", spec.master_addr,
                "--main_process_port", str(spec.master_port), "--mixed_precision", "bf16" if bf16 else "no",
                "--max_restarts", "0", "--module", "launcher.worker", spec.run_dir]

    def worker_env(self, cfg: Config, nproc: int) -> dict[str, str]:
        env = super().worker_env(cfg, nproc)
        # Accelerate would quietly turn FSDP into DDP with this set; the FSDP backend works on CPU without it.
        env.pop("ACCELERATE_USE_CPU", None)
        return env

    def config_problems(self, cfg: Config) -> list[str]:
        return super().config_problems(cfg) + config_file_problems(
            "accelerate_config", cfg.backend.accelerate_config, "an Accelerate config file, e.g. backend=fsdp",
            "accelerate_configs/fsdp2.yaml")

    def check_config(self, cfg: Config, world_size: int) -> None:
        check_accelerate_config(resolve_path(cfg.backend.accelerate_config))

    def memory_plan(self, cfg: Config, shape: ModelShape, b: int, cuda: bool, plan: MemoryPlan) -> MemoryPlan:
        psi, phi, W = shape.params, shape.trainable, plan.world_size
        # float32 shards; while a layer computes, it and the prefetched next one are gathered in the compute dtype,
        # and the root unit (embeddings, head, final norm) stays gathered through forward and backward.
        gathered = b * (2 * shape.largest_layer + psi - shape.layer_params)
        return replace(plan, strategy=f"FSDP2 full shard × {W}", parameters=4 * psi / W + gathered,
                       gradients=4 * phi / W, optimizer=8 * phi / W, step_temp=4 * phi / W)

    def holds(self, ckpt: Path) -> bool:
        return (ckpt / "model").is_dir()

    def read_checkpoint(self, ckpt: Path) -> Reader:
        return DcpReader(ckpt / "model")


BACKEND = FSDP()
