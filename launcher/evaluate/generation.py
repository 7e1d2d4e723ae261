"""Generation evaluation: greedy answers to held-out prompts, scored with task metrics, on every backend.

The launcher reads the prompts once, before any worker starts (:func:`prepare_prompts`): every record of the
``eval.generate.datasets`` entries becomes a prompt (its turns before the last reply), a reference (the last
reply) and the fields its metrics need (the SQL schema, the document ids); a record or metric that does not fit
fails there, naming the record, the key and the fix. They are written to ``<run_dir>/generate_prompts.jsonl``.

Workers (and ``python -m launcher.evaluate``) then run :class:`GenerationEval`: prompts are encoded with the
training template, sorted by length and cut into global batches of ``batch_size``, which are dealt round-robin to
the ranks. A record therefore lands in the same padded batch whatever the world size, so one process, ZeRO-2/3
and FSDP2 produce the same greedy tokens for the same weights. Every rank makes the same number of ``generate``
calls (a rank short of batches repeats one and drops the result) with ``synced_gpus=True``, so ranks whose
sequences finished keep joining the forwards that ZeRO-3 and FSDP need from all of them (their parameter
gathers are collectives). Decoding stops at the template's stop words. Rank 0 gathers the answers, scores them
(:mod:`launcher.evaluate.tasks`), prints a table and appends to ``eval_generations.jsonl``.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from launcher.attention import unpacked
from launcher.config import Config, ConfigError, GenerateConfig, resolve_path
from launcher.evaluate.tasks import METRICS, NEEDS, SqlSettings, average, document_ids, scorers, sql_exec
from launcher.formats import to_messages
from launcher.registry import DataError, load_registry, read_records
from launcher.templates import IGNORE_INDEX, Template, TemplateError

PROMPTS_FILE = "generate_prompts.jsonl"
GENERATIONS_FILE = "eval_generations.jsonl"


# ------------------------------------------------------------------------------------------------ config
def metrics_for(g: GenerateConfig, dataset: str) -> list[str]:
    """The metrics of one dataset: ``eval.generate.metrics`` as a list (every dataset) or its entry in a mapping."""
    m = g.metrics
    return list(m.get(dataset, [])) if isinstance(m, dict) else list(m)


def config_problems(g: GenerateConfig) -> list[str]:
    """Problems with ``eval.generate`` that need no data (the launcher checks them first)."""
    e: list[str] = []
    m = g.metrics
    if isinstance(m, dict):
        for name in m:
            if name not in g.datasets:
                e.append(f"eval.generate.metrics names dataset {name!r}, which is not in eval.generate.datasets="
                         f"{list(g.datasets)}: add it there or remove its entry.")
        lists = list(m.values())
    else:
        lists = [m]
    for names in lists:
        if not isinstance(names, (list, tuple)) or not names:
            e.append(f"eval.generate.metrics={m!r}: give a non-empty list of metrics (e.g. [exact_match]) or a "
                     f"mapping from dataset to such a list.")
            continue
        for name in names:
            if name not in METRICS:
                e.append(f"eval.generate.metrics: unknown metric {name!r}; choose from {', '.join(METRICS)}.")
    for d in g.datasets:
        if isinstance(m, dict) and not m.get(d):
            e.append(f"eval.generate.datasets has {d!r} but eval.generate.metrics has no entry for it: add "
                     f"{d}: [exact_match] (or the metrics that fit it).")
    for key in ("max_new_tokens", "batch_size"):
        if getattr(g, key) < 1:
            e.append(f"eval.generate.{key}={getattr(g, key)} must be at least 1.")
    if g.steps < 0:
        e.append(f"eval.generate.steps={g.steps} is negative: use 0 (after training only) or N (every N steps).")
    if (g.steps or g.before) and not g.datasets:
        e.append(f"eval.generate.{'steps' if g.steps else 'before'} is set but eval.generate.datasets is empty: "
                 "name the held-out "
                 "entries of dataset_info.json to answer, e.g. eval.generate.datasets=[text2sql_ko_heldout].")
    if g.max_samples is not None and g.max_samples < 1:
        e.append(f"eval.generate.max_samples={g.max_samples} must be at least 1 (or null for all records).")
    try:
        if re.compile(g.citation.document_header).groups < 1:
            e.append("eval.generate.citation.document_header needs a group for the id, e.g. ^\\[([^\\]]+)\\].")
    except re.error as err:
        e.append(f"eval.generate.citation.document_header is not a regular expression ({err}).")
    if g.sql.timeout_s <= 0 or g.sql.rows_per_table < 1 or g.sql.databases < 1:
        e.append("eval.generate.sql: timeout_s must be positive, rows_per_table and databases at least 1.")
    return e


def check_config(g: GenerateConfig) -> None:
    """Raise one ConfigError listing every problem of :func:`config_problems`."""
    problems = config_problems(g)
    if problems:
        raise ConfigError("Invalid generation eval settings:\n  - " + "\n  - ".join(problems))


def sql_settings(g: GenerateConfig, seed: int = 0) -> SqlSettings:
    return SqlSettings(timeout_s=g.sql.timeout_s, rows_per_table=g.sql.rows_per_table, databases=g.sql.databases,
                       seed=seed)


# ------------------------------------------------------------------------------------------------ prompts
@dataclass
class Prompt:
    """One held-out record: what the model is asked, what it should answer, and what its metrics need."""

    id: str  # "<dataset>/<record index>"
    dataset: str
    messages: list[dict[str, str]]  # the turns before the reply
    reference: str
    metrics: list[str]
    fields: dict[str, Any] = field(default_factory=dict)  # "schema" (sql_exec), "documents" (citation)
    tools: list[dict[str, Any]] = field(default_factory=list)


def _record_fields(record: Any, prompt_text: str, reference: str, names: list[str], g: GenerateConfig,
                   dataset: str, where: str) -> dict[str, Any]:
    """What the metrics need from one record; raises ConfigError naming the record, the key and the fix."""
    fields: dict[str, Any] = {}
    fix = f"or drop the metric for this dataset (eval.generate.metrics={{{dataset}: [exact_match]}})"
    where = f"{dataset}, {where}"
    if "sql_exec" in names:
        schema = record.get(g.sql.schema_field) if isinstance(record, dict) else None
        if not isinstance(schema, str) or "create table" not in schema.lower():
            raise ConfigError(f"{where}: metric sql_exec needs {NEEDS['sql_exec']} in field "
                              f"{g.sql.schema_field!r} (eval.generate.sql.schema_field), which this record does "
                              f"not have; set eval.generate.sql.schema_field to the field that holds it, {fix}.")
        try:
            sql_exec(reference, reference, schema, SqlSettings(databases=1, timeout_s=g.sql.timeout_s))
        except ValueError as err:
            raise ConfigError(f"{where}: metric sql_exec cannot score this record: {err}. Fix the record, "
                              f"{fix}.") from None
        fields["schema"] = schema
    if "citation" in names:
        docs = document_ids(record if isinstance(record, dict) else {}, prompt_text, g.citation.documents_field,
                            g.citation.document_header)
        if not docs:
            raise ConfigError(f"{where}: metric citation needs {NEEDS['citation']}: a field "
                              f"{g.citation.documents_field!r} (eval.generate.citation.documents_field) or "
                              f"document headers in the prompt (eval.generate.citation.document_header, e.g. "
                              f"'[doc-12] title'); this record has neither. Point one of the two at where its "
                              f"documents are, {fix}.")
        fields["documents"] = docs
    return fields


def load_prompts(cfg: Config, template: Template) -> list[Prompt]:
    """The held-out prompts of ``eval.generate.datasets``, checked against their metrics and the template."""
    g = cfg.eval.generate
    data_dir = resolve_path(cfg.dataset.dir)
    out: list[Prompt] = []
    for entry in load_registry(data_dir, list(g.datasets)):
        names = metrics_for(g, entry.name)
        n = 0
        for file in entry.files:
            for where, record in read_records(file):
                if g.max_samples is not None and n >= g.max_samples:
                    break
                msgs, tools = to_messages(record, entry, where)
                if msgs[-1]["role"] != "assistant":
                    raise DataError(f"{where}: the last turn is a {msgs[-1]['role']}, not an assistant reply to "
                                    f"compare with; eval.generate.datasets needs records that end with a reply.")
                try:
                    template.check(msgs, tools)
                except TemplateError as err:
                    raise DataError(f"{where}: {err}.") from None
                prompt_text = "\n".join(m["content"] for m in msgs[:-1])
                fields = _record_fields(record, prompt_text, msgs[-1]["content"], names, g, entry.name, where)
                out.append(Prompt(f"{entry.name}/{n}", entry.name, msgs[:-1], msgs[-1]["content"], names, fields,
                                  tools))
                n += 1
        if n == 0:
            raise DataError(f"dataset {entry.name!r} ({', '.join(map(str, entry.files))}) holds no records to "
                            f"answer: fix eval.generate.datasets.")
    return out


def write_prompts(prompts: list[Prompt], path: Path) -> Path:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(asdict(p), ensure_ascii=False) + "\n" for p in prompts), encoding="utf-8")
    tmp.replace(path)
    return path


def read_prompts(path: Path) -> list[Prompt]:
    return [Prompt(**json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line]


def prepare_prompts(cfg: Config, tokenizer: Any, run_dir: Path) -> int:
    """Launcher side: check and write the prompts for the workers (before they start); returns how many."""
    if not cfg.eval.generate.datasets:
        return 0
    prompts = load_prompts(cfg, Template(cfg.template, tokenizer))
    write_prompts(prompts, run_dir / PROMPTS_FILE)
    return len(prompts)


# ------------------------------------------------------------------------------------------------ generation
def prompt_ids(template: Template, p: Prompt) -> list[int]:
    """Token ids of the prompt exactly as training shows it, ending with the reply header: the conversation is
    encoded with its reference reply and cut where that (trained) reply starts."""
    enc = template.encode([*p.messages, {"role": "assistant", "content": p.reference}], tools=p.tools or None,
                          mask_history=True)
    assert enc is not None  # no cutoff, and the reply is trained
    start = next(i for i, lab in enumerate(enc.labels) if lab != IGNORE_INDEX)
    return enc.input_ids[:start]


def stop_ids(template: Template) -> list[int]:
    """The template's stop words that are single tokens, and the tokenizer's eos."""
    vocab = template.tokenizer.get_vocab()
    ids = [vocab[w] for w in template.cfg.stop_words if w in vocab]
    eos = template.tokenizer.eos_token_id
    return list(dict.fromkeys(ids + ([eos] if eos is not None else [])))


def cut_at_stop(text: str, stop_words: list[str]) -> str:
    """Text up to the first stop word (stop words of several tokens end up in the decoded text)."""
    cuts = [text.find(w) for w in stop_words if w and w in text]
    return text[:min(cuts)] if cuts else text


@dataclass
class Result:
    """One evaluation, on rank 0: per-record rows and per-dataset averages."""

    step: int
    rows: list[dict[str, Any]]
    scores: dict[str, dict[str, float]]  # dataset -> metric name -> mean
    seconds: float

    @property
    def records_per_s(self) -> float:
        return len(self.rows) / max(self.seconds, 1e-9)

    def flat(self) -> dict[str, float]:
        """Scores as flat metrics.jsonl keys: ``generate/<dataset>/<metric>``."""
        out = {f"generate/{d}/{k}": v for d, s in self.scores.items() for k, v in s.items()}
        return {**out, "generate/seconds": self.seconds, "generate/records_per_s": self.records_per_s}

    def table(self) -> list[str]:
        """The scores as console lines: one row per dataset, one column per metric value."""
        names = sorted({k for s in self.scores.values() for k in s})
        width = max([len(d) for d in self.scores] + [7])
        lines = [f"{'dataset':<{width}}  {'n':>4}  " + "  ".join(f"{n:>18}" for n in names)]
        for d, s in self.scores.items():
            n = sum(1 for r in self.rows if r["dataset"] == d)
            lines.append(f"{d:<{width}}  {n:>4}  " + "  ".join(
                f"{s[k]:>18.1%}" if k in s else f"{'-':>18}" for k in names))
        return lines


class GenerationEval:
    """Answers the prompts with the model on every rank together and scores them on rank 0."""

    def __init__(self, prompts: list[Prompt], template: Template, g: GenerateConfig, rank: int, world_size: int,
                 device: torch.device, seed: int = 0):
        self.prompts, self.template, self.g = prompts, template, g
        self.rank, self.world_size, self.device = rank, world_size, device
        self.ids = [prompt_ids(template, p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: (-len(self.ids[i]), i))  # little padding per batch
        batches = [order[i:i + g.batch_size] for i in range(0, len(order), g.batch_size)]
        self.mine = batches[rank::world_size]
        self.calls = math.ceil(len(batches) / world_size)  # the same on every rank
        self.placeholder = batches[0]
        self.stops = stop_ids(template)
        self.pad_id = template.tokenizer.pad_token_id if template.tokenizer.pad_token_id is not None else 0
        self.score = scorers(sql_settings(g, seed), g.citation.not_found)

    @classmethod
    def from_run(cls, cfg: Config, run_dir: Path, tokenizer: Any, rank: int, world_size: int,
                 device: torch.device) -> "GenerationEval | None":
        """The evaluation the launcher prepared for this run, or None when none is configured."""
        path = run_dir / PROMPTS_FILE
        if not cfg.eval.generate.datasets or not path.is_file():
            return None
        return cls(read_prompts(path), Template(cfg.template, tokenizer), cfg.eval.generate, rank, world_size,
                   device, cfg.train.seed)

    def due(self, step: int, total_steps: int) -> bool:
        """Whether to evaluate after optimizer step ``step``: every eval.generate.steps, and after the last."""
        return step == total_steps or bool(self.g.steps and step % self.g.steps == 0)

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, batch: list[int]) -> list[list[int]]:
        """Greedy new tokens for one batch of prompts (left-padded), each cut after its first stop token."""
        width = max(len(self.ids[i]) for i in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, width - len(self.ids[i]):] = torch.tensor(self.ids[i])
            mask[row, width - len(self.ids[i]):] = 1
        out = model.generate(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=self.g.max_new_tokens,
            do_sample=False, temperature=None, top_p=None, top_k=None, eos_token_id=self.stops,
            pad_token_id=self.pad_id, use_cache=True, synced_gpus=self.world_size > 1)
        new = out[:, width:].tolist()
        cut = []
        for seq in new:
            end = next((k for k, t in enumerate(seq) if t in self.stops), None)
            cut.append(seq if end is None else seq[:end + 1])
        return cut

    def run(self, model: torch.nn.Module, step: int, autocast: Any = None,
            context: AbstractContextManager | None = None) -> Result | None:
        """Generate on every rank (all call this together) inside ``context`` (the backend's ``generating``);
        rank 0 returns the scored result, others None."""
        t0 = time.time()
        was_training = model.training
        model.eval()
        answers: dict[int, list[int]] = {}
        try:
            with context or nullcontext(), unpacked(model):
                for k in range(self.calls):
                    batch = self.mine[k] if k < len(self.mine) else self.placeholder
                    with autocast or nullcontext():
                        new = self.generate(model, batch)
                    if k < len(self.mine):
                        answers.update(zip(batch, new))
        finally:
            model.train(was_training)
        if self.world_size > 1:
            gathered: list[Any] = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, answers)
            answers = {i: a for part in gathered for i, a in part.items()}
        if self.rank != 0:
            return None
        return self.scored(step, answers, time.time() - t0)

    def scored(self, step: int, answers: dict[int, list[int]], seconds: float) -> Result:
        tok, stop_words = self.template.tokenizer, list(self.template.cfg.stop_words)
        rows, per_dataset = [], {}
        for i, p in enumerate(self.prompts):
            seq = answers[i]
            stopped = bool(seq) and seq[-1] in self.stops
            text = cut_at_stop(tok.decode(seq[:-1] if stopped else seq, skip_special_tokens=True), stop_words)
            values: dict[str, Any] = {}
            for name in p.metrics:
                values.update(self.score[name](text, p.reference, p.fields))
            rows.append({"step": step, "id": p.id, "dataset": p.dataset, "reference": p.reference,
                         "prediction": text, "stopped": stopped, "new_tokens": len(seq), "metrics": values})
            per_dataset.setdefault(p.dataset, []).append(values)
        return Result(step, rows, {d: average(v) for d, v in per_dataset.items()}, seconds)


def append_generations(path: Path, result: Result) -> None:
    """Append one evaluation's rows to ``eval_generations.jsonl`` (prompt id, reference, prediction, metrics)."""
    with path.open("a", encoding="utf-8") as f:
        for row in result.rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def gain_lines(results: list[dict[str, Any]]) -> list[str]:
    """Summary lines: each dataset's metrics at the first and the last evaluation (``results`` from summary.json)."""
    if not results:
        return []
    first, last = results[0], results[-1]
    lines = []
    for d, s in last["scores"].items():
        parts = []
        for k in ("sql_exec", "sql_error", "exact_match", "citation_recall", "not_found_accuracy"):
            if k in s:
                before = first["scores"].get(d, {}).get(k)
                parts.append(f"{k} {before:.1%} (step {first['step']}) -> {s[k]:.1%} (step {last['step']})"
                             if before is not None and first is not last else f"{k} {s[k]:.1%} (step {last['step']})")
        if parts:
            lines.append(f"generation eval, {d}: " + ", ".join(parts))
    return lines

