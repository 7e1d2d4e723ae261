"""The real launcher, end to end: 2 DeepSpeed ZeRO-3 CPU workers train the tiny model for a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_launcher


def _run_dir(out: Path) -> Path:
    (cfg,) = out.rglob("config.yaml")
    return cfg.parent if cfg.parent.name != ".hydra" else cfg.parent.parent


@pytest.mark.slow
@pytest.mark.distributed
def test_two_zero3_workers_train_and_checkpoint(tmp_path: Path) -> None:
    r = run_launcher("backend=deepspeed_zero3", "launcher.nproc_per_node=2", "train.max_steps=8",
                     "train.grad_accum=1", "train.log_every=1", "optimizer.warmup_ratio=0",
                     f"output_dir={tmp_path}", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summaries = list(tmp_path.rglob("summary.json"))
    assert len(summaries) == 1
    run_dir = summaries[0].parent
    s = json.loads(summaries[0].read_text())
    assert s["world_size"] == 2 and s["steps"] == 8
    assert s["last_loss"] < s["first_loss"] - 0.5, s
    ckpt = run_dir / "checkpoints" / "step-8"
    assert (ckpt / "COMPLETE").is_file()
    shards = list(ckpt.rglob("*optim_states.pt"))
    assert len(shards) == 2, "ZeRO-3 writes one optimizer shard per rank"
    # DeepSpeed's CPU all-reduce buffers (66 MiB of RAM per rank in /dev/shm) must not outlive the job.
    from launcher.runspec import load_run_spec

    port = load_run_spec(run_dir).master_port
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 9))
    assert "done: 8 steps" in r.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_a_failing_worker_fails_the_launcher(tmp_path: Path) -> None:
    """A model whose weights file is corrupt passes the launcher's checks and fails inside the workers."""
    import shutil

    from launcher.config import ModelConfig
    from launcher.model import materialize

    src = materialize(ModelConfig(name_or_path="models/tiny_llama", init="random"))
    bad = tmp_path / "bad_model"
    shutil.copytree(src, bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    r = run_launcher("backend=deepspeed_zero3", "launcher.nproc_per_node=2", "train.max_steps=2",
                     f"model.name_or_path={bad}", "model.init=pretrained", f"output_dir={tmp_path / 'out'}",
                     timeout=600)
    assert r.returncode != 0
    assert "workers failed" in r.stderr
    assert "safetensors" in (r.stdout + r.stderr).lower()
