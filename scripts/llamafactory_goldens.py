"""Write tests/fixtures/chat_templates/llamafactory_0_9_5.json: how LLaMA-Factory 0.9.5 itself encodes a few
conversations with its ``default`` template and with ``llama3-rag`` as its users registered it, on the tiny
tokenizer. tests/test_templates.py checks lf_default.yaml and llama3_rag_lf.yaml against it, so LLaMA-Factory is
not needed to run the tests, only to remake the fixture:

    pip download llamafactory==0.9.5 --no-deps -d /tmp/lf && (cd /tmp/lf && unzip -oq llamafactory-0.9.5-*.whl)
    PYTHONPATH=/tmp/lf .venv/bin/python scripts/llamafactory_goldens.py

The ids and labels come from LLaMA-Factory's own SupervisedDatasetProcessor (default data arguments: every reply
trained, prompts masked). Its multimodal plugin imports torchaudio/av/librosa at module level; no conversation here
uses them, so empty modules stand in for them when they are not installed.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "chat_templates" / "llamafactory_0_9_5.json"
sys.path.insert(0, str(ROOT))

for name in ("torchaudio", "av", "librosa"):  # imported by llamafactory.data.mm_plugin, unused for text
    if importlib.util.find_spec(name) is None:
        sys.modules[name] = types.ModuleType(name)
        sys.modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None)

from llamafactory.data.formatter import EmptyFormatter, FunctionFormatter, StringFormatter, ToolFormatter  # noqa: E402
from llamafactory.data.processor.supervised import SupervisedDatasetProcessor  # noqa: E402
from llamafactory.data.template import TEMPLATES, register_template  # noqa: E402
from llamafactory.extras.env import VERSION  # noqa: E402
from llamafactory.hparams import DataArguments  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

assert VERSION == "0.9.5", f"this fixture is LLaMA-Factory 0.9.5's; found {VERSION}"
RAG_SYSTEM = OmegaConf.load(ROOT / "conf" / "template" / "llama3_rag.yaml").default_system
HEADER = "<|start_header_id|>assistant<|end_header_id|>"  # llama3's is followed by "\n\n"; theirs is not

# LLaMA-Factory's llama3 registration (src/llamafactory/data/template.py) with the blank line after the assistant
# header dropped, and the Korean RAG default system prompt.
register_template(
    name="llama3-rag",
    format_user=StringFormatter(slots=["<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|>" + HEADER]),
    format_assistant=StringFormatter(slots=["{{content}}<|eot_id|>"]),
    format_system=StringFormatter(slots=["<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>"]),
    format_function=FunctionFormatter(slots=["{{content}}<|eot_id|>"], tool_format="llama3"),
    format_observation=StringFormatter(
        slots=["<|start_header_id|>ipython<|end_header_id|>\n\n{{content}}<|eot_id|>" + HEADER]),
    format_tools=ToolFormatter(tool_format="llama3"),
    format_prefix=EmptyFormatter(slots=[{"bos_token"}]),
    default_system=RAG_SYSTEM,
    stop_words=["<|eot_id|>", "<|eom_id|>"],
    replace_eos=True,
)

SYSTEM = "You are terse."
CASES = {
    "single": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
    "multi": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
              {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": "Green."}],
    "korean": [{"role": "user", "content": "서울의 인구는? 🙂"}, {"role": "assistant", "content": "약 940만 명입니다."}],
    "rag": [{"role": "user", "content": "[[doc-1]] 서울의 인구는 약 940만 명이다.\n\n질문: 서울의 인구는?"},
            {"role": "assistant", "content": "약 940만 명입니다 [[doc-1]]."}],
}


def main() -> None:
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "models" / "tiny_llama")
    processor = None
    out: dict = {"llamafactory": VERSION, "tokenizer": "models/tiny_llama", "templates": {}}
    for name in ("default", "llama3-rag"):
        template = TEMPLATES[name]
        proc = SupervisedDatasetProcessor(template=template, tokenizer=tokenizer, processor=processor,
                                          data_args=DataArguments(cutoff_len=4096))
        cases = {}
        for case, messages in CASES.items():
            for system in ("", SYSTEM):
                ids, labels = proc._encode_data_example(prompt=messages[:-1], response=messages[-1:], system=system,
                                                        tools="", images=[], videos=[], audios=[])
                full = ([{"role": "system", "content": system}] if system else []) + messages
                cases[case + ("+system" if system else "")] = {
                    "messages": full, "input_ids": ids, "labels": labels,
                    "text": tokenizer.decode(ids, skip_special_tokens=False)}
        out["templates"][name] = cases
    OUT.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
