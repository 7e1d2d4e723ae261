"""Typed configuration: the dataclasses Hydra composes over, and loading a run's saved config.

Every YAML file under ``conf/`` fills one of these schemas, so a misspelt key or a wrong type fails at
composition time with Hydra's own message. Cross-field checks live in :func:`launcher.validate.validate`, which
gathers every problem into one :class:`ConfigError` instead of stopping at the first; the ``backend`` group is
checked by the backend it names (launcher/backends/).
"""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from launcher.evaluate.tasks import DOCUMENT_HEADER

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message says which key and how."""


@dataclass
class ModelConfig:
    """Which model to fine-tune and how to load it."""

    # Hugging Face hub id or local directory. Relative paths resolve against the working directory, then the
    # project root (so `models/tiny_llama` works from anywhere).
    name_or_path: str = MISSING
    # "pretrained": load weights from name_or_path. "random": build the architecture from its config.json and
    # initialise weights from `init_seed` (the embedded tiny model; no download needed).
    init: str = "pretrained"
    init_seed: int = 0
    # Compute dtype: "auto" is bfloat16 on GPU and float32 on CPU. Master weights stay float32 either way.
    dtype: str = "auto"
    # "auto" (packed rows: "packed", each record's own attention blocks only, see launcher/attention.py; otherwise
    # "sdpa"), "packed", "sdpa", "eager", "flash_attention_2" or "flash_attention_3". Packed rows stay isolated with
    # each (see launcher/packing.py); the worker also checks the loaded model at start and refuses packed training on
    # an architecture that ignores packed position ids (OPT, Bloom, Falcon in transformers 5.23).
    attn_implementation: str = "auto"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False


@dataclass
class TemplateConfig:
    """A chat format as slots (see conf/template/*.yaml and launcher/templates.py).

    Holes in double braces mark where data goes: ``{{content}}`` (a message's text), and in the tool slots
    ``{{tools}}``, ``{{tool}}``, ``{{name}}``, ``{{arguments}}``. ``{{bos}}``/``{{eos}}`` are the tokenizer's bos/eos
    token. Everything else in a slot is template markup: control tokens are recognised there, never inside data."""

    name: str = MISSING
    prefix: str = ""  # once at the start, e.g. "{{bos}}"
    system: str = "{{content}}"
    user: str = "{{content}}"  # ends with the reply header: what follows is what the model generates
    assistant: str = "{{content}}"  # the trained part: the reply and its end-of-turn marker
    separator: str = ""  # between one reply and the next prompt turn
    default_system: str = ""  # used when a conversation has no system message
    # Where the system prompt goes: "turn" (its own turn, rendered by `system`), or "first_user" / "last_user": the
    # `system` slot is rendered inside that user turn, before the user's text (formats without a system role).
    system_position: str = "turn"
    # The tool protocol; an empty slot means the template cannot render such turns (clear error for such data).
    observation: str = ""  # a tool result, answered by the next reply; ends with the reply header like `user`
    function_call: str = ""  # a reply that calls tools: {{content}} = the calls, each rendered by `tool_call`
    tool_call: str = ""  # one call: {{name}} and {{arguments}} (JSON); several calls are joined by a newline
    tools: str = ""  # the system turn of a conversation with tools: {{content}} = system prompt, {{tools}} = list
    tool_item: str = "{{tool}}"  # one tool of {{tools}}: {{tool}} = its JSON ({"type": "function", ...})
    tool_indent: Optional[int] = None  # JSON indent of {{tool}} (None: one line)
    stop_words: list[str] = field(default_factory=list)
    # Use the first stop word as the tokenizer's eos at export, so `generate` stops at the end of a turn.
    replace_eos: bool = False
    # Append the tokenizer's eos once after the last reply (trained), instead of in every reply.
    efficient_eos: bool = False
    notes: str = ""  # why the template differs from the model's official Jinja template, if it does


@dataclass
class DatasetConfig:
    """Which records to train on and how they become token rows.

    Mixing (launcher/mixing.py): ``weights`` gives each of ``names`` a share of the training records (or tokens,
    ``mix_by=tokens``); ``mix_size`` is ``under`` (largest mix repeating nothing), ``over`` (smallest mix using every
    record), a count (``20000``) or a multiple of what is available (``2x``). Each dataset is down-sampled or
    repeated to its share, drawn from ``train.seed``. LLaMA-Factory's keys map onto it exactly:
    ``mix_strategy=interleave_under interleave_probs=0.6,0.3,0.1`` is ``weights=[0.6,0.3,0.1] mix_size=under``,
    ``interleave_over`` is ``mix_size=over``, interleave without probs is equal weights, and ``concat`` /
    ``interleave_once`` are the default (every record once)."""

    # A LLaMA-Factory-style data folder with dataset_info.json.
    dir: str = "data"
    names: list[str] = field(default_factory=lambda: ["text2sql_ko"])
    # One weight per name (any scale: [6,3,1] = [0.6,0.3,0.1]); empty: every record once, nothing mixed.
    weights: list[float] = field(default_factory=list)
    mix_by: str = "records"  # what the weights are shares of: "records" or "tokens"
    mix_size: Optional[str] = None  # "under" (None), "over", a count (of mix_by's unit), or "Nx" (N × available)
    # LLaMA-Factory's spelling of the same (one or the other): "concat", "interleave_under", "interleave_over",
    # "interleave_once"; interleave_probs as "0.6,0.3,0.1" or a list.
    mix_strategy: Optional[str] = None
    interleave_probs: Any = None
    max_samples: Optional[int] = None  # per dataset, taken from the start of each file
    val_size: float = 0.0  # fraction (<1) or count (>=1) of records held out for evaluation
    cutoff_len: int = 1024  # tokens per packed row (and the longest record kept)
    packing: bool = True
    # Records longer than cutoff_len: "truncate" (earlier turns go first, then the end of the last reply), "drop",
    # or "cut_prompt" (every reply kept whole: the longest user message loses text from its end, then the other
    # user messages, earliest first; a record whose replies alone do not fit is dropped). All counted in the
    # data report (python -m launcher.inspect_data).
    overlong: str = "truncate"
    on_error: str = "raise"  # malformed records: "raise" or "skip" (skips are counted and reported)
    train_on_prompt: bool = False
    mask_history: bool = False  # train only the last assistant turn
    num_proc: int = 1
    cache_dir: str = ".cache/launcher"


@dataclass
class OptimizerConfig:
    """AdamW with linear warmup then cosine decay to `min_lr_ratio` × lr."""

    name: str = "adamw"
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0


@dataclass
class BackendConfig:
    """How workers are started and how they shard the model."""

    # "single": one process, plain PyTorch, run in the launcher process.
    # "deepspeed": workers started by the `deepspeed` CLI; ZeRO stage and offload come from `ds_config`.
    # "fsdp": workers started by `accelerate launch` with `accelerate_config` (FSDP2, full shard).
    name: str = "single"
    # DeepSpeed JSON; its "auto" values are filled from this config (an explicit contradicting value is an error).
    ds_config: Optional[str] = None
    # Accelerate config file for name=fsdp (distributed_type FSDP, fsdp_version 2).
    accelerate_config: Optional[str] = None
    # How long a collective waits for a missing rank before the job fails, so a hung rank never hangs the job.
    timeout_minutes: float = 30.0


@dataclass
class FinetuneConfig:
    """Full fine-tuning or LoRA adapters (PEFT)."""

    method: str = "full"  # "full", "lora", or "qlora" (LoRA on a 4-bit base; needs a GPU and bitsandbytes)
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    # Module names to adapt, or [all-linear] for every linear layer except the output head.
    lora_target: list[str] = field(default_factory=lambda: ["all-linear"])
    # Modules trained in full next to the adapters, e.g. [embed_tokens,lm_head] when the template added tokens.
    lora_modules_to_save: list[str] = field(default_factory=list)


@dataclass
class TrainerConfig:
    """The optimisation loop."""

    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    micro_batch_size: int = 1  # rows per rank per forward pass (each row holds up to cutoff_len tokens)
    grad_accum: int = 1
    seed: int = 42
    log_every: int = 1
    save_steps: int = 0  # 0: only at the end
    save_total_limit: int = 2
    # The loss computes logits for at most this many supervised positions at a time and never holds fp32
    # [tokens × vocab] logits (launcher/loss.py); 0: the plain path (the model's full logits, upcast to fp32).
    # Same loss and gradients either way; smaller chunks use less memory (each chunk's logits are recomputed in
    # backward, one extra output-head matmul over the supervised positions).
    loss_chunk_tokens: int = 2048
    # A step whose loss or gradient norm is not finite: "stop" (no checkpoint of that state is written; exit
    # non-zero, naming the last good checkpoint) or "skip" (the update is not applied; single and fsdp backends).
    nonfinite: str = "stop"


@dataclass
class LauncherConfig:
    """Where the workers run, as asked for. Multi-node values are filled by slurm/train.sh; what the launcher
    picks where a value is None (the worker count, a free port) goes into run.json (launcher/runspec.py)."""

    nproc_per_node: Optional[int] = None  # None: one per GPU, or 2 on a CPU-only machine
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    # None: a free port on one node. Multi-node runs must set it; they also use master_port + 1 (preflight).
    master_port: Optional[int] = None
    omp_num_threads: Optional[int] = None  # None: cores / workers on CPU (at least 1)
    # Multi-node: seconds node 0 waits for every node's launcher to check in (launcher/preflight.py).
    preflight_timeout: int = 300


@dataclass
class MergeConfig:
    """Export of a checkpoint as a verified Hugging Face model folder (``python -m launcher.merge RUN_DIR``)."""

    # At the end of `python -m launcher`: merge the last checkpoint and print one answer of the trained model.
    after_train: bool = True
    # "": <run_dir>/merged/step-N (merged weights) or <run_dir>/adapter/step-N (merge.lora=false).
    output_dir: str = ""
    # Weights dtype: "float32", "bfloat16", "float16", or "auto" (the base model's dtype, float32 if it names none).
    dtype: str = "auto"
    # Larger weights are split into model-0000i-of-0000n.safetensors + model.safetensors.index.json.
    max_shard_size: str = "5GB"
    # LoRA runs: true merges the adapters into the base weights; false writes the adapter alone in PEFT format.
    lora: bool = True
    # Reload the export in a fresh process and compare it with the checkpoint (logits, parameters, a reply).
    verify: bool = True
    # Largest logit difference allowed between the export and the training-time weights: `atol` for float32
    # exports; lower precisions are compared with `atol_low_precision` × the largest reference logit.
    atol: float = 1e-5
    atol_low_precision: float = 0.05
    max_new_tokens: int = 128
    # Held-out records whose first prompt the merged model answers after training: a name registered in
    # dataset.dir's dataset_info.json (e.g. text2sql_ko_heldout) or a JSON file path; "" asks nothing.
    ask: str = ""


@dataclass
class WandbConfig:
    """Weights & Biases: one run per job, created by global rank 0 with the composed config.

    A W&B failure (no network, no API key, a full disk) is warned about once and never stops training."""

    enabled: bool = False
    project: str = "launcher"
    entity: Optional[str] = None  # team or user; None: your default entity
    name: Optional[str] = None  # None: the job name and the run directory's timestamp
    tags: list[str] = field(default_factory=list)
    mode: str = "online"  # "online" (sync while training) or "offline" (files only; `wandb sync` them later)
    # Seconds wandb.init may take before the run goes on without W&B (offline init takes well under 1 s).
    init_timeout: float = 30.0


@dataclass
class LoggerConfig:
    """What rank 0 shows and records while training (metrics.jsonl is always written)."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    # "auto": a progress bar when stdout is a terminal, plain periodic lines otherwise (Slurm logs);
    # "bar" or "lines" to force one of them.
    progress: str = "auto"
    # Seconds between plain progress lines during data preparation (lines mode only).
    progress_every_s: float = 30.0
    # Peak dense bf16 FLOP/s of one device, for MFU; None: looked up from the GPU's name (launcher/metrics/flops.py).
    peak_flops: Optional[float] = None
    plot: bool = True  # write loss.png (train and eval loss) into the run directory at the end


@dataclass
class SqlMetricConfig:
    """How ``sql_exec`` runs SQL answers (launcher/evaluate/tasks.py)."""

    schema_field: str = "input"  # the record field (as in the data file) holding the CREATE TABLE statements
    timeout_s: float = 2.0  # per query; a prediction past it counts as a timeout
    rows_per_table: int = 50  # generated rows in each table
    databases: int = 3  # generated databases an answer must match the reference on


@dataclass
class CitationMetricConfig:
    """How ``citation`` reads a RAG record (launcher/evaluate/tasks.py)."""

    # The record field with the documents (a list of {"id": ...} objects or of ids, or an {id: text} object);
    # records without it have their documents' ids read from the headers in the prompt that match
    # `document_header` at a line start (group 1 is the id): "[doc-12] title" or "[[doc-12]]" by default.
    documents_field: str = "documents"
    document_header: str = DOCUMENT_HEADER
    # An answer containing this phrase says the documents do not hold the answer (the llama3_rag system prompt's).
    not_found: str = "검색 결과에서 답을 찾을 수 없습니다"


@dataclass
class GenerateConfig:
    """Generation evaluation: greedy answers to held-out prompts, scored with task metrics, during training (on
    every backend) and by ``python -m launcher.evaluate`` for a finished model."""

    # dataset_info.json entries (in dataset.dir) whose prompts are answered; empty: no generation eval.
    datasets: list[str] = field(default_factory=list)
    max_samples: Optional[int] = 32  # per dataset, from the start of each file
    # Metrics for every dataset ([exact_match, sql_exec]), or per dataset ({text2sql_ko_heldout: [sql_exec]}).
    # Known: exact_match, sql_exec (needs a schema), citation (needs documents).
    metrics: Any = field(default_factory=lambda: ["exact_match"])
    steps: int = 0  # generate every N optimizer steps; 0: only after training
    before: bool = False  # also before the first step, so the gain over the base model is visible
    max_new_tokens: int = 128
    batch_size: int = 8  # prompts per generate call on each rank
    sql: SqlMetricConfig = field(default_factory=SqlMetricConfig)
    citation: CitationMetricConfig = field(default_factory=CitationMetricConfig)


@dataclass
class EvalConfig:
    """Held-out loss: same masking and normalisation as training (Σ token losses / supervised tokens over the
    whole eval set, across ranks). Eval data comes from `dataset.val_size` or from `eval.datasets`. Generation
    with task metrics is `eval.generate`."""

    steps: int = 0  # evaluate every N optimizer steps; 0: only once at the end (when there is eval data)
    # dataset_info.json entries (in dataset.dir) used as the validation set, instead of dataset.val_size.
    datasets: list[str] = field(default_factory=list)
    max_samples: Optional[int] = None  # per validation dataset, from the start of each file
    micro_batch_size: Optional[int] = None  # rows per rank per eval forward; None: train.micro_batch_size
    generate: GenerateConfig = field(default_factory=GenerateConfig)


@dataclass
class ParallelConfig:
    """How ranks split the work beyond data parallelism."""

    # Sequence parallelism (DeepSpeed backends): every packed row is split over this many ranks, which exchange
    # attention heads for sequence with DeepSpeed's Ulysses all-to-all; data parallelism is world / sequence.
    # Loss and gradients are those of sequence=1 at the same global batch; per-rank activations shrink ~1/N.
    sequence: int = 1


@dataclass
class PlannerConfig:
    """The memory planner that runs before any worker starts (launcher/planner.py)."""

    enabled: bool = True
    force: bool = False  # start even when the estimate exceeds the detected memory
    # Fraction of each device's memory the job may plan to use; the rest covers the allocator's fragmentation
    # and what the estimate does not model (CUDA context, communication buffers).
    usable_fraction: float = 0.9


@dataclass
class Config:
    """The whole job. `python -m launcher --cfg job` prints the composed form."""

    model: ModelConfig = MISSING
    template: TemplateConfig = MISSING
    dataset: DatasetConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    backend: BackendConfig = MISSING
    finetune: FinetuneConfig = MISSING
    train: TrainerConfig = field(default_factory=TrainerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    name: str = "default"
    output_dir: str = "outputs"
    dry_run: bool = False
    # "auto": continue from the newest complete checkpoint in the run directory (pass hydra.run.dir=<run dir>),
    # "never": start from step 0, or the path of one checkpoints/step-N directory to continue from.
    resume: str = "auto"
    # Resuming on data that changed since the checkpoint is refused; true continues the model on the new data,
    # with the data cursor started again at its beginning (the old cursor points into the old data).
    resume_new_data: bool = False


def register_configs() -> None:
    """Register the schema that conf/config.yaml extends: each group's YAML is merged into its typed field, so
    an unknown key or a wrong type in any group file or override fails at composition."""
    ConfigStore.instance().store(name="config_schema", node=Config)
    from launcher.rundir import register_resolver

    register_resolver()  # ${unique_dir:...} in conf/config.yaml's hydra.run.dir


def unknown_keys(node: Any, schema: type, prefix: str = "") -> list[str]:
    """Keys of ``node`` that ``schema`` (a config dataclass) does not define, e.g. from Hydra's append syntax
    ``+train.foo=1``, which adds keys even to a typed node; in the words of Hydra's message for a misspelt key."""
    hints = typing.get_type_hints(schema)
    out = []
    for key, value in node.items():
        if key not in hints:
            out.append(f"Key {key!r} not in {schema.__name__!r} (full_key: {prefix}{key})")
        elif is_dataclass(hints[key]) and isinstance(value, dict):
            out += unknown_keys(value, hints[key], f"{prefix}{key}.")
    return out


def to_object(cfg: DictConfig) -> Config:
    """Turn a composed DictConfig into the typed Config (resolving interpolations); a key the schema does not
    know is refused like a misspelt one."""
    unknown = unknown_keys(OmegaConf.to_container(cfg, resolve=False), Config)
    if unknown:
        raise ConfigError("; ".join(unknown) + ". Check the spelling (`python -m launcher --cfg job` lists every "
                          "key); a '+' cannot add settings the launcher does not have.")
    merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, Config)
    return obj


# Run facts that config.yaml held before they moved to run.json (launcher/runspec.py); old run directories
# still have them, and they are not settings.
_RUN_FACTS = ("run_dir", "data_path", "eval_data_path")


def load_run_config(run_dir: str | Path) -> Config:
    """Read the config the launcher wrote into a run directory as composed (workers and merge use this)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: pass a run directory written by `python -m launcher`.")
    cfg = OmegaConf.load(path)
    for key in _RUN_FACTS:
        cfg.pop(key, None)
    return to_object(cfg)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def resolve_path(p: str) -> Path:
    """A user path: absolute, or relative to the working directory, else to the project root."""
    path = Path(os.path.expanduser(p))
    if path.is_absolute() or path.exists():
        return path.resolve()
    return (PROJECT_ROOT / path).resolve() if (PROJECT_ROOT / path).exists() else path.resolve()
