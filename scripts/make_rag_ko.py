"""Generate the shipped Korean retrieval-augmented (RAG) sample (LLaMA-Factory alpaca format) into ``data/``.

Writes ``data/rag_ko.json`` (byte-identical on every run) and registers it as ``rag_ko`` in
``data/dataset_info.json`` (other entries there are kept), and 8 held-out records of 2k-6k tokens (other invented
entities, the same kinds of questions) as ``rag_ko_heldout``, whose answers ``dataset=rag_ko`` scores for
citations before and after training. Train it with the RAG template::

    python -m launcher dataset=rag_ko template=llama3_rag

A record is ``{"instruction": "질문: ...", "input": <4-20 retrieved documents>, "output": <answer>}``: the user turn
is the question followed by the documents, each headed ``[doc-NNNN] <title>``. About three quarters of the
questions ask for a fact stated in one document, and the answer states it and cites that document as
``[[doc-NNNN]]``; the others ask about something no document covers, and the answer says so (the sentence the
``llama3_rag`` system prompt asks for). The documents are synthetic: facts about invented cities, companies and
festivals, padded with descriptive sentences, so that record lengths spread evenly on a log scale from about 2k
to 32k tokens of the tiny tokenizer (``models/tiny_llama``). The question comes first, so
``dataset.overlong=cut_prompt`` cuts the last documents of an over-long record, never the question.

Usage::

    python scripts/make_rag_ko.py           # regenerate in place
    python scripts/make_rag_ko.py --check   # exit 1 if the committed files differ from a fresh generation
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from make_text2sql import dump, write_or_check  # scripts/: the same registry handling and --check

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "data"
TOKENIZER_DIR = ROOT / "models" / "tiny_llama"
FILE = "rag_ko.json"
NAME = "rag_ko"
SEED = 20261130
N_RECORDS = 40
MIN_TOKENS, MAX_TOKENS = 2_000, 32_000
HELDOUT_FILE, HELDOUT_NAME = "rag_ko_heldout.json", "rag_ko_heldout"
N_HELDOUT, HELDOUT_MAX_TOKENS = 8, 6_000  # short enough to be answered whole within the default cutoff_len
P_UNANSWERABLE = 0.25
NOT_FOUND = "검색 결과에서 답을 찾을 수 없습니다."
DOC_OVERHEAD = 80  # tokens a document costs beyond its sentences counted one by one (header, joins), measured

SYLLABLES = "가나다라마바사아자차카타파하강남동서한솔누리푸른새별빛달온결"
KINDS = {
    "도시": {"인구": "{v:,}명", "면적": "{v:,}제곱킬로미터", "설립 연도": "{v}년", "시장": "{p}"},
    "회사": {"직원 수": "{v:,}명", "설립 연도": "{v}년", "본사 위치": "{c}", "대표": "{p}"},
    "축제": {"방문객 수": "{v:,}명", "첫 개최 연도": "{v}년", "개최 장소": "{c}", "총감독": "{p}"},
}
FACT = "{name}의 {attr}은(는) {value}이다."
FILLER = [
    "{name}은(는) 지역 주민들 사이에서 오랫동안 {adj} 곳으로 알려져 왔다.",
    "{year}년에 발표된 보고서에 따르면 {name}의 {topic} 분야는 꾸준히 성장하고 있다.",
    "전문가들은 {name}이(가) 앞으로 {topic} 정책에서 중요한 역할을 할 것이라고 내다봤다.",
    "{name} 관계자는 \"{topic} 문제를 해결하기 위해 다양한 방안을 검토하고 있다\"고 밝혔다.",
    "최근 {name} 주변에서는 {topic}와(과) 관련된 행사가 여러 차례 열렸다.",
    "{name}의 {topic} 현황은 {year}년 이후 매년 공개되고 있다.",
    "방문객들은 {name}의 {adj} 분위기와 잘 정비된 {topic} 시설을 장점으로 꼽는다.",
    "{name}은(는) {year}년에 {topic} 개선 사업을 시작해 {num}개의 세부 과제를 추진했다.",
]
ADJ = ["조용한", "활기찬", "전통적인", "현대적인", "친환경적인", "독특한", "편리한", "유서 깊은"]
TOPIC = ["교통", "문화", "교육", "관광", "환경", "복지", "산업", "주거", "안전", "디지털"]


def word(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(n))


def person(rng: random.Random) -> str:
    return rng.choice("김이박최정강조윤장임") + word(rng, 2)


def entity(rng: random.Random, taken: set[str]) -> tuple[str, str, dict[str, str]]:
    """(kind, name, {attribute: value text}) of a new invented entity."""
    kind = rng.choice(sorted(KINDS))
    while (name := word(rng, 3) + {"도시": "시", "회사": "전자", "축제": " 축제"}[kind]) in taken:
        pass
    taken.add(name)
    facts = {attr: fmt.format(v=rng.randint(1950, 2020) if "연도" in attr else rng.randint(1_000, 2_000_000),
                              p=person(rng), c=word(rng, 2) + "시")
             for attr, fmt in KINDS[kind].items()}
    return kind, name, facts


def document(rng: random.Random, name: str, facts: dict[str, str], tokens: int, count) -> str:
    """A document about ``name`` stating ``facts`` among filler sentences, about ``tokens`` tokens long."""
    lines = [FACT.format(name=name, attr=a, value=v) for a, v in facts.items()]
    body: list[str] = []
    used = sum(count(s) for s in lines)
    while used < tokens:
        s = rng.choice(FILLER).format(name=name, adj=rng.choice(ADJ), topic=rng.choice(TOPIC),
                                      year=rng.randint(1990, 2025), num=rng.randint(2, 40))
        body.append(s)
        used += count(s)
    for fact in lines:  # facts scattered through the text, not all at the top
        body.insert(rng.randint(0, len(body)), fact)
    return " ".join(body)


def record(rng: random.Random, target: int, count) -> dict[str, str]:
    """One record of about ``target`` tokens."""
    n_docs = rng.randint(4, 20)
    taken: set[str] = set()
    entities = [entity(rng, taken) for _ in range(n_docs + 1)]  # the last one is in no document
    ids = rng.sample(range(1, 10_000), n_docs)
    docs = [f"[doc-{i:04d}] {name} 개요\n{document(rng, name, facts, target // n_docs - DOC_OVERHEAD, count)}"
            for i, (_, name, facts) in zip(ids, entities)]
    unanswerable = rng.random() < P_UNANSWERABLE
    pick = n_docs if unanswerable else rng.randrange(n_docs)
    _, name, facts = entities[pick]
    attr = rng.choice(sorted(facts))
    question = f"질문: {name}의 {attr}은(는) 무엇인가요?"
    if unanswerable:
        answer = f"{NOT_FOUND} 제공된 문서에는 {name}에 대한 내용이 없습니다."
    else:
        answer = f"{name}의 {attr}은(는) {facts[attr]}입니다 [[doc-{ids[pick]:04d}]]."
    return {"instruction": question, "input": "검색 결과:\n\n" + "\n\n".join(docs), "output": answer}


def build() -> dict[str, str]:
    """File name -> exact text of every generated file."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))

    def count(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False).ids)

    rng = random.Random(SEED)
    records = records_of(rng, N_RECORDS, MAX_TOKENS, count)
    heldout = records_of(rng, N_HELDOUT, HELDOUT_MAX_TOKENS, count)  # drawn after: the training file is unchanged
    path = DATA_DIR / "dataset_info.json"
    info = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    columns = {"prompt": "instruction", "query": "input", "response": "output"}
    info[NAME] = {"file_name": FILE, "columns": columns}
    info[HELDOUT_NAME] = {"file_name": HELDOUT_FILE, "columns": columns}
    return {FILE: dump(records), HELDOUT_FILE: dump(heldout), "dataset_info.json": dump(info)}


def records_of(rng: random.Random, n: int, max_tokens: int, count) -> list[dict[str, str]]:
    """``n`` records whose lengths spread evenly on a log scale from MIN_TOKENS to ``max_tokens``, shuffled."""
    ratio = max_tokens / MIN_TOKENS
    targets = [round(MIN_TOKENS * ratio ** (i / (n - 1))) for i in range(n)]
    rng.shuffle(targets)
    records = []
    for target in targets:
        budget = target
        while True:  # the overhead of a record varies with its number of documents: correct and draw again
            rec = record(rng, budget, count)
            length = count("\n".join(rec.values()))
            if MIN_TOKENS <= length <= max_tokens and abs(length - target) <= 0.1 * target:
                break
            budget += target - length
        records.append(rec)
    return records


def main(argv: list[str] | None = None) -> int:
    return write_or_check(build(), "make_rag_ko.py", __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
