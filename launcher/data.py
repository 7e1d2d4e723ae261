"""Data preparation: registered datasets -> token ids and labels, cached on disk.

The registry and file readers are launcher/registry.py, record -> messages is launcher/formats.py; this module
tokenises, splits, mixes, packs and caches.

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
from launcher.formats import to_messages
from launcher.mixing import MixError, mix_split, resolve as resolve_mix
from launcher.registry import DataError, DatasetEntry, load_registry, read_records
from launcher.templates import Template, TemplateError

CACHE_VERSION = "3"  # bump when the cached format changes (the code itself is hashed too)
SOURCES = "sources.json"  # in a prepared directory: its key and the SHA-256 of each data file it was made from
MAX_ERROR_EXAMPLES = 10
FIX_HINT = ("Fix the record, or set dataset.on_error=skip to drop such records (they are counted and reported).")


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
    files = ("data.py", "registry.py", "formats.py", "messages.py", "templates.py", "cut_prompt.py", "packing.py",
             "binpack.py", "mixing.py")
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
