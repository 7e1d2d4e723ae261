"""Datasets as LLaMA-Factory registers them: ``dataset_info.json`` entries and the records of their files.

:func:`load_registry` resolves dataset names to :class:`DatasetEntry` (files, format, column and tag names, with
LLaMA-Factory's defaults) and refuses what this launcher does not support; :func:`read_records` streams the
records of one ``.json``/``.jsonl`` file with their position for error messages. A problem in the user's data is
a :class:`DataError` naming the file, the record and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator


DATA_SUFFIXES = (".json", ".jsonl")


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
