"""dataset.overlong=cut_prompt: every reply kept whole, user text cut to fit, counted in the data report."""

from __future__ import annotations

import json
from pathlib import Path

from launcher.cut_prompt import encode_cut_prompt
from launcher.data import prepare
from launcher.inspect_data import report
from launcher.templates import IGNORE_INDEX, Template
from tests.test_data import TOKENIZER_DIR, data_dir, dcfg, template

DOCS = " ".join(f"[doc-{i}] 문서 {i}의 내용은 서울의 날씨와 교통에 관한 긴 설명입니다." for i in range(60))


def encode(tokenizer, conversations, cutoff: int):
    tpl = Template(template("llama3"), tokenizer)
    return tpl, encode_cut_prompt(tpl, conversations, cutoff, [None] * len(conversations))


def trained(enc) -> list[int]:
    return [t for t in enc.labels if t != IGNORE_INDEX]


def test_the_reply_stays_whole_and_the_prompt_end_goes(tokenizer) -> None:
    conv = [{"role": "user", "content": f"질문: 서울의 날씨는?\n{DOCS}"},
            {"role": "assistant", "content": "맑습니다 [[doc-3]]."}]
    tpl, (enc,) = encode(tokenizer, [conv], 300)
    whole = tpl.encode(conv)
    assert len(whole.input_ids) > 300 and len(enc.input_ids) <= 300 and enc.truncated
    assert trained(enc) == trained(whole), "the reply (and its end-of-turn token) is trained in full"
    text = tokenizer.decode(enc.input_ids)
    assert "질문: 서울의 날씨는?" in text and "[doc-0]" in text and "[doc-59]" not in text
    assert len(enc.input_ids) >= 300 - 8, "cut no more than needed (a few tokens of re-tokenisation slack)"


def test_the_longest_user_message_goes_first_then_the_earliest(tokenizer) -> None:
    conv = [{"role": "user", "content": "첫 질문 " * 40}, {"role": "assistant", "content": "첫 답"},
            {"role": "user", "content": f"질문: 무엇?\n{DOCS}"}, {"role": "assistant", "content": "답 [[doc-1]]"}]
    tpl, (enc,) = encode(tokenizer, [conv], 400)
    text = tokenizer.decode(enc.input_ids)
    assert text.count("첫 질문") == 40, "the shorter, earlier message is untouched while cutting the longest suffices"
    assert trained(enc) == trained(tpl.encode(conv))
    _, (tight,) = encode(tokenizer, [conv], 120)  # the long message emptied is not enough: the first one is cut too
    assert tight is not None and len(tight.input_ids) <= 120 and trained(tight) == trained(tpl.encode(conv))
    assert "[doc-0]" not in tokenizer.decode(tight.input_ids) and tokenizer.decode(tight.input_ids).count("첫 질문") < 40


def test_records_that_fit_are_unchanged_and_long_replies_are_dropped(tokenizer) -> None:
    short = [{"role": "user", "content": "안녕"}, {"role": "assistant", "content": "안녕하세요"}]
    long_reply = [{"role": "user", "content": "요약해 줘"}, {"role": "assistant", "content": DOCS}]
    tpl, (a, b) = encode(tokenizer, [short, long_reply], 200)
    assert a == tpl.encode(short) and not a.truncated
    assert b is None


def test_prepare_counts_cut_and_dropped_records(tmp_path: Path, tokenizer) -> None:
    records = [{"instruction": "안녕", "output": "안녕하세요"},
               {"instruction": f"질문: 날씨?\n{DOCS}", "output": "맑음 [[doc-2]]"},
               {"instruction": "요약", "output": DOCS}]
    d = data_dir(tmp_path, {"a.json": json.dumps(records, ensure_ascii=False)}, {"a": {"file_name": "a.json"}})
    out, stats, _ = prepare(dcfg(d, ["a"], tmp_path, cutoff_len=256, overlong="cut_prompt"), template("llama3"),
                            tokenizer, TOKENIZER_DIR, 0)
    assert (stats.used, stats.prompt_cut, stats.truncated, stats.dropped_overlong) == (2, 1, 0, 1)
    text = report(out, stats, tokenizer, 256, samples=0)
    assert "prompt cut:          1" in text and "dropped for length:  1" in text
    # The same data with truncate: the long-prompt record loses the end of its reply instead.
    _, trunc, _ = prepare(dcfg(d, ["a"], tmp_path, cutoff_len=256), template("llama3"), tokenizer,
                          TOKENIZER_DIR, 0)
    assert trunc.prompt_cut == 0 and trunc.truncated >= 1
