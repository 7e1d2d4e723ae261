"""Chat templates: golden renderings, label masking token by token, the generated Jinja template, and equality
with the official Jinja chat templates of the public models (tests/fixtures/chat_templates)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from launcher.chat_jinja import to_jinja
from launcher.config import TemplateConfig, register_configs
from launcher.messages import normalize_tools, to_openai_messages
from launcher.templates import IGNORE_INDEX, Template, TemplateError
from tests.conftest import ROOT

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
TEMPLATES = sorted(p.stem for p in (ROOT / "conf" / "template").glob("*.yaml"))
register_configs()

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


@functools.lru_cache(maxsize=None)
def _template_node(name: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"template={name}"]).template


def template_config(name: str) -> TemplateConfig:
    """conf/template/<name>.yaml as Hydra composes it (so a template's `defaults:` are honoured)."""
    obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TemplateConfig), _template_node(name)))
    assert isinstance(obj, TemplateConfig)
    return obj


def load_template(name: str, tokenizer) -> Template:
    return Template(template_config(name), tokenizer)


def trained_text(enc, tokenizer) -> str:
    return tokenizer.decode([t for t in enc.labels if t != IGNORE_INDEX])


# ------------------------------------------------------------------------------------------------ llama3 masking
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


# ------------------------------------------------------------------------------------------------ every template
SYSTEM = {"role": "system", "content": "You are terse."}
SINGLE = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]
MULTI_EN = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": "Green."}]
KOREAN = [{"role": "user", "content": "서울의 인구는? 🙂"}, {"role": "assistant", "content": "약 940만 명입니다."}]
TRICKY = [{"role": "user", "content": 'quote " backslash \\ {{content}} {% if x %} }} <|im_end|> <end_of_turn>'},
          {"role": "assistant", "content": "<|eot_id|> <|end|> {{eos}} [/INST]"}]
CASES = {
    "single": SINGLE, "single+system": [SYSTEM, *SINGLE], "multi": MULTI_EN, "multi+system": [SYSTEM, *MULTI_EN],
    "korean": KOREAN, "tricky": TRICKY,
}
TOOLS = [{"name": "get_weather", "description": "도시의 현재 날씨",
          "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "도시 이름"}},
                         "required": ["city"]}},
         {"type": "function", "function": {"name": "get_time", "description": "Current time",
                                           "parameters": {"type": "object", "properties": {}}}}]
TOOL_CONV = [
    {"role": "user", "content": "서울 날씨 알려줘"},
    {"role": "function_call", "content": json.dumps({"name": "get_weather", "arguments": {"city": "서울"}},
                                                    ensure_ascii=False)},
    {"role": "observation", "content": json.dumps({"temperature": 21, "sky": "맑음"}, ensure_ascii=False)},
    {"role": "assistant", "content": "서울은 맑고 21도입니다."},
]


def _hf(tokenizer, chat_template: str, messages, **kw) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False, **kw)


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_to_jinja_renders_what_render_renders(name: str, case: str, tokenizer) -> None:
    t = load_template(name, tokenizer)
    jinja = to_jinja(t)
    conv = CASES[case]
    assert _hf(tokenizer, jinja, to_openai_messages(conv)) == t.render(conv)
    prompt = conv[:-1]
    assert _hf(tokenizer, jinja, to_openai_messages(prompt), add_generation_prompt=True) == \
        t.render(prompt, add_generation_prompt=True)


@pytest.mark.parametrize("name", ["llama3", "qwen", "llama3_rag_lf"])
@pytest.mark.parametrize("with_system", [False, True])
def test_to_jinja_renders_tools(name: str, with_system: bool, tokenizer) -> None:
    t = load_template(name, tokenizer)
    tools = normalize_tools(TOOLS)
    conv = ([SYSTEM] if with_system else []) + TOOL_CONV
    text = t.render(conv, tools=tools)
    assert '"get_weather"' in text and "서울은 맑고 21도입니다." in text
    assert _hf(tokenizer, to_jinja(t), to_openai_messages(conv), tools=tools) == text
    for end in (len(conv) - 3, len(conv) - 1):  # prompts ending with the user turn, and with the tool result
        assert _hf(tokenizer, to_jinja(t), to_openai_messages(conv[:end]), tools=tools,
                   add_generation_prompt=True) == t.render(conv[:end], add_generation_prompt=True, tools=tools)


@pytest.mark.parametrize("name", TEMPLATES)
def test_ids_equal_tokenising_the_rendered_text(name: str, tokenizer) -> None:
    t = load_template(name, tokenizer)
    for case in ("single+system", "multi", "korean", "tricky"):
        conv = CASES[case]
        enc = t.encode(conv)
        # Control-token look-alikes in content stay text, so tokenise the rendered text the same way: specials
        # only where the template put them. Cases without look-alikes must equal plain tokenisation.
        if case != "tricky":
            assert enc.input_ids == tokenizer(t.render(conv), add_special_tokens=False)["input_ids"], case
        assert tokenizer.decode(enc.input_ids) == t.render(conv), case


@pytest.mark.parametrize("name", TEMPLATES)
def test_every_template_masks_prompts_and_trains_replies(name: str, tokenizer) -> None:
    t = load_template(name, tokenizer)
    enc = t.encode([SYSTEM, *MULTI_EN])
    text = trained_text(enc, tokenizer)
    assert "Blue." in text and "Green." in text
    assert "Name a colour." not in text and "You are terse." not in text and "Another one?" not in text
    assert trained_text(t.encode([SYSTEM, *MULTI_EN], mask_history=True), tokenizer).lstrip().startswith("Green.")
    # The trained part is exactly the text after each generation prompt.
    prompt = t.render([SYSTEM, *MULTI_EN[:3]], add_generation_prompt=True)
    assert t.render([SYSTEM, *MULTI_EN]).startswith(prompt)


def test_llama3_rag_has_the_korean_rag_system_prompt(tokenizer) -> None:
    cfg = template_config("llama3_rag")
    assert cfg.name == "llama3_rag"
    assert "[[" in cfg.default_system and "검색" in cfg.default_system and "문서" in cfg.default_system
    t = Template(cfg, tokenizer)
    text = t.render(SINGLE)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + cfg.default_system)
    assert t.render([SYSTEM, *SINGLE]) == load_template("llama3", tokenizer).render([SYSTEM, *SINGLE])


def test_tool_turns_need_a_template_with_tool_slots(tokenizer) -> None:
    for name in ("gemma", "mistral", "default", "lf_default"):
        t = load_template(name, tokenizer)
        with pytest.raises(TemplateError, match="tool support"):
            t.encode(TOOL_CONV)
        with pytest.raises(TemplateError, match="tools"):
            t.encode(SINGLE, tools=normalize_tools(TOOLS))


def test_tool_calls_and_results_are_trained_and_masked(tokenizer) -> None:
    t = load_template("qwen", tokenizer)
    enc = t.encode(TOOL_CONV, tools=normalize_tools(TOOLS))
    text = trained_text(enc, tokenizer)
    assert text == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "서울"}}\n</tool_call><|im_end|>\n'
                    "서울은 맑고 21도입니다.<|im_end|>\n")


def test_unknown_template_lists_the_available_ones() -> None:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        with pytest.raises(Exception) as err:
            compose("config", overrides=["template=nope"])
    assert "llama3" in str(err.value) and "qwen" in str(err.value)


# ------------------------------------------------------------------------------------------------ official templates
DATE_LINES = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
EMPTY_LLAMA_SYSTEM = "<|start_header_id|>system<|end_header_id|>\n\n<|eot_id|>"


def _official(fixture: str) -> str:
    return (FIXTURES / fixture).read_text(encoding="utf-8")


def _without_llama31_date(text: str) -> str:
    """Llama 3.1's template writes a date into every system turn (and a system turn into every conversation);
    llama3.yaml deliberately does not."""
    return text.replace(DATE_LINES, "").replace(EMPTY_LLAMA_SYSTEM, "")


def _gemma_system_in_user(messages: list[dict]) -> list[dict]:
    """Gemma's template rejects a system message; gemma.yaml writes it at the top of the first user turn."""
    if messages and messages[0]["role"] == "system":
        first = messages[1]
        return [{**first, "content": messages[0]["content"] + "\n\n" + first["content"]}, *messages[2:]]
    return messages


# (template, fixture, how the official messages are adapted, how the official text is adapted)
OFFICIAL = [
    ("llama3", "llama3_instruct.jinja", None, None),
    ("llama3", "llama3_1_instruct.jinja", None, _without_llama31_date),
    ("qwen", "qwen2_5_instruct.jinja", None, None),
    ("chatml", "chatml_openhermes_2_5.jinja", None, None),
    ("llama2", "llama2_chat.jinja", None, None),
    ("mistral", "mistral_7b_instruct_v0_3.jinja", None, None),
    ("gemma", "gemma2_it.jinja", _gemma_system_in_user, None),
    ("phi3", "phi3_mini_4k_instruct.jinja", None, None),
]
OFFICIAL_CASES = ["single", "single+system", "multi", "multi+system", "korean"]


@pytest.mark.parametrize("name,fixture,adapt_messages,adapt_text", OFFICIAL, ids=[f"{o[0]}-{o[1]}" for o in OFFICIAL])
@pytest.mark.parametrize("case", OFFICIAL_CASES)
def test_equals_the_official_chat_template(name, fixture, adapt_messages, adapt_text, case, tokenizer) -> None:
    t = load_template(name, tokenizer)
    official = _official(fixture)
    conv = CASES[case]
    adapt_messages = adapt_messages or (lambda m: m)
    adapt_text = adapt_text or (lambda s: s)

    def official_text(messages, **kw) -> str:
        return adapt_text(_hf(tokenizer, official, adapt_messages(messages), **kw))

    # The inference prompt (everything but the last reply) must match the official one exactly.
    prompt = official_text(conv[:-1], add_generation_prompt=True)
    assert t.render(conv[:-1], add_generation_prompt=True) == prompt
    assert t.encode(conv).input_ids[:len(tokenizer(prompt, add_special_tokens=False)["input_ids"])] == \
        tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = official_text(conv)
    if name == "mistral" and conv[0]["role"] == "system":
        # Mistral's template drops the system prompt from a conversation that ends with a reply (it is written
        # only into an inference prompt); mistral.yaml keeps it where inference puts it, in the last user turn.
        assert "You are terse." not in full
        full = prompt + " " + conv[-1]["content"] + tokenizer.eos_token
    assert t.render(conv) == full
    assert t.encode(conv).input_ids == tokenizer(full, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("with_system", [False, True])
def test_qwen_tools_equal_the_official_template(with_system: bool, tokenizer) -> None:
    t = load_template("qwen", tokenizer)
    tools = normalize_tools(TOOLS)
    conv = ([SYSTEM] if with_system else []) + TOOL_CONV
    official = _hf(tokenizer, _official("qwen2_5_instruct.jinja"), to_openai_messages(conv), tools=tools)
    assert t.render(conv, tools=tools) == official
    assert t.encode(conv, tools=tools).input_ids == tokenizer(official, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("with_system", [False, True])
def test_llama3_tools_equal_llama31_with_tools_in_the_system_turn(with_system: bool, tokenizer) -> None:
    t = load_template("llama3", tokenizer)
    tools = normalize_tools(TOOLS)
    conv = ([SYSTEM] if with_system else []) + TOOL_CONV
    messages = to_openai_messages(conv)
    # Llama 3.1 JSON-quotes a tool result given as a string; given as an object it prints its JSON, as we do.
    messages[-2]["content"] = json.loads(messages[-2]["content"])
    official = _hf(tokenizer, _official("llama3_1_instruct.jinja"), messages, tools=tools,
                   tools_in_user_message=False)
    assert t.render(conv, tools=tools) == _without_llama31_date(official)


BAD_CONVERSATIONS = {
    "ends with a user turn": ([SINGLE[0]], None),
    "two user turns": ([SINGLE[0], SINGLE[0], SINGLE[1]], None),
    "late system message": ([*SINGLE, SYSTEM, *SINGLE], None),
    "reply first": ([SINGLE[1], SINGLE[0]], None),
    "tool turns": (TOOL_CONV, None),
    "tools": (SINGLE, normalize_tools(TOOLS)),
    "bad function call": ([SINGLE[0], {"role": "function_call", "content": "not json"}, *TOOL_CONV[2:]], None),
}


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("case", sorted(BAD_CONVERSATIONS))
def test_check_rejects_exactly_what_render_rejects(name: str, case: str, tokenizer) -> None:
    """Data preparation validates records with the cheap check(); it must agree with render()."""
    t = load_template(name, tokenizer)
    conv, tools = BAD_CONVERSATIONS[case]
    try:
        t.render(conv, tools=tools)
        renders = True
    except TemplateError:
        renders = False
    try:
        t.check(conv, tools)
        checks = True
    except TemplateError:
        checks = False
    assert renders == checks
    if case in ("ends with a user turn", "two user turns", "late system message", "reply first", "tools"):
        assert not renders or (case == "tools" and name in ("llama3", "llama3_rag", "llama3_rag_lf", "qwen"))


@pytest.mark.parametrize("name", ["gemma", "llama2", "mistral", "llama3"])
def test_truncation_keeps_the_system_prompt_where_inference_puts_it(name: str, tokenizer) -> None:
    """Dropping the first exchange must not drop a system prompt that lived in the first user turn: the kept
    conversation is encoded exactly as if it had been given alone."""
    t = load_template(name, tokenizer)
    conv = [SYSTEM, *MULTI_EN]
    kept = t.encode([SYSTEM, *MULTI_EN[2:]])
    enc = t.encode(conv, cutoff_len=len(kept.input_ids))
    assert enc.truncated and enc.input_ids == kept.input_ids and enc.labels == kept.labels
    assert "You are terse." in tokenizer.decode(enc.input_ids)


def test_truncation_starts_at_a_user_turn_not_at_a_tool_result(tokenizer) -> None:
    t = load_template("qwen", tokenizer)
    tools = normalize_tools(TOOLS)
    conv = [*MULTI_EN[:2], *TOOL_CONV]
    full = t.encode(conv, tools=tools)
    kept = t.encode(TOOL_CONV, tools=tools)
    # Room for the tool exchange but not for it plus the first question: the whole tool exchange is kept.
    enc = t.encode(conv, cutoff_len=len(kept.input_ids), tools=tools)
    assert enc.input_ids == kept.input_ids and len(full.input_ids) > len(kept.input_ids)
    # Less room than the tool exchange: it is cut at the end, never started at the tool result.
    short = t.encode(conv, cutoff_len=len(kept.input_ids) - 5, tools=tools)
    assert short.input_ids == kept.input_ids[:-5]


@pytest.mark.parametrize("name", TEMPLATES)
def test_exported_chat_template_gives_the_training_prompt_ids(name: str, tokenizer) -> None:
    """What the export writes as chat_template tokenises an inference prompt to exactly the ids training masked."""
    t = load_template(name, tokenizer)
    conv = [SYSTEM, *MULTI_EN]
    ids = tokenizer.apply_chat_template(to_openai_messages(conv[:-1]), chat_template=to_jinja(t),
                                        add_generation_prompt=True, tokenize=True, return_dict=False)
    enc = t.encode(conv, mask_history=True)  # earlier replies are part of the prompt here
    n = len(ids)
    assert enc.input_ids[:n] == list(ids)
    assert all(x == IGNORE_INDEX for x in enc.labels[:n]) and enc.labels[n] != IGNORE_INDEX


# ------------------------------------------------------------------------------------------------ LLaMA-Factory's own
# How LLaMA-Factory 0.9.5 itself encodes these conversations (its SupervisedDatasetProcessor on the tiny tokenizer),
# written by scripts/llamafactory_goldens.py: models trained there with `default` or `llama3-rag` see these ids.
LF_GOLDENS = json.loads((FIXTURES / "llamafactory_0_9_5.json").read_text(encoding="utf-8"))
LF_PAIRS = [("lf_default", "default"), ("llama3_rag_lf", "llama3-rag")]


@pytest.mark.parametrize("ours,theirs", LF_PAIRS)
@pytest.mark.parametrize("case", sorted(LF_GOLDENS["templates"]["default"]))
def test_equals_llamafactory_0_9_5(ours: str, theirs: str, case: str, tokenizer) -> None:
    gold = LF_GOLDENS["templates"][theirs][case]
    t = load_template(ours, tokenizer)
    enc = t.encode(gold["messages"])
    assert enc.input_ids == gold["input_ids"]
    assert enc.labels == gold["labels"]
    assert t.render(gold["messages"]) == gold["text"]


def test_lf_default_puts_eos_after_every_slot(tokenizer) -> None:
    eos = tokenizer.eos_token
    t = load_template("lf_default", tokenizer)
    assert t.render([SYSTEM, *MULTI_EN]) == (f"System: You are terse.{eos}\nHuman: Name a colour.{eos}\nAssistant:Blue."
                                             f"{eos}\nHuman: Another one?{eos}\nAssistant:Green.{eos}\n")
    # Its neighbour, today's default: no eos after the system and user turns, a space after "Assistant:", and the
    # newline between turns is an untrained separator.
    assert load_template("default", tokenizer).render([SYSTEM, *MULTI_EN]) == (
        f"System: You are terse.\nHuman: Name a colour.\nAssistant: Blue.{eos}\nHuman: Another one?\nAssistant: "
        f"Green.{eos}")
    assert t.render(MULTI_EN[:3], add_generation_prompt=True).endswith(f"Human: Another one?{eos}\nAssistant:")
    enc = t.encode(MULTI_EN)
    assert trained_text(enc, tokenizer) == f"Blue.{eos}\nGreen.{eos}\n"
    eos_id = tokenizer.eos_token_id
    assert enc.input_ids.count(eos_id) == 4 and [enc.labels[i] for i, x in enumerate(enc.input_ids) if x == eos_id] \
        == [IGNORE_INDEX, eos_id, IGNORE_INDEX, eos_id]  # the user turns' eos is prompt, the replies' is trained


def test_llama3_rag_lf_has_no_blank_line_after_the_assistant_header(tokenizer) -> None:
    ours, neighbour = load_template("llama3_rag_lf", tokenizer), load_template("llama3_rag", tokenizer)
    header = "<|start_header_id|>assistant<|end_header_id|>"
    conv = [SYSTEM, *MULTI_EN]
    assert ours.render(conv) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\nName a colour.<|eot_id|>{header}Blue.<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\nAnother one?<|eot_id|>{header}Green.<|eot_id|>")
    assert ours.render(conv) == neighbour.render(conv).replace(header + "\n\n", header)  # the only difference
    assert ours.cfg.default_system == neighbour.cfg.default_system and ours.render(SINGLE).startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + neighbour.cfg.default_system)
    # Token by token: the reply starts right after <|end_header_id|>, and it is the first trained token.
    enc = ours.encode(SINGLE)
    first = next(i for i, lab in enumerate(enc.labels) if lab != IGNORE_INDEX)
    assert enc.input_ids[first - 1] == tokenizer.convert_tokens_to_ids("<|end_header_id|>")
    assert enc.input_ids[first:] == enc.labels[first:] == \
        tokenizer("4.", add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|eot_id|>")]
    # Served with the same text: the exported chat template's generation prompt ends at the bare header, and a
    # tool result hands over to the reply the same way.
    prompt = _hf(tokenizer, to_jinja(ours), to_openai_messages(SINGLE[:1]), add_generation_prompt=True)
    assert prompt == ours.render(SINGLE[:1], add_generation_prompt=True) and prompt.endswith("<|eot_id|>" + header)
    assert ours.render(TOOL_CONV, tools=normalize_tools(TOOLS)).count(header + "서울은") == 1
