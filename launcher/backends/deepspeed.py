"""DeepSpeed ZeRO (stage 2 or 3, optional offload), configured by a JSON in ds_configs/ whose "auto" values are
filled from the Hydra config. Workers are started by the real ``deepspeed`` CLI (one node's workers per launcher;
``--no_ssh`` with a placeholder hostfile for several nodes).

Checkpoints keep DeepSpeed's own layout, tag = ``step-N`` (for LoRA only the trained parameters, the frozen base
being ``model.name_or_path``): ``mp_rank_00_model_states.pt`` and ``zero_pp_rank_R_mp_rank_00_optim_states.pt``
(+ ``zero_pp_rank_R_mp_rank_00_model_states.pt`` with ZeRO-3). ``deepspeed.utils.zero_to_fp32`` consolidates them;
:class:`ZeroReader` reads them lazily for the merge.

``deepspeed`` itself is imported only where it is used (worker start, checkpoint reading): the launcher process
imports this module for the command, the config checks and the memory model, and importing DeepSpeed costs
seconds there.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoConfig

from launcher.backends.base import (BackendKind, MakeModel, ProcessGroupMixin, Reader, cli, collective_timeout,
                                    config_file_problems, load_pt, make_optimizer, trainable)
from launcher.checkpoint import CheckpointError
from launcher.config import Config, ConfigError, resolve_path
from launcher.model import compute_dtype, model_dir
from launcher.planner import MemoryPlan, ModelShape
from launcher.safe_load import guard_deepspeed
from launcher.worker import remove_shm_buffers

if TYPE_CHECKING:
    from launcher.runspec import RunSpec

DS_SHM_BUFFER = 66 * 2**20  # deepspeed/ops/csrc/cpu/comm/shm.cpp: 2 × 1 MiB + 2 × 32 MiB per rank


# The smallest "auto" gradient-reduce bucket, in elements (200 MB of float32 gradients, a tenth of DeepSpeed's own
# default). Hugging Face's rule, hidden², gives a small model tiny buckets: the tiny Llama's 65,536 elements made ~80
# reductions per step, latency-bound (ZeRO-3 × 2 on CPU: 3,005-3,468 tokens/s against 3,847-3,946 with 5e7).
MIN_REDUCE_BUCKET = 50_000_000


def auto_buckets(hidden_size: int) -> dict[str, int]:
    """The bucket sizes that fill "auto" entries of ``zero_optimization``: Hugging Face's rules from the hidden size
    (what LLaMA-Factory and the HF Trainer use), with the reduce bucket never below :data:`MIN_REDUCE_BUCKET`."""
    return {"reduce_bucket_size": max(hidden_size * hidden_size, MIN_REDUCE_BUCKET),
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size}


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
    derived = {("zero_optimization", k): v for k, v in auto_buckets(hidden_size).items()} if hidden_size else {}
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
        import deepspeed  # see the module docstring

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
        import deepspeed  # see the module docstring
        from transformers.integrations import HfDeepSpeedConfig  # imports deepspeed

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

    def generating(self, model: torch.nn.Module) -> AbstractContextManager:
        # ZeRO-3 gathers each module's parameters in its forward, wherever it is called from. Sequence parallelism
        # splits training rows over ranks; generation runs each rank's prompts whole.
        if self.cfg.parallel.sequence > 1:
            from launcher.sequence import whole_sequences

            return whole_sequences()
        return nullcontext()

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
        guard_deepspeed(self.engine)  # its loader would unpickle anything
        path, _ = self.engine.load_checkpoint(
            str(directory.parent), tag=directory.name, load_module_strict=self.cfg.finetune.method == "full",
            load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {directory}")


# --------------------------------------------------------------------------------------------- offline reading
def _natural(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def take(parts: list[torch.Tensor], start: int, length: int) -> torch.Tensor:
    """Elements [start, start+length) of the concatenation of 1-D ``parts``, copying only what spans parts."""
    pieces, pos = [], 0
    for part in parts:
        n = part.numel()
        lo, hi = max(start, pos), min(start + length, pos + n)
        if lo < hi:
            pieces.append(part[lo - pos:hi - pos])
        pos += n
        if pos >= start + length:
            break
    if sum(p.numel() for p in pieces) != length:
        raise IndexError(f"elements {start}..{start + length} lie beyond the partitions ({pos} elements)")
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


class ZeroReader:
    """DeepSpeed ZeRO-2/3: float32 master partitions from every rank's ``*_optim_states.pt``, frozen parameters
    (if saved) from ``*_model_states.pt``. The same reconstruction as DeepSpeed's ``zero_to_fp32`` (the tests
    compare them), but lazy: a tensor is gathered when asked for, from memory-mapped files, where DeepSpeed's
    own consolidation holds the whole float32 model (twice over, for ZeRO-2)."""

    def __init__(self, ckpt: Path):
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # say it, instead of DeepSpeed warning that it guessed
        self.ckpt = ckpt
        self.model_files = sorted(ckpt.glob("*_model_states.pt"), key=_natural)
        self.optim_files = sorted(ckpt.glob("*_optim_states.pt"), key=_natural)
        if not self.model_files:
            files = ", ".join(sorted(p.name for p in ckpt.iterdir())) or "none"
            raise CheckpointError(f"{ckpt} has no *_model_states.pt file, so it is not a complete DeepSpeed "
                                  f"checkpoint (files there: {files}).")
        self._shapes: dict[str, torch.Size] = {}
        self._getters: dict[str, Any] = {}
        self._open()

    def _open(self) -> None:
        from deepspeed.checkpoint import constants as C  # see the module docstring

        ckpt = self.ckpt
        states = [load_pt(f) for f in self.model_files]
        world = int(states[0].get("dp_world_size") or 1)
        if not self.optim_files:
            raise CheckpointError(f"{ckpt} has no *_optim_states.pt files: the float32 weights of a DeepSpeed "
                                  f"checkpoint live there, one file per rank ({world} expected).")
        self._missing_ranks(self.optim_files, world, "optim_states")
        optim = [load_pt(f)["optimizer_state_dict"] for f in self.optim_files]
        self.stage = int(optim[0][C.ZERO_STAGE])
        self.kind = f"DeepSpeed ZeRO-{self.stage} ({world} ranks)"
        if self.stage == 3:
            self._missing_ranks(self.model_files, world, "model_states")
        steps = {s.get("global_steps") for s in states}
        if len(steps) > 1:
            raise CheckpointError(f"{ckpt}: the rank files come from different saves (steps {sorted(steps)}); the "
                                  f"folder was overwritten partially. Merge another checkpoint of this run.")
        first = states[0]
        for name in first.get(C.BUFFER_NAMES, []):
            self._add(name, first["module"][name].shape, lambda n=name: first["module"][n])
        frozen = first.get(C.FROZEN_PARAM_SHAPES) or {}
        for name, shape in frozen.items():
            if self.stage == 3:  # each rank holds a 1/world slice, the last one padded
                frags = [s[C.FROZEN_PARAM_FRAGMENTS][name] for s in states]
                self._add(name, shape, lambda f=frags, s=shape: torch.cat(f)[: s.numel()].view(s))
            else:
                self._add(name, shape, lambda n=name, s=shape: first[C.FROZEN_PARAM_FRAGMENTS][n].view(s))
        groups = first[C.PARAM_SHAPES]
        if self.stage == 3:
            self._index_zero3(groups, [o[C.FP32_FLAT_GROUPS] for o in optim], world)
        else:
            self._index_zero2(groups, [o[C.SINGLE_PARTITION_OF_FP32_GROUPS] for o in optim],
                              optim[0].get(C.PARAM_ALIGNMENT_PADDINGS), world)
        for alias, source in (first.get("shared_params") or {}).items():
            if source in self._shapes:
                self._add(alias, self._shapes[source], self._getters[source])

    def _missing_ranks(self, files: list[Path], world: int, what: str) -> None:
        ranks = {int(m.group(1)) for f in files if (m := re.search(r"zero_pp_rank_(\d+)_", f.name))}
        missing = sorted(set(range(world)) - ranks)
        if missing or len(files) != world:
            names = ", ".join(f"zero_pp_rank_{r}_mp_rank_00_{what}.pt" for r in missing) or "(extra files)"
            raise CheckpointError(f"{self.ckpt} was written by {world} ranks but holds {len(files)} *_{what}.pt "
                                  f"file(s); missing: {names}. A rank did not finish saving or a file was deleted; "
                                  f"merge another checkpoint of this run.")

    def _add(self, name: str, shape: Any, getter: Any) -> None:
        self._shapes[name] = torch.Size(shape)
        self._getters[name] = getter

    def _index_zero3(self, groups: list[dict], flat: list[list[torch.Tensor]], world: int) -> None:
        offset = 0
        for shapes in groups:
            for name, shape in shapes.items():
                numel = torch.Size(shape).numel()
                part = -(-numel // world)  # every rank holds ceil(numel / world) elements of each parameter
                self._add(name, shape, lambda o=offset, p=part, s=torch.Size(shape):
                          torch.cat([take(r, o, p) for r in flat])[: s.numel()].view(s))
                offset += part
        avail = sum(t.numel() for t in flat[0])
        if offset != avail:
            raise CheckpointError(f"{self.ckpt}: the parameter list needs {offset} elements per rank but the rank "
                                  f"files hold {avail}; the files do not belong together. Merge another checkpoint.")

    def _index_zero2(self, groups: list[dict], parts: list[list[torch.Tensor]], paddings: Any, world: int) -> None:
        for g, shapes in enumerate(groups):
            group_parts = [p[g] for p in parts]  # each rank's slice of this group's flat vector
            offset = 0
            for i, (name, shape) in enumerate(shapes.items()):
                numel = torch.Size(shape).numel()
                self._add(name, shape, lambda gp=group_parts, o=offset, s=torch.Size(shape):
                          take(gp, o, s.numel()).view(s))
                offset += numel + (paddings[g][i] if paddings is not None else 0)
            avail = sum(p.numel() for p in group_parts)
            align = 2 * world  # ZeRO-2 pads each group to a multiple of 2 × world size
            if -(-offset // align) * align != -(-avail // align) * align:
                raise CheckpointError(f"{self.ckpt}: parameter group {g} needs {offset} elements but the rank "
                                      f"files hold {avail}; the files do not belong together. Merge another "
                                      f"checkpoint.")

    def shapes(self) -> dict[str, torch.Size]:
        return dict(self._shapes)

    def get(self, name: str) -> torch.Tensor:
        if not self._getters:
            self._open()
        return self._getters[name]()

    def release(self) -> None:
        self._getters = {}  # the closures hold the mapped files; gc unmaps them


# --------------------------------------------------------------------------------------------- launcher side
def ds_settings(cfg: Config) -> dict[str, Any]:
    """What the memory model needs from the DeepSpeed JSON ("auto" values: DeepSpeed's defaults)."""
    ds = json.loads(resolve_path(cfg.backend.ds_config or "").read_text())
    z = ds.get("zero_optimization", {})
    num = lambda v, d: v if isinstance(v, (int, float)) else d  # noqa: E731
    return {
        "stage": int(z.get("stage", 0)),
        "offload_optimizer": (z.get("offload_optimizer") or {}).get("device", "none") in ("cpu", "nvme"),
        "offload_param": (z.get("offload_param") or {}).get("device", "none") in ("cpu", "nvme"),
        "max_live": num(z.get("stage3_max_live_parameters"), 1e9),
        "reduce_bucket": num(z.get("reduce_bucket_size"), 5e8),
    }


def hostfile(spec: RunSpec) -> Path:
    """The hostfile `deepspeed --no_ssh` insists on for more than one node (without one it refuses with "Num nodes
    is >1 but no extra nodes available via hostfile"). With --no_ssh it only counts nodes and slots: the names are
    never contacted (rendezvous is master_addr:master_port), so placeholders do. Every node writes the same file."""
    path = Path(spec.run_dir) / "deepspeed_hostfile"
    text = "".join(f"node{i} slots={spec.nproc_per_node}\n" for i in range(spec.nnodes))
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


class DeepSpeed(BackendKind):
    name = "deepspeed"
    supports_sequence_parallel = True
    layout = "*_model_states.pt + *_optim_states.pt for DeepSpeed"

    def runtime(self, cfg: Config) -> DeepSpeedBackend:
        return DeepSpeedBackend(cfg)

    def worker_command(self, cfg: Config, spec: RunSpec) -> list[str]:
        cmd = [cli("deepspeed"), "--num_gpus", str(spec.nproc_per_node), "--master_addr", spec.master_addr,
               "--master_port", str(spec.master_port), "--no_local_rank", "--log_level", "warning"]
        if spec.nnodes > 1:
            # Each node's launcher starts only its own workers: no ssh/pdsh between nodes.
            cmd += ["--hostfile", str(hostfile(spec)), "--no_ssh", "--num_nodes", str(spec.nnodes),
                    "--node_rank", str(cfg.launcher.node_rank)]
        return cmd + ["--module", "launcher.worker", spec.run_dir]  # each rank's supervisor: launcher/worker.py

    def worker_env(self, cfg: Config, nproc: int) -> dict[str, str]:
        env = super().worker_env(cfg, nproc)
        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")  # say it, instead of DeepSpeed warning that it guessed
        return env

    def after_workers(self, cfg: Config, spec: RunSpec) -> None:
        """Delete the shared-memory all-reduce buffers DeepSpeed's CPU backend leaves in /dev/shm (66 MiB per
        rank, held in RAM until deleted). They are named after the rendezvous address and port: only this job's go."""
        remove_shm_buffers(spec.master_addr, spec.master_port)

    def config_problems(self, cfg: Config) -> list[str]:
        return super().config_problems(cfg) + config_file_problems(
            "ds_config", cfg.backend.ds_config, "a DeepSpeed JSON, e.g. backend=deepspeed_zero3",
            "a file from ds_configs/")

    def check_config(self, cfg: Config, world_size: int) -> None:
        fill_ds_config(cfg, world_size)

    def memory_plan(self, cfg: Config, shape: ModelShape, b: int, cuda: bool, plan: MemoryPlan) -> MemoryPlan:
        ds = ds_settings(cfg)
        psi, phi, W = shape.params, shape.trainable, plan.world_size
        stage, notes, transient = ds["stage"], [], plan.transient
        opt_w = W if stage >= 1 else 1
        params = b * psi / (W if stage == 3 else 1)
        grads = b * phi / (W if stage >= 2 else 1)
        # float32 master partition (kept even when training in float32), float32 gradient partition, two moments
        optim = (4 + 4 + 8) * phi / opt_w
        if stage == 3:
            # ZeRO-3 gathers each layer for its forward/backward and keeps it while under max_live_parameters.
            params += b * min(psi, ds["max_live"]) * (W - 1) / W
        else:
            transient += min(ds["reduce_bucket"], phi) * b
        host = 0.0
        if ds["offload_optimizer"]:
            host, optim = host + optim, 0.0
            notes.append("optimizer states offloaded to host memory")
        if ds["offload_param"] and stage == 3:
            host += b * psi / W
            params -= b * psi / W
            notes.append("parameter shards offloaded to host memory")
        return replace(plan, strategy=f"DeepSpeed ZeRO-{stage} × {W}", parameters=params, gradients=grads,
                       optimizer=optim, transient=transient,
                       step_temp=0.0 if ds["offload_optimizer"] else 4 * phi / opt_w,
                       # On CPU, DeepSpeed's shared-memory all-reduce maps every rank's buffer into every rank.
                       buffers=0.0 if cuda else DS_SHM_BUFFER * W, host_offload=host, notes=notes)

    def memory_tips(self, cfg: Config, plan: MemoryPlan) -> list[str]:
        if "ZeRO-3" not in plan.strategy:
            return super().memory_tips(cfg, plan)
        if not plan.host_offload:
            return ["a DeepSpeed config with zero_optimization.offload_optimizer.device=cpu (optimizer states "
                    "to host memory)"]
        return []

    def holds(self, ckpt: Path) -> bool:
        return any(ckpt.glob("*_model_states.pt")) or any(ckpt.glob("*_optim_states.pt"))

    def read_checkpoint(self, ckpt: Path) -> Reader:
        return ZeroReader(ckpt)


BACKEND = DeepSpeed()
