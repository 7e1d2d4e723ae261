"""Task metrics for generated answers: pure functions of (prediction, reference, record fields).

``exact_match``
    The texts are equal after normalisation (Unicode NFKC, case folded, whitespace collapsed, trailing ``.``/``;``
    dropped).
``sql_exec`` (execution accuracy)
    The SQL in the prediction and in the reference run with Python's ``sqlite3`` on databases built from the
    record's schema (its ``CREATE TABLE`` statements) and filled with deterministic generated rows; the answer is
    right when both give the same result on every database (:data:`SqlSettings.databases` of them, so that two
    queries that agree on one sparse table by chance are still told apart). Rows are compared as a multiset unless
    the reference sorts (``ORDER BY``); values, not column names, are compared; floats to 1e-6. The generated
    values include the literals of the reference query (``'서울'``, ``5000``, ``'2024-01'``...), so filters select
    something. Each query runs in memory, read-only (``PRAGMA query_only`` and an authorizer that allows reading
    only: no DROP, INSERT, ATTACH or PRAGMA), under a time limit enforced by a progress handler. A prediction whose
    SQL fails counts as an error, one that runs out of time as a timeout; neither stops the evaluation.
``citation``
    For retrieval-augmented answers that cite documents as ``[[doc-id]]``: whether every cited id exists among the
    record's documents, precision and recall of the cited ids against those the reference cites, and whether the
    answer says "not found" (the configured phrase) exactly when the reference does.

Each metric returns a dict of named values per record (``None``: not applicable to this record); the generation
evaluator averages every name over the records where it applies.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import sqlite3
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

METRICS = ("exact_match", "sql_exec", "citation")

# What each metric needs from a record (see launcher/evaluate/generation.py, which checks it before any worker).
NEEDS = {"exact_match": "a reference answer", "sql_exec": "a schema of CREATE TABLE statements",
         "citation": "documents with ids"}


# ------------------------------------------------------------------------------------------------ exact match
def normalize(text: str) -> str:
    """Text as compared by exact match: NFKC, case folded, whitespace collapsed, trailing . and ; dropped."""
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return text.rstrip(" .;")


def exact_match(prediction: str, reference: str) -> dict[str, float]:
    return {"exact_match": float(normalize(prediction) == normalize(reference))}


# ------------------------------------------------------------------------------------------------ SQL
@dataclass(frozen=True)
class SqlSettings:
    """How SQL answers are executed (``eval.generate.sql`` in the config)."""

    timeout_s: float = 2.0  # per query
    rows_per_table: int = 50
    databases: int = 3  # the answer must match the reference on each
    max_rows: int = 100_000  # a result larger than this counts as an error (a runaway join)
    seed: int = 0


class SqlTimeout(Exception):
    """A query ran past its time limit."""


_FENCE = re.compile(r"```(?:sql|sqlite)?\s*\n?(.*?)```", re.S | re.I)
_START = re.compile(r"\b(SELECT|WITH)\b", re.I)
_STRING = re.compile(r"'(?:[^']|'')*'")
_ORDER_BY = re.compile(r"\border\s+by\b", re.I)


def extract_sql(text: str) -> str:
    """The SQL statement in a generated answer: a fenced code block if there is one, else the text from its first
    SELECT/WITH (answers often start with a phrase like "쿼리 작성:"), up to the first ``;`` outside quotes.
    Text with neither is returned as it is (and fails to run, counted as an error)."""
    fenced = _FENCE.search(text)
    if fenced:
        text = fenced.group(1)
    start = _START.search(text)
    sql = text[start.start():] if start else text
    quote = None
    for i, ch in enumerate(sql):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"`":
            quote = ch
        elif ch == ";":
            return sql[:i + 1].strip()
    return sql.strip()


_LIT = r"('(?:[^']|'')*'|-?\d+(?:\.\d+)?)"
_COMPARE = re.compile(r"(?:\w+\.)?(\w+)\s*(?:=|==|!=|<>|>=|<=|<|>|\bNOT\s+LIKE\b|\bLIKE\b)\s*" + _LIT, re.I)
_BETWEEN = re.compile(r"(?:\w+\.)?(\w+)\s+BETWEEN\s+" + _LIT + r"\s+AND\s+" + _LIT, re.I)
# strftime('%Y', d) = '2024' and AVG(score) >= 70 tie the literal to the column inside the call.
_CALL = re.compile(r"(?:strftime\(\s*'[^']*'\s*,|\b(?:AVG|SUM|MIN|MAX)\()\s*(?:\w+\.)?(\w+)\s*\)\s*"
                   r"(?:=|!=|<>|>=|<=|<|>)\s*" + _LIT, re.I)


def _literal(text: str) -> str | float:
    return text[1:-1].replace("''", "'") if text.startswith("'") else float(text)


def column_literals(sql: str) -> dict[str, list[str | float]]:
    """Literals the query compares each column with (``city = '서울'``, ``salary >= 5000``, ``BETWEEN``,
    ``strftime('%Y', d) = '2024'``, ``AVG(score) >= 70``): lower-cased column name -> values, so generated rows can satisfy filters."""
    tied: dict[str, list[str | float]] = {}
    for pattern in (_COMPARE, _BETWEEN, _CALL):
        for col, *lits in pattern.findall(sql):
            tied.setdefault(col.lower(), []).extend(_literal(x) for x in lits)
    return tied


def _near(lit: str | float, rng: random.Random) -> str | float:
    """A value equal or close to a literal: numbers move by -1, 0 or +1; LIKE patterns are filled in; a year or
    a year-month becomes a date inside it."""
    if isinstance(lit, float):
        return lit + rng.choice([-1, 0, 0, 1])
    if re.fullmatch(r"\d{4}", lit):
        return f"{lit}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    if re.fullmatch(r"\d{4}-\d{2}", lit):
        return f"{lit}-{rng.randint(1, 28):02d}"
    if "%" in lit or "_" in lit:
        return re.sub(r"[%_]", lambda _: rng.choice("가나다ab"), lit)
    return lit


def _value(typ: str, name: str, tied: dict[str, list[str | float]], pool: list[str], rng: random.Random) -> Any:
    """One generated value: often near a literal the query compares this column with, else a value of the
    column's type (dates for columns named like dates, else text drawn from every literal of the query)."""
    t = typ.upper()
    numeric = any(k in t for k in ("INT", "REAL", "FLOA", "DOUB", "NUM", "DEC"))
    if rng.random() < 0.05:
        return None
    if name.lower() in tied and rng.random() < 0.6:
        v = _near(rng.choice(tied[name.lower()]), rng)
    elif numeric:
        v = rng.choice([0, 1, 2, 3, 5, 10, 50, 100, 1000, 5000]) * rng.choice([1, 1, 2, 3])
    elif "date" in name.lower() or name.lower().endswith("_at"):
        v = f"{rng.randint(2015, 2025)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    else:
        v = rng.choice(pool)
    if numeric and isinstance(v, (int, float)):
        return int(round(v)) if "INT" in t else round(float(v), 2)
    return v


def _cell(i: int, name: str, typ: str, pk: int, tied: dict, pool: list[str], rng: random.Random, n: int) -> Any:
    """Row ``i``'s value of one column. Integer primary keys count 1..n and ``*_id`` columns draw from 1..n,
    so joins on ids find partners; skewed towards small ids, so that groups of many sizes occur (``HAVING
    COUNT(*) >= 10`` selects some groups and not others)."""
    if "INT" in typ.upper() and pk:
        return i + 1
    if "INT" in typ.upper() and name.lower().endswith("_id"):
        return min(n, 1 + int(n * rng.random() ** 3))
    return _value(typ, name, tied, pool, rng)


def build_database(schema: str, reference_sql: str, settings: SqlSettings, index: int = 0) -> sqlite3.Connection:
    """An in-memory database with the tables of ``schema`` and deterministic rows (seeded by the settings, the
    schema, the reference and ``index``), made read-only before it is returned. Raises sqlite3.Error if the
    schema itself does not run."""
    digest = hashlib.sha256(f"{settings.seed}|{index}|{schema}|{reference_sql}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    con = sqlite3.connect(":memory:")
    con.executescript(schema)
    tied = column_literals(reference_sql)
    pool = ["-", "x"] + [s[1:-1].replace("''", "'") for s in _STRING.findall(reference_sql)]
    tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    for table in tables:
        cols = con.execute(f'PRAGMA table_info("{table}")').fetchall()  # cid, name, type, notnull, default, pk
        rows = []
        for i in range(settings.rows_per_table):
            rows.append([_cell(i, name, typ, pk, tied, pool, rng, settings.rows_per_table)
                         for _, name, typ, _, _, pk in cols])
        con.executemany(f'INSERT INTO "{table}" VALUES ({", ".join("?" * len(cols))})', rows)
    con.commit()
    con.execute("PRAGMA query_only = ON")
    con.set_authorizer(_read_only)
    return con


_ALLOWED = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}


def _read_only(action: int, *_: Any) -> int:
    """sqlite3 authorizer: reading is allowed, everything else (writes, schema changes, ATTACH, PRAGMA) denied."""
    return sqlite3.SQLITE_OK if action in _ALLOWED else sqlite3.SQLITE_DENY


def run_query(con: sqlite3.Connection, sql: str, settings: SqlSettings) -> list[tuple]:
    """Rows of ``sql``; raises SqlTimeout past ``settings.timeout_s`` and sqlite3.Error when it fails."""
    deadline = time.monotonic() + settings.timeout_s
    expired = []

    def check() -> int:
        if time.monotonic() > deadline:
            expired.append(True)
            return 1  # non-zero interrupts the statement
        return 0

    con.set_progress_handler(check, 10_000)
    try:
        cur = con.execute(sql)
        rows = cur.fetchmany(settings.max_rows + 1)
        if len(rows) > settings.max_rows:
            raise sqlite3.OperationalError(f"more than {settings.max_rows} result rows")
        return rows
    except sqlite3.OperationalError:
        if expired:
            raise SqlTimeout(f"over {settings.timeout_s}s") from None
        raise
    finally:
        con.set_progress_handler(None, 0)


def _canonical(rows: list[tuple]) -> list[tuple]:
    return [tuple(round(v, 6) if isinstance(v, float) and math.isfinite(v) else v for v in r) for r in rows]


def same_result(pred: list[tuple], ref: list[tuple], ordered: bool) -> bool:
    pred, ref = _canonical(pred), _canonical(ref)
    return pred == ref if ordered else Counter(pred) == Counter(ref)


def sql_exec(prediction: str, reference: str, schema: str, settings: SqlSettings = SqlSettings()) -> dict[str, Any]:
    """Execution accuracy of one answer: {"sql_exec": 1/0, "sql_error": 1/0, "sql_timeout": 1/0, "detail"}.

    Raises ValueError when the reference itself does not run on the schema (a data problem, not the model's)."""
    ref_sql, pred_sql = extract_sql(reference), extract_sql(prediction)
    ordered = bool(_ORDER_BY.search(_STRING.sub("''", ref_sql)))
    out = {"sql_exec": 0.0, "sql_error": 0.0, "sql_timeout": 0.0, "detail": ""}
    for index in range(settings.databases):
        try:
            con = build_database(schema, ref_sql, settings, index)
        except sqlite3.Error as err:
            raise ValueError(f"the schema does not run in SQLite: {err}") from None
        try:
            try:
                ref_rows = run_query(con, ref_sql, settings)
            except (sqlite3.Error, SqlTimeout) as err:
                raise ValueError(f"the reference SQL does not run on its schema ({err}): {ref_sql}") from None
            try:
                pred_rows = run_query(con, pred_sql, settings)
            except SqlTimeout as err:
                return {**out, "sql_timeout": 1.0, "detail": f"timeout: {err}"}
            except (sqlite3.Error, ValueError, OverflowError) as err:  # sqlite3 raises ValueError for some input
                return {**out, "sql_error": 1.0, "detail": f"error: {err}"}
            if not same_result(pred_rows, ref_rows, ordered):
                return {**out, "detail": f"different result on database {index}"}
        finally:
            con.close()
    return {**out, "sql_exec": 1.0}


# ------------------------------------------------------------------------------------------------ citations
_CITE = re.compile(r"\[\[\s*([^\[\]\n]+?)\s*\]\]")


def citations(text: str) -> list[str]:
    """The ``[[doc-id]]`` ids cited in ``text``, in order, each once."""
    return list(dict.fromkeys(_CITE.findall(text)))


def says_not_found(text: str, phrase: str) -> bool:
    return bool(phrase) and normalize(phrase) in normalize(text)


def citation(prediction: str, reference: str, documents: list[str], not_found: str) -> dict[str, float | None]:
    """Citation checks of one answer against the record's document ids.

    citation_valid: every cited id exists (None when nothing is cited); citation_precision / citation_recall:
    against the ids the reference cites (precision None when nothing is cited, recall None when the reference
    cites nothing); not_found_accuracy: the answer says the not-found phrase exactly when the reference does;
    not_found_recall: on records whose reference says it, the answer does too (None elsewhere)."""
    cited, wanted, known = set(citations(prediction)), set(citations(reference)), set(documents)
    hit = len(cited & wanted)
    ref_nf, pred_nf = says_not_found(reference, not_found), says_not_found(prediction, not_found)
    return {
        "citation_valid": float(cited <= known) if cited else None,
        "citation_precision": hit / len(cited) if cited else None,
        "citation_recall": hit / len(wanted) if wanted else None,
        "not_found_accuracy": float(ref_nf == pred_nf),
        "not_found_recall": float(pred_nf) if ref_nf else None,
    }


# A document header at the start of a line: "[doc-12] title" or "[[doc-12]]"; group 1 is the id.
DOCUMENT_HEADER = r"^\[\[?\s*([^\[\]\n]+?)\s*\]\]?"


def document_ids(record: dict[str, Any], prompt_text: str, field: str, header: str = DOCUMENT_HEADER) -> list[str]:
    """The ids of a record's documents: its ``field`` (a list of {"id", ...} objects or of ids, or an {id: text}
    object) when present, else the ids of the document headers (regular expression ``header``, group 1 the id,
    matched at line starts) in the prompt text."""
    docs = record.get(field) if field else None
    if isinstance(docs, dict):
        return [str(k) for k in docs]
    if isinstance(docs, list):
        return [str(d.get("id", d.get("doc_id", ""))) if isinstance(d, dict) else str(d) for d in docs]
    return list(dict.fromkeys(re.findall(header, prompt_text, re.M)))


# ------------------------------------------------------------------------------------------------ dispatch
Scorer = Callable[[str, str, dict[str, Any]], dict[str, Any]]


def scorers(sql: SqlSettings, not_found: str) -> dict[str, Scorer]:
    """Metric name -> scorer(prediction, reference, fields), where ``fields`` holds what the record provides:
    "schema" (SQL) and "documents" (citation)."""
    return {
        "exact_match": lambda p, r, f: exact_match(p, r),
        "sql_exec": lambda p, r, f: sql_exec(p, r, f["schema"], sql),
        "citation": lambda p, r, f: citation(p, r, f["documents"], not_found),
    }


def average(results: list[dict[str, Any]]) -> dict[str, float]:
    """Mean of every numeric value over the records where it applies (None and non-numbers are skipped)."""
    sums: dict[str, list[float]] = {}
    for r in results:
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                sums.setdefault(k, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in sums.items()}
