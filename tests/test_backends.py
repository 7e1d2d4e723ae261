"""The same config trains the same model on every backend.

One process, 2-rank DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 (2 CPU workers each, tiny model, fp32, the same global
batch) must give the same per-step losses for full fine-tuning and LoRA, really shard the model, and write
checkpoints that consolidate to the same weights. Each configuration is trained once per test session
(:func:`train`), and tests/test_resume.py reuses those runs as its uninterrupted references.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from launcher.backends.deepspeed import MIN_REDUCE_BUCKET, fill_ds_config
from launcher.config import Config, ConfigError
from tests.conftest import ROOT, run_launcher

STEPS = 12
# 4 rows of ≤256 tokens per optimizer step whatever the world size; warmup off so every step moves the weights.
COMMON = (f"train.max_steps={STEPS}", "train.log_every=1", "dataset.cutoff_len=256", "optimizer.warmup_ratio=0",
          "train.save_steps=6", "train.save_total_limit=2", "model.dtype=float32")
# The one-process reference computes the plain loss over full logits; the others the chunked loss in 4 chunks
# (launcher/loss.py), so agreeing also shows that chunking changes nothing on any backend.
BACKENDS = {
    "single": ("backend=single", "train.grad_accum=4", "train.loss_chunk_tokens=0"),
    "zero2": ("backend=deepspeed_zero2", "launcher.nproc_per_node=2", "train.grad_accum=2",
              "train.loss_chunk_tokens=64"),
    "zero3": ("backend=deepspeed_zero3", "launcher.nproc_per_node=2", "train.grad_accum=2",
              "train.loss_chunk_tokens=64"),
    "fsdp": ("backend=fsdp", "launcher.nproc_per_node=2", "train.grad_accum=2", "train.loss_chunk_tokens=64"),
    # Both ranks hold halves of the same rows (DeepSpeed Ulysses): one data-parallel rank, so 4 micro-batches.
    "zero3_sp2": ("backend=deepspeed_zero3", "launcher.nproc_per_node=2", "train.grad_accum=4", "parallel.sequence=2",
                  "train.loss_chunk_tokens=64"),
}
# Gradient checkpointing must not change the numbers either: two of the runs use it.
EXTRA = {("zero3", "lora"): ("model.gradient_checkpointing=true",),
         ("fsdp", "full"): ("model.gradient_checkpointing=true",)}


@dataclass
class Run:
    dir: Path
    overrides: tuple[str, ...]
    summary: dict
    losses: list[float]


_runs: dict[tuple[str, str], Run] = {}


def overrides_for(backend: str, finetune: str) -> tuple[str, ...]:
    return (*COMMON, *BACKENDS[backend], f"finetune={finetune}", *EXTRA.get((backend, finetune), ()))


def losses_of(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines]


def train(tmp_path_factory: pytest.TempPathFactory, backend: str, finetune: str) -> Run:
    """Train one configuration through the real launcher, once per test session."""
    key = (backend, finetune)
    if key not in _runs:
        run_dir = tmp_path_factory.mktemp(f"{backend}-{finetune}") / "run"
        overrides = overrides_for(backend, finetune)
        # With this set Accelerate would quietly run DDP instead of FSDP; the launcher must neutralise it.
        env = {"ACCELERATE_USE_CPU": "true"} if backend == "fsdp" else None
        r = run_launcher(*overrides, f"hydra.run.dir={run_dir}", timeout=900, env=env)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        _runs[key] = Run(run_dir, overrides, json.loads((run_dir / "summary.json").read_text()), losses_of(run_dir))
    return _runs[key]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("finetune", ["full", "lora"])
@pytest.mark.parametrize("backend", ["zero2", "zero3", "fsdp", "zero3_sp2"])
def test_loss_curve_matches_one_process(tmp_path_factory, backend: str, finetune: str) -> None:
    ref = train(tmp_path_factory, "single", finetune)
    run = train(tmp_path_factory, backend, finetune)
    assert run.summary["world_size"] == 2 and len(run.losses) == len(ref.losses) == STEPS
    assert ref.losses[-1] < ref.losses[0] - 0.5, ref.losses  # it learns, so agreeing means something
    worst = max(abs(a - b) for a, b in zip(run.losses, ref.losses))
    assert worst < 1e-4, list(zip(run.losses, ref.losses))
    if "sp" in backend:  # rows split over ranks: every step within 1e-5 relative (measured: <= 3e-6)
        assert max(abs(a - b) / abs(b) for a, b in zip(run.losses, ref.losses)) < 1e-5
    # Both checkpoints kept (save_steps=6, limit 2), complete, and consolidating to the same weights.
    ckpts = sorted(p.name for p in (run.dir / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts == ["step-12", "step-6"]
    from launcher.export import consolidated_state_dict

    mine = consolidated_state_dict(run.dir / "checkpoints" / "step-12")
    theirs = consolidated_state_dict(ref.dir / "checkpoints" / "step-12")
    assert mine.keys() == theirs.keys()
    # Adam turns rounding-level gradient differences into steps of up to lr (1e-3) where a gradient is ~0, so
    # weights agree to about one step while the losses above agree to 1e-4.
    assert max(float((mine[k] - theirs[k]).abs().max()) for k in mine) < 1e-3
    if finetune == "lora":
        assert all("lora_" in k for k in mine), "LoRA checkpoints hold the adapters only"
        assert (run.dir / "checkpoints" / "step-12" / "adapter_config.json").is_file()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["zero3", "fsdp"])
def test_each_rank_holds_half_of_the_parameters(tmp_path_factory, backend: str) -> None:
    counts = train(tmp_path_factory, backend, "full").summary["params_per_rank"]
    total, held = counts["total"], counts["held"]
    assert len(held) == 2
    for n in held:
        assert 0.45 * total <= n <= 0.55 * total, counts


def _cfg(**train) -> Config:
    from tests.test_configs import _compose  # composes like the CLI
    from launcher.config import to_object

    cfg = to_object(_compose("backend=deepspeed_zero3"))
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def test_ds_config_auto_values_are_filled() -> None:
    cfg = _cfg(micro_batch_size=2, grad_accum=3)
    ds = fill_ds_config(cfg, world_size=4, hidden_size=64)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == cfg.optimizer.max_grad_norm
    assert ds["bf16"]["enabled"] is (cfg.model.dtype == "bfloat16")
    z = ds["zero_optimization"]
    assert z["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64) and z["stage3_param_persistence_threshold"] == 640
    assert z["reduce_bucket_size"] == MIN_REDUCE_BUCKET  # hidden² (4,096) would be latency-bound
    assert fill_ds_config(cfg, world_size=4, hidden_size=8192)["zero_optimization"]["reduce_bucket_size"] == 8192 ** 2


def test_ds_config_contradiction_names_both_values(tmp_path: Path) -> None:
    src = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    src["train_micro_batch_size_per_gpu"] = 4
    src["gradient_clipping"] = 0.5
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(src))
    cfg = _cfg(micro_batch_size=1)
    cfg.backend.ds_config = str(path)
    with pytest.raises(ConfigError) as err:
        fill_ds_config(cfg, world_size=2)
    msg = str(err.value)
    assert "train_micro_batch_size_per_gpu=4" in msg and "train.micro_batch_size=1" in msg
    assert "gradient_clipping=0.5" in msg and "optimizer.max_grad_norm=1.0" in msg
    assert str(path) in msg


@pytest.mark.slow
def test_ds_config_contradiction_stops_the_launcher_cleanly(tmp_path: Path) -> None:
    src = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    src["gradient_accumulation_steps"] = 8
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(src))
    r = run_launcher("backend=deepspeed_zero2", f"backend.ds_config={path}", "train.grad_accum=2",
                     f"output_dir={tmp_path / 'out'}", timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "gradient_accumulation_steps=8" in r.stderr and "train.grad_accum=2" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("config.yaml"))


def test_qlora_without_a_gpu_is_a_clear_error(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine can run QLoRA")
    r = run_launcher("finetune=lora", "finetune.method=qlora", f"output_dir={tmp_path}", timeout=300)
    assert r.returncode == 2
    assert "finetune.method=qlora needs a CUDA GPU and the bitsandbytes package" in r.stderr
    assert "Traceback" not in r.stderr
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_accelerate_config_must_be_fsdp2_with_sharded_checkpoints(tmp_path: Path) -> None:
    from launcher.backends.fsdp import check_accelerate_config

    check_accelerate_config(ROOT / "accelerate_configs" / "fsdp2.yaml")
    text = (ROOT / "accelerate_configs" / "fsdp2.yaml").read_text()
    bad = tmp_path / "fsdp1.yaml"
    bad.write_text(text.replace("fsdp_version: 2", "fsdp_version: 1").replace("use_cpu: false", "use_cpu: true"))
    with pytest.raises(ConfigError) as err:
        check_accelerate_config(bad)
    assert "fsdp_config.fsdp_version: 1" in str(err.value) and "use_cpu: true" in str(err.value)
