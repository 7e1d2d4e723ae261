"""The shipped sample: data/ and models/tiny_llama/ are reproducible, well-formed, and their SQL runs."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
MODEL_DIR = ROOT / "models" / "tiny_llama"
PREFIX = "쿼리 작성: "


def load(name: str) -> list[dict]:
    return json.loads((DATA / name).read_text(encoding="utf-8"))


def question(prompt: str) -> str:
    return prompt.split("질문: ", 1)[1]


@pytest.fixture(scope="module")
def train() -> list[dict]:
    return load("text2sql_ko.json")


@pytest.fixture(scope="module")
def heldout() -> list[dict]:
    return load("text2sql_ko_heldout.json")


@pytest.mark.parametrize("script", ["make_text2sql.py", "build_tokenizer.py"])
def test_generated_files_are_up_to_date(script: str) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_registry_lists_both_files() -> None:
    info = json.loads((DATA / "dataset_info.json").read_text(encoding="utf-8"))
    for name in ("text2sql_ko", "text2sql_ko_heldout"):
        assert (DATA / info[name]["file_name"]).is_file()
        assert info[name].get("formatting", "alpaca") == "alpaca"


def test_sizes(train: list[dict], heldout: list[dict]) -> None:
    assert len(train) == 2000 and len(heldout) == 50
    assert (DATA / "text2sql_ko.json").stat().st_size < 2_000_000
    # The optional alpaca fields are exercised, but stay the exception.
    assert 100 <= sum("system" in r for r in train) <= 300
    assert 50 <= sum("history" in r for r in train) <= 150


@pytest.mark.parametrize("name", ["text2sql_ko.json", "text2sql_ko_heldout.json"])
def test_records_are_well_formed(name: str) -> None:
    for i, r in enumerate(load(name)):
        where = f"{name}[{i}]"
        assert set(r) <= {"instruction", "input", "output", "system", "history"}, where
        assert all(isinstance(r[k], str) and r[k] for k in ("instruction", "input", "output")), where
        assert "\n질문: " in r["instruction"] and r["input"].startswith("CREATE TABLE "), where
        assert r["output"].startswith(PREFIX + "SELECT ") and r["output"].endswith(";"), where
        assert isinstance(r.get("system", ""), str), where
        for turn in r.get("history", []):
            assert isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn), where
            assert turn[1].startswith(PREFIX + "SELECT "), where
        # No leftover template field or particle marker such as {city} or (이/가).
        assert not re.search(r"[{}]|\([가-힣]+/[가-힣]+\)", r["instruction"]), where


@pytest.mark.parametrize("name", ["text2sql_ko.json", "text2sql_ko_heldout.json"])
def test_every_query_runs_against_its_schema(name: str) -> None:
    for i, r in enumerate(load(name)):
        with closing(sqlite3.connect(":memory:")) as db:
            db.executescript(r["input"])  # the record's schema text is itself valid SQLite DDL
            fill_tables(db)  # rows, so that expressions are evaluated too, not only names resolved
            for q in [r["output"]] + [answer for _, answer in r.get("history", [])]:
                try:
                    db.execute(q.removeprefix(PREFIX)).fetchall()
                except sqlite3.Error as err:
                    pytest.fail(f"{name}[{i}]: {err} in {q!r}")


def fill_tables(db: sqlite3.Connection, rows: int = 3) -> None:
    """Insert a few rows into every table, with values of each column's declared type."""
    tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    for table in tables:
        cols = db.execute(f"PRAGMA table_info({table})").fetchall()  # (cid, name, type, notnull, default, pk)
        values = [tuple(column_value(name, type_, k) for _, name, type_, *_ in cols) for k in range(1, rows + 1)]
        marks = ", ".join("?" for _ in cols)
        db.executemany(f"INSERT INTO {table} VALUES ({marks})", values)


def column_value(name: str, type_: str, k: int) -> object:
    if name.endswith(("_date", "_at")):
        return f"202{k}-0{k}-1{k}"
    return {"INTEGER": k, "REAL": k * 1.5}.get(type_, f"값{k}")


def test_heldout_questions_are_not_trained_on(train: list[dict], heldout: list[dict]) -> None:
    seen = {question(r["instruction"]) for r in train}
    seen |= {question(user) for r in train for user, _ in r.get("history", [])}
    held = [question(r["instruction"]) for r in heldout]
    assert len(set(held)) == len(held)
    assert not seen & set(held)
    assert len({re.search(r"CREATE TABLE (\w+)", r["input"]).group(1) for r in heldout}) >= 5  # spread out


# ------------------------------------------------------------------------------------------- tokenizer
@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|finetune_right_pad_id|>", "<|eom_id|>", "<|python_tag|>", "<|im_start|>", "<|im_end|>",
            "<start_of_turn>", "<end_of_turn>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>",
            "<s>", "</s>", "<unk>"]


def test_special_tokens(tok) -> None:
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|begin_of_text|>", "<|end_of_text|>",
                                                              "<|finetune_right_pad_id|>")
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIALS]
    assert ids == list(range(len(tok) - len(SPECIALS), len(tok)))  # right after the BPE vocabulary
    for t, i in zip(SPECIALS, ids):
        assert tok(t, add_special_tokens=False)["input_ids"] == [i], t
        # Text that merely looks like a control token must stay encodable as ordinary text.
        plain = tok(t, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert len(plain) > 1 and not set(plain) & set(ids), t
        assert tok.decode(plain) == t


def test_no_bos_is_added(tok) -> None:
    assert tok("질문", add_special_tokens=True)["input_ids"] == tok("질문", add_special_tokens=False)["input_ids"]


def test_decoding_round_trips(tok, train: list[dict]) -> None:
    texts = [r[k] for r in train[:200] for k in ("instruction", "input", "output")]
    texts += ["띄어쓰기  두 칸, 탭\t줄바꿈\n\n뷁 똠얌꿍 ℃ 😀 ｆｕｌｌ", " 앞뒤 공백 ", "<|eot_id|>가 본문에 있으면?"]
    for text in texts:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_llama_config_covers_the_tokenizer(tok) -> None:
    from transformers import LlamaConfig

    config = LlamaConfig.from_pretrained(MODEL_DIR)
    assert config.model_type == "llama" and config.architectures == ["LlamaForCausalLM"]
    assert config.vocab_size >= len(tok) and config.vocab_size % 64 == 0
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.tie_word_embeddings) == (256, 4, 4, 2, False)
    assert not list(MODEL_DIR.glob("*.safetensors")) and not list(MODEL_DIR.glob("*.bin"))  # no weights ship
