"""Generation eval (launcher/evaluate/generation.py): prompts as training encodes them, and the same greedy answers
from one process, ZeRO-3 × 2 and FSDP2 × 2 for the same weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launcher.config import to_object
from launcher.evaluate.generation import GenerationEval, load_prompts, prompt_ids
from launcher.model import load_model, materialize
from launcher.templates import Template
from tests.conftest import ROOT, run_launcher
from tests.test_configs import _compose

SETTINGS = ("eval.generate.max_samples=5", "eval.generate.batch_size=2", "eval.generate.max_new_tokens=12")


def test_prompt_ids_are_the_training_prompt(tokenizer) -> None:
    """The prompt is the encoded conversation up to the reply: the tokens training puts before the labels."""
    cfg = to_object(_compose(*SETTINGS))
    template = Template(cfg.template, tokenizer)
    p = load_prompts(cfg, template)[0]
    enc = template.encode([*p.messages, {"role": "assistant", "content": p.reference}])
    ids = prompt_ids(template, p)
    assert enc.input_ids[:len(ids)] == ids and enc.labels[len(ids) - 1] == -100 and enc.labels[len(ids)] != -100
    assert tokenizer.decode(ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def _stop_word(tokenizer) -> str:
    """A token the untrained tiny model emits in some answers and not in others: as a stop word it makes ranks
    finish their batches at different steps, which is what synced_gpus must survive under ZeRO-3 and FSDP."""
    cfg = to_object(_compose(*SETTINGS))
    materialize(cfg.model)
    ev = GenerationEval(load_prompts(cfg, Template(cfg.template, tokenizer)), Template(cfg.template, tokenizer),
                        cfg.eval.generate, 0, 1, torch.device("cpu"))
    model = load_model(cfg.model).eval()
    seqs = [seq for batch in ev.mine for seq in ev.generate(model, batch)]
    for tok in dict.fromkeys(t for seq in seqs for t in seq[2:8]):
        word = tokenizer.convert_ids_to_tokens(tok)
        if word.isascii() and word.isalnum() and 0 < sum(tok in s for s in seqs) < len(seqs):
            return word
    pytest.fail(f"no token ends some answers but not all: {seqs}")


def _answers(path: Path, step: int) -> list[tuple]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r["id"], r["prediction"], r["new_tokens"], r["stopped"]) for r in rows if r["step"] == step]


@pytest.mark.slow
@pytest.mark.distributed
def test_same_answers_on_every_backend(tmp_path, tokenizer) -> None:
    """Before its first step every backend (and ZeRO-3 with sequence parallelism) holds the same initial weights:
    their answers (fp32, greedy) must equal the one-process answers of `python -m launcher.evaluate --base`, token
    for token."""
    word = _stop_word(tokenizer)
    common = ("train.max_steps=1", "train.grad_accum=1", "model.dtype=float32", "dataset.max_samples=40",
              "dataset.cutoff_len=256", "eval.generate.before=true", f"template.stop_words=['<|eot_id|>','{word}']",
              *SETTINGS)
    answers = {}
    for name, backend in [("zero3", ("backend=deepspeed_zero3",)), ("fsdp", ("backend=fsdp",)),
                          ("zero3_sp2", ("backend=deepspeed_zero3", "parallel.sequence=2"))]:
        run_dir = tmp_path / name
        r = run_launcher(*common, *backend, "launcher.nproc_per_node=2", f"hydra.run.dir={run_dir}", timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "generate      0/1  5 answers" in r.stdout + r.stderr
        answers[name] = _answers(run_dir / "eval_generations.jsonl", 0)
    r = subprocess.run([sys.executable, "-m", "launcher.evaluate", str(tmp_path / "zero3"), "--base"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    single = _answers(tmp_path / "zero3" / "evaluate" / "base" / "eval_generations.jsonl", 0)
    assert len(single) == 5 and 0 < sum(stopped for *_, stopped in single) < 5, single
    assert answers["zero3"] == single
    assert answers["fsdp"] == single
    assert answers["zero3_sp2"] == single  # sequence parallelism trains on split rows, generates on whole prompts


def _evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.evaluate", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_cli_names_the_problem_with_its_input(tmp_path) -> None:
    r = _evaluate(str(tmp_path / "missing"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "config.json").write_text("{}")  # a model folder that names no run
    r = _evaluate(str(tmp_path))
    assert r.returncode == 2 and "--run RUN_DIR" in r.stderr and "Traceback" not in r.stderr


def test_rag_answers_are_decoded_cut_and_scored(tmp_path, tokenizer) -> None:
    """Scoring on rank 0: token ids -> text without the stop token -> citation metrics, averaged per dataset."""
    records = [{"instruction": "[[doc-1]]\n서울은 수도다.\n[[doc-2]]\n부산은 항구다.\n\n질문: 수도는?", "output": "서울 [[doc-1]]"},
               {"instruction": "[[doc-1]]\n서울은 수도다.\n\n질문: 화성의 수도는?",
                "output": "검색 결과에서 답을 찾을 수 없습니다."}]
    (tmp_path / "rag.json").write_text(json.dumps(records, ensure_ascii=False))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"rag": {"file_name": "rag.json"}}))
    cfg = to_object(_compose(f"dataset.dir={tmp_path}", "eval.generate.datasets=[rag]",
                             "eval.generate.metrics=[citation,exact_match]"))
    template = Template(cfg.template, tokenizer)
    ev = GenerationEval(load_prompts(cfg, template), template, cfg.eval.generate, 0, 1, torch.device("cpu"))
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    said = ["서울 [[doc-1]] [[doc-7]]", "검색 결과에서 답을 찾을 수 없습니다."]
    answers = {i: tokenizer.encode(t, add_special_tokens=False) + [eot] for i, t in enumerate(said)}
    result = ev.scored(3, answers, 1.0)
    assert [r["prediction"] for r in result.rows] == said and all(r["stopped"] for r in result.rows)
    assert result.rows[0]["metrics"]["citation_valid"] == 0.0  # doc-7 does not exist
    assert result.scores["rag"] == {"citation_valid": 0.0, "citation_precision": 0.5, "citation_recall": 1.0,
                                    "not_found_accuracy": 1.0, "not_found_recall": 1.0, "exact_match": 0.5}
    assert result.flat()["generate/rag/citation_recall"] == 1.0 and "rag" in result.table()[1]
