"""Monitoring: FLOP counting against PyTorch's own counter, padding detection, the peak-FLOPs table, progress
output, the loss plot, cross-rank skew, eval-loss normalisation, and an end-to-end 2-worker run whose W&B offline
files are read back."""

from __future__ import annotations

import copy
import io
import json
import struct
from pathlib import Path

import pytest
import torch

from launcher.metrics import (FlopCounter, MetricsLogger, Progress, peak_flops_for, plot_losses, real_token_mask,
                              wandb_name)
from launcher.packing import collate
from launcher.templates import IGNORE_INDEX
from tests.conftest import ROOT, run_launcher

TINY = ROOT / "models" / "tiny_llama"


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(TINY)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def _record(n: int, start: int = 10, supervised_from: int = 2) -> dict[str, list[int]]:
    ids = list(range(start, start + n))
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * supervised_from + ids[supervised_from:]}


# --------------------------------------------------------------------------------------------- FLOPs
def test_flop_count_matches_pytorchs_counter(tiny_model) -> None:
    """Matmul FLOPs of forward + backward equal what torch.utils.flop_counter measures; attention is the causal
    part (c = position + 1) of the full-square count PyTorch reports for eager attention's matmuls."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    T = 64
    batch = collate([[_record(T)]], pad_id=0)
    counter = FlopCounter.from_model(tiny_model)
    ours, real = counter.batch(batch, pad_id=0)
    assert real == T

    def measured(model) -> int:
        with FlopCounterMode(display=False) as fc:
            out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
            out.logits.sum().backward()
        return fc.get_total_flops()

    linear = measured(tiny_model)  # PyTorch does not count CPU sdpa kernels: this is the nn.Linear part
    ours_attn = counter.attn_coeff * T * (T + 1) // 2
    assert ours - ours_attn == linear
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(tiny_model.config), attn_implementation="eager")
    full_square_attn = measured(eager) - linear
    assert ours_attn == pytest.approx(full_square_attn * (T + 1) / (2 * T), rel=1e-9)


def test_packed_rows_count_each_records_own_attention_in_either_layout(tiny_model) -> None:
    """A row of records counts the attention of each record alone (Σ lᵢ², not the row's L²), flattened or not."""
    counter = FlopCounter.from_model(tiny_model)
    lens = [1, 7, 30, 26]
    recs = [_record(n, start=10 + i, supervised_from=min(n - 1, 2)) for i, n in enumerate(lens)]
    alone = [counter.batch(collate([[r]], pad_id=0), pad_id=0)[0] for r in recs]
    batched = counter.batch(collate([recs[:3], recs[3:]], pad_id=0), pad_id=0)  # second row padded
    flat = counter.batch(collate([recs[:3], recs[3:]], pad_id=0, flatten=True), pad_id=0)
    assert batched == flat == (sum(alone), sum(lens))
    assert flat[0] == counter.per_token_matmul() * 64 + counter.attn_coeff * sum(n * (n + 1) // 2 for n in lens)
    one_record = counter.batch(collate([[_record(64)]], pad_id=0), pad_id=0)[0]
    assert one_record - flat[0] == counter.attn_coeff * (64 * 65 // 2 - sum(n * (n + 1) // 2 for n in lens))


def test_lora_counts_no_weight_gradients_for_frozen_layers(tiny_model) -> None:
    from launcher.config import FinetuneConfig
    from launcher.model import apply_finetune

    full = FlopCounter.from_model(tiny_model)
    lora = FlopCounter.from_model(apply_finetune(copy.deepcopy(tiny_model), FinetuneConfig(method="lora")))
    assert full.per_token_matmul() == 6 * full.linear
    # frozen base: 4 FLOPs per weight; adapters (trainable): 6 per weight
    assert lora.per_token_matmul() == 4 * lora.linear + 2 * lora.linear_trainable
    assert 0 < lora.linear_trainable < 0.1 * lora.linear


def test_real_token_mask_ignores_only_trailing_padding() -> None:
    pad = 7
    rows = [[_record(5), _record(3, start=20)], [_record(4)]]
    batch = collate(rows, pad_id=pad)
    mask = real_token_mask(batch, pad)
    assert mask.tolist() == [[1] * 8, [1] * 4 + [0] * 4]
    # a real record made of pad ids is still real: it has supervised labels
    rows = [[{"input_ids": [pad] * 3, "labels": [IGNORE_INDEX, pad, pad]}], [_record(2)]]
    batch = collate(rows, pad_id=pad)
    assert real_token_mask(batch, pad).tolist() == [[1, 1, 1], [1, 1, 0]]


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12), ("NVIDIA A10G", 70e12),
    ("NVIDIA GeForce RTX 4090", 165.2e12), ("AMD Instinct MI300X", 1307e12), ("NVIDIA RTX A4000", None),
    ("Tesla T4", None),
])
def test_peak_flops_table(name: str, peak: float | None) -> None:
    assert peak_flops_for(name) == peak


# --------------------------------------------------------------------------------------------- console
class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_prints_plain_periodic_lines_when_not_a_tty() -> None:
    out = io.StringIO()
    p = Progress(100, "tokenising", stream=out, every_s=3600)
    for _ in range(100):
        p.update(1)
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tokenising: 100/100 (100%)") and "eta" in lines[0]
    out = io.StringIO()
    p = Progress(3, "x", stream=out, every_s=0)
    for _ in range(3):
        p.update(1)
    assert len(out.getvalue().splitlines()) == 3


def test_progress_draws_a_bar_on_a_tty_and_prints_lines_above_it() -> None:
    out = _Tty()
    p = Progress(10, "train", stream=out, every_s=None)
    assert p.mode == "bar"
    p.update(5, info="loss 1.2345")
    p.print("step 5/10 loss 1.2345")
    p.close()
    text = out.getvalue()
    assert "step 5/10 loss 1.2345" in text and "train" in text


def test_library_bars_become_plain_lines_when_not_a_tty(capsys) -> None:
    """datasets' progress bars during preparation: a line per interval and one at the end, no carriage returns."""
    import time

    import datasets
    from datasets.utils import tqdm as hf_tqdm

    from launcher.metrics import library_progress

    was = datasets.is_progress_bar_enabled()
    datasets.enable_progress_bars()
    try:
        with library_progress("lines", every_s=0.1):
            for _ in hf_tqdm(range(6), desc="Tokenizing"):
                time.sleep(0.05)
        with library_progress("lines", every_s=0.1, enabled=False):  # another node's launcher
            for _ in hf_tqdm(range(3), desc="Silent"):
                pass
    finally:
        if not was:
            datasets.disable_progress_bars()
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert "\r" not in err and "Silent" not in err
    assert 2 <= len(lines) <= 4 and lines[-1].startswith("Tokenizing: 100%") and "6/6" in lines[-1]


def test_loss_plot_is_a_png_with_train_and_eval(tmp_path: Path) -> None:
    import matplotlib.image

    path = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "loss": 3.0 / s} for s in range(1, 80)]
    lines += [{"step": s, "eval_loss": 3.2 / s} for s in (20, 40, 60, 79)]
    path.write_text("\n".join(json.dumps(x) for x in lines))
    out = plot_losses(path, tmp_path / "loss.png", "test run")
    img = matplotlib.image.imread(out)
    assert img.shape[0] > 300 and img.shape[1] > 600
    # the orange eval markers and the blue train line are both drawn
    rgb = img[..., :3]
    assert ((rgb[..., 0] > 0.9) & (rgb[..., 1] > 0.4) & (rgb[..., 1] < 0.6) & (rgb[..., 2] < 0.2)).sum() > 50
    assert ((rgb[..., 2] > 0.6) & (rgb[..., 0] < 0.3)).sum() > 50


# --------------------------------------------------------------------------------------------- skew
class _FakeBackend:
    """Rank 0 of a pretend 2-rank job: the all-reduce adds rank 1's row as the real one would."""

    rank, world_size, device = 0, 2, torch.device("cpu")

    def __init__(self, other_row: list[float]):
        self.other_row = other_row

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        if t.dim() == 2:
            t[1] += torch.tensor(self.other_row, dtype=t.dtype)
        return t


def test_skew_and_peaks_are_gathered_from_every_rank(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir
    from launcher.config import register_configs, to_object

    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = to_object(compose("config", overrides=["name=t", "logger.progress=lines"]))
    # rank 1: steps took 2 s over the interval, data 0.5 s, 1e9 FLOPs, 100 real tokens of 200 slots, 9 GiB host
    backend = _FakeBackend([2.0, 0.5, 1e9, 100, 200, 9 * 2**30, 0])
    m = MetricsLogger(cfg, tmp_path, backend, total_steps=1, pad_id=0)
    m.flop_counter, m.peak_flops, m.device_name = None, None, "cpu"
    m.start_time = 0.0
    m._interval += torch.tensor([1.0, 0.1, 3e9, 150, 200], dtype=torch.float64)
    m._interval_steps = 1
    out = m._gather()
    assert out["step_time_skew"] == pytest.approx(2.0) and out["slowest_rank"] == 1
    assert out["flops_per_s"] == pytest.approx(4e9) and out["flops_per_s_per_device"] == pytest.approx(2e9)
    assert out["packing_efficiency"] == pytest.approx(250 / 400)
    assert out["peak_host_gib"] == pytest.approx(9.0)
    assert out["data_time_slowest"] == pytest.approx(0.5)
    assert "mfu" not in out  # CPU: achieved FLOP/s only


def test_wandb_names_group_metrics_into_panels() -> None:
    assert wandb_name("loss") == "train/loss" and wandb_name("eval_loss") == "eval/loss"
    assert wandb_name("mfu") == "perf/mfu" and wandb_name("peak_host_gib") == "memory/peak_host_gib"


# --------------------------------------------------------------------------------------------- eval loss
def test_eval_loss_is_token_weighted_over_the_whole_set_and_world_size_independent(tiny_model, tmp_path: Path):
    """Evaluator over 1 rank and over 2 (simulated) ranks with an odd number of micro-batches equals the loss
    computed record by record, unpacked: Σ token losses / supervised tokens."""
    import datasets
    import torch.nn.functional as F

    from launcher.evaluate.loss import Evaluator
    from launcher.train import token_loss_sum

    g = torch.Generator().manual_seed(0)
    recs = []
    for i in range(7):
        n = int(torch.randint(8, 40, (1,), generator=g))
        ids = torch.randint(10, 4000, (n,), generator=g).tolist()
        cut = int(torch.randint(1, n - 2, (1,), generator=g))
        recs.append({"input_ids": ids, "labels": [IGNORE_INDEX] * cut + ids[cut:]})
    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "eval"))
    import numpy as np

    from launcher.packing import PackStats, RowPlan, plan_path, save_plan

    # packed rows [0, 1], [2], [3, 4, 5], [6]
    save_plan(RowPlan(np.array([0, 2, 3, 6, 7]), np.arange(7),
                      PackStats(rows=4, records=7, tokens=sum(len(r["input_ids"]) for r in recs), cutoff_len=128,
                                packing=True, max_records_per_row=3)), plan_path(tmp_path, "eval"))

    expected_sum = expected_n = 0.0
    with torch.no_grad():
        for r in recs:
            logits = tiny_model(input_ids=torch.tensor([r["input_ids"]])).logits[0, :-1]
            target = torch.tensor(r["labels"][1:])
            expected_sum += float(F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum"))
            expected_n += int((target != IGNORE_INDEX).sum())
    expected = expected_sum / expected_n

    one = Evaluator(tmp_path, "eval", 1, 0, 1, pad_id=4082).run(tiny_model, token_loss_sum, lambda t: t,
                                                                   torch.device("cpu"))
    assert one["loss"] == pytest.approx(expected, rel=1e-5) and one["supervised_tokens"] == expected_n

    parts = []
    ranks = [Evaluator(tmp_path, "eval", 1, r, 3, pad_id=4082) for r in (0, 1, 2)]  # 4 rows over 3 ranks
    assert [len(e.mine) for e in ranks] == [2, 1, 1] and {e.forwards for e in ranks} == {2}
    for e in ranks:
        e.run(tiny_model, token_loss_sum, lambda t: parts.append(t.clone()) or t, torch.device("cpu"))
    total = torch.stack(parts).sum(0)
    assert float(total[0] / total[1]) == pytest.approx(expected, rel=1e-5)
    assert tiny_model.training


# --------------------------------------------------------------------------------------------- end to end
def read_wandb_records(path: Path) -> list:
    """The records of a .wandb file, decoded with W&B's own protobuf schema.

    The container is LevelDB's log format (which wandb 0.31 reads only from Go): a 7-byte header (":W&B", a
    2-byte magic, a version byte), then 32 KiB blocks of chunks, each with a 4-byte CRC, 2-byte length and a type
    (1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding up to the block end
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            records.append(rec)
    return records


@pytest.mark.slow
@pytest.mark.distributed
def test_two_workers_log_metrics_eval_and_wandb_offline(tmp_path: Path) -> None:
    r = run_launcher("backend=deepspeed_zero3", "launcher.nproc_per_node=2", "train.max_steps=4",
                     "train.grad_accum=1", "train.log_every=2", "dataset.val_size=40", "eval.steps=2",
                     "logger.wandb.enabled=true", "logger.wandb.mode=offline", "logger.wandb.project=tests",
                     "logger.wandb.tags=[ci,tiny]", f"output_dir={tmp_path}", timeout=900,
                     env={"OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (summary_path,) = tmp_path.rglob("summary.json")
    run_dir = summary_path.parent
    s = json.loads(summary_path.read_text())
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if "loss" in x]
    evals = [x for x in lines if "eval_loss" in x]
    assert [x["step"] for x in train] == [1, 2, 3, 4] and [x["step"] for x in evals] == [2, 4]
    for key in ("lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device", "supervised_tokens_per_s",
                "supervised_tokens_per_s_per_device", "step_time", "data_time"):
        assert all(key in x for x in train), key
    logged = [x for x in train if "step_time_skew" in x]
    assert [x["step"] for x in logged] == [1, 2, 4]
    for x in logged:
        assert x["step_time_skew"] >= 1.0 and x["slowest_rank"] in (0, 1)
        assert 0 < x["packing_efficiency"] <= 1 and x["flops_per_s"] > 0 and x["peak_host_gib"] > 0
        assert "mfu" not in x  # CPU: no peak to divide by
        assert x["tokens_per_s_per_device"] == pytest.approx(x["tokens_per_s"] / 2)
    assert s["eval_loss"] == evals[-1]["eval_loss"] and s["eval_loss"] < train[0]["loss"]
    assert evals[0]["eval_supervised_tokens"] == evals[1]["eval_supervised_tokens"] > 0
    assert (run_dir / "loss.png").stat().st_size > 10_000
    assert "eval loss" in r.stderr and "throughput" in r.stderr

    # W&B: one offline run, written by rank 0 only, with the composed config and the same numbers
    (wandb_file,) = run_dir.rglob("*.wandb")
    records = read_wandb_records(wandb_file)
    runs = [x.run for x in records if x.WhichOneof("record_type") == "run"]
    assert runs and runs[0].project == "tests" and list(runs[0].tags) == ["ci", "tiny"]
    config = {i.key: json.loads(i.value_json) for i in runs[0].config.update}
    assert config["train"]["max_steps"] == 4 and config["backend"]["name"] == "deepspeed"
    history = []
    for x in records:
        if x.WhichOneof("record_type") == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in x.history.item})
    by_step: dict[int, dict] = {}
    for h in history:
        by_step.setdefault(h["_step"], {}).update(h)
    assert sorted(by_step) == [1, 2, 3, 4]
    for x in train:
        assert by_step[x["step"]]["train/loss"] == pytest.approx(x["loss"])
        assert by_step[x["step"]]["train/lr"] == pytest.approx(x["lr"])
    for x in evals:
        assert by_step[x["step"]]["eval/loss"] == pytest.approx(x["eval_loss"])
    for name in ("perf/tokens_per_s", "perf/supervised_tokens_per_s_per_device", "perf/step_time",
                 "perf/data_time", "perf/flops_per_s", "perf/step_time_skew", "train/packing_efficiency",
                 "memory/peak_host_gib", "train/grad_norm"):
        assert name in by_step[4], name
    assert "perf/mfu" not in by_step[4]
    assert (run_dir / "wandb_id").read_text() == runs[0].run_id


@pytest.mark.slow
def test_validation_dataset_and_unreachable_wandb_do_not_stop_training(tmp_path: Path) -> None:
    """eval.datasets is prepared like training data and evaluated whole; an online W&B that cannot be reached
    is reported once and training finishes normally."""
    r = run_launcher("backend=single", "train.max_steps=2", "eval.steps=1", "eval.datasets=[text2sql_ko_heldout]",
                     "eval.max_samples=30", "logger.wandb.enabled=true", "logger.wandb.mode=online",
                     "logger.wandb.init_timeout=15", f"output_dir={tmp_path}", timeout=600,
                     env={"OMP_NUM_THREADS": "1", "WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (r.stdout + r.stderr).count("W&B is off for the rest of this run") == 1
    (run_dir,) = [p.parent for p in tmp_path.rglob("summary.json")]
    from launcher.runspec import load_run_spec

    eval_path = Path(load_run_spec(run_dir).eval_data_path)
    stats = json.loads((eval_path / "stats.json").read_text())
    assert stats["used"] == 30
    evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
    assert [e["step"] for e in evals] == [1, 2]
    assert all(e["eval_supervised_tokens"] == stats["supervised_tokens"] for e in evals)


@pytest.mark.parametrize("overrides,needle", [
    (["eval.steps=10"], "there is no eval data"),
    (["dataset.val_size=0.1", "eval.datasets=[text2sql_ko_heldout]"], "both set"),
    (["logger.wandb.mode=cloud"], "logger.wandb.mode='cloud'"),
    (["planner.usable_fraction=1.5"], "planner.usable_fraction=1.5"),
])
def test_monitoring_config_mistakes_are_named(overrides: list[str], needle: str) -> None:
    from hydra import compose, initialize_config_dir
    from launcher.config import ConfigError, register_configs, to_object
    from launcher.validate import validate

    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = to_object(compose("config", overrides=["name=t", *overrides]))
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        validate(cfg)
