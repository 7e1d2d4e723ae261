"""Data: LLaMA-Factory's ``dataset_info.json`` registry -> messages -> token ids and labels, cached on disk.

Preparation runs once, in the launcher process, before any worker starts. Its result is a directory of Arrow
files keyed by a hash of every input that can change it (data files, tokenizer, template, cutoff, masking), so a
second run with the same inputs reuses it and a changed input never reuses a stale one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from launcher.config import DatasetConfig, TemplateConfig, resolve_path
from launcher.templates import Template, TemplateError

log = logging.getLogger(__name__)
CACHE_VERSION = "1"  # bump when the cached format or the encoding logic changes

Messages = list[dict[str, str]]


class DataError(ValueError):
    """A problem in the user's data; the message names the file, the record and the field."""


# --------------------------------------------------------------------------------------------- registry
@dataclass
class DatasetEntry:
    """One entry of dataset_info.json, with LLaMA-Factory's defaults."""

    name: str
    files: list[Path]
    formatting: str = "alpaca"
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


_UNSUPPORTED = {
    "hf_hub_url": "it is downloaded from the Hugging Face hub",
    "ms_hub_url": "it is downloaded from ModelScope",
    "om_hub_url": "it is downloaded from Modelers",
    "script_url": "it is built by a dataset loading script",
    "cloud_file_name": "it is read from cloud storage",
}


def load_registry(data_dir: Path, names: list[str]) -> list[DatasetEntry]:
    """Read the named entries of ``<data_dir>/dataset_info.json``."""
    info_path = data_dir / "dataset_info.json"
    if not info_path.is_file():
        raise DataError(f"{info_path} does not exist: point dataset.dir at a folder with a dataset_info.json "
                        f"(LLaMA-Factory's format), e.g. dataset.dir=data.")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{info_path}, line {err.lineno}: not valid JSON ({err.msg}).") from None
    entries = []
    for name in names:
        if name not in info:
            raise DataError(f"dataset {name!r} is not in {info_path}; it has: {', '.join(sorted(info))}. "
                            f"Fix dataset.names or add the entry.")
        spec = info[name]
        for key, why in _UNSUPPORTED.items():
            if key in spec and "file_name" not in spec:
                raise DataError(f"{info_path}, entry {name!r}: {why} ({key}), which this launcher does not do "
                                f"(it runs offline). Download the files and give the entry a 'file_name'.")
        if spec.get("ranking"):
            raise DataError(f"{info_path}, entry {name!r}: 'ranking: true' marks preference data (DPO/RM); "
                            f"this launcher does supervised fine-tuning only. Remove it from dataset.names.")
        if "file_name" not in spec:
            raise DataError(f"{info_path}, entry {name!r}: no 'file_name'. Add the data file's name.")
        path = data_dir / spec["file_name"]
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in (".json", ".jsonl"))
        else:
            files = [path]
        missing = [str(p) for p in files if not p.is_file()]
        if missing or not files:
            raise DataError(f"{info_path}, entry {name!r}: file_name {spec['file_name']!r} not found "
                            f"({', '.join(missing) or 'empty folder'}).")
        formatting = spec.get("formatting", "alpaca")
        if formatting not in ("alpaca", "sharegpt"):
            raise DataError(f"{info_path}, entry {name!r}: formatting {formatting!r} is not 'alpaca' or 'sharegpt'.")
        entries.append(DatasetEntry(name, files, formatting, spec.get("columns", {}), spec.get("tags", {})))
    return entries


# --------------------------------------------------------------------------------------------- reading
def read_records(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (record number, record) from a JSON list or a JSON-lines file; errors name the line."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix == ".jsonl" or (stripped and stripped[0] == "{"):
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {lineno}: not valid JSON ({err.msg}, column {err.colno}).") from None
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}, line {err.lineno}: not valid JSON ({err.msg}, column {err.colno}).") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records (or JSON lines), found {type(data).__name__}.")
    yield from enumerate(data)


def _text(record: dict, key: str, where: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None or value == "":
        if required:
            raise DataError(f"{where}: field {key!r} is missing or empty.")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, found {type(value).__name__}.")
    return value


def alpaca_to_messages(record: dict, columns: dict[str, str], where: str) -> Messages:
    """instruction + input as the user turn (joined with a newline, as LLaMA-Factory does), output as the reply,
    optional system, and history as earlier [user, assistant] pairs."""
    c = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
         "history": "history", **columns}
    msgs: Messages = []
    system = _text(record, c["system"], where, required=False)
    if system:
        msgs.append({"role": "system", "content": system})
    history = record.get(c["history"]) or []
    if not isinstance(history, list):
        raise DataError(f"{where}: field {c['history']!r} must be a list of [user, assistant] pairs.")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) and x for x in pair)):
            raise DataError(f"{where}: {c['history']}[{i}] must be a pair of two non-empty strings.")
        msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = _text(record, c["prompt"], where)
    query = _text(record, c["query"], where, required=False)
    msgs.append({"role": "user", "content": f"{prompt}\n{query}" if query else prompt})
    msgs.append({"role": "assistant", "content": _text(record, c["response"], where)})
    return msgs


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "observation": "observation", "function_call": "function_call",
                   "function": "function_call", "tool": "observation"}


def sharegpt_to_messages(record: dict, entry: DatasetEntry, where: str) -> Messages:
    """sharegpt (`conversations` of from/value) or OpenAI (`messages` of role/content), tag names remappable."""
    c, t = entry.columns, entry.tags
    openai = "messages" in record and "conversations" not in record
    key = c.get("messages", "messages" if openai else "conversations")
    role_tag = t.get("role_tag", "role" if openai else "from")
    content_tag = t.get("content_tag", "content" if openai else "value")
    roles = dict(_SHAREGPT_ROLES)
    for tag, role in [("user_tag", "user"), ("assistant_tag", "assistant"), ("observation_tag", "observation"),
                      ("function_tag", "function_call"), ("system_tag", "system")]:
        if tag in t:
            roles[t[tag]] = role
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field {key!r} is missing or not a non-empty list of turns.")
    msgs: Messages = []
    system = _text(record, c["system"], where, required=False) if "system" in c else ""
    if system:
        msgs.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        at = f"{where}, {key}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{at}: a turn must be an object with {role_tag!r} and {content_tag!r}.")
        role = roles.get(turn.get(role_tag))
        if role is None:
            raise DataError(f"{at}: {role_tag}={turn.get(role_tag)!r} is not a known role "
                            f"({', '.join(sorted(roles))}); map it with 'tags' in dataset_info.json.")
        content = turn.get(content_tag)
        if not isinstance(content, str):
            raise DataError(f"{at}: {content_tag!r} must be a string, found {type(content).__name__}.")
        if role == "system":
            if msgs or i:
                raise DataError(f"{at}: a system turn may only come first.")
            msgs.append({"role": "system", "content": content})
            continue
        msgs.append({"role": role, "content": content})
    body = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    for i, m in enumerate(body):
        expect = ("user", "observation") if i % 2 == 0 else ("assistant", "function_call")
        if m["role"] not in expect:
            raise DataError(f"{where}: turn {i} has role {m['role']!r} where {' or '.join(expect)} is expected: "
                            f"turns must alternate user/observation and assistant/function_call.")
    if not body or len(body) % 2:
        raise DataError(f"{where}: the conversation must end with an assistant turn.")
    for i in range(1, len(body), 2):
        if not body[i]["content"].strip():
            raise DataError(f"{where}: assistant turn {i} is empty; there is nothing to train on.")
    return msgs


def to_messages(record: Any, entry: DatasetEntry, where: str) -> Messages:
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, found {type(record).__name__}.")
    if entry.formatting == "alpaca":
        return alpaca_to_messages(record, entry.columns, where)
    return sharegpt_to_messages(record, entry, where)


# --------------------------------------------------------------------------------------------- preparation
@dataclass
class DataStats:
    """What preparation did; printed at start and kept in the run summary."""

    records: int = 0
    used: int = 0
    dropped_errors: int = 0
    dropped_overlong: int = 0
    truncated: int = 0
    eval_records: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    errors: list[str] = field(default_factory=list)  # the first few skip reasons


def _hash_inputs(cfg: DatasetConfig, template: TemplateConfig, tokenizer_dir: Path,
                 entries: list[DatasetEntry], seed: int) -> str:
    h = hashlib.sha256(CACHE_VERSION.encode())
    for key in ("cutoff_len", "packing", "overlong", "on_error", "train_on_prompt", "mask_history",
                "max_samples", "val_size"):
        h.update(f"{key}={getattr(cfg, key)};".encode())
    h.update(json.dumps(asdict(template), sort_keys=True).encode())
    h.update(f"seed={seed}".encode())
    for p in sorted(tokenizer_dir.glob("tokenizer*")) + sorted(tokenizer_dir.glob("special_tokens_map.json")):
        h.update(p.name.encode() + p.read_bytes())
    for e in entries:
        h.update(json.dumps([e.name, e.formatting, e.columns, e.tags], sort_keys=True).encode())
        for f in e.files:
            h.update(str(f.name).encode() + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def prepare(cfg: DatasetConfig, template_cfg: TemplateConfig, tokenizer: Any, tokenizer_dir: Path,
            seed: int) -> tuple[Path, DataStats, bool]:
    """Tokenise, mask, split and pack the configured datasets; returns (prepared dir, stats, cache hit)."""
    from launcher.packing import pack_dataset

    data_dir = resolve_path(cfg.dir)
    entries = load_registry(data_dir, list(cfg.names))
    key = _hash_inputs(cfg, template_cfg, tokenizer_dir, entries, seed)
    cache_root = resolve_path(cfg.cache_dir)
    out = cache_root / f"data-{key}"
    if (out / "COMPLETE").is_file():
        stats = DataStats(**json.loads((out / "stats.json").read_text()))
        return out, stats, True

    template = Template(template_cfg, tokenizer)
    stats = DataStats()
    convs: list[Messages] = []
    for entry in entries:
        n = 0
        for file in entry.files:
            for idx, record in read_records(file):
                if cfg.max_samples is not None and n >= cfg.max_samples:
                    break
                n += 1
                stats.records += 1
                where = f"{file}, record {idx}" if file.suffix != ".jsonl" else f"{file}, line {idx}"
                try:
                    msgs = to_messages(record, entry, where)
                    template._turns(msgs)  # roles the template cannot render fail here, with the record named
                except (DataError, TemplateError) as err:
                    msg = str(err) if isinstance(err, DataError) else f"{where}: {err}"
                    if cfg.on_error == "raise":
                        raise DataError(f"{msg} Fix the record, or set dataset.on_error=skip to drop such "
                                        f"records (they are counted and reported).") from None
                    stats.dropped_errors += 1
                    if len(stats.errors) < 5:
                        stats.errors.append(msg)
                    continue
                convs.append(msgs)
    if not convs:
        raise DataError(f"no usable records in {', '.join(cfg.names)} under {data_dir}.")

    encoded = []
    batch = 1024
    for start in range(0, len(convs), batch):
        for enc in template.encode_batch(convs[start:start + batch], cfg.cutoff_len,
                                         train_on_prompt=cfg.train_on_prompt, mask_history=cfg.mask_history):
            if enc is None or (enc.truncated and cfg.overlong == "drop"):
                stats.dropped_overlong += 1
                continue
            stats.truncated += enc.truncated
            encoded.append(enc)
    if not encoded:
        raise DataError(f"every record was dropped as longer than dataset.cutoff_len={cfg.cutoff_len}; "
                        f"raise cutoff_len or use dataset.overlong=truncate.")

    import random

    order = list(range(len(encoded)))
    n_eval = int(cfg.val_size if cfg.val_size >= 1 else round(cfg.val_size * len(encoded)))
    if n_eval:
        random.Random(seed).shuffle(order)
    eval_idx, train_idx = sorted(order[:n_eval]), sorted(order[n_eval:])
    stats.used, stats.eval_records = len(train_idx), len(eval_idx)
    stats.tokens = sum(len(encoded[i].input_ids) for i in train_idx)
    stats.supervised_tokens = sum(encoded[i].num_supervised for i in train_idx)

    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".data-{key}-", dir=cache_root))
    try:
        import datasets

        for split, idx in (("train", train_idx), ("eval", eval_idx)):
            ds = datasets.Dataset.from_dict({
                "input_ids": [encoded[i].input_ids for i in idx],
                "labels": [encoded[i].labels for i in idx],
            })
            ds.save_to_disk(str(tmp / split))
            if idx:
                pack_dataset(ds, cfg.cutoff_len, cfg.packing, tmp / f"{split}_rows.json")
        (tmp / "stats.json").write_text(json.dumps(asdict(stats), indent=1))
        (tmp / "COMPLETE").write_text(key)
        try:
            os.rename(tmp, out)
        except OSError:  # another launcher (another node) finished the same work first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, stats, False
