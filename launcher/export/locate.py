"""Locate a checkpoint and open it: its run's config, a reader for the backend's layout (the readers live in
launcher/backends/), the frozen base weights a LoRA checkpoint did not save, and the meta-device skeletons of the
training-time module and the base model that name and shape every tensor.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from huggingface_hub import snapshot_download
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from launcher.backends import every_backend
from launcher.backends.base import Reader
from launcher.checkpoint import CheckpointError, checkpoint_dirs, complete_checkpoints, is_complete, step_of
from launcher.config import Config, ConfigError, load_run_config
from launcher.model import apply_finetune, materialize, model_dir


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
        raise CheckpointError(f"{p} does not exist: pass a run directory written by `python -m launcher` "
                              f"(outputs/<name>/<time>) or one of its checkpoints/step-N folders.")
    if (p / "config.yaml").is_file():
        run_dir = p
        steps = checkpoint_dirs(run_dir)
        done = [c for c in steps if is_complete(c)]
        if not done:
            found = ", ".join(f"{c.name} (no COMPLETE marker)" for c in steps) or "no checkpoints/step-N folder"
            raise CheckpointError(f"{run_dir} has no complete checkpoint to merge (found: {found}). "
                                  f"Training writes checkpoints/step-N with a COMPLETE marker when a save finishes; "
                                  f"train to the end (or set train.save_steps) and merge again.")
        ckpt = done[-1]
    elif p.parent.name == "checkpoints" and (p.parent.parent / "config.yaml").is_file():
        run_dir, ckpt = p.parent.parent, p
    else:
        raise CheckpointError(f"{p} is neither a run directory (with config.yaml) nor a checkpoint inside one "
                              f"(<run_dir>/checkpoints/step-N): pass the folder `python -m launcher` printed.")
    if not is_complete(ckpt):
        others = [c.name for c in complete_checkpoints(run_dir)]
        hint = f"merge a complete one instead: {', '.join(others)}" if others else "no checkpoint of this run is complete"
        raise CheckpointError(f"{ckpt} is incomplete: it has no COMPLETE marker, so the save that wrote it did not "
                              f"finish (the job was stopped or a rank failed while saving); {hint}.")
    try:
        cfg = load_run_config(run_dir)
    except Exception as err:  # a hand-edited or truncated config.yaml
        raise CheckpointError(f"{run_dir / 'config.yaml'} cannot be read as this launcher's config: "
                              f"{str(err).splitlines()[0]}") from None
    step = step_of(ckpt)
    state = ckpt / "trainer_state.json"
    if state.is_file():
        try:
            step = int(json.loads(state.read_text()).get("step", step))
        except (ValueError, AttributeError):
            raise CheckpointError(f"{state} is not valid JSON: the checkpoint is damaged; merge another one.") from None
    return Source(run_dir, ckpt, step, cfg)


def open_reader(ckpt: Path) -> Reader:
    """The reader of whichever backend's layout ``ckpt`` holds."""
    kinds = every_backend()
    for kind in kinds:
        if kind.holds(ckpt):
            return kind.read_checkpoint(ckpt)
    files = ", ".join(sorted(p.name for p in ckpt.iterdir())) or "none"
    raise CheckpointError(f"{ckpt} holds no model weights this project writes "
                          f"({', '.join(k.layout for k in kinds)}); files there: {files}. The save did not complete "
                          f"or the files were removed; merge another checkpoint of this run.")


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """All saved parameters of a checkpoint of any backend, gathered into one fp32 state dict (one process).

    Keys are the trained model's parameter names (PEFT names for LoRA, where only trained parameters are saved).
    """
    ckpt = Path(ckpt)
    if not is_complete(ckpt):
        raise CheckpointError(f"{ckpt} is not a complete checkpoint (no COMPLETE marker).")
    reader = open_reader(ckpt)
    return {k: reader.get(k).detach().float() for k in reader.shapes()}


class BaseWeights:
    """The frozen base model's weights, read lazily from its safetensors: LoRA checkpoints may hold only what was
    trained, the base being ``model.name_or_path`` as config.yaml names it."""

    def __init__(self, base_dir: Path | str):
        folder = Path(base_dir)
        if not folder.is_dir():  # a hub id: its local snapshot (nothing is downloaded here)
            folder = Path(snapshot_download(str(base_dir), local_files_only=True))
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            where = json.loads(index.read_text())["weight_map"]
        elif (folder / "model.safetensors").is_file():
            with safe_open(folder / "model.safetensors", "pt") as f:
                where = {k: "model.safetensors" for k in f.keys()}
        else:
            where = {}
        self.folder, self._where, self._open = folder, where, {}

    def _file(self, name: str) -> Any:
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


def base_model_dir(cfg: Config) -> Path | str:
    """The base model's folder (config, tokenizer, generation config); the seeded tiny model is re-created."""
    where = model_dir(cfg.model)
    if cfg.model.init == "random":
        return materialize(cfg.model)
    if isinstance(where, Path) and not (where / "config.json").is_file():
        raise ConfigError(f"the base model {where} (model.name_or_path in config.yaml) has no config.json; the "
                          f"export needs its config and tokenizer. Restore it, or merge with "
                          f"model.name_or_path=<folder> pointing at a copy.")
    return where


def skeletons(cfg: Config, base_dir: Path | str) -> tuple[torch.nn.Module, torch.nn.Module, Any]:
    """(training-time module, plain base model, HF config), parameters on the meta device: names and shapes for
    the plan, and the LoRA layers whose PEFT code computes each delta. Buffers are real (rotary tables)."""
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


def tied_groups(module: torch.nn.Module) -> list[list[str]]:
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


def lora_layers(trained: torch.nn.Module) -> dict[str, Any]:
    return {name: mod for name, mod in trained.named_modules() if isinstance(mod, LoraLayer)}


def check_complete(reader: Reader, trained: torch.nn.Module, where: Path) -> dict[str, str]:
    """Compare the checkpoint with the training-time module; return {module name: checkpoint name} covering
    every tensor (tied names resolved to the one the checkpoint holds). Raise CheckpointError naming what is off."""
    have = reader.shapes()
    want = {k: v.shape for k, v in trained.state_dict().items()}
    alias = {n: group for group in tied_groups(trained) for n in group}
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
        raise CheckpointError(f"{where} does not match the model that config.yaml describes "
                              f"({model_hint(trained)}): {'; '.join(problems)}. "
                              f"Either the checkpoint is damaged, or config.yaml was edited after training (model, "
                              f"finetune.* must be what the run used).")
    return source


def model_hint(trained: torch.nn.Module) -> str:
    kind = getattr(getattr(trained, "config", None), "model_type", type(trained).__name__)
    return f"{kind} with LoRA adapters" if hasattr(trained, "peft_config") else f"{kind}, all weights trained"

