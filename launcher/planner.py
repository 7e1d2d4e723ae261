"""Memory planner: before any worker starts, estimate what one device will hold and refuse a job that cannot fit.

Parameter counts come from the model's ``config.json``: the architecture is built on the meta device (no weights
are read or allocated) and LoRA is attached by the same code the workers use, so total (Ψ) and trainable (Φ)
counts are exact. Below, W is the data-parallel world size, ``b`` the bytes of the compute dtype (2 for bf16,
4 for float32), ``T = micro_batch_size × cutoff_len`` the tokens of one micro-batch, ``h`` the hidden size, ``i``
the MLP width, ``V`` the vocabulary and ``L`` the number of layers.

Model states per device (AdamW keeps two float32 moments):

=====================  ==========  ===========  ============  ===================================================
strategy               parameters  gradients    optimizer     notes
=====================  ==========  ===========  ============  ===================================================
single (plain torch)   4Ψ          4Φ           8Φ            float32 masters; bf16 autocast caches a 2-byte copy
                                                              of the trainable matmul weights (+2Φ_linear)
DeepSpeed ZeRO-0/1/2   bΨ          bΦ (/W ≥2)   16Φ (/W ≥1)   float32 master, float32 gradient partition, moments
DeepSpeed ZeRO-3       bΨ/W        bΦ/W         16Φ/W         + gathered parameters: b·min(Ψ, max_live)·(W-1)/W
FSDP2 (full shard)     4Ψ/W        4Φ/W         8Φ/W          + b·(2 layers + embeddings, head, final norm)
=====================  ==========  ===========  ============  ===================================================

Each backend computes its row (``memory_plan`` in launcher/backends/); this module adds activations and checks
the total against the devices. FSDP2 gathers a layer (and prefetches the next) in the compute dtype; its root unit stays gathered. QLoRA
(single process) stores the frozen linear weights in NF4, about 0.53 byte each. DeepSpeed keeps its float32
master partition even when training in float32. ``offload_optimizer`` moves the
optimizer column to host memory, ``offload_param`` the parameter shard. On CPU, DeepSpeed's shared-memory
all-reduce maps a 66 MiB buffer per rank into every rank (``buffers``). AdamW's step allocates about 4Φ/W of
temporaries (foreach sqrt) after backward has freed the activations, so the total counts the larger of the two.

Activations of one micro-batch (saved for backward; bytes per token), counted with autograd's saved-tensor hooks
on transformers' Llama (q/k/v after RoPE with GQA heads repeated, norm outputs, attention output and its reshape,
the residual, SwiGLU's gate, up, activation and product):

* per layer ``b·(9h + 4i) + 4h`` (float32) or ``+ 16h`` (bf16: RMSNorm's float32 copies of its input), plus sdpa's
  per-layer copy of the packed rows' block-diagonal mask (``b · cutoff_len``) or, for eager attention, the softmax
  probabilities (``(4 + b) · heads · cutoff_len``); the default ``packed`` attention builds no mask and its kernels
  keep only a log-sum-exp per head (``4 · heads``, the same for all), so nothing grows with the row length;
* with gradient checkpointing each layer keeps only its input (``b·h``) and one layer is recomputed at a time;
* the plain loss (``train.loss_chunk_tokens=0``): the head keeps ``3bh`` and the log-softmax of the logits
  (``4V``); the chunked loss (launcher/loss.py, the default) keeps ``4bh`` (the hidden states and the supervised
  positions' copy) and no ``V`` term per token.

On top of them, backward peaks at the larger of the loss's transient and one layer's activation gradients (twice
that with checkpointing: recomputation and its gradients). The plain loss's transient is its gradients, ``8V`` per
token (``+bV`` in bf16); the chunked loss's is one chunk of ``C = min(loss_chunk_tokens, T)`` positions, whatever
``T``: its logits and their gradient (``2bCV``) and DeepSpeed's float32 block (``4·min(CV, 2^26)``).

With sequence parallelism of degree N, each rank holds ``T/N`` tokens of every activation term; model states are
sharded over all W ranks as before (the sequence group is part of the ZeRO world).

Accuracy: ``bench/planner_accuracy.py`` (numbers in BENCHMARKS.md) and tests/test_planner.py train a few steps on
CPU and compare with the measured peak (resident-set high-water mark during training minus the resident set before
the model was built, with a fixed glibc mmap threshold so RSS follows live tensors). Measured: the estimate is
0.88-1.17× the peak (tiny and a 56M-parameter Llama; single process, LoRA, checkpointing, 2-rank ZeRO-3 and
FSDP2); the tests accept 0.8-1.35×. QLoRA and offload are not measured (they need a GPU). Not modelled: allocator fragmentation and the CUDA context (``planner.usable_fraction``
and a fixed per-process overhead cover them), NCCL buffers, MoE routing, sliding-window savings.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import psutil
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from launcher.attention import SEQUENCE_PARALLEL_ATTENTION, attention_of
from launcher.backends import backend_for
from launcher.config import Config, ConfigError, resolve_path
from launcher.model import apply_finetune, compute_dtype, model_dir

GIB = 1024**3
# What a process holds besides the model and its activations: the CUDA context and NCCL buffers on a GPU, or
# the interpreter with torch, transformers and DeepSpeed imported on a CPU worker (measured: ~0.6-0.9 GiB).
GPU_PROCESS_OVERHEAD = 1.0 * GIB
CPU_PROCESS_OVERHEAD = 0.8 * GIB


@dataclass
class ModelShape:
    """What the estimate needs from the architecture."""

    params: int  # Ψ, unique parameters (tied embeddings counted once)
    trainable: int  # Φ
    trainable_matmul: int  # trainable weights of nn.Linear layers (what bf16 autocast caches)
    frozen_body_matmul: int  # frozen nn.Linear weights except the output head (what QLoRA stores in 4 bits)
    largest_layer: int  # parameters of the largest decoder layer
    layer_params: int  # parameters of all decoder layers (the rest: embeddings, head, final norm)
    layers: int
    hidden: int
    kv_dim: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int = 0


@dataclass
class MemoryPlan:
    """Per-device estimate in bytes (device = one GPU, or one worker process on a CPU host)."""

    strategy: str
    world_size: int
    parameters: float
    gradients: float
    optimizer: float
    activations: float
    activations_other: float  # the same with gradient checkpointing toggled, for the suggestion
    transient: float
    step_temp: float = 0.0  # the optimizer step's temporaries (AdamW's foreach sqrt), after backward
    buffers: float = 0.0  # communication buffers the backend allocates outside the model states
    tokens: int = 0  # tokens of one micro-batch
    sequence: int = 1  # ranks each row is split over (sequence parallelism)
    host_offload: float = 0.0  # per rank, in host memory
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        # Activations exist during forward/backward, the optimizer's temporaries only after them.
        return self.parameters + self.gradients + self.optimizer + self.buffers + max(
            self.activations + self.transient, self.step_temp)


def load_shape(cfg: Config) -> ModelShape:
    """Build the configured model on the meta device (no weights) and count what the plan needs."""
    where = resolve_path(cfg.model.name_or_path) if cfg.model.init == "random" else model_dir(cfg.model)
    hf = AutoConfig.from_pretrained(where, trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # library deprecation notices are not the planner's to show
        model = AutoModelForCausalLM.from_config(hf, trust_remote_code=cfg.model.trust_remote_code)
        model = apply_finetune(model, cfg.finetune)
    params = {id(p): p for p in model.parameters()}.values()
    linear = {id(m.weight): m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)}
    head = getattr(model, "get_base_model", lambda: model)().get_output_embeddings()
    head_id = id(head.weight) if head is not None else None
    text = getattr(hf, "text_config", None) or hf
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    blocks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in max(blocks, key=len)] if blocks else [0]
    return ModelShape(
        params=sum(p.numel() for p in params), trainable=sum(p.numel() for p in params if p.requires_grad),
        trainable_matmul=sum(w.numel() for w in linear.values() if w.requires_grad),
        frozen_body_matmul=sum(w.numel() for k, w in linear.items() if not w.requires_grad and k != head_id),
        largest_layer=max(per_layer), layer_params=sum(per_layer),
        layers=text.num_hidden_layers, hidden=text.hidden_size,
        kv_dim=getattr(text, "num_key_value_heads", heads) * head_dim,
        intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size), vocab=text.vocab_size, heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", heads))


def layer_bytes(s: ModelShape, row_len: int, b: int, attn: str) -> float:
    """Activations one decoder layer saves for backward, per token (see the module docstring)."""
    per = b * (9 * s.hidden + 4 * s.intermediate) + (16 if b < 4 else 4) * s.hidden + 4 * s.heads
    if attn == "eager":
        per += (4 + (b if b < 4 else 0)) * s.heads * row_len  # softmax probabilities (float32 and cast back)
    elif attn == "sdpa":
        per += b * row_len  # sdpa's per-layer copy of the block-diagonal mask of packed rows
    return per  # packed and flash-attention: no mask, nothing of O(row_len) per token


def loss_bytes(s: ModelShape, tokens: int, b: int, chunk: int) -> tuple[float, float]:
    """(bytes the loss saves for backward, its transient peak) for a micro-batch of ``tokens`` on one rank."""
    if chunk <= 0:  # the plain loss over full logits
        return (3 * b * s.hidden + 4 * s.vocab) * tokens, (8 + (b if b < 4 else 0)) * s.vocab * tokens
    c = min(chunk, tokens)
    return 4 * b * s.hidden * tokens, 2 * b * c * s.vocab + 4 * min(c * s.vocab, 2**26)


def activation_bytes(s: ModelShape, tokens: int, row_len: int, b: int, checkpointing: bool,
                     attn: str, loss_chunk: int = 0, sequence: int = 1) -> tuple[float, float]:
    """(saved activations, backward's extra peak) of one micro-batch on one rank, in bytes."""
    per = layer_bytes(s, row_len, b, attn)
    local = -(-tokens // sequence)  # this rank's share of the rows' tokens
    loss_saved, loss_extra = loss_bytes(s, local, b, loss_chunk)
    saved = s.layers * (b * s.hidden if checkpointing else per) * local + loss_saved
    layer_extra = per * (2 if checkpointing else 1)  # a layer's activation gradients (+ its recomputation)
    return saved, max(loss_extra, layer_extra * local)


def estimate(cfg: Config, shape: ModelShape, world_size: int, cuda: bool, sequence: int = 1,
             checkpointing: bool | None = None) -> MemoryPlan:
    """The per-device plan for this config at ``world_size`` ranks, each row split over ``sequence`` of them:
    activations here, model states from the backend (its ``memory_plan``). ``checkpointing`` overrides
    ``model.gradient_checkpointing`` (for the suggestions)."""
    b = 2 if compute_dtype(cfg.model) == torch.bfloat16 else 4
    tokens = cfg.train.micro_batch_size * cfg.dataset.cutoff_len
    attn = attention_of(cfg)
    ckpt = cfg.model.gradient_checkpointing if checkpointing is None else checkpointing
    acts = {c: activation_bytes(shape, tokens, cfg.dataset.cutoff_len, b, c, attn, cfg.train.loss_chunk_tokens,
                                sequence) for c in (ckpt, not ckpt)}
    (act, transient), act_other = acts[ckpt], acts[not ckpt][0]
    activations = MemoryPlan("", world_size=max(world_size, 1), parameters=0.0, gradients=0.0, optimizer=0.0,
                             activations=act, activations_other=act_other, transient=transient, tokens=tokens,
                             sequence=sequence)
    return backend_for(cfg).memory_plan(cfg, shape, b, cuda, activations)


@dataclass
class Capacity:
    kind: str  # "cuda" or "cpu"
    name: str
    per_device: float  # bytes one device (or, on CPU, the whole host) offers
    host_available: float


def detect_capacity() -> Capacity:
    """GPU memory of the smallest visible GPU, or the host's available RAM on a CPU-only machine."""
    host = float(psutil.virtual_memory().available)
    if torch.cuda.is_available() and torch.cuda.device_count():
        props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        small = min(props, key=lambda p: p.total_memory)
        return Capacity("cuda", small.name, float(small.total_memory), host)
    return Capacity("cpu", "host RAM", host, host)


def _gib(x: float) -> str:
    return f"{x / GIB:,.2f} GiB"


def table(plan: MemoryPlan, cap: Capacity, per_node: int) -> list[str]:
    """The short table printed before the workers start (its rows add up to the total)."""
    ckpt = "with" if plan.activations < plan.activations_other else "without"
    peak = plan.total - plan.parameters - plan.gradients - plan.optimizer - plan.buffers - plan.activations
    rows = [("parameters", plan.parameters), ("gradients", plan.gradients), ("optimizer states", plan.optimizer),
            (f"activations ({ckpt} grad. checkpointing)", plan.activations),
            ("backward / optimizer-step peak on top", peak), ("communication buffers", plan.buffers),
            ("total per device", plan.total)]
    split = f", each row split over {plan.sequence} ranks" if plan.sequence > 1 else ""
    out = [f"memory plan ({plan.strategy}, per device; micro-batch of {plan.tokens:,} tokens{split}):"]
    out += [f"  {k:<42}{_gib(v):>12}" for k, v in rows if v or k.startswith("total")]
    other = "with" if ckpt == "without" else "without"
    out.append(f"  {'(activations ' + other + ' grad. checkpointing)':<42}{_gib(plan.activations_other):>12}")
    if plan.host_offload:
        out.append(f"  {'offloaded to host memory, per rank':<42}{_gib(plan.host_offload):>12}")
    if cap.kind == "cuda":
        out.append(f"  available: {_gib(cap.per_device)} per GPU ({cap.name}), host {_gib(cap.host_available)}")
    else:
        out.append(f"  available: {_gib(cap.host_available)} host RAM for {per_node} CPU worker(s)")
    return out + [f"  note: {n}" for n in plan.notes]


def needed(plan: MemoryPlan, cap: Capacity, per_node: int) -> tuple[float, float]:
    """(bytes needed, bytes usable) on the tightest resource: one GPU, or the host holding every local rank."""
    if cap.kind == "cuda":
        return plan.total + GPU_PROCESS_OVERHEAD, cap.per_device
    return per_node * (plan.total + plan.host_offload + CPU_PROCESS_OVERHEAD), cap.host_available


def smallest_fix(cfg: Config, shape: ModelShape, cap: Capacity, per_node: int, world: int,
                 degrees: list[int]) -> str | None:
    """The smallest change of sequence degree (one of ``degrees``) and/or gradient checkpointing that makes the job
    fit, as overrides (sequence degree first: it also shrinks what checkpointing keeps); None if none does."""
    now = cfg.parallel.sequence
    usable = cap.per_device if cap.kind == "cuda" else cap.host_available
    for n in sorted(degrees):
        for ckpt in sorted({cfg.model.gradient_checkpointing, True}):
            plan = estimate(cfg, shape, world, cap.kind == "cuda", sequence=n, checkpointing=ckpt)
            if needed(plan, cap, per_node)[0] <= usable * cfg.planner.usable_fraction:
                fix = ([f"parallel.sequence={n}"] if n != now else []) + (
                    ["model.gradient_checkpointing=true"] if ckpt and not cfg.model.gradient_checkpointing else [])
                return " ".join(fix) or None
    return None


def suggestions(cfg: Config, plan: MemoryPlan, fix: str | None = None) -> list[str]:
    tips = [f"{fix} (the smallest such change that fits)"] if fix else []
    if not cfg.model.gradient_checkpointing and plan.activations_other < plan.activations and (
            not fix or "gradient_checkpointing" not in fix):
        tips.append(f"model.gradient_checkpointing=true (activations {_gib(plan.activations)} -> "
                    f"{_gib(plan.activations_other)})")
    if cfg.train.micro_batch_size > 1:
        tips.append(f"train.micro_batch_size={max(1, cfg.train.micro_batch_size // 2)} with "
                    f"train.grad_accum={cfg.train.grad_accum * 2} (same batch, half the activations)")
    tips += backend_for(cfg).memory_tips(cfg, plan)
    if cfg.finetune.method == "full":
        tips.append("finetune=lora (trains adapters only: gradients and optimizer states shrink to a few MB)")
    tips.append(f"a shorter dataset.cutoff_len (now {cfg.dataset.cutoff_len}) or more GPUs")
    return tips


def sequence_degrees(cfg: Config, world: int, shape: ModelShape) -> list[int]:
    """Sequence degrees the job could run with: on a backend that splits rows (DeepSpeed), the configured one and
    the larger ones that divide the world size and the attention heads (launcher/sequence.py); elsewhere the
    configured one."""
    now = cfg.parallel.sequence
    if (not backend_for(cfg).supports_sequence_parallel
            or cfg.model.attn_implementation not in SEQUENCE_PARALLEL_ATTENTION):
        return [now]
    return [d for d in range(now, world + 1) if world % d == 0 and d % now == 0 and shape.heads % d == 0
            and (shape.kv_heads % d == 0 or d % shape.kv_heads == 0)]


def check_memory(cfg: Config, nproc_per_node: int, say: Callable[[str], None],
                 refuse: bool = True) -> dict[str, Any] | None:
    """Print the plan; raise ConfigError when it cannot fit (unless ``planner.force`` or not ``refuse``).

    Returns the plan as a dict (what the launcher writes to ``memory_plan.json``), or None when the model's
    config.json is not available locally (the launcher's own check reports that)."""
    try:
        shape = load_shape(cfg)
    except (OSError, ValueError) as err:
        say(f"memory plan skipped: cannot read the model's config.json ({str(err).splitlines()[0][:200]})")
        return None
    cap = detect_capacity()
    world = backend_for(cfg).world_size(cfg, nproc_per_node)
    plan = estimate(cfg, shape, world, cap.kind == "cuda", sequence=cfg.parallel.sequence)
    for line in table(plan, cap, nproc_per_node):
        say(line)
    need, have = needed(plan, cap, nproc_per_node)
    usable = have * cfg.planner.usable_fraction
    host_need = nproc_per_node * plan.host_offload
    record = {**asdict(plan), "total": plan.total, "shape": asdict(shape), "capacity": asdict(cap),
              "needed": need, "usable": usable}
    problems = []
    if need > usable:
        where = f"one {cap.name} GPU" if cap.kind == "cuda" else f"the host's RAM ({nproc_per_node} workers)"
        problems.append(f"needs about {_gib(need)} on {where} but {_gib(usable)} is usable "
                        f"({cfg.planner.usable_fraction:.0%} of {_gib(have)})")
    if cap.kind == "cuda" and host_need > cap.host_available * cfg.planner.usable_fraction:
        problems.append(f"offloading needs {_gib(host_need)} of host RAM but {_gib(cap.host_available)} is available")
    if not problems:
        return record
    fix = smallest_fix(cfg, shape, cap, nproc_per_node, world, sequence_degrees(cfg, world, shape))
    msg = (f"The job will not fit in memory: it {' and '.join(problems)}. Try "
           + "; or ".join(suggestions(cfg, plan, fix))
           + ". Set planner.force=true to start anyway (the estimate is conservative within about ±35%).")
    if cfg.planner.force or not refuse:
        say(f"warning: {msg}")
        return record
    raise ConfigError(msg)
