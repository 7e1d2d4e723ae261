"""The shipped RAG sample (data/rag_ko.json): reproducible, well-formed, long, and trainable with llama3_rag."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from launcher.config import to_object
from launcher.data import prepare
from launcher.templates import IGNORE_INDEX
from tests.conftest import ROOT

DATA = ROOT / "data"
NOT_FOUND = "검색 결과에서 답을 찾을 수 없습니다."


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return json.loads((DATA / "rag_ko.json").read_text(encoding="utf-8"))


def test_the_shipped_file_is_the_scripts_output() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_rag_ko.py"), "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_records_cite_their_documents(records: list[dict]) -> None:
    assert 30 <= len(records) <= 60 and (DATA / "rag_ko.json").stat().st_size < 3_000_000
    info = json.loads((DATA / "dataset_info.json").read_text(encoding="utf-8"))
    assert info["rag_ko"]["file_name"] == "rag_ko.json" and "text2sql_ko" in info
    unanswerable = 0
    for i, r in enumerate(records):
        assert r["instruction"].startswith("질문: "), i  # the question first: cut_prompt cuts documents only
        ids = re.findall(r"^\[(doc-\d{4})\] ", r["input"], flags=re.M)
        assert 4 <= len(ids) <= 20 and len(set(ids)) == len(ids), i
        cited = re.findall(r"\[\[(doc-\d{4})\]\]", r["output"])
        if r["output"].startswith(NOT_FOUND):
            unanswerable += 1
            assert not cited, i
        else:
            assert len(cited) == 1 and cited[0] in ids, i
            # The answer's value is stated in the cited document.
            value = re.search(r"\)\s(.+)입니다 \[\[", r["output"]).group(1)
            doc = r["input"].split(f"[{cited[0]}] ", 1)[1].split("\n\n[doc-", 1)[0]
            assert value in doc, i
    assert 0.1 * len(records) <= unanswerable <= 0.4 * len(records)


def test_lengths_spread_from_2k_to_32k_tokens(records: list[dict], tokenizer) -> None:
    lengths = sorted(len(tokenizer("\n".join(r.values()), add_special_tokens=False)["input_ids"]) for r in records)
    assert 2_000 <= lengths[0] <= 3_000 and 28_000 <= lengths[-1] <= 32_000
    assert sum(n > 8_192 for n in lengths) >= 10 and sum(n < 8_192 for n in lengths) >= 10


def test_it_trains_with_llama3_rag_keeping_every_answer(tokenizer, tmp_path) -> None:
    """dataset=rag_ko template=llama3_rag: records over cutoff_len lose documents, never their answer."""
    from tests.test_configs import _compose

    cfg = to_object(_compose("dataset=rag_ko", "template=llama3_rag", f"dataset.cache_dir={tmp_path}"))
    assert cfg.dataset.overlong == "cut_prompt"
    out, stats, _ = prepare(cfg.dataset, cfg.template, tokenizer, ROOT / "models" / "tiny_llama", 0)
    assert stats.used == 40 and stats.dropped_overlong == 0 and stats.prompt_cut >= 10
    import datasets

    ds = datasets.load_from_disk(str(out / "train"))
    assert max(ds["length"]) <= cfg.dataset.cutoff_len
    answers = sorted(tokenizer.decode([t for t in lab if t != IGNORE_INDEX]) for lab in ds["labels"])
    assert sum("[[doc-" in a for a in answers) == sum("[[doc-" in r["output"] for r in
                                                      json.loads((DATA / "rag_ko.json").read_text("utf-8")))


def test_the_heldout_set_is_scored_for_citations(tokenizer) -> None:
    """rag_ko_heldout (the README's RAG example scores it): 8 new records whose prompts fit the default cutoff,
    each with its documents for the citation metric, answerable and unanswerable ones both present."""
    from launcher.evaluate.generation import load_prompts, prompt_ids
    from launcher.templates import Template
    from tests.test_configs import _compose

    cfg = to_object(_compose("dataset=rag_ko", "template=llama3_rag", "eval.generate.datasets=[rag_ko_heldout]",
                             "eval.generate.metrics=[citation]"))
    template = Template(cfg.template, tokenizer)
    prompts = load_prompts(cfg, template)
    train = {r["instruction"] for r in json.loads((DATA / "rag_ko.json").read_text("utf-8"))}
    assert len(prompts) == 8
    for p in prompts:
        assert 4 <= len(p.fields["documents"]) <= 20 and p.messages[-1]["content"].split("\n")[0] not in train
        assert all(d in p.messages[-1]["content"] for d in p.fields["documents"])
        assert len(prompt_ids(template, p)) < cfg.dataset.cutoff_len
    assert 1 <= sum(p.reference.startswith(NOT_FOUND) for p in prompts) < 8
