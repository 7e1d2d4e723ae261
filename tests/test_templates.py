"""Label masking of the llama3 template, token by token, on known conversations."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from launcher.config import TemplateConfig
from launcher.templates import IGNORE_INDEX, Template
from tests.conftest import ROOT

CONV = [
    {"role": "system", "content": "너는 SQL 도우미다."},
    {"role": "user", "content": "직원 수는?"},
    {"role": "assistant", "content": "쿼리 작성: SELECT COUNT(*) FROM employees;"},
]
LLAMA3_TEXT = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n너는 SQL 도우미다.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n직원 수는?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n쿼리 작성: SELECT COUNT(*) FROM employees;<|eot_id|>"
)


def load_template(name: str, tokenizer) -> Template:
    cfg = OmegaConf.merge(OmegaConf.structured(TemplateConfig), OmegaConf.load(ROOT / "conf/template" / f"{name}.yaml"))
    return Template(OmegaConf.to_object(cfg), tokenizer)


def trained_text(enc, tokenizer) -> str:
    return tokenizer.decode([t for t in enc.labels if t != IGNORE_INDEX])


def test_llama3_renders_the_official_format(tokenizer) -> None:
    assert load_template("llama3", tokenizer).render(CONV) == LLAMA3_TEXT


def test_llama3_ids_equal_tokenising_the_whole_text(tokenizer) -> None:
    enc = load_template("llama3", tokenizer).encode(CONV)
    assert enc.input_ids == tokenizer(LLAMA3_TEXT, add_special_tokens=False)["input_ids"]


def test_llama3_trains_only_the_reply_and_its_eot(tokenizer) -> None:
    enc = load_template("llama3", tokenizer).encode(CONV)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    reply = tokenizer("쿼리 작성: SELECT COUNT(*) FROM employees;", add_special_tokens=False)["input_ids"] + [eot]
    n = len(reply)
    assert enc.labels[-n:] == reply
    assert enc.labels[:-n] == [IGNORE_INDEX] * (len(enc.input_ids) - n)
    assert trained_text(enc, tokenizer) == "쿼리 작성: SELECT COUNT(*) FROM employees;<|eot_id|>"


def test_generation_prompt_is_the_untrained_prefix(tokenizer) -> None:
    t = load_template("llama3", tokenizer)
    prompt = t.render(CONV[:2], add_generation_prompt=True)
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    enc = t.encode(CONV)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert enc.input_ids[:n_prompt] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert all(x == IGNORE_INDEX for x in enc.labels[:n_prompt]) and enc.labels[n_prompt] != IGNORE_INDEX


MULTI = [
    {"role": "user", "content": "첫 질문"},
    {"role": "assistant", "content": "첫 답"},
    {"role": "user", "content": "둘째 질문"},
    {"role": "assistant", "content": "둘째 답"},
]


def test_every_assistant_turn_is_trained_by_default(tokenizer) -> None:
    enc = load_template("llama3", tokenizer).encode(MULTI)
    assert trained_text(enc, tokenizer) == "첫 답<|eot_id|>둘째 답<|eot_id|>"


def test_mask_history_trains_only_the_last_turn(tokenizer) -> None:
    enc = load_template("llama3", tokenizer).encode(MULTI, mask_history=True)
    assert trained_text(enc, tokenizer) == "둘째 답<|eot_id|>"


def test_train_on_prompt_trains_everything(tokenizer) -> None:
    enc = load_template("llama3", tokenizer).encode(MULTI, train_on_prompt=True)
    assert enc.labels == enc.input_ids


def test_control_tokens_in_content_stay_plain_text(tokenizer) -> None:
    conv = [{"role": "user", "content": "what is <|eot_id|> and {{content}}?"},
            {"role": "assistant", "content": "<|eot_id|> ends a turn"}]
    t = load_template("llama3", tokenizer)
    enc = t.encode(conv)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    # Exactly two real <|eot_id|>: the end of the user turn and the end of the reply.
    assert enc.input_ids.count(eot) == 2
    assert enc.labels[-1] == eot and eot not in enc.labels[:-1]
    assert "{{content}}" in t.render(conv)
    assert tokenizer.decode(enc.input_ids).count("<|eot_id|>") == 4  # two as text, two as control tokens


def test_truncation_drops_earlier_turns_first(tokenizer) -> None:
    t = load_template("llama3", tokenizer)
    full = t.encode(MULTI)
    last = t.encode(MULTI[2:])
    enc = t.encode(MULTI, cutoff_len=len(last.input_ids))
    assert enc.truncated and enc.input_ids == last.input_ids
    assert trained_text(enc, tokenizer) == "둘째 답<|eot_id|>"
    assert len(full.input_ids) > len(last.input_ids)


def test_record_without_room_for_a_reply_is_dropped(tokenizer) -> None:
    t = load_template("llama3", tokenizer)
    prompt_len = len(tokenizer(t.render(MULTI[2:3], add_generation_prompt=True),
                               add_special_tokens=False)["input_ids"])
    assert t.encode(MULTI, cutoff_len=prompt_len) is None
    cut = t.encode(MULTI, cutoff_len=prompt_len + 1)
    assert cut is not None and sum(x != IGNORE_INDEX for x in cut.labels) == 1
