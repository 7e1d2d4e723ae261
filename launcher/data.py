"""Data: LLaMA-Factory's ``dataset_info.json`` registry -> messages -> token ids and labels, cached on disk.

Preparation runs once, in the launcher process, before any worker starts (so no collective can time out while it
runs). Records stream from the files into an Arrow dataset (``Dataset.from_generator``), are tokenised in batches
with the fast tokenizer (``Dataset.map``, ``dataset.num_proc`` processes), split, mixed (launcher/mixing.py) and
packed; nothing holds all rows in a Python list. The result is a directory keyed by a hash of every input that can
change it (data files, tokenizer files, template, cutoff, masking, split and mix options, this code), so a second
run with the same inputs reuses it and a changed input never reuses a stale one::

    <cache_dir>/data-<key>/train, eval   Arrow datasets: input_ids, labels (-100 = no loss), length
    <cache_dir>/data-<key>/*_rows.npz    the row plan (launcher.packing.pack_dataset)
    <cache_dir>/data-<key>/stats.json    DataStats: what was used, dropped and why
    <cache_dir>/data-<key>/sources.json  the key and the SHA-256 of every data file it was made from
    <cache_dir>/data-<key>/COMPLETE      written last; a directory without it is never used
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from launcher.config import DatasetConfig, TemplateConfig, resolve_path
from launcher.cut_prompt import encode_cut_prompt
from launcher.messages import normalize_tools, parse_tool_calls
from launcher.mixing import MixError, mix_split, resolve as resolve_mix
from launcher.templates import Template, TemplateError

CACHE_VERSION = "3"  # bump when the cached format changes (the code itself is hashed too)
SOURCES = "sources.json"  # in a prepared directory: its key and the SHA-256 of each data file it was made from
DATA_SUFFIXES = (".json", ".jsonl")
MAX_ERROR_EXAMPLES = 10
FIX_HINT = ("Fix the record, or set dataset.on_error=skip to drop such records (they are counted and reported).")

Messages = list[dict[str, str]]


class DataError(ValueError):
    """A problem in the user's data; the message names the file, the record and the field.

    ``reason`` is a short category used to count skipped records (e.g. "missing field").
    """

    def __init__(self, message: str, reason: str = "invalid data"):
        super().__init__(message)
        self.reason = reason


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
    if not isinstance(info, dict):
        raise DataError(f"{info_path}: expected a JSON object of named entries, found {type(info).__name__}.")
    entries = []
    for name in names:
        if name not in info:
            raise DataError(f"dataset {name!r} is not in {info_path}; it has: {', '.join(sorted(info))}. "
                            f"Fix dataset.names or add the entry.")
        spec = info[name]
        where = f"{info_path}, entry {name!r}"
        if not isinstance(spec, dict):
            raise DataError(f"{where}: must be an object with 'file_name', found {type(spec).__name__}.")
        for key, why in _UNSUPPORTED.items():
            if key in spec and "file_name" not in spec:
                raise DataError(f"{where}: {why} ({key}), which this launcher does not do (it runs offline). "
                                f"Download the files and give the entry a 'file_name'.")
        if spec.get("ranking"):
            raise DataError(f"{where}: 'ranking: true' marks preference data (DPO/RM); this launcher does "
                            f"supervised fine-tuning only. Remove it from dataset.names.")
        if "file_name" not in spec:
            raise DataError(f"{where}: no 'file_name'. Add the data file's name (relative to {data_dir}).")
        path = data_dir / spec["file_name"]
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
            if not files:
                raise DataError(f"{where}: folder {path} has no .json or .jsonl files.")
        elif path.is_file():
            if path.suffix not in DATA_SUFFIXES:
                raise DataError(f"{where}: {path.name} is not .json or .jsonl; convert it to JSON lines.")
            files = [path]
        else:
            raise DataError(f"{where}: file_name {spec['file_name']!r} not found ({path}).")
        formatting = spec.get("formatting", "alpaca")
        if formatting not in ("alpaca", "sharegpt"):
            raise DataError(f"{where}: formatting {formatting!r} is not 'alpaca' or 'sharegpt'.")
        for key in ("columns", "tags"):
            if not isinstance(spec.get(key, {}), dict):
                raise DataError(f"{where}: {key!r} must be an object mapping names to column/tag names.")
        entries.append(DatasetEntry(name, files, formatting, spec.get("columns", {}), spec.get("tags", {})))
    return entries


# --------------------------------------------------------------------------------------------- reading
def _not_utf8(path: Path, err: UnicodeDecodeError, offset: int = 0) -> DataError:
    return DataError(f"{path}: not UTF-8 at byte {offset + err.start} ({err.reason}). Save the file as UTF-8 "
                     f"(e.g. `iconv -f cp949 -t utf-8`).", "not UTF-8")


def read_records(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (where, record) from a JSON list or a JSON-lines file; ``where`` names the file and record.

    JSON lines are streamed, and a line that is not valid JSON (or not UTF-8) is yielded as a DataError (the
    caller raises or skips it); a JSON list is parsed whole (use JSON lines for very large files).
    """
    with path.open("rb") as f:
        head = f.read(4096).decode("utf-8", errors="ignore").lstrip()
    if path.suffix == ".jsonl" or head.startswith("{"):
        with path.open("rb") as f:
            offset = 0
            for lineno, raw in enumerate(f, 1):
                start, offset = offset, offset + len(raw)
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    yield f"{path}, line {lineno}", _not_utf8(path, err, start)
                    continue
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    # Yielded, not raised: one bad line can be skipped (dataset.on_error=skip); a broken JSON list
                    # below cannot.
                    record = DataError(f"{path}, line {lineno}: not valid JSON ({err.msg}, column {err.colno}).",
                                       "invalid JSON")
                yield f"{path}, line {lineno}", record
        return
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from None
    if not text.strip():
        return  # an empty file: no records (the caller names it)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}, line {err.lineno}: not valid JSON ({err.msg}, column {err.colno}).",
                        "invalid JSON") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records (or JSON lines), found {type(data).__name__}.",
                        "invalid JSON")
    for i, record in enumerate(data):
        yield f"{path}, record {i}", record


# --------------------------------------------------------------------------------------------- formats
def _text(record: dict, key: str, where: str, required: bool = True) -> str:
    """A string field: missing/None and non-strings are errors (when required), named with the field."""
    if key not in record or record[key] is None:
        if required:
            raise DataError(f"{where}: field {key!r} is missing.", "missing field")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, found {type(value).__name__}.", "not a string")
    return value


def _tools(record: dict, key: str, where: str) -> list[dict[str, Any]]:
    if record.get(key) in (None, "", []):
        return []
    try:
        return normalize_tools(record[key])
    except ValueError as err:
        raise DataError(f"{where}: field {key!r} (the tools) {err}.", "invalid tools") from None


def _check_call(content: str, where: str) -> None:
    try:
        parse_tool_calls(content)
    except ValueError as err:
        raise DataError(f"{where}: {err}.", "invalid function call") from None


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
        raise DataError(f"{where}: field {c['history']!r} must be a list of [user, assistant] pairs, found "
                        f"{type(history).__name__}.", "invalid history")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataError(f"{where}: field {c['history']!r}[{i}] must be a pair of two strings [user, assistant].",
                            "invalid history")
        if not pair[1].strip():
            raise DataError(f"{where}: field {c['history']!r}[{i}] has an empty assistant reply; there is nothing "
                            f"to train on.", "empty reply")
        msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = _text(record, c["prompt"], where)
    query = _text(record, c["query"], where, required=False)
    user = "\n".join(x for x in (prompt, query) if x)
    if not user.strip():
        raise DataError(f"{where}: fields {c['prompt']!r} and {c['query']!r} are both empty.", "empty prompt")
    response = _text(record, c["response"], where)
    if not response.strip():
        raise DataError(f"{where}: field {c['response']!r} is empty: an empty assistant reply has nothing to "
                        f"train on.", "empty reply")
    msgs.append({"role": "user", "content": user})
    msgs.append({"role": "assistant", "content": response})
    return msgs


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "observation": "observation", "function_call": "function_call",
                   "function": "function_call", "tool": "observation", "ipython": "observation"}


def _openai_tool_calls(turn: dict, at: str) -> str:
    """An OpenAI assistant message's ``tool_calls`` as our function_call content (JSON list of name/arguments)."""
    calls = []
    for k, call in enumerate(turn["tool_calls"]):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise DataError(f"{at}: tool_calls[{k}] needs a function with a string 'name'.", "invalid function call")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            with contextlib.suppress(json.JSONDecodeError):
                args = json.loads(args)  # the OpenAI API sends arguments as a JSON string
        calls.append({"name": fn["name"], "arguments": args})
    return json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)


def sharegpt_to_messages(record: dict, entry: DatasetEntry, where: str) -> Messages:
    """sharegpt (`conversations` of from/value) or OpenAI (`messages` of role/content), tag names remappable."""
    c, t = entry.columns, entry.tags
    key = c.get("messages") or ("messages" if "messages" in record and "conversations" not in record
                                else "conversations")
    role_tag = t.get("role_tag", "role" if key == "messages" else "from")
    content_tag = t.get("content_tag", "content" if key == "messages" else "value")
    roles = dict(_SHAREGPT_ROLES)
    for tag, role in [("user_tag", "user"), ("assistant_tag", "assistant"), ("observation_tag", "observation"),
                      ("function_tag", "function_call"), ("system_tag", "system")]:
        if tag in t:
            roles[t[tag]] = role
    if key not in record:
        raise DataError(f"{where}: field {key!r} is missing (the list of turns).", "missing field")
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field {key!r} must be a non-empty list of turns, found "
                        f"{type(turns).__name__ if not isinstance(turns, list) else 'an empty list'}.",
                        "missing field")
    system = _text(record, c["system"], where, required=False) if "system" in c else ""
    msgs: Messages = []
    for i, turn in enumerate(turns):
        at = f"{where}, {key}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{at}: a turn must be an object with {role_tag!r} and {content_tag!r}, found "
                            f"{type(turn).__name__}.", "invalid turn")
        if role_tag not in turn:
            raise DataError(f"{at}: field {role_tag!r} is missing.", "missing field")
        role = roles.get(turn[role_tag]) if isinstance(turn[role_tag], str) else None
        if role is None:
            raise DataError(f"{at}: {role_tag}={turn[role_tag]!r} is not a known role ({', '.join(sorted(roles))}); "
                            f"map it with 'tags' in dataset_info.json.", "unknown role")
        if role == "assistant" and isinstance(turn.get("tool_calls"), list) and turn["tool_calls"]:
            msgs.append({"role": "function_call", "content": _openai_tool_calls(turn, at)})
            continue
        if content_tag not in turn or turn[content_tag] is None:
            raise DataError(f"{at}: field {content_tag!r} is missing.", "missing field")
        content = turn[content_tag]
        if not isinstance(content, str):
            raise DataError(f"{at}: field {content_tag!r} must be a string, found {type(content).__name__}.",
                            "not a string")
        if role == "system":
            if i:
                raise DataError(f"{at}: a system turn may only come first.", "roles out of order")
            system = content  # a system turn overrides the system column, as in LLaMA-Factory
            continue
        if role == "function_call":
            _check_call(content, at)
        msgs.append({"role": role, "content": content})
    offset = 1 if turns and roles.get(turns[0].get(role_tag)) == "system" else 0
    for i, m in enumerate(msgs):
        expect = ("user", "observation") if i % 2 == 0 else ("assistant", "function_call")
        if m["role"] not in expect:
            raise DataError(f"{where}, {key}[{i + offset}]: role {m['role']!r} where {' or '.join(expect)} is "
                            f"expected: turns must alternate user/observation and assistant/function_call.",
                            "roles out of order")
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"{where}, {key}[{i + offset}]: the assistant reply is empty; there is nothing to "
                            f"train on.", "empty reply")
    if not msgs:
        raise DataError(f"{where}: field {key!r} has no user or assistant turns.", "missing field")
    if len(msgs) % 2:
        raise DataError(f"{where}, {key}[{len(msgs) - 1 + offset}]: the conversation ends with a "
                        f"{msgs[-1]['role']} turn; it must end with an assistant reply.", "roles out of order")
    return ([{"role": "system", "content": system}] if system else []) + msgs


def to_messages(record: Any, entry: DatasetEntry, where: str) -> tuple[Messages, list[dict[str, Any]]]:
    """One record -> (messages, tools). Raises DataError naming ``where`` and the field."""
    if isinstance(record, DataError):
        raise record
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, found {type(record).__name__}.", "not an object")
    if entry.formatting == "alpaca":
        msgs = alpaca_to_messages(record, entry.columns, where)
    else:
        msgs = sharegpt_to_messages(record, entry, where)
    return msgs, _tools(record, entry.columns.get("tools", "tools"), where)


# --------------------------------------------------------------------------------------------- preparation
@dataclass
class DataStats:
    """What preparation did; printed at start, kept in stats.json, and shown by launcher.inspect_data."""

    records: int = 0  # read from the files (after max_samples)
    used: int = 0  # training records
    eval_records: int = 0
    dropped_errors: int = 0  # malformed records skipped with dataset.on_error=skip
    # no trained token fits cutoff_len, or longer than it with dataset.overlong=drop, or (cut_prompt) the replies
    # and markup alone are longer than it
    dropped_overlong: int = 0
    truncated: int = 0  # kept, with earlier turns (or the end of the last reply) cut to fit
    prompt_cut: int = 0  # kept with dataset.overlong=cut_prompt: replies whole, user text cut to fit
    tokens: int = 0  # training tokens
    supervised_tokens: int = 0  # training tokens with a loss
    per_dataset: dict[str, int] = field(default_factory=dict)  # records read per dataset name
    mix: dict[str, Any] = field(default_factory=dict)  # the training split per dataset (launcher.mixing.mix_split)
    error_reasons: dict[str, int] = field(default_factory=dict)  # skipped records per reason
    errors: list[str] = field(default_factory=list)  # the first few skip messages, with file and record


def _code_hash() -> bytes:
    """The code that decides what a prepared dataset contains; a change to it invalidates the cache."""
    here = Path(__file__).parent
    files = ("data.py", "messages.py", "templates.py", "cut_prompt.py", "packing.py", "mixing.py")
    return b"".join((here / f).read_bytes() for f in files)


def file_digests(entries: list[DatasetEntry]) -> dict[str, str]:
    """SHA-256 of every data file, by path: what ``sources.json`` of a prepared directory records, so a resumed
    run can name the files that changed (launcher/integrity.py)."""
    out = {}
    for e in entries:
        for f in e.files:
            digest = hashlib.sha256()
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
            out[str(f)] = digest.hexdigest()
    return out


def cache_key(cfg: DatasetConfig, template: TemplateConfig, tokenizer_dir: Path, entries: list[DatasetEntry],
              seed: int, tokenizer: Any = None, digests: dict[str, str] | None = None) -> str:
    """Hash of every input of preparation: data file contents, tokenizer files, template definition, cutoff,
    masking, split and packing options, and the preparation code. (num_proc and cache_dir do not change it.)"""
    h = hashlib.sha256(CACHE_VERSION.encode())
    h.update(hashlib.sha256(_code_hash()).digest())
    for key in ("cutoff_len", "packing", "overlong", "on_error", "train_on_prompt", "mask_history",
                "max_samples", "val_size"):
        h.update(f"{key}={getattr(cfg, key)};".encode())
    h.update(json.dumps(asdict(template), sort_keys=True).encode())
    h.update(f"seed={seed};mix={resolve_mix(cfg).key()};".encode())
    tok_files = sorted(p for p in tokenizer_dir.glob("*") if p.is_file() and (
        p.name.startswith("tokenizer") or p.name in ("special_tokens_map.json", "added_tokens.json", "vocab.json",
                                                     "merges.txt", "chat_template.jinja")))
    for p in tok_files:
        h.update(p.name.encode() + hashlib.sha256(p.read_bytes()).digest())
    if not tok_files and tokenizer is not None:  # a hub id (no local files): hash the tokenizer itself
        backend = getattr(tokenizer, "backend_tokenizer", None)
        h.update((backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
                  ).encode())
        h.update(json.dumps([tokenizer.bos_token, tokenizer.eos_token, sorted(tokenizer.get_added_vocab())]).encode())
    digests = digests or file_digests(entries)
    for e in entries:
        h.update(json.dumps([e.name, e.formatting, e.columns, e.tags], sort_keys=True).encode())
        for f in e.files:
            h.update(str(f.name).encode() + bytes.fromhex(digests[str(f)]))
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _progress_bars() -> Iterator[None]:
    """Show the datasets progress bars (generation, tokenisation) for preparation only."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.enable_progress_bars()
    try:
        yield
    finally:
        if not was:
            datasets.disable_progress_bars()


def _count_skip(stats: DataStats, err: DataError) -> None:
    """Count a skipped record (dataset.on_error=skip) and keep the first few messages for the report."""
    stats.dropped_errors += err.reason != "no records"  # an empty file has no record to count
    stats.error_reasons[err.reason] = stats.error_reasons.get(err.reason, 0) + 1
    if len(stats.errors) < MAX_ERROR_EXAMPLES:
        stats.errors.append(str(err))


def _records(entries: tuple[DatasetEntry, ...], cfg: DatasetConfig, template: Template, stats: DataStats
             ) -> Iterator[dict[str, Any]]:
    """Converted records, one at a time: {"messages", "tools" (JSON text, "" for none)}. Errors raise or are
    counted in ``stats`` according to ``cfg.on_error``."""
    for source, entry in enumerate(entries):
        n = 0
        for file in entry.files:
            if cfg.max_samples is not None and n >= cfg.max_samples:
                break
            in_file = 0
            for where, record in read_records(file):
                if cfg.max_samples is not None and n >= cfg.max_samples:
                    break
                n, in_file = n + 1, in_file + 1
                stats.records += 1
                try:
                    msgs, tools = to_messages(record, entry, where)
                    try:
                        template.check(msgs, tools)  # roles/tools the template cannot render fail here
                    except TemplateError as err:
                        raise DataError(f"{where}: {err}.", "template cannot render") from None
                except DataError as err:
                    if cfg.on_error == "raise":
                        raise DataError(f"{err} {FIX_HINT}", err.reason) from None
                    _count_skip(stats, err)
                    continue
                yield {"messages": msgs, "tools": json.dumps(tools, ensure_ascii=False) if tools else "",
                       "source": source}
            if in_file == 0:
                what = "is empty" if not file.read_bytes().strip() else "holds no records"
                err = DataError(f"{file} {what}: add records, or leave it out of {entry.name!r} in "
                                f"dataset_info.json.", "no records")
                if cfg.on_error == "raise":
                    raise err
                _count_skip(stats, err)
        stats.per_dataset[entry.name] = n


def _encode(batch: dict[str, list], template: Template, cutoff_len: int, train_on_prompt: bool,
            mask_history: bool, overlong: str) -> dict[str, list]:
    """Batched map function: conversations -> input_ids, labels, length (+ counters dropped after summing)."""
    tools = [json.loads(t) if t else None for t in batch["tools"]]
    masking = {"train_on_prompt": train_on_prompt, "mask_history": mask_history}
    if overlong == "cut_prompt":
        encoded = encode_cut_prompt(template, batch["messages"], cutoff_len, tools, **masking)
    else:
        encoded = template.encode_batch(batch["messages"], cutoff_len, tools=tools, **masking)
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "supervised": [], "truncated": [],
                            "source": []}
    for enc, source in zip(encoded, batch["source"]):
        if enc is None or (enc.truncated and overlong == "drop"):
            continue  # counted as dropped for length: rows in minus rows out
        out["input_ids"].append(enc.input_ids)
        out["labels"].append(enc.labels)
        out["length"].append(len(enc.input_ids))
        out["supervised"].append(enc.num_supervised)
        out["truncated"].append(enc.truncated)
        out["source"].append(source)  # the entry of dataset.names it came from, for the mix
    return out


def _no_records(cfg: DatasetConfig, data_dir: Path, stats: DataStats, entries: list[DatasetEntry]) -> DataError:
    files = [str(f) for e in entries for f in e.files]
    shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
    example = f" (e.g. {stats.errors[0].rstrip('.')})" if stats.errors else ""
    return DataError(f"no usable records in {', '.join(cfg.names)} under {data_dir} ({shown}): {stats.records} "
                     f"read, {stats.dropped_errors} skipped for errors{example}.")


def _all_too_long(cfg: DatasetConfig) -> DataError:
    """Every record was dropped for length: the fix depends on the settings that dropped them."""
    if cfg.overlong == "drop":
        return DataError(f"every record is longer than dataset.cutoff_len={cfg.cutoff_len} tokens and "
                         f"dataset.overlong=drop drops such records: raise dataset.cutoff_len, or set "
                         f"dataset.overlong=truncate to keep their latest turns (cut_prompt: their replies).")
    if cfg.overlong == "cut_prompt":
        return DataError(f"every record was dropped: even with their user text cut away "
                         f"(dataset.overlong=cut_prompt), the replies and markup of each are longer than "
                         f"dataset.cutoff_len={cfg.cutoff_len} tokens. Raise dataset.cutoff_len, or use "
                         f"dataset.overlong=truncate (which may cut the end of a reply).")
    trained = "any token" if cfg.train_on_prompt else (
        "the last assistant reply" if cfg.mask_history else "an assistant reply")
    return DataError(f"every record was dropped: even truncated (earliest turns first, as dataset.overlong=truncate "
                     f"does), none keeps {trained} within dataset.cutoff_len={cfg.cutoff_len} tokens, so none has "
                     f"anything to train on. Raise dataset.cutoff_len.")


def _column_sum(table: Any, column: str) -> int:
    """Sum of one column of a pyarrow Table (bool columns count their true values)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = table.column(column)
    if pa.types.is_boolean(col.type):
        col = pc.cast(col, pa.int64())
    return int(pc.sum(col).as_py() or 0)


def prepare(cfg: DatasetConfig, template_cfg: TemplateConfig, tokenizer: Any, tokenizer_dir: Path,
            seed: int) -> tuple[Path, DataStats, bool]:
    """Tokenise, mask, split and pack the configured datasets; returns (prepared dir, stats, cache hit)."""
    import datasets

    from launcher.packing import pack_dataset

    data_dir = resolve_path(cfg.dir)
    entries = load_registry(data_dir, list(cfg.names))
    digests = file_digests(entries)
    key = cache_key(cfg, template_cfg, tokenizer_dir, entries, seed, tokenizer, digests)
    cache_root = resolve_path(cfg.cache_dir)
    out = cache_root / f"data-{key}"
    if (out / "COMPLETE").is_file():
        return out, DataStats(**json.loads((out / "stats.json").read_text())), True

    template = Template(template_cfg, tokenizer)
    stats = DataStats()
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".data-{key}-", dir=cache_root))
    if cfg.num_proc > 1:
        # Forked map workers must not inherit a used tokenizer thread pool (tokenizers warns and disables it);
        # with one process the fast tokenizer's own threads tokenise each batch in parallel.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        features = datasets.Features({
            "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
            "tools": datasets.Value("string"), "source": datasets.Value("int32"),
        })
        with _progress_bars():
            try:
                raw = datasets.Dataset.from_generator(
                    _records, features=features, cache_dir=str(tmp / "work"), fingerprint=f"{key}-records",
                    # A tuple: a list would be split into shards, one generator call each, losing the positions.
                    gen_kwargs={"entries": tuple(entries), "cfg": cfg, "template": template, "stats": stats})
            except Exception as err:
                cause: BaseException | None = err
                while cause is not None and not isinstance(cause, DataError):
                    cause = cause.__cause__ or cause.__context__
                if isinstance(cause, DataError):
                    raise cause from None
                if stats.records == stats.dropped_errors:  # datasets cannot build an empty split
                    raise _no_records(cfg, data_dir, stats, entries) from None
                raise
            if len(raw) == 0:
                raise _no_records(cfg, data_dir, stats, entries)
            tokenized = raw.map(
                _encode, batched=True, batch_size=1000, num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
                remove_columns=raw.column_names, new_fingerprint=f"{key}-tokens", desc="Tokenizing",
                fn_kwargs={"template": template, "cutoff_len": cfg.cutoff_len,
                           "train_on_prompt": cfg.train_on_prompt, "mask_history": cfg.mask_history,
                           "overlong": cfg.overlong},
                features=datasets.Features({
                    "input_ids": datasets.List(datasets.Value("int32")),
                    "labels": datasets.List(datasets.Value("int32")),
                    "length": datasets.Value("int32"), "supervised": datasets.Value("int32"),
                    "truncated": datasets.Value("bool"), "source": datasets.Value("int32")}))
        stats.dropped_overlong = len(raw) - len(tokenized)
        if len(tokenized) == 0:
            raise _all_too_long(cfg)

        n_eval = int(cfg.val_size if cfg.val_size >= 1 else round(cfg.val_size * len(tokenized)))
        if n_eval >= len(tokenized):
            raise DataError(f"dataset.val_size={cfg.val_size} holds out {n_eval} of {len(tokenized)} usable "
                            f"records, leaving none to train on; lower it.")
        if n_eval:
            split = tokenized.train_test_split(test_size=n_eval, shuffle=True, seed=seed)
            parts = {"train": split["train"], "eval": split["test"]}
        else:
            parts = {"train": tokenized, "eval": tokenized.select([])}
        try:  # after the split, so that no repeated record is also held out
            parts["train"], stats.mix = mix_split(parts["train"], list(cfg.names), resolve_mix(cfg), seed)
        except MixError as err:
            raise DataError(str(err)) from None
        for name, part in parts.items():
            counts = part.select_columns(["length", "supervised", "truncated"]).with_format("arrow")[:]
            if name == "train":
                stats.used = len(part)
                stats.tokens = _column_sum(counts, "length")
                stats.supervised_tokens = _column_sum(counts, "supervised")
                cut = _column_sum(counts, "truncated")
                stats.prompt_cut, stats.truncated = (cut, 0) if cfg.overlong == "cut_prompt" else (0, cut)
            else:
                stats.eval_records = len(part)
            part.remove_columns(["supervised", "truncated", "source"]).save_to_disk(str(tmp / name))
            if len(part):
                pack_dataset(datasets.load_from_disk(str(tmp / name)), cfg.cutoff_len, cfg.packing,
                             tmp / f"{name}_rows.npz")
        shutil.rmtree(tmp / "work", ignore_errors=True)
        (tmp / "stats.json").write_text(json.dumps(asdict(stats), indent=1, ensure_ascii=False))
        (tmp / SOURCES).write_text(json.dumps({"key": key, "files": digests}, indent=1))
        (tmp / "COMPLETE").write_text(key)
        try:
            os.rename(tmp, out)
        except OSError:  # another launcher (another node) finished the same work first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, stats, False
