"""Packed training on the real tiny model: records never see each other, and the loss and gradients of a step equal
those of the same records unpacked, whatever the micro-batching, gradient accumulation or world size."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from launcher.backends.single import SingleBackend
from launcher.config import Config, ModelConfig, OptimizerConfig, TemplateConfig
from launcher.packing import LEAK_TOLERANCE, collate, isolation_leak, packed_forward
from launcher.preflight import free_port
from launcher.templates import IGNORE_INDEX, Template
from launcher.train import forward_backward, token_loss_sum
from tests.conftest import ROOT, run_launcher


def tiny_model(attn: str = "sdpa") -> torch.nn.Module:
    """The embedded tiny Llama (models/tiny_llama, seeded weights), loaded the way the worker loads it."""
    from launcher.model import load_model, materialize

    cfg = ModelConfig(name_or_path="models/tiny_llama", init="random", attn_implementation=attn)
    materialize(cfg)
    return load_model(cfg, torch.float32)


@pytest.fixture(scope="module")
def records(tokenizer) -> list[dict[str, list[int]]]:
    """Six real records of the shipped sample, encoded by the llama3 template (prompt tokens masked)."""
    from omegaconf import OmegaConf

    tcfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TemplateConfig),
                                               OmegaConf.load(ROOT / "conf/template/llama3.yaml")))
    template = Template(tcfg, tokenizer)
    data = json.loads((ROOT / "data/text2sql_ko.json").read_text(encoding="utf-8"))[:6]
    out = []
    for rec in data:
        msgs = [{"role": "user", "content": f"{rec['instruction']}\n{rec['input']}".strip()},
                {"role": "assistant", "content": rec["output"]}]
        enc = template.encode(msgs)
        out.append({"input_ids": enc.input_ids, "labels": enc.labels})
    assert len({len(r["input_ids"]) for r in out}) > 3, "records of different lengths exercise padding"
    return out


# --------------------------------------------------------------------------------------------- isolation
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("flatten", [False, True])
def test_packed_logits_equal_each_record_alone(attn: str, flatten: bool, records) -> None:
    """A micro-batch of several packed rows, padded to the longest, through the worker's own forward call."""
    model = tiny_model(attn).eval()
    rows = [records[0:3], records[3:4], records[4:6]]
    batch = collate(rows, pad_id=0, flatten=flatten)
    assert flatten or (batch["input_ids"] == 0).any(), "the micro-batch must contain padding"
    with torch.no_grad():
        packed = packed_forward(model, batch)
        for r, row in enumerate(rows):
            start = 0 if not flatten else sum(len(x["input_ids"]) for x in rec_before(rows, r))
            for rec in row:
                n = len(rec["input_ids"])
                alone = model(input_ids=torch.tensor([rec["input_ids"]]), use_cache=False).logits[0]
                got = packed[0 if flatten else r, start:start + n]
                assert (got - alone).abs().max() <= 1e-5, f"{attn}: a packed record sees another one"
                start += n


def rec_before(rows, r):
    return [rec for row in rows[:r] for rec in row]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cache_or_2d_mask_would_leak(attn: str, records) -> None:
    """Why packed_forward passes use_cache=False and no attention mask (PROBES.md, transformers 5.23): with the KV
    cache on, or a 2-D all-ones mask, transformers ignores the packed position ids and records attend across."""
    model = tiny_model(attn).eval()
    batch = collate([records[0:2]], pad_id=0)
    n0 = len(records[0]["input_ids"])
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([records[1]["input_ids"]]), use_cache=False).logits[0]
        isolated = packed_forward(model, batch)[0, n0:]
        cached = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).logits
        masked = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                       attention_mask=torch.ones_like(batch["input_ids"])).logits
    assert (isolated - alone).abs().max() <= 1e-5
    assert (cached[0, n0:] - alone).abs().max() > 1e-2
    assert (masked[0, n0:] - alone).abs().max() > 1e-2


def _opt_model() -> torch.nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(vocab_size=512, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                    num_attention_heads=4, word_embed_proj_dim=64)).eval()


def test_isolation_check_passes_llama_and_catches_a_leaking_architecture() -> None:
    for attn in ("eager", "sdpa"):
        assert isolation_leak(tiny_model(attn), 4096, torch.device("cpu")) <= 1e-6
    assert isolation_leak(tiny_model("sdpa"), 4096, torch.device("cpu"), flatten=True) <= 1e-6
    # OPT in transformers 5.23 ignores packed position ids: its records attend to each other.
    assert isolation_leak(_opt_model(), 512, torch.device("cpu")) > LEAK_TOLERANCE * 10


# --------------------------------------------------------------------------------------------- loss normalisation
def _step(batches: list[dict[str, torch.Tensor]], attn: str = "sdpa") -> tuple[float, dict[str, torch.Tensor]]:
    """The worker's forward_backward on a fresh tiny model with the plain-PyTorch backend: loss and gradients."""
    model = tiny_model(attn)
    backend = SingleBackend(Config(optimizer=OptimizerConfig()))
    backend.build(lambda dtype, empty: model, total_steps=1)
    out = forward_backward(model, batches, backend)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out["loss"], grads


def _assert_same(a: tuple[float, dict], b: tuple[float, dict]) -> None:
    assert abs(a[0] - b[0]) <= 1e-5, (a[0], b[0])
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        assert torch.allclose(a[1][name], b[1][name], atol=1e-5, rtol=0), name


def test_packed_step_equals_unpacked_step_with_gradient_accumulation(records) -> None:
    r = records
    unpadded_ga3 = _step([collate([[x]], 0) for x in r[:3]])  # 3 micro-batches of one record each
    packed_one_row = _step([collate([r[:3]], 0)])  # 1 micro-batch: one row holding all three
    _assert_same(packed_one_row, unpadded_ga3)

    unpacked_padded_ga2 = _step([collate([[x] for x in r[:3]], 0), collate([[x] for x in r[3:]], 0)])
    packed_padded_mbs2 = _step([collate([r[0:4], r[4:6]], 0)])  # 2 rows, the shorter one padded
    packed_ga2 = _step([collate([r[0:2], r[2:3]], 0), collate([r[3:6]], 0)])
    packed_flat = _step([collate([r[0:2], r[2:6]], 0, flatten=True)])
    _assert_same(packed_padded_mbs2, unpacked_padded_ga2)
    _assert_same(packed_ga2, unpacked_padded_ga2)
    _assert_same(packed_flat, unpacked_padded_ga2)


def test_a_per_micro_batch_mean_would_differ(records) -> None:
    """Guards the test above: these micro-batches hold different numbers of supervised tokens, so averaging
    per-micro-batch means (what many trainers do) gives gradients far outside its 1e-5 tolerance."""
    batches = [collate([[x]], 0) for x in records[:3]]
    counts = [int((b["labels"] != IGNORE_INDEX).sum()) for b in batches]
    assert len(set(counts)) > 1
    model = tiny_model()
    for b, c in zip(batches, counts):
        (token_loss_sum(model, b) / c / len(batches)).backward()
    naive = {n: p.grad for n, p in model.named_parameters()}
    _, right = _step(batches)
    assert max(float((naive[n] - right[n]).abs().max()) for n in right) > 1e-3


# --------------------------------------------------------------------------------------------- the real launcher
def _run_dir(out: Path) -> Path:
    (summary,) = out.rglob("summary.json")
    return summary.parent


@pytest.mark.slow
def test_launcher_refuses_packing_for_a_model_that_leaks(tmp_path: Path, tokenizer) -> None:
    """A tiny OPT (which ignores packed position ids) is refused with the fix named; packing=false then trains."""
    from transformers import OPTConfig

    model_dir = tmp_path / "tiny_opt"
    OPTConfig(vocab_size=len(tokenizer), hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
              word_embed_proj_dim=64, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id).save_pretrained(model_dir)
    for f in (ROOT / "models/tiny_llama").glob("*token*"):
        shutil.copy(f, model_dir / f.name)
    common = ["backend=single", f"model.name_or_path={model_dir}", "model.init=random", "dataset.max_samples=40",
              "train.max_steps=1", f"launcher.omp_num_threads=1"]
    r = run_launcher(*common, f"output_dir={tmp_path / 'packed'}", timeout=300)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "packing efficiency" in r.stderr, "the launcher reports the packing at start"
    assert "lets packed records attend to each other" in r.stderr and "dataset.packing=false" in r.stderr
    assert "Traceback" not in r.stderr
    assert not list((tmp_path / "packed").rglob("checkpoints")), "refused before any training step"

    r = run_launcher(*common, "dataset.packing=false", f"output_dir={tmp_path / 'unpacked'}", timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_packed_step_equals_single_process_unpacked_step(tmp_path: Path) -> None:
    """2 DeepSpeed ZeRO-3 workers, packed rows, grad_accum 2: the first step's loss and gradient norm equal those
    of the same records unpacked (one record per row, padded) in one plain-PyTorch process."""
    import datasets

    from launcher.config import load_run_config
    from launcher.packing import RowLoader
    from launcher.runspec import load_run_spec
    from launcher.train import load_rows

    r = run_launcher("backend=deepspeed_zero3", "launcher.nproc_per_node=2", "dataset.max_samples=60",
                     "train.max_steps=1", "train.micro_batch_size=2", "train.grad_accum=2", "train.log_every=1",
                     f"launcher.master_port={free_port()}", f"output_dir={tmp_path}", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run_dir = _run_dir(tmp_path)
    step1 = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["packing"]["records_per_row"] > 2 and summary["packing"]["efficiency"] > 0.9
    assert 0 <= summary["padding_fraction"] < 0.1 and "padding_fraction" in step1
    assert "packing efficiency" in r.stderr and "of the token slots trained on were padding" in r.stderr

    # The records both ranks trained on in step 1, from the real plan and loader.
    cfg, spec = load_run_config(run_dir), load_run_spec(run_dir)
    ds = datasets.load_from_disk(str(Path(spec.data_path) / "train"))
    plan = load_rows(spec)
    used = []
    for rank in (0, 1):
        loader = RowLoader(ds, plan, 2, rank, 2, cfg.train.seed, 0)
        used += [int(i) for b in range(2) for row in loader.batch_rows(0, b) for i in plan.row(int(row))]
    assert len(used) == len(set(used)) > 8
    recs = [ds[i] for i in used]
    loss, grads = _step([collate([[x] for x in recs[:len(recs) // 2]], 0),
                         collate([[x] for x in recs[len(recs) // 2:]], 0)])
    norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))
    assert step1["supervised_tokens"] == sum(sum(t != IGNORE_INDEX for t in x["labels"][1:]) for x in recs)
    assert step1["loss"] == pytest.approx(loss, rel=1e-5)
    assert step1["grad_norm"] == pytest.approx(norm, rel=1e-4)
