"""Data: the dataset_info.json registry, every record format, each bad-record case with its exact message, the
on_error policy, the prepared output contract and its cache (hit, and a miss for every input that changes it)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import datasets
import pytest
from omegaconf import OmegaConf

from launcher.config import DatasetConfig, TemplateConfig
from launcher.data import cache_key, prepare
from launcher.formats import to_messages
from launcher.registry import DataError, DatasetEntry, load_registry, read_records
from launcher.templates import IGNORE_INDEX
from tests.conftest import ROOT, run_launcher

LF = ROOT / "tests" / "fixtures" / "llamafactory_data"
TOKENIZER_DIR = ROOT / "models" / "tiny_llama"
ALL = ["alpaca_ko", "alpaca_remapped", "sharegpt_ko", "support_tagged", "openai_messages", "glaive_toolcall_ko_demo",
       "multi_file"]


def template(name: str = "llama3") -> TemplateConfig:
    cfg = OmegaConf.merge(OmegaConf.structured(TemplateConfig), OmegaConf.load(ROOT / "conf/template" / f"{name}.yaml"))
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, TemplateConfig)
    return obj


def first(name: str) -> tuple[list[dict], list[dict]]:
    """The first record of a fixture entry, converted."""
    (entry,) = load_registry(LF, [name])
    where, record = next(read_records(entry.files[0]))
    return to_messages(record, entry, where)


def data_dir(tmp_path: Path, files: dict[str, str], info: dict) -> Path:
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text, encoding="utf-8")
    (d / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return d


def dcfg(directory: Path, names: list[str], tmp_path: Path, **kw) -> DatasetConfig:
    kw = {"cutoff_len": 256, **kw}
    return DatasetConfig(dir=str(directory), names=names, cache_dir=str(tmp_path / "cache"), **kw)


# ------------------------------------------------------------------------------------------------ registry
def test_registry_reads_every_supported_entry() -> None:
    entries = {e.name: e for e in load_registry(LF, ALL)}
    assert [p.name for p in entries["multi_file"].files] == ["part-1.jsonl", "part-2.jsonl"]
    assert entries["sharegpt_ko"].formatting == "sharegpt" and entries["alpaca_ko"].formatting == "alpaca"
    assert entries["support_tagged"].tags["user_tag"] == "customer"


@pytest.mark.parametrize("name,message", [
    ("alpaca_en_hub", "entry 'alpaca_en_hub': it is downloaded from the Hugging Face hub (hf_hub_url), which this "
                      "launcher does not do (it runs offline). Download the files and give the entry a 'file_name'."),
    ("belle_ms", "entry 'belle_ms': it is downloaded from ModelScope (ms_hub_url)"),
    ("scripted", "entry 'scripted': it is built by a dataset loading script (script_url)"),
    ("dpo_pairs", "entry 'dpo_pairs': 'ranking: true' marks preference data (DPO/RM); this launcher does supervised "
                  "fine-tuning only. Remove it from dataset.names."),
    ("nope", "dataset 'nope' is not in"),
])
def test_unsupported_entries_are_clear_errors(name: str, message: str) -> None:
    with pytest.raises(DataError) as err:
        load_registry(LF, [name])
    assert message in str(err.value)
    assert str(LF / "dataset_info.json") in str(err.value) or name == "nope"


def test_missing_registry_and_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset_info.json does not exist: point dataset.dir at a folder"):
        load_registry(tmp_path, ["x"])
    d = data_dir(tmp_path, {}, {"gone": {"file_name": "gone.json"}, "csv": {"file_name": "t.csv"}})
    with pytest.raises(DataError, match=r"entry 'gone': file_name 'gone.json' not found"):
        load_registry(d, ["gone"])
    (d / "t.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"entry 'csv': t.csv is not .json or .jsonl"):
        load_registry(d, ["csv"])


# ------------------------------------------------------------------------------------------------ formats
def test_alpaca_joins_instruction_and_input_like_llamafactory() -> None:
    msgs, tools = first("alpaca_ko")
    assert tools == []
    assert msgs == [
        {"role": "system", "content": "너는 SQL 도우미다."},
        {"role": "user", "content": "서울의 인구를 조회하는 SQL을 작성하세요.\nCREATE TABLE city(name TEXT, population INT);"},
        {"role": "assistant", "content": "SELECT population FROM city WHERE name = '서울';"},
    ]


def test_alpaca_history_becomes_earlier_turns() -> None:
    (entry,) = load_registry(LF, ["alpaca_ko"])
    where, record = list(read_records(entry.files[0]))[1]
    msgs, _ = to_messages(record, entry, where)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[:2] == [{"role": "user", "content": "테이블 이름은?"}, {"role": "assistant", "content": "city 입니다."}]


def test_alpaca_columns_are_remapped() -> None:
    msgs, _ = first("alpaca_remapped")
    assert msgs == [{"role": "user", "content": "What is 0 + 0?\nAnswer with a number."},
                    {"role": "assistant", "content": "0"}]


def test_sharegpt_default_tags_and_system_column() -> None:
    msgs, _ = first("sharegpt_ko")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[0]["content"] == "간결하게 답하라." and msgs[1]["content"] == "서울는 어느 나라 도시인가요?"


def test_sharegpt_custom_tags() -> None:
    msgs, _ = first("support_tagged")
    assert msgs == [{"role": "user", "content": "Order 100 has not arrived."},
                    {"role": "assistant", "content": "Sorry! Order 100 ships tomorrow."}]


def test_openai_messages() -> None:
    msgs, _ = first("openai_messages")
    assert msgs == [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "Spell the number 0 in Korean."},
                    {"role": "assistant", "content": "영"}]


def test_openai_messages_with_tool_calls_and_no_tags() -> None:
    entry = DatasetEntry("x", [], "sharegpt")
    record = {"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{\"city\": \"Seoul\"}"}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."}]}
    msgs, _ = to_messages(record, entry, "f.json, record 0")
    assert msgs[1] == {"role": "function_call", "content": '{"name": "w", "arguments": {"city": "Seoul"}}'}
    assert msgs[2] == {"role": "observation", "content": "sunny"}


def test_glaive_tool_entry() -> None:
    msgs, tools = first("glaive_toolcall_ko_demo")
    assert [m["role"] for m in msgs] == ["user", "function_call", "observation", "assistant"]
    assert json.loads(msgs[1]["content"]) == {"name": "get_population", "arguments": {"city": "서울"}}
    assert tools[0]["type"] == "function" and tools[0]["function"]["name"] == "get_population"


# ------------------------------------------------------------------------------------------------ bad records
HINT = " Fix the record, or set dataset.on_error=skip to drop such records (they are counted and reported)."
ALPACA_OK = {"instruction": "q", "output": "a"}
SHARE_OK = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
BAD = {
    "malformed JSON line": (
        "bad.jsonl", json.dumps(ALPACA_OK) + "\n" + '{"instruction": "q", "output": }\n', "alpaca",
        "bad.jsonl, line 2: not valid JSON (Expecting value, column 32)."),
    "malformed JSON list": (
        "bad.json", '[\n {"instruction": "q", "output": "a"},\n {"instruction": "q" "output": "a"}\n]\n', "alpaca",
        "bad.json, line 3: not valid JSON (Expecting ',' delimiter, column 22)."),
    "missing field": (
        "bad.json", json.dumps([ALPACA_OK, {"instruction": "q"}]), "alpaca",
        "bad.json, record 1: field 'output' is missing."),
    "empty reply (alpaca)": (
        "bad.json", json.dumps([{"instruction": "q", "output": "  "}]), "alpaca",
        "bad.json, record 0: field 'output' is empty: an empty assistant reply has nothing to train on."),
    "empty reply (sharegpt)": (
        "bad.json", json.dumps([{"conversations": [SHARE_OK[0], {"from": "gpt", "value": ""}]}]), "sharegpt",
        "bad.json, record 0, conversations[1]: the assistant reply is empty; there is nothing to train on."),
    "roles out of order": (
        "bad.json",
        json.dumps([{"conversations": SHARE_OK}, {"conversations": [SHARE_OK[0], SHARE_OK[0], SHARE_OK[1]]}]),
        "sharegpt",
        "bad.json, record 1, conversations[1]: role 'user' where assistant or function_call is expected: turns must "
        "alternate user/observation and assistant/function_call."),
    "ends with a user turn": (
        "bad.json", json.dumps([{"conversations": [SHARE_OK[0]]}]), "sharegpt",
        "bad.json, record 0, conversations[0]: the conversation ends with a user turn; it must end with an "
        "assistant reply."),
    "non-string content (alpaca)": (
        "bad.json", json.dumps([{"instruction": "q", "output": 42}]), "alpaca",
        "bad.json, record 0: field 'output' must be a string, found int."),
    "non-string content (sharegpt)": (
        "bad.jsonl", json.dumps({"conversations": [SHARE_OK[0], {"from": "gpt", "value": ["a"]}]}) + "\n", "sharegpt",
        "bad.jsonl, line 1, conversations[1]: field 'value' must be a string, found list."),
    "unknown role": (
        "bad.json", json.dumps([{"conversations": [{"from": "bot", "value": "a"}]}]), "sharegpt",
        "bad.json, record 0, conversations[0]: from='bot' is not a known role"),
    "not an object": (
        "bad.json", json.dumps([["q", "a"]]), "alpaca",
        "bad.json, record 0: a record must be a JSON object, found list."),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_record_names_file_record_and_field(case: str, tmp_path: Path, tokenizer) -> None:
    file, text, formatting, message = BAD[case]
    d = data_dir(tmp_path, {file: text}, {"bad": {"file_name": file, "formatting": formatting}})
    with pytest.raises(DataError) as err:
        prepare(dcfg(d, ["bad"], tmp_path), template(), tokenizer, TOKENIZER_DIR, 0)
    assert str(err.value).startswith(f"{d / message.split(',')[0]}{message[len(message.split(',')[0]):]}"), \
        str(err.value)
    if "JSON list" not in case:
        assert str(err.value).endswith(HINT)
    assert not any((tmp_path / "cache").glob("data-*")), "nothing half-written"


def test_on_error_skip_counts_and_reports(tmp_path: Path, tokenizer) -> None:
    records = [ALPACA_OK, {"instruction": "q"}, {"instruction": "q", "output": ""}, {"instruction": "q", "output": 3},
               ALPACA_OK]
    lines = "\n".join(map(json.dumps, records)) + "\n{broken\n"
    d = data_dir(tmp_path, {"mixed.jsonl": lines}, {"mixed": {"file_name": "mixed.jsonl"}})
    _, stats, hit = prepare(dcfg(d, ["mixed"], tmp_path, on_error="skip"), template(), tokenizer, TOKENIZER_DIR, 0)
    assert not hit
    assert (stats.records, stats.used, stats.dropped_errors) == (6, 2, 4)
    assert stats.error_reasons == {"missing field": 1, "empty reply": 1, "not a string": 1, "invalid JSON": 1}
    assert stats.errors[0] == f"{d / 'mixed.jsonl'}, line 2: field 'output' is missing."
    assert stats.errors[-1].startswith(f"{d / 'mixed.jsonl'}, line 6: not valid JSON")


def test_tool_data_with_a_template_without_tool_slots(tmp_path: Path, tokenizer) -> None:
    cfg = dcfg(LF, ["glaive_toolcall_ko_demo"], tmp_path)
    with pytest.raises(DataError) as err:
        prepare(cfg, template("gemma"), tokenizer, TOKENIZER_DIR, 0)
    assert "glaive_toolcall_ko_demo.json, record 0: template 'gemma' has no 'tools' slot" in str(err.value)
    # Skipping them all (the tools column is on every record, so even the call-free one needs a tools slot)
    # leaves nothing to train on: that is an error too, with the counts and an example.
    with pytest.raises(DataError) as err:
        prepare(dataclasses.replace(cfg, on_error="skip"), template("gemma"), tokenizer, TOKENIZER_DIR, 0)
    assert str(err.value).startswith(f"no usable records in glaive_toolcall_ko_demo under {LF} "
                                     f"({LF / 'glaive_toolcall_ko_demo.json'}): 9 read, 9 skipped "
                                     f"for errors (e.g. {LF / 'glaive_toolcall_ko_demo.json'}, record 0: template")


# ------------------------------------------------------------------------------------------------ prepare + cache
def test_prepare_mixed_datasets_contract(tmp_path: Path, tokenizer) -> None:
    cfg = dcfg(LF, ALL, tmp_path, max_samples=6, val_size=0.2, cutoff_len=1024)  # tool records: ~630 tokens
    out, stats, hit = prepare(cfg, template(), tokenizer, TOKENIZER_DIR, 0)
    assert not hit and (out / "COMPLETE").is_file()
    assert stats.per_dataset == {"alpaca_ko": 6, "alpaca_remapped": 6, "sharegpt_ko": 6, "support_tagged": 6,
                                 "openai_messages": 6, "glaive_toolcall_ko_demo": 6, "multi_file": 6}
    assert stats.records == 42 and stats.used + stats.eval_records == 42 and stats.eval_records == 8
    train, evals = datasets.load_from_disk(str(out / "train")), datasets.load_from_disk(str(out / "eval"))
    assert set(train.column_names) == {"input_ids", "labels", "length"} and len(evals) == 8
    row = train[0]
    assert row["length"] == len(row["input_ids"]) == len(row["labels"])
    assert stats.tokens == sum(train["length"])
    assert stats.supervised_tokens == sum(sum(x != IGNORE_INDEX for x in lab) for lab in train["labels"])
    assert (out / "train_rows.npz").is_file() and (out / "eval_rows.npz").is_file()
    assert json.loads((out / "stats.json").read_text())["used"] == stats.used
    # The tool records render their tools into the system turn.
    texts = [tokenizer.decode(ids) for ids in train["input_ids"]]
    assert any("Environment: ipython" in t and '"get_population"' in t for t in texts)


def test_second_run_reuses_the_cache(tmp_path: Path, tokenizer) -> None:
    cfg = dcfg(LF, ["alpaca_ko"], tmp_path)
    out1, stats1, hit1 = prepare(cfg, template(), tokenizer, TOKENIZER_DIR, 0)
    out2, stats2, hit2 = prepare(dataclasses.replace(cfg, num_proc=2), template(), tokenizer, TOKENIZER_DIR, 0)
    assert (hit1, hit2) == (False, True) and out1 == out2 and stats1 == stats2


def test_num_proc_gives_the_same_data(tmp_path: Path, tokenizer) -> None:
    a, _, _ = prepare(dcfg(LF, ALL, tmp_path / "a", cutoff_len=1024), template(), tokenizer, TOKENIZER_DIR, 0)
    b, _, _ = prepare(dcfg(LF, ALL, tmp_path / "b", cutoff_len=1024, num_proc=2), template(), tokenizer,
                      TOKENIZER_DIR, 0)
    assert datasets.load_from_disk(str(a / "train"))[:] == datasets.load_from_disk(str(b / "train"))[:]


def test_every_input_changes_the_cache_key(tmp_path: Path) -> None:
    d = tmp_path / "data"
    shutil.copytree(LF, d)
    tok = tmp_path / "tok"
    shutil.copytree(TOKENIZER_DIR, tok, symlinks=False)
    cfg = dcfg(d, ["alpaca_ko"], tmp_path)

    def key(c=cfg, t=template(), tokdir=tok) -> str:
        return cache_key(c, t, tokdir, load_registry(Path(c.dir), list(c.names)), 0)

    base = key()
    assert key() == base and key(dataclasses.replace(cfg, num_proc=4)) == base
    changed = {
        "cutoff_len": key(dataclasses.replace(cfg, cutoff_len=128)),
        "train_on_prompt": key(dataclasses.replace(cfg, train_on_prompt=True)),
        "mask_history": key(dataclasses.replace(cfg, mask_history=True)),
        "overlong": key(dataclasses.replace(cfg, overlong="drop")),
        "val_size": key(dataclasses.replace(cfg, val_size=0.1)),
        "max_samples": key(dataclasses.replace(cfg, max_samples=3)),
        "template": key(t=template("qwen")),
        "template slot": key(t=dataclasses.replace(template(), default_system="x")),
        "mix weights": key(dataclasses.replace(cfg, weights=[1.0])),
        "mix size": key(dataclasses.replace(cfg, mix_size="2x")),
    }
    assert key(dataclasses.replace(cfg, mix_size="2x", mix_by="tokens")) != changed["mix size"]
    # Settings that give the same mix share the cache: no weights with under/over is every record once.
    assert key(dataclasses.replace(cfg, mix_size="over", mix_by="tokens")) == base
    assert key(dataclasses.replace(cfg, mix_strategy="interleave_over", interleave_probs="2")) == \
        key(dataclasses.replace(cfg, weights=[2.0], mix_size="over"))
    (tok / "tokenizer_config.json").write_text((tok / "tokenizer_config.json").read_text().replace("2048", "4096"))
    changed["tokenizer file"] = key()
    shutil.copytree(TOKENIZER_DIR, tok, dirs_exist_ok=True)
    records = json.loads((d / "alpaca_ko.json").read_text())
    records[0]["output"] += " "
    (d / "alpaca_ko.json").write_text(json.dumps(records, ensure_ascii=False))
    changed["data file"] = key()
    for what, k in changed.items():
        assert k != base, f"changing the {what} must invalidate the cache"


def test_changed_data_is_prepared_again(tmp_path: Path, tokenizer) -> None:
    d = data_dir(tmp_path, {"a.json": json.dumps([ALPACA_OK])}, {"a": {"file_name": "a.json"}})
    out1, _, hit1 = prepare(dcfg(d, ["a"], tmp_path), template(), tokenizer, TOKENIZER_DIR, 0)
    (d / "a.json").write_text(json.dumps([ALPACA_OK, ALPACA_OK]))
    out2, stats, hit2 = prepare(dcfg(d, ["a"], tmp_path), template(), tokenizer, TOKENIZER_DIR, 0)
    assert (hit1, hit2) == (False, False) and out1 != out2 and stats.used == 2


def test_overlong_records_are_counted(tmp_path: Path, tokenizer) -> None:
    long = {"instruction": "q " * 200, "output": "a"}
    d = data_dir(tmp_path, {"a.json": json.dumps([ALPACA_OK, long])}, {"a": {"file_name": "a.json"}})
    _, stats, _ = prepare(dcfg(d, ["a"], tmp_path, cutoff_len=64), template(), tokenizer, TOKENIZER_DIR, 0)
    assert (stats.used, stats.dropped_overlong) == (1, 1)


@pytest.mark.parametrize("overlong,needle", [
    ("truncate", "even truncated (earliest turns first, as dataset.overlong=truncate does), none keeps an assistant "
                 "reply within dataset.cutoff_len=64 tokens"),
    ("drop", "every record is longer than dataset.cutoff_len=64 tokens and dataset.overlong=drop drops such records: "
             "raise dataset.cutoff_len, or set dataset.overlong=truncate"),
])
def test_all_dropped_message_fits_the_settings(overlong: str, needle: str, tmp_path: Path, tokenizer) -> None:
    long = {"instruction": "q " * 200, "output": "a"}
    d = data_dir(tmp_path, {"a.json": json.dumps([long])}, {"a": {"file_name": "a.json"}})
    with pytest.raises(DataError) as err:
        prepare(dcfg(d, ["a"], tmp_path, cutoff_len=64, overlong=overlong), template(), tokenizer, TOKENIZER_DIR, 0)
    assert needle in str(err.value)
    if overlong == "truncate":
        assert "overlong=truncate\"" not in str(err.value) and "use dataset.overlong" not in str(err.value)


@pytest.mark.parametrize("name", ["a.json", "a.jsonl"])
def test_text_that_is_not_utf8_is_named_with_its_byte_offset(name: str, tmp_path: Path, tokenizer) -> None:
    d = data_dir(tmp_path, {}, {"a": {"file_name": name}})
    good = json.dumps(ALPACA_OK).encode()
    if name.endswith(".jsonl"):  # line 2 starts after the first line and its newline
        (d / name).write_bytes(good + b"\n" + b'{"instruction": "\xbf\xf0", "output": "a"}\n')
        offset = len(good) + 1 + len('{"instruction": "')
    else:
        (d / name).write_bytes(b'[{"instruction": "q\xff", "output": "a"}]')
        offset = len('[{"instruction": "q')
    with pytest.raises(DataError) as err:
        prepare(dcfg(d, ["a"], tmp_path), template(), tokenizer, TOKENIZER_DIR, 0)
    assert str(err.value).startswith(f"{d / name}: not UTF-8 at byte {offset} "), str(err.value)


@pytest.mark.parametrize("text,what", [("", "is empty"), ("[]", "holds no records"), ("\n\n", "is empty")])
def test_a_file_without_records_is_named(text: str, what: str, tmp_path: Path, tokenizer) -> None:
    d = data_dir(tmp_path, {"a.json": json.dumps([ALPACA_OK]), "b.json": text},
                 {"a": {"file_name": "a.json"}, "b": {"file_name": "b.json"}})
    with pytest.raises(DataError) as err:
        prepare(dcfg(d, ["a", "b"], tmp_path), template(), tokenizer, TOKENIZER_DIR, 0)
    assert str(err.value).startswith(f"{d / 'b.json'} {what}: add records, or leave it out of 'b'"), str(err.value)
    # Skipping: the file is reported, and with nothing else to train on the error names the files read.
    _, stats, _ = prepare(dcfg(d, ["a", "b"], tmp_path, on_error="skip"), template(), tokenizer, TOKENIZER_DIR, 0)
    assert stats.used == 1 and stats.errors[0].startswith(f"{d / 'b.json'} {what}")
    with pytest.raises(DataError) as err:
        prepare(dcfg(d, ["b"], tmp_path, on_error="skip"), template(), tokenizer, TOKENIZER_DIR, 0)
    assert str(err.value).startswith(f"no usable records in b under {d} ({d / 'b.json'}): 0 read"), str(err.value)


# ------------------------------------------------------------------------------------------------ the CLI
def test_launcher_reports_a_bad_record_without_traceback(tmp_path: Path) -> None:
    d = data_dir(tmp_path, {"bad.json": json.dumps([ALPACA_OK, {"instruction": "q"}])},
                 {"bad": {"file_name": "bad.json"}})
    r = run_launcher(f"dataset.dir={d}", "dataset.names=[bad]", f"dataset.cache_dir={tmp_path / 'cache'}",
                     f"output_dir={tmp_path / 'out'}", "backend=single", timeout=300)
    assert r.returncode == 2
    assert f"{d / 'bad.json'}, record 1: field 'output' is missing." in r.stderr
    assert "Traceback" not in r.stderr and not any((tmp_path / "out").rglob("config.yaml"))


@pytest.mark.slow
@pytest.mark.distributed
def test_llamafactory_folder_trains_with_the_default_job(tmp_path: Path) -> None:
    names = "[alpaca_ko,alpaca_remapped,sharegpt_ko,support_tagged,openai_messages,glaive_toolcall_ko_demo,multi_file]"
    r = run_launcher(f"dataset.dir={LF}", f"dataset.names={names}", "dataset.val_size=4", "train.max_steps=3",
                     "dataset.cutoff_len=1024",
                     f"dataset.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'out'}", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "done: 3 steps" in r.stderr
    assert "0 dropped for errors, 0 dropped for length" in r.stderr
    (summary,) = (tmp_path / "out").rglob("summary.json")
    assert json.loads(summary.read_text())["steps"] == 3
    data_report = (summary.parent / "data_report.txt").read_text()
    assert "records read:        69" in data_report and "⟦" in data_report


# ------------------------------------------------------------------------------------------------ inspect_data
def test_report_marks_trained_tokens_and_gives_statistics(tmp_path: Path, tokenizer) -> None:
    from launcher.inspect_data import report

    out, stats, _ = prepare(dcfg(LF, ["alpaca_ko"], tmp_path), template(), tokenizer, TOKENIZER_DIR, 0)
    text = report(out, stats, tokenizer, 256, samples=2)
    assert "records read:        12 (alpaca_ko 12)" in text and "used for training:   12" in text
    assert f"({stats.supervised_tokens:,} supervised, {stats.supervised_tokens / stats.tokens:.1%})" in text
    assert "record lengths (tokens):" in text and "█" in text
    # The reply and its end-of-turn token are inside the marks; the prompt (and its headers) outside.
    assert "<|start_header_id|>assistant<|end_header_id|>\n\n⟦SELECT population FROM city WHERE name = '서울';" \
           "<|eot_id|>⟧" in text
    assert text.count("--- record ") == 2
    coloured = report(out, stats, tokenizer, 256, samples=1, color=True)
    assert "\033[1;32mSELECT population" in coloured and "⟦" not in coloured


def test_inspect_data_cli(tmp_path: Path) -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "launcher.inspect_data", "-n", "1", f"dataset.dir={LF}",
                        "dataset.names=[sharegpt_ko]", f"dataset.cache_dir={tmp_path}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "records read:        10" in r.stdout and "⟦대한민국입니다.<|eot_id|>⟧" in r.stdout
    assert "prepared data" in r.stderr and "Tokenizing" in r.stderr  # progress is shown
    again = subprocess.run([sys.executable, "-m", "launcher.inspect_data", "-n", "0", f"dataset.dir={LF}",
                            "dataset.names=[sharegpt_ko]", f"dataset.cache_dir={tmp_path}"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "reused cached data" in again.stderr
    bad = subprocess.run([sys.executable, "-m", "launcher.inspect_data", "template=nope"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "llama3" in bad.stderr and "Traceback" not in bad.stderr


def test_cache_key_without_tokenizer_files_hashes_the_tokenizer(tmp_path: Path, tokenizer) -> None:
    """A model given as a hub id has no local tokenizer directory; the tokenizer itself is hashed then."""
    cfg = dcfg(LF, ["alpaca_ko"], tmp_path)
    entries = load_registry(LF, ["alpaca_ko"])
    a = cache_key(cfg, template(), tmp_path / "missing", entries, 0, tokenizer)
    other = tokenizer.__class__.from_pretrained(TOKENIZER_DIR)
    other.add_special_tokens({"additional_special_tokens": ["<|new|>"]})
    assert cache_key(cfg, template(), tmp_path / "missing", entries, 0, other) != a
    assert cache_key(cfg, template(), tmp_path / "missing", entries, 0, tokenizer) == a
