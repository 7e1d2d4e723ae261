"""Export: a training checkpoint -> a verified, deployable Hugging Face model folder.

Three stages, each checkable on its own:

* **Read.** A reader opens whichever layout the backend wrote (DeepSpeed ZeRO-2/3 rank files, FSDP2's
  torch.distributed.checkpoint folder, the single-process ``state.pt``) and gathers one full tensor at a time from
  memory-mapped files, so nothing holds the whole model; a LoRA checkpoint that saved only what it trained gets
  its frozen base from the base model's safetensors. Before any byte is written the checkpoint is checked against
  the model that ``config.yaml`` describes: a missing rank file, a missing or misshapen tensor, a file cut short,
  or files from different saves is a clear :class:`ExportError`.
* **Write.** Output files are planned by size (``merge.max_shard_size``), then written tensor by tensor in the
  chosen dtype, LoRA deltas added on the way (PEFT's own ``get_delta_weight``), so peak host memory stays below
  one copy of the model in the output dtype (BENCHMARKS.md, "Merge"). Next to the weights: ``config.json``, the
  tokenizer with the training template as ``chat_template``, ``generation_config.json`` whose ``eos_token_id``
  lists the template's stop words, and ``manifest.json`` (source, step, config hash, parameter count, file
  hashes, verification results). With ``merge.lora=false`` a LoRA run is written as a PEFT adapter folder.
* **Verify.** A fresh process reloads the folder with ``from_pretrained`` and checks it against the checkpoint:
  every tensor present, none empty or non-finite, the parameter count, logits on fixed probe conversations against
  the training-time module (float32: ``merge.atol``), the chat template against the training template (text and
  token ids), and a generated reply that must stop at the stop word when the model emits it.

Everything is written into a hidden temporary folder that is renamed into place only after verification passed,
so a failed or interrupted export never leaves a folder that looks complete.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from launcher.checkpoint import CheckpointError, checkpoint_dirs, complete_checkpoints, is_complete, step_of
from launcher.config import Config, ConfigError, MergeConfig, load_run_config
from launcher.safe_load import SafePlanner, SafeReader, torch_load

MANIFEST = "manifest.json"
# Fixed probe conversations for verification: the logits of the whole conversation are compared, the first
# prompt is answered by generation. Short, so verification costs little even for a large model.
PROBES: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "직원 테이블에서 나이가 40 이상인 사람 수는?\nCREATE TABLE emp(id INT, age INT);"},
     {"role": "assistant", "content": "SELECT COUNT(*) FROM emp WHERE age >= 40;"}],
    [{"role": "system", "content": "You are a careful assistant."},
     {"role": "user", "content": "Name one prime number."},
     {"role": "assistant", "content": "7"},
     {"role": "user", "content": "And another?"},
     {"role": "assistant", "content": "11"}],
]


class ExportError(Exception):
    """A checkpoint (or output location) problem the user can fix; the message names the file and the fix."""


class VerificationError(Exception):
    """The written folder does not reproduce the checkpoint."""


# ============================================================================================ locating
@dataclass
class Source:
    """One checkpoint of one run, and the run's resolved config."""

    run_dir: Path
    checkpoint: Path
    step: int
    cfg: Config


def find_checkpoint(path: str | Path) -> Source:
    """Resolve a run directory (its latest complete checkpoint) or a ``checkpoints/step-N`` folder."""
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise ExportError(f"{p} does not exist: pass a run directory written by `python -m launcher` "
                          f"(outputs/<name>/<time>) or one of its checkpoints/step-N folders.")
    if (p / "config.yaml").is_file():
        run_dir = p
        steps = checkpoint_dirs(run_dir)
        done = [c for c in steps if is_complete(c)]
        if not done:
            found = ", ".join(f"{c.name} (no COMPLETE marker)" for c in steps) or "no checkpoints/step-N folder"
            raise ExportError(f"{run_dir} has no complete checkpoint to merge (found: {found}). "
                              f"Training writes checkpoints/step-N with a COMPLETE marker when a save finishes; "
                              f"train to the end (or set train.save_steps) and merge again.")
        ckpt = done[-1]
    elif p.parent.name == "checkpoints" and (p.parent.parent / "config.yaml").is_file():
        run_dir, ckpt = p.parent.parent, p
    else:
        raise ExportError(f"{p} is neither a run directory (with config.yaml) nor a checkpoint inside one "
                          f"(<run_dir>/checkpoints/step-N): pass the folder `python -m launcher` printed.")
    if not is_complete(ckpt):
        others = [c.name for c in complete_checkpoints(run_dir)]
        hint = f"merge a complete one instead: {', '.join(others)}" if others else "no checkpoint of this run is complete"
        raise ExportError(f"{ckpt} is incomplete: it has no COMPLETE marker, so the save that wrote it did not "
                          f"finish (the job was stopped or a rank failed while saving); {hint}.")
    try:
        cfg = load_run_config(run_dir)
    except Exception as err:  # a hand-edited or truncated config.yaml
        raise ExportError(f"{run_dir / 'config.yaml'} cannot be read as this launcher's config: "
                          f"{str(err).splitlines()[0]}") from None
    step = step_of(ckpt)
    state = ckpt / "trainer_state.json"
    if state.is_file():
        try:
            step = int(json.loads(state.read_text()).get("step", step))
        except (ValueError, AttributeError):
            raise ExportError(f"{state} is not valid JSON: the checkpoint is damaged; merge another one.") from None
    return Source(run_dir, ckpt, step, cfg)


# ============================================================================================ reading
class Reader(Protocol):
    """Random access to the tensors of a training checkpoint, by the training module's parameter names."""

    kind: str

    def shapes(self) -> dict[str, torch.Size]:
        """Every tensor the checkpoint holds (model weights only), by name."""

    def get(self, name: str) -> torch.Tensor:
        """The full tensor (master precision when the checkpoint has masters); may share memory with the file."""

    def release(self) -> None:
        """Drop memory-mapped pages read so far (the next get() maps the files again)."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _damaged(path: Path, err: BaseException) -> ExportError:
    return ExportError(f"{path} cannot be read ({_first_line(err)}): the file is damaged or was cut short (disk "
                       f"full, or the job was killed while saving). Merge another checkpoint of this run (pass its "
                       f"checkpoints/step-N folder) or train again from the last good one.")


def _load_pt(path: Path) -> Any:
    """torch.load weights-only (launcher/safe_load.py: DeepSpeed's enums allow-listed, nothing else) and
    memory-mapped (pages are read only when a tensor is used); damage becomes an ExportError."""
    try:
        return torch_load(path, where=path, map_location="cpu", mmap=True)
    except CheckpointError:
        raise
    except Exception as err:
        raise _damaged(path, err) from None


class SingleReader:
    """``backend=single``: one ``state.pt`` with the module's state_dict under "model"."""

    kind = "single-process state.pt"

    def __init__(self, ckpt: Path):
        self.path = ckpt / "state.pt"
        self._sd: dict[str, torch.Tensor] | None = None
        self._shapes = {k: v.shape for k, v in self._open().items()}

    def _open(self) -> dict[str, torch.Tensor]:
        if self._sd is None:
            state = _load_pt(self.path)
            if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
                raise ExportError(f"{self.path} has no 'model' state: it was not written by this project's single "
                                  f"backend, or it is damaged. Merge another checkpoint of this run.")
            self._sd = state["model"]
        return self._sd

    def shapes(self) -> dict[str, torch.Size]:
        return dict(self._shapes)

    def get(self, name: str) -> torch.Tensor:
        return self._open()[name]

    def release(self) -> None:
        self._sd = None


def _natural(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def _take(parts: list[torch.Tensor], start: int, length: int) -> torch.Tensor:
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
            raise ExportError(f"{ckpt} has no *_model_states.pt file, so it is not a complete DeepSpeed checkpoint "
                              f"(files there: {', '.join(sorted(p.name for p in ckpt.iterdir())) or 'none'}).")
        self._shapes: dict[str, torch.Size] = {}
        self._getters: dict[str, Any] = {}
        self._open()

    def _open(self) -> None:
        from deepspeed.checkpoint import constants as C

        ckpt = self.ckpt
        states = [_load_pt(f) for f in self.model_files]
        world = int(states[0].get("dp_world_size") or 1)
        if not self.optim_files:
            raise ExportError(f"{ckpt} has no *_optim_states.pt files: the float32 weights of a DeepSpeed "
                              f"checkpoint live there, one file per rank ({world} expected).")
        self._missing_ranks(self.optim_files, world, "optim_states")
        optim = [_load_pt(f)["optimizer_state_dict"] for f in self.optim_files]
        self.stage = int(optim[0][C.ZERO_STAGE])
        self.kind = f"DeepSpeed ZeRO-{self.stage} ({world} ranks)"
        if self.stage == 3:
            self._missing_ranks(self.model_files, world, "model_states")
        steps = {s.get("global_steps") for s in states}
        if len(steps) > 1:
            raise ExportError(f"{ckpt}: the rank files come from different saves (steps {sorted(steps)}); the "
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
            raise ExportError(f"{self.ckpt} was written by {world} ranks but holds {len(files)} *_{what}.pt "
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
                          torch.cat([_take(r, o, p) for r in flat])[: s.numel()].view(s))
                offset += part
        avail = sum(t.numel() for t in flat[0])
        if offset != avail:
            raise ExportError(f"{self.ckpt}: the parameter list needs {offset} elements per rank but the rank "
                              f"files hold {avail}; the files do not belong together. Merge another checkpoint.")

    def _index_zero2(self, groups: list[dict], parts: list[list[torch.Tensor]], paddings: Any, world: int) -> None:
        for g, shapes in enumerate(groups):
            group_parts = [p[g] for p in parts]  # each rank's slice of this group's flat vector
            offset = 0
            for i, (name, shape) in enumerate(shapes.items()):
                numel = torch.Size(shape).numel()
                self._add(name, shape, lambda gp=group_parts, o=offset, s=torch.Size(shape):
                          _take(gp, o, s.numel()).view(s))
                offset += numel + (paddings[g][i] if paddings is not None else 0)
            avail = sum(p.numel() for p in group_parts)
            align = 2 * world  # ZeRO-2 pads each group to a multiple of 2 × world size
            if -(-offset // align) * align != -(-avail // align) * align:
                raise ExportError(f"{self.ckpt}: parameter group {g} needs {offset} elements but the rank files "
                                  f"hold {avail}; the files do not belong together. Merge another checkpoint.")

    def shapes(self) -> dict[str, torch.Size]:
        return dict(self._shapes)

    def get(self, name: str) -> torch.Tensor:
        if not self._getters:
            self._open()
        return self._getters[name]()

    def release(self) -> None:
        self._getters = {}  # the closures hold the mapped files; gc unmaps them


class DcpReader:
    """FSDP2: a torch.distributed.checkpoint folder (``step-N/model``: ``.metadata`` + one ``.distcp`` per rank),
    read by DCP's own loader without a process group, a batch of tensors at a time (``prefetch``)."""

    kind = "FSDP2 torch.distributed.checkpoint"

    def __init__(self, folder: Path):
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.folder = folder
        if not (folder / ".metadata").is_file():
            raise ExportError(f"{folder} has no .metadata file, so the sharded (FSDP) save did not finish; merge "
                              f"another checkpoint of this run.")
        try:
            md = SafeReader(str(folder)).read_metadata()
        except CheckpointError:
            raise
        except Exception as err:
            raise _damaged(folder / ".metadata", err) from None
        self._meta = {k: v for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
        need: dict[str, int] = {}
        for info in (md.storage_data or {}).values():
            need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
        missing = sorted(p for p in need if not (folder / p).is_file())
        if missing:
            raise ExportError(f"{folder} lacks {', '.join(missing)} (one file per rank): a rank did not finish "
                              f"saving or a file was deleted; merge another checkpoint of this run.")
        short = sorted(p for p, n in need.items() if (folder / p).stat().st_size < n)
        if short:
            raise ExportError(f"{folder / short[0]} is shorter than its index says: the file was cut short (disk "
                              f"full, or the job was killed while saving). Merge another checkpoint of this run.")
        self._cache: dict[str, torch.Tensor] = {}

    def shapes(self) -> dict[str, torch.Size]:
        return {k: torch.Size(v.size) for k, v in self._meta.items()}

    def prefetch(self, names: list[str]) -> None:
        import torch.distributed.checkpoint as dcp
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
                raise _damaged(self.folder, err) from None
            self._cache.update(want)

    def get(self, name: str) -> torch.Tensor:
        self.prefetch([name])
        return self._cache.pop(name)

    def release(self) -> None:
        self._cache.clear()


class BaseWeights:
    """The frozen base model's weights, read lazily from its safetensors: LoRA checkpoints may hold only what was
    trained, the base being ``model.name_or_path`` as config.yaml names it."""

    def __init__(self, base_dir: Path | str):
        folder = Path(base_dir)
        if not folder.is_dir():  # a hub id: its local snapshot (nothing is downloaded here)
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(base_dir), local_files_only=True))
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            where = json.loads(index.read_text())["weight_map"]
        elif (folder / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(folder / "model.safetensors", "pt") as f:
                where = {k: "model.safetensors" for k in f.keys()}
        else:
            where = {}
        self.folder, self._where, self._open = folder, where, {}

    def _file(self, name: str) -> Any:
        from safetensors import safe_open

        fname = self._where[name]
        if fname not in self._open:
            self._open[fname] = safe_open(self.folder / fname, "pt")
        return self._open[fname]

    def has(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> torch.Size:
        return torch.Size(self._file(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._file(name).get_tensor(name)

    def release(self) -> None:
        self._open = {}


class WithBase:
    """A LoRA checkpoint plus the base weights it did not save (frozen parameters, by their training names)."""

    def __init__(self, reader: Reader, base: BaseWeights, frozen: dict[str, str]):
        self.reader, self.base, self.frozen = reader, base, frozen  # frozen: training name -> base name
        self.kind = f"{reader.kind} + base weights of {base.folder}"
        self._shapes = reader.shapes()
        for name, base_name in frozen.items():
            if name not in self._shapes and base.has(base_name):
                self._shapes[name] = base.shape(base_name)

    def shapes(self) -> dict[str, torch.Size]:
        return dict(self._shapes)

    def prefetch(self, names: list[str]) -> None:
        if hasattr(self.reader, "prefetch"):
            self.reader.prefetch([n for n in names if n not in self.frozen or n in self.reader.shapes()])

    def get(self, name: str) -> torch.Tensor:
        if name in self.frozen and name not in self.reader.shapes():
            return self.base.get(self.frozen[name])
        return self.reader.get(name)

    def release(self) -> None:
        self.reader.release()
        self.base.release()


def open_reader(ckpt: Path) -> Reader:
    """The reader for whatever layout ``ckpt`` holds."""
    if (ckpt / "state.pt").is_file():
        return SingleReader(ckpt)
    if (ckpt / "model").is_dir():
        return DcpReader(ckpt / "model")
    if any(ckpt.glob("*_model_states.pt")) or any(ckpt.glob("*_optim_states.pt")):
        return ZeroReader(ckpt)
    files = ", ".join(sorted(p.name for p in ckpt.iterdir())) or "none"
    raise ExportError(f"{ckpt} holds no model weights this project writes (state.pt for backend=single, "
                      f"*_model_states.pt + *_optim_states.pt for DeepSpeed, model/ for FSDP); files there: {files}. "
                      f"The save did not complete or the files were removed; merge another checkpoint of this run.")


def open_source(src: Source, trained: torch.nn.Module, base_dir: Path | str) -> Reader:
    """The checkpoint's reader; for LoRA, with the frozen base weights it may not hold taken from the base model."""
    reader = open_reader(src.checkpoint)
    if not uses_lora(src.cfg):
        return reader
    have = reader.shapes()
    frozen = {n: base_name(n) for n, p in trained.named_parameters() if not p.requires_grad}
    if all(n in have for n in frozen):
        return reader
    return WithBase(reader, BaseWeights(base_dir), frozen)


# ============================================================================================ planning
def base_model_dir(cfg: Config) -> Path | str:
    """The base model's folder (config, tokenizer, generation config); the seeded tiny model is re-created."""
    from launcher.model import materialize, model_dir

    where = model_dir(cfg.model)
    if cfg.model.init == "random":
        return materialize(cfg.model)
    if isinstance(where, Path) and not (where / "config.json").is_file():
        raise ExportError(f"the base model {where} (model.name_or_path in config.yaml) has no config.json; the "
                          f"export needs its config and tokenizer. Restore it, or merge with "
                          f"model.name_or_path=<folder> pointing at a copy.")
    return where


def skeletons(cfg: Config, base_dir: Path | str) -> tuple[torch.nn.Module, torch.nn.Module, Any]:
    """(training-time module, plain base model, HF config), parameters on the meta device: names and shapes for
    the plan, and the LoRA layers whose PEFT code computes each delta. Buffers are real (rotary tables)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher.model import apply_finetune

    hf_config = AutoConfig.from_pretrained(base_dir, trust_remote_code=cfg.model.trust_remote_code)

    def build() -> torch.nn.Module:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32,
                                                     trust_remote_code=cfg.model.trust_remote_code)
        model.tie_weights()  # init_empty_weights unties them (training's from_pretrained had them tied)
        return model

    base = build()
    # QLoRA trains the same adapters on a 4-bit copy of the base; they are merged into the full-precision base.
    finetune = replace(cfg.finetune, method="lora") if cfg.finetune.method == "qlora" else cfg.finetune
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # PEFT asks transformers a deprecated question
        trained = apply_finetune(build(), finetune)
    return trained, base, hf_config


def _tied_groups(module: torch.nn.Module) -> list[list[str]]:
    """Names that share one parameter (tied embeddings), the first name of each group first."""
    by_id: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return list(by_id.values())


def uses_lora(cfg: Config) -> bool:
    return cfg.finetune.method in ("lora", "qlora")


def base_name(train_name: str) -> str:
    """The base model's name of a training (PEFT) tensor name: what ``merge_and_unload`` would call it."""
    name = train_name.removeprefix("base_model.model.")
    for wrapper in (".base_layer.", ".original_module.", ".modules_to_save.default."):
        name = name.replace(wrapper, ".")
    return name


def is_adapter(train_name: str) -> bool:
    """Trained by a LoRA run: the adapters, and full copies of ``finetune.lora_modules_to_save``."""
    return "lora_" in train_name or ".modules_to_save." in train_name


def _lora_layers(trained: torch.nn.Module) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {name: mod for name, mod in trained.named_modules() if isinstance(mod, LoraLayer)}


def check_complete(reader: Reader, trained: torch.nn.Module, where: Path) -> dict[str, str]:
    """Compare the checkpoint with the training-time module; return {module name: checkpoint name} covering
    every tensor (tied names resolved to the one the checkpoint holds). Raise ExportError naming what is off."""
    have = reader.shapes()
    want = {k: v.shape for k, v in trained.state_dict().items()}
    alias = {n: group for group in _tied_groups(trained) for n in group}
    source, missing, wrong = {}, [], []
    for name, shape in want.items():
        found = next((n for n in alias.get(name, [name]) if n in have), None)
        if found is None:
            missing.append(name)
        elif have[found] != shape:
            wrong.append(f"{found} is {tuple(have[found])}, the model needs {tuple(shape)}")
        else:
            source[name] = found
    extra = sorted(set(have) - set(want) - {n for g in alias.values() for n in g})
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing, e.g. {', '.join(missing[:3])}")
    if wrong:
        problems.append(f"{len(wrong)} with the wrong shape, e.g. {'; '.join(wrong[:2])}")
    if extra:
        problems.append(f"{len(extra)} the model does not have, e.g. {', '.join(extra[:3])}")
    if problems:
        raise ExportError(f"{where} does not match the model that config.yaml describes "
                          f"({reader_model_hint(trained)}): {'; '.join(problems)}. "
                          f"Either the checkpoint is damaged, or config.yaml was edited after training (model, "
                          f"finetune.* must be what the run used).")
    return source


def reader_model_hint(trained: torch.nn.Module) -> str:
    kind = getattr(getattr(trained, "config", None), "model_type", type(trained).__name__)
    return f"{kind} with LoRA adapters" if hasattr(trained, "peft_config") else f"{kind}, all weights trained"


@dataclass
class Plan:
    """What the export writes and from where."""

    out_dtype: torch.dtype
    adapter_only: bool
    # output tensor name -> (checkpoint tensor name, LoRA layer module name or "")
    tensors: dict[str, tuple[str, str]] = field(default_factory=dict)
    shapes: dict[str, torch.Size] = field(default_factory=dict)  # output tensor name -> shape
    source: dict[str, str] = field(default_factory=dict)  # training module name -> checkpoint name
    parameters: int = 0  # parameters of the exported model (tied ones once)


def make_plan(cfg: Config, mcfg: MergeConfig, reader: Reader, trained: torch.nn.Module, base: torch.nn.Module,
              hf_config: Any, where: Path) -> Plan:
    source = check_complete(reader, trained, where)
    lora = uses_lora(cfg)
    plan = Plan(out_dtype=output_dtype(mcfg, hf_config), adapter_only=lora and not mcfg.lora, source=source)
    layers = _lora_layers(trained)
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
    dropped = {n for group in _tied_groups(base) for n in group[1:]}  # saved once; from_pretrained re-ties
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


# ============================================================================================ writing
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


def write_weights(plan: Plan, reader: Reader, trained: torch.nn.Module, out: Path, max_shard_size: str,
                  log: Any = print) -> list[str]:
    """Write the planned tensors as (sharded) safetensors in the output dtype, one tensor in memory at a time."""
    from huggingface_hub import split_torch_state_dict_into_shards

    layers = _lora_layers(trained)
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
            raise ExportError(f"{o} (from {src}) is {'empty' if t.numel() == 0 else 'not finite (NaN/inf)'} in the "
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


def write_adapter(plan: Plan, reader: Reader, trained: torch.nn.Module, base_dir: Path | str, out: Path) -> None:
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


def write_tokenizer_and_configs(cfg: Config, plan: Plan, hf_config: Any, base_dir: Path | str, out: Path) -> dict:
    """config.json, generation_config.json and the tokenizer with the training template as chat_template."""
    from transformers import GenerationConfig

    from launcher.model import load_tokenizer
    from launcher.templates import Template

    tokenizer = load_tokenizer(cfg.model)
    original_eos = tokenizer.eos_token_id
    # bos/eos are baked into the Jinja text as literal tokens, so replacing the eos below does not change it.
    tokenizer.chat_template = Template(cfg.template, tokenizer).to_jinja()
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
    from transformers import AutoModelForCausalLM

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


# ============================================================================================ the export
@dataclass
class ExportResult:
    out_dir: Path
    manifest: dict


def default_output(src: Source, mcfg: MergeConfig) -> Path:
    if mcfg.output_dir:
        from launcher.config import resolve_path

        return resolve_path(mcfg.output_dir)
    kind = "adapter" if uses_lora(src.cfg) and not mcfg.lora else "merged"
    return src.run_dir / kind / f"step-{src.step}"


def export(path: str | Path, mcfg: MergeConfig | None = None, log: Any = print) -> ExportResult:
    """Export the checkpoint at ``path`` (run directory or checkpoint folder); return the final folder and manifest.

    Raises ExportError (input problems, nothing written), VerificationError (the written folder failed the checks;
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
            "versions": _versions(),
        }
        if mcfg.verify:
            manifest["verification"] = run_verification(src, mcfg, tmp, plan, log)
        manifest["seconds"] = {"write": round(written, 1), "total": round(time.time() - t0, 1)}
        manifest["peak_rss_mb"] = {"export_process": _peak_rss_mb(),
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


def _peak_rss_mb() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux reports KiB


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


# ============================================================================================ verification
def run_verification(src: Source, mcfg: MergeConfig, folder: Path, plan: Plan, log: Any = print) -> dict:
    """Verify ``folder`` in a fresh Python process (nothing of this one's state can mask a problem)."""
    request = {"checkpoint": str(src.checkpoint), "folder": str(folder), "dtype": str(plan.out_dtype),
               "adapter_only": plan.adapter_only, "parameters": plan.parameters, "merge": asdict(mcfg)}
    req_path = folder.parent / f".{folder.name}.verify.json"
    req_path.write_text(json.dumps(request))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1))))
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, "-m", "launcher.export", "--verify", str(req_path)],
                              capture_output=True, text=True, env=env)
        result = json.loads(req_path.read_text()).get("result") if req_path.is_file() else None
    finally:
        req_path.unlink(missing_ok=True)
    if proc.returncode != 0 or not result:
        reason = (result or {}).get("error") or (proc.stderr.strip()[-3000:] or f"exit code {proc.returncode}")
        raise VerificationError(f"the exported folder failed verification: {reason}")
    result["seconds"] = round(time.time() - t0, 1)
    diff = result["max_logit_diff"]
    log(f"verified in a fresh process ({result['seconds']}s): {result['parameters']:,} parameters, max logit "
        f"difference {diff:.2e} vs the training-time weights (limit {result['tolerance']:.1e}), chat template "
        f"identical to training on {result['template_probes']} probes")
    return result


def _reference_logits(reader: Reader, trained: torch.nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Logits of the training-time module (float32, LoRA unmerged) rebuilt from the checkpoint."""
    source = check_complete(reader, trained, Path("checkpoint"))
    trained.load_state_dict({n: reader.get(s).float() for n, s in source.items()}, strict=True, assign=True)
    trained.eval()
    with torch.no_grad():
        return [trained(input_ids=ids[None]).logits[0].float() for ids in inputs]


def verify(request: dict) -> dict:
    """The checks of a written folder (runs in its own process; see run_verification)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from launcher.chat import generate_reply
    from launcher.model import load_tokenizer
    from launcher.templates import IGNORE_INDEX, Template, TemplateError

    folder = Path(request["folder"])
    src = find_checkpoint(request["checkpoint"])
    cfg = src.cfg
    dtype = getattr(torch, request["dtype"].removeprefix("torch."))
    mcfg = MergeConfig(**request["merge"])

    # 1. The exported chat template formats prompts exactly as training did: text and token ids.
    tok = AutoTokenizer.from_pretrained(folder)
    template = Template(cfg.template, load_tokenizer(cfg.model))
    inputs, prompt_msgs, n = [], None, 0
    for msgs in PROBES:
        try:
            want = template.render(msgs)
            want_ids = template.encode(msgs)
        except TemplateError:
            continue  # e.g. a template without a system slot
        got = tok.apply_chat_template(msgs, tokenize=False)
        if got != want:
            raise VerificationError(f"the exported chat_template renders {got!r} where training rendered {want!r}")
        prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        if prompt != template.render(msgs[:-1], add_generation_prompt=True):
            raise VerificationError(f"the exported chat_template's generation prompt {prompt!r} differs from "
                                    f"training's {template.render(msgs[:-1], add_generation_prompt=True)!r}")
        ids = tok(got, add_special_tokens=False)["input_ids"]
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        if ids != want_ids.input_ids:
            raise VerificationError(f"the exported tokenizer turns the rendered probe into ids {ids} but training "
                                    f"encoded {want_ids.input_ids}")
        if ids[:len(p_ids)] != p_ids or want_ids.labels[len(p_ids)] == IGNORE_INDEX:
            raise VerificationError("the generation prompt is not exactly the untrained prefix of the training "
                                    "encoding, so the model would be prompted differently from how it was trained")
        inputs.append(torch.tensor(ids))
        prompt_msgs = prompt_msgs or msgs[:-1]
        n += 1
    if not n:
        raise VerificationError(f"template {cfg.template.name!r} cannot render any probe conversation")

    # 2. generation_config stops at every stop word.
    gen = GenerationConfig.from_pretrained(folder)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    stops = stop_token_ids(tok, list(cfg.template.stop_words), str(folder))
    if not set(stops) <= set(eos):
        raise VerificationError(f"generation_config.json eos_token_id={eos} lacks the stop words' ids {stops}")

    # 3. Reference: the training-time module from the checkpoint, in float32. Freed before the export is loaded.
    base_dir = base_model_dir(cfg)
    trained, _, _ = skeletons(cfg, base_dir)
    expected_params = sum(p.numel() for p in trained.parameters())  # on the skeleton: tied weights once
    reader = open_source(src, trained, base_dir)
    ref = _reference_logits(reader, trained, inputs)
    del reader, trained
    gc.collect()

    # 4. Load the export the way a user would.
    if request["adapter_only"]:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(base_model_dir(cfg), dtype=dtype)
        model = PeftModel.from_pretrained(base, folder)
        info: dict[str, list] = {}
        expected = expected_params
    else:
        model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True)
        expected = request["parameters"]  # the plan's count, from the base model's skeleton
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise VerificationError(f"from_pretrained reported {problems}")
    for name, t in model.state_dict().items():
        if t.numel() == 0:
            raise VerificationError(f"{name} is empty after loading")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise VerificationError(f"{name} holds NaN or inf after loading")
    count = sum(p.numel() for p in model.parameters())
    if count != expected:
        raise VerificationError(f"the loaded model has {count:,} parameters, the checkpoint {expected:,}")
    model.eval()
    diff, top = 0.0, 0.0
    agree = total = 0
    with torch.no_grad():
        for ids, r in zip(inputs, ref):
            got = model(input_ids=ids[None]).logits[0].float()
            diff = max(diff, float((got - r).abs().max()))
            top = max(top, float(r.abs().max()))
            agree += int((got.argmax(-1) == r.argmax(-1)).sum())
            total += r.shape[0]
    tol = mcfg.atol if dtype == torch.float32 else mcfg.atol_low_precision * top
    if diff > tol:
        raise VerificationError(f"logits differ from the training-time weights by up to {diff:.3e} "
                                f"(allowed {tol:.1e} for {request['dtype']}): the weights were not exported "
                                f"faithfully")

    # 5. A reply through the exported template and generation_config: it must end at the stop word if it has one.
    model.generation_config = gen
    reply = generate_reply(model, tok, prompt_msgs, max_new_tokens=mcfg.max_new_tokens)
    if any(t in eos for t in reply.token_ids[:-1]):
        raise VerificationError(f"generation continued past a stop token: {reply.token_ids}")
    return {"max_logit_diff": diff, "tolerance": tol, "reference_max_logit": top,
            "argmax_agreement": agree / max(total, 1), "parameters": count, "template_probes": n,
            "dtype": request["dtype"].removeprefix("torch."), "probe_prompt": prompt_msgs[-1]["content"],
            "reply": reply.text, "stopped_at": reply.stop_word, "new_tokens": len(reply.token_ids),
            "peak_rss_mb": _peak_rss_mb()}


def _verify_main(req_path: str) -> int:
    path = Path(req_path)
    request = json.loads(path.read_text())
    try:
        request["result"] = verify(request)
        rc = 0
    except (VerificationError, ExportError, ConfigError) as err:
        request["result"] = {"error": str(err)}
        rc = 1
    path.write_text(json.dumps(request, ensure_ascii=False))
    return rc


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--verify":
        sys.exit(_verify_main(sys.argv[2]))
    sys.exit("internal entry point; use `python -m launcher.merge RUN_DIR` to export a checkpoint")
