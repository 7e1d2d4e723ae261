"""Model and tokenizer: locate, load (or initialise from a seed), attach LoRA, enable gradient checkpointing."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from launcher.config import ConfigError, FinetuneConfig, ModelConfig, PROJECT_ROOT, resolve_path

log = logging.getLogger(__name__)


def compute_dtype(cfg: ModelConfig) -> torch.dtype:
    """The dtype of forward/backward math ("auto": bfloat16 on GPU, float32 on CPU)."""
    if cfg.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, cfg.dtype)


def _cache_dir() -> Path:
    return Path(os.environ.get("LAUNCHER_CACHE", PROJECT_ROOT / ".cache" / "launcher"))


def model_dir(cfg: ModelConfig) -> Path | str:
    """Where the weights are: a local directory, or the hub id as given.

    For ``init: random`` this is a cache directory that :func:`materialize` fills once with weights drawn from
    ``init_seed``, so workers, merge and tests all load the model the same way, by ``from_pretrained``.
    """
    src = resolve_path(cfg.name_or_path)
    if cfg.init == "random":
        if not (src / "config.json").is_file():
            raise ConfigError(f"model.init=random needs {src}/config.json (the architecture to initialise).")
        h = hashlib.sha256((src / "config.json").read_bytes() + f"seed={cfg.init_seed}".encode()).hexdigest()[:12]
        return _cache_dir() / f"model-{src.name}-{h}"
    if src.exists():
        return src
    return cfg.name_or_path


def check_available(cfg: ModelConfig) -> None:
    """Fail fast, before any worker starts, if the model cannot be found (no hub download can hang here)."""
    where = model_dir(cfg)
    if cfg.init == "random" or isinstance(where, Path):
        return
    from huggingface_hub import try_to_load_from_cache

    if cfg.name_or_path.startswith(("/", "./", "../", "~")):  # a path, not a hub id: it must exist
        raise ConfigError(f"model.name_or_path={cfg.name_or_path!r}: no such directory. Pass the folder that holds "
                          f"the model's config.json and weights.")
    if try_to_load_from_cache(where, "config.json") is None and os.environ.get("HF_HUB_OFFLINE", "1") != "0":
        raise ConfigError(
            f"model.name_or_path={cfg.name_or_path!r} is neither a local directory nor in the Hugging Face cache. "
            f"Download it first (`huggingface-cli download {cfg.name_or_path} --local-dir DIR`) and pass "
            f"model.name_or_path=DIR, or set HF_HUB_OFFLINE=0 to let the launcher and workers download it.")


def materialize(cfg: ModelConfig) -> Path | str:
    """Create the seeded initial weights for ``init: random`` (once; atomic); return the model directory."""
    out = model_dir(cfg)
    if cfg.init != "random" or (isinstance(out, Path) and (out / "model.safetensors").is_file()):
        return out
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = resolve_path(cfg.name_or_path)
    torch.manual_seed(cfg.init_seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
    try:
        os.rename(tmp, out)
    except OSError:  # created concurrently by another node's launcher
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    src = resolve_path(cfg.name_or_path) if cfg.init == "random" else model_dir(cfg)
    tok = AutoTokenizer.from_pretrained(src, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding positions are never attended to nor trained
    return tok


def load_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32, empty: bool = False,
               quantize_4bit: bool = False) -> torch.nn.Module:
    """Load the causal LM for training: master weights in ``dtype``, no KV cache (which would defeat packing).

    ``empty=True`` builds the architecture with parameters on the meta device and reads no weights (buffers stay
    real): FSDP ranks other than 0 do this and receive their shard from rank 0, so host memory holds one copy of
    the model, not one per rank. ``quantize_4bit`` loads the base in NF4 for QLoRA (GPU + bitsandbytes only).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(dtype=dtype, attn_implementation=cfg.attn_implementation,
                                  trust_remote_code=cfg.trust_remote_code)
    if empty:
        from accelerate import init_empty_weights

        config = AutoConfig.from_pretrained(model_dir(cfg), trust_remote_code=cfg.trust_remote_code)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, **kwargs)
    else:
        if quantize_4bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype)
            kwargs["device_map"] = {"": torch.cuda.current_device()}
        model = AutoModelForCausalLM.from_pretrained(model_dir(cfg), **kwargs)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def apply_finetune(model: torch.nn.Module, cfg: FinetuneConfig) -> torch.nn.Module:
    """Full fine-tuning trains everything; LoRA/QLoRA freeze the base and add PEFT adapters."""
    if cfg.method == "full":
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    target = cfg.lora_target
    lora = LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM",
        target_modules="all-linear" if list(target) == ["all-linear"] else list(target),
        modules_to_save=list(cfg.lora_modules_to_save) or None)
    if getattr(model, "is_activation_checkpointing", False):  # checkpointed layers need inputs that carry grad
        model.enable_input_require_grads()
    return get_peft_model(model, lora)
