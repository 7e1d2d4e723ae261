"""Task metrics (launcher/evaluate/tasks.py) on the shipped text-to-SQL data and on hand-made cases, and the
generation-eval config checks that run before any worker."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from launcher.config import Config, ConfigError, GenerateConfig
from launcher.evaluate.generation import config_problems, load_prompts, metrics_for
from launcher.evaluate.tasks import (SqlSettings, average, build_database, citation, citations, document_ids,
                                     exact_match, extract_sql, run_query, sql_exec)
from launcher.templates import Template
from tests.conftest import ROOT, run_launcher

HELDOUT = json.loads((ROOT / "data" / "text2sql_ko_heldout.json").read_text())
TRAIN = json.loads((ROOT / "data" / "text2sql_ko.json").read_text())[:200]
HR = next(r["input"] for r in TRAIN if "CREATE TABLE employees" in r["input"] and "departments" in r["input"])


def test_reference_sql_against_itself_is_100_percent() -> None:
    results = [sql_exec(r["output"], r["output"], r["input"]) for r in HELDOUT + TRAIN]
    assert average(results) == {"sql_exec": 1.0, "sql_error": 0.0, "sql_timeout": 0.0}


def test_reference_results_are_not_empty() -> None:
    """Generated rows satisfy the references' filters, so a right answer is not right by an empty result."""
    empty = 0
    for r in HELDOUT:
        sql = extract_sql(r["output"])
        rows = run_query(build_database(r["input"], sql, SqlSettings()), sql, SqlSettings())
        empty += rows in ([], [(None,)], [(0,)])
    assert empty <= len(HELDOUT) // 10, empty


def test_wrong_queries_score_zero() -> None:
    """Every other question's query on the same schema is a wrong answer, and each is told apart."""
    pairs = [(a, b) for i, a in enumerate(TRAIN) for b in TRAIN[i + 1:]
             if a["input"] == b["input"] and extract_sql(a["output"]) != extract_sql(b["output"])]
    assert len(pairs) > 200
    assert average([sql_exec(b["output"], a["output"], a["input"]) for a, b in pairs])["sql_exec"] == 0.0
    ref = "SELECT name FROM employees WHERE city = '서울';"
    for wrong in ("SELECT name FROM employees WHERE city = '부산';", "SELECT name FROM employees;",
                  "SELECT name, city FROM employees WHERE city = '서울';", "SELECT 1;"):
        assert sql_exec(wrong, ref, HR)["sql_exec"] == 0.0, wrong


def test_equal_results_count_and_order_only_when_the_reference_sorts() -> None:
    ref = "쿼리 작성: SELECT name FROM employees WHERE salary >= 5000;"
    assert sql_exec("SELECT e.name FROM employees AS e WHERE 5000 <= e.salary", ref, HR)["sql_exec"] == 1.0
    assert sql_exec("SELECT name FROM employees WHERE salary >= 5000 ORDER BY name DESC", ref, HR)["sql_exec"] == 1.0
    sorted_ref = "SELECT name, salary FROM employees ORDER BY salary DESC, id"
    assert sql_exec("SELECT name, salary FROM employees ORDER BY salary ASC, id", sorted_ref, HR)["sql_exec"] == 0.0
    assert sql_exec("SELECT name, salary FROM employees ORDER BY salary DESC, id;", sorted_ref, HR)["sql_exec"] == 1.0


def test_malformed_sql_is_an_error_and_the_eval_goes_on() -> None:
    ref = HELDOUT[0]["output"]
    preds = [ref, "쿼리 작성: SELECT FROM WHERE;", "I don't know", ref]
    results = [sql_exec(p, ref, HELDOUT[0]["input"]) for p in preds]
    assert [r["sql_exec"] for r in results] == [1.0, 0.0, 0.0, 1.0]
    assert [r["sql_error"] for r in results] == [0.0, 1.0, 1.0, 0.0]
    assert average(results) == {"sql_exec": 0.5, "sql_error": 0.5, "sql_timeout": 0.0}


def test_runaway_query_is_a_timeout() -> None:
    endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c;"
    t0 = time.monotonic()
    r = sql_exec(endless, "SELECT name FROM employees;", HR, SqlSettings(timeout_s=0.3))
    assert (r["sql_timeout"], r["sql_error"], r["sql_exec"]) == (1.0, 0.0, 0.0)
    assert time.monotonic() - t0 < 5
    # A recursive query that ends is fine.
    ok = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3) SELECT x FROM c;"
    assert sql_exec(ok, ok, HR)["sql_exec"] == 1.0


@pytest.mark.parametrize("attack", ["DROP TABLE employees;", "INSERT INTO employees (id) VALUES (999);",
                                    "DELETE FROM employees;", "UPDATE employees SET salary = 0;",
                                    "CREATE TABLE t (x);", "ATTACH DATABASE 'x.db' AS x;", "PRAGMA query_only = OFF;"])
def test_database_is_read_only(attack: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # an ATTACH that got through would create x.db here
    r = sql_exec(attack, "SELECT COUNT(*) FROM employees;", HR)
    assert r["sql_error"] == 1.0, r
    con = build_database(HR, "SELECT 1", SqlSettings())
    with pytest.raises(sqlite3.DatabaseError):
        run_query(con, attack.removesuffix(";"), SqlSettings())
    assert run_query(con, "SELECT COUNT(*) FROM employees", SqlSettings()) == [(50,)]
    assert not list(tmp_path.iterdir())


def test_databases_are_deterministic() -> None:
    sql = extract_sql(HELDOUT[3]["output"])

    def content(index: int) -> list:
        con = build_database(HELDOUT[3]["input"], sql, SqlSettings(), index)
        tables = [t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return [con.execute(f"SELECT * FROM {t}").fetchall() for t in tables]

    assert content(0) == content(0) != content(1)


def test_extract_sql() -> None:
    assert extract_sql("쿼리 작성: SELECT a FROM t WHERE b = 'x;y'; 설명입니다") == "SELECT a FROM t WHERE b = 'x;y';"
    assert extract_sql("답:\n```sql\nselect 1\n```\n끝") == "select 1"
    assert extract_sql("WITH x AS (SELECT 1) SELECT * FROM x") == "WITH x AS (SELECT 1) SELECT * FROM x"
    assert extract_sql("모르겠어요") == "모르겠어요"


def test_exact_match_normalises() -> None:
    assert exact_match("  SELECT  a\nFROM t; ", "select a from t")["exact_match"] == 1.0
    assert exact_match("ｓｅｌｅｃｔ 1.", "SELECT 1")["exact_match"] == 1.0  # NFKC folds full-width letters
    assert exact_match("SELECT 2", "SELECT 1")["exact_match"] == 0.0


NOT_FOUND = "검색 결과에서 답을 찾을 수 없습니다"


def test_citation_metrics_on_hand_made_cases() -> None:
    docs = ["doc-1", "doc-2", "doc-3"]
    ref = "서울입니다 [[doc-1]]. 인구는 천만 명입니다 [[doc-3]]."
    assert citations("a [[doc-1]] b [[ doc-2 ]] [[doc-1]]") == ["doc-1", "doc-2"]
    perfect = citation("서울 [[doc-1]], 천만 [[doc-3]]", ref, docs, NOT_FOUND)
    assert perfect == {"citation_valid": 1.0, "citation_precision": 1.0, "citation_recall": 1.0,
                       "not_found_accuracy": 1.0, "not_found_recall": None}
    half = citation("서울 [[doc-1]] [[doc-2]]", ref, docs, NOT_FOUND)
    assert (half["citation_precision"], half["citation_recall"], half["citation_valid"]) == (0.5, 0.5, 1.0)
    invented = citation("서울 [[doc-9]]", ref, docs, NOT_FOUND)
    assert (invented["citation_valid"], invented["citation_precision"], invented["citation_recall"]) == (0, 0, 0)
    uncited = citation("서울입니다.", ref, docs, NOT_FOUND)
    assert (uncited["citation_valid"], uncited["citation_precision"], uncited["citation_recall"]) == (None, None, 0)
    # "Not found" is right exactly when the reference says it.
    unanswerable = f"{NOT_FOUND}."
    assert citation(f"{NOT_FOUND}.", unanswerable, docs, NOT_FOUND)["not_found_accuracy"] == 1.0
    assert citation(f"{NOT_FOUND}.", unanswerable, docs, NOT_FOUND)["not_found_recall"] == 1.0
    assert citation("서울 [[doc-1]]", unanswerable, docs, NOT_FOUND)["not_found_recall"] == 0.0
    assert citation(f"{NOT_FOUND}.", ref, docs, NOT_FOUND)["not_found_accuracy"] == 0.0
    scores = average([perfect, half, invented, uncited])
    assert scores["citation_recall"] == pytest.approx((1 + 0.5 + 0 + 0) / 4)
    assert scores["citation_precision"] == pytest.approx((1 + 0.5 + 0) / 3)  # uncited answers have no precision


def test_document_ids_from_a_field_or_the_prompt() -> None:
    assert document_ids({"documents": [{"id": "a", "text": "..."}, {"id": "b"}]}, "", "documents") == ["a", "b"]
    assert document_ids({"documents": {"a": "...", "b": "..."}}, "", "documents") == ["a", "b"]
    assert document_ids({}, "[[doc-1]]\n본문\n[[doc-2]]\n본문", "documents") == ["doc-1", "doc-2"]
    # The shipped RAG sample (scripts/make_rag_ko.py): "[doc-NNNN] title" headers in the user turn.
    prompt = "질문: 면적은?\n검색 결과:\n\n[doc-6208] 마다솔전자 개요\n본문 [[doc-1]] 인용\n\n[doc-0711] 개요\n본문"
    assert document_ids({}, prompt, "documents") == ["doc-6208", "doc-0711"]
    assert document_ids({}, "<d id=a>\n<d id=b>", "", r"^<d id=(\w+)>") == ["a", "b"]


# ------------------------------------------------------------------------------------------------ config
def test_config_problems_name_the_key_and_the_fix() -> None:
    assert config_problems(GenerateConfig(datasets=["a"], metrics=["sql_exec", "exact_match"])) == []
    (p,) = config_problems(GenerateConfig(datasets=["a"], metrics=["bleu"]))
    assert "eval.generate.metrics" in p and "'bleu'" in p and "exact_match, sql_exec, citation" in p
    problems = config_problems(GenerateConfig(datasets=["a", "b"], metrics={"a": ["exact_match"], "c": ["x"]}))
    assert any("'c'" in p and "eval.generate.datasets" in p for p in problems)
    assert any("'b'" in p and "no entry" in p for p in problems)
    assert any("eval.generate.datasets is empty" in p for p in config_problems(GenerateConfig(steps=10)))
    g = GenerateConfig(datasets=["a", "b"], metrics={"a": ["sql_exec"], "b": ["citation"]})
    assert (metrics_for(g, "a"), metrics_for(g, "b")) == (["sql_exec"], ["citation"])


def _config(tmp_path, records: list[dict], metrics: list[str]) -> Config:
    """The default job's config reading ``records`` as dataset "d" with ``metrics``."""
    from launcher.config import to_object
    from tests.test_configs import _compose

    (tmp_path / "d.json").write_text(json.dumps(records, ensure_ascii=False))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json"}}))
    return to_object(_compose(f"dataset.dir={tmp_path}", "eval.generate.datasets=[d]",
                              f"eval.generate.metrics=[{','.join(metrics)}]"))


def test_sql_metric_without_a_schema_fails_naming_the_key(tmp_path, tokenizer) -> None:
    cfg = _config(tmp_path, [{"instruction": "몇 명?", "output": "SELECT 1;"}], ["sql_exec"])
    with pytest.raises(ConfigError) as err:
        load_prompts(cfg, Template(cfg.template, tokenizer))
    msg = str(err.value)
    assert "record 0" in msg and "eval.generate.sql.schema_field" in msg and "'input'" in msg and "exact_match" in msg


def test_reference_that_does_not_run_fails_before_workers(tmp_path, tokenizer) -> None:
    cfg = _config(tmp_path, [{"instruction": "q", "input": HR, "output": "SELECT nope FROM employees;"}], ["sql_exec"])
    with pytest.raises(ConfigError, match="reference SQL does not run.*no such column: nope"):
        load_prompts(cfg, Template(cfg.template, tokenizer))


def test_citation_metric_without_documents_fails(tmp_path, tokenizer) -> None:
    cfg = _config(tmp_path, [{"instruction": "q", "output": "a"}], ["citation"])
    with pytest.raises(ConfigError, match="eval.generate.citation.documents_field"):
        load_prompts(cfg, Template(cfg.template, tokenizer))
    cfg = _config(tmp_path, [{"instruction": "[[doc-1]]\n서울\n\n질문: 수도는?", "output": "서울 [[doc-1]]"}],
                  ["citation", "exact_match"])
    (p,) = load_prompts(cfg, Template(cfg.template, tokenizer))
    assert p.fields == {"documents": ["doc-1"]} and p.reference == "서울 [[doc-1]]" and p.id == "d/0"


@pytest.mark.slow
def test_launcher_refuses_a_metric_that_does_not_fit_before_workers(tmp_path) -> None:
    r = run_launcher("backend=single", "eval.generate.metrics=[citation]", f"output_dir={tmp_path}", timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "eval.generate.citation.documents_field" in r.stderr and "text2sql_ko_heldout" in r.stderr
    assert "Traceback" not in r.stderr and "starting" not in r.stderr
    assert not any(tmp_path.iterdir())  # a rejected run leaves no run directory
