"""Checkpoints and stopping: a stopped or interrupted run continues exactly, failures end the whole job.

- SIGTERM to the launcher: workers finish the step, save, the launcher exits 75; the same command with
  hydra.run.dir continues and reproduces the uninterrupted run's losses bit for bit (DeepSpeed ZeRO-3).
- FSDP2: resuming skips an incomplete checkpoint and reproduces the uninterrupted losses bit for bit.
- A rank killed with SIGKILL ends the job non-zero within a minute with no process left behind.
The uninterrupted references are the runs of tests/test_backends.py (trained once per session).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from launcher.checkpoint import COMPLETE, complete_checkpoints, config_changes
from tests.conftest import GENERATE_OFF, ROOT, run_launcher
from tests.test_backends import losses_of, overrides_for, train


def _start(*overrides: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "launcher", *overrides, "merge.after_train=false",
                             *GENERATE_OFF], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, seen: dict[int, psutil.Process],
                   timeout: float = 600) -> None:
    """Wait until metrics.jsonl has ``step``, remembering every process the launcher started."""
    end = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.time() < end:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        try:
            for p in psutil.Process(proc.pid).children(recursive=True):
                seen.setdefault(p.pid, p)
        except psutil.Error:
            pass
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout}s")


def _alive(seen: dict[int, psutil.Process]) -> list[str]:
    out = []
    for p in seen.values():
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(" ".join(p.cmdline()))
        except psutil.Error:
            pass
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_sigterm_saves_and_the_same_command_continues_exactly(tmp_path_factory, tmp_path: Path) -> None:
    ref = train(tmp_path_factory, "zero3", "full")
    run_dir = tmp_path / "run"
    overrides = (*overrides_for("zero3", "full"), f"hydra.run.dir={run_dir}")
    proc = _start(*overrides)
    seen: dict[int, psutil.Process] = {}
    _wait_for_step(proc, run_dir, 2, seen)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-3000:]
    assert "stopped on request" in out and f"hydra.run.dir={run_dir}" in out
    assert not _alive(seen)
    summary = json.loads((run_dir / "summary.json").read_text())
    stopped_at = summary["steps"]
    assert summary["stopped"] and 2 <= stopped_at < 12, summary
    assert complete_checkpoints(run_dir)[-1].name == f"step-{stopped_at}"

    r = run_launcher(*overrides, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"resuming from {run_dir}/checkpoints/step-{stopped_at}" in r.stderr
    assert losses_of(run_dir) == ref.losses  # bit for bit, before and after the stop


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["fsdp", "zero3_sp2"])
def test_resume_skips_incomplete_checkpoints_and_continues_exactly(backend: str, tmp_path_factory,
                                                                    tmp_path: Path) -> None:
    """FSDP2, and ZeRO-3 with parallel.sequence=2: resuming at step 6 reproduces the uninterrupted losses bit for
    bit, past an incomplete last checkpoint and another job's leftover temporary directory."""
    ref = train(tmp_path_factory, backend, "full")
    run_dir = tmp_path / "run"
    shutil.copytree(ref.dir, run_dir)
    # A job killed while saving step 12 (marker missing) and another one's leftover temporary directory.
    (run_dir / "checkpoints" / "step-12" / COMPLETE).unlink()
    (run_dir / "checkpoints" / ".tmp-step-9").mkdir()
    config_before = (run_dir / "config.yaml").read_text()
    r = run_launcher(*ref.overrides, f"hydra.run.dir={run_dir}", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"resuming from {run_dir}/checkpoints/step-6" in r.stderr
    assert losses_of(run_dir) == ref.losses
    assert not (run_dir / "checkpoints" / ".tmp-step-9").exists()
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step-6", "step-12"]
    # Only where the run happens changed (the rendezvous port), nothing the training depends on.
    assert config_changes(_yaml(config_before), _yaml((run_dir / "config.yaml").read_text()))[0] == []


def _yaml(text: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.create(text))


@pytest.mark.slow
def test_resuming_with_other_training_settings_is_refused(tmp_path_factory, tmp_path: Path) -> None:
    ref = train(tmp_path_factory, "single", "full")
    run_dir = tmp_path / "run"
    shutil.copytree(ref.dir, run_dir)
    before = (run_dir / "config.yaml").read_text()
    r = run_launcher(*ref.overrides, "optimizer.lr=0.1", f"hydra.run.dir={run_dir}", timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "optimizer.lr: 0.001 -> 0.1" in r.stderr and "Traceback" not in r.stderr
    assert (run_dir / "config.yaml").read_text() == before


@pytest.mark.slow
@pytest.mark.distributed
def test_a_killed_rank_ends_the_job_and_is_named(tmp_path: Path) -> None:
    """kill -9 of rank 1's training process (FSDP, via accelerate/torchrun; DeepSpeed: a raising rank in
    tests/test_train_integration.py): the job ends within seconds, nothing is left, rank 1 is named with the
    signal, and rank 0, which failed only because its peer vanished, is one line, not a traceback."""
    run_dir = tmp_path / "run"
    proc = _start("backend=fsdp", "launcher.nproc_per_node=2", "train.max_steps=500", "train.log_every=1",
                  "dataset.cutoff_len=128", f"hydra.run.dir={run_dir}")
    seen: dict[int, psutil.Process] = {}
    _wait_for_step(proc, run_dir, 1, seen)
    victim = next(p for p in seen.values() if p.cmdline()[-3:-1] == ["-m", "launcher.train"]
                  and p.environ().get("RANK") == "1")
    victim.kill()
    t0 = time.time()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode not in (0, 75), out[-3000:]
    assert time.time() - t0 < 60, f"took {time.time() - t0:.0f}s to notice"
    assert "rank 1 failed first: killed by SIGKILL (9)" in out, out[-3000:]
    assert "rank 0 then stopped because a peer vanished" in out
    assert f'File "{ROOT / "launcher"}' not in out, "no rank prints a traceback"  # (accelerate's CLI does)
    assert not _alive(seen), _alive(seen)


@pytest.mark.slow
@pytest.mark.distributed
def test_workers_end_when_their_launcher_dies(tmp_path: Path) -> None:
    """kill -9 of the launcher: its ranks (behind the deepspeed CLI) end within seconds and remove their
    /dev/shm buffers."""
    run_dir = tmp_path / "run"
    proc = _start("backend=deepspeed_zero3", "launcher.nproc_per_node=2", "train.max_steps=500",
                  "train.log_every=1", "dataset.cutoff_len=128", f"hydra.run.dir={run_dir}")
    seen: dict[int, psutil.Process] = {}
    _wait_for_step(proc, run_dir, 1, seen)
    port = next(p.environ()["MASTER_PORT"] for p in seen.values() if "launcher.train" in p.cmdline())
    assert list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")), "the test needs shm buffers"
    proc.kill()
    proc.communicate(timeout=60)
    end = time.time() + 60
    while _alive(seen) and time.time() < end:
        time.sleep(0.2)
    assert not _alive(seen), _alive(seen)
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


@pytest.mark.slow
def test_the_run_keeps_the_config_as_composed_and_its_facts_in_run_json(tmp_path_factory) -> None:
    """config.yaml is the composed config, untouched by the launcher; run dir, data and rendezvous are in run.json."""
    from omegaconf import OmegaConf

    from launcher.config import load_run_config, to_object
    from launcher.runspec import load_run_spec
    from tests.test_configs import _compose

    ref = train(tmp_path_factory, "single", "full")
    composed = to_object(_compose(*ref.overrides, "merge.after_train=false", *GENERATE_OFF, f"hydra.run.dir={ref.dir}"))
    assert load_run_config(ref.dir) == composed
    written = OmegaConf.load(ref.dir / "config.yaml")
    assert written.launcher.master_port is None and written.launcher.nproc_per_node is None
    assert "run_dir" not in written and "data_path" not in written
    spec = load_run_spec(ref.dir)
    assert Path(spec.run_dir) == ref.dir.resolve() and spec.world_size == 1 and spec.master_port > 0
    assert (Path(spec.data_path) / "train").is_dir() and spec.eval_data_path == ""


def test_a_run_spec_round_trips(tmp_path: Path) -> None:
    from launcher.runspec import RunSpec, load_run_spec

    spec = RunSpec(run_dir=str(tmp_path), nproc_per_node=4, nnodes=2, world_size=8, master_addr="n1",
                   master_port=29500)
    spec.with_data(tmp_path / "data").write()
    back = load_run_spec(tmp_path)
    assert back == spec.with_data(tmp_path / "data") and back.world_size == 8


def test_only_complete_checkpoints_count(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for name, complete in [("step-5", True), ("step-10", True), ("step-15", False), (".tmp-step-20", True),
                           ("step-x", True)]:
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / COMPLETE).write_text("")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-5", "step-10"]


def test_config_changes_separate_harmless_from_breaking() -> None:
    old = {"train": {"max_steps": 10, "grad_accum": 2}, "launcher": {"master_port": 1}, "optimizer": {"lr": 1.0}}
    new = {"train": {"max_steps": 20, "grad_accum": 4}, "launcher": {"master_port": 2}, "optimizer": {"lr": 1.0},
           "added_later": 1}
    breaking, harmless = config_changes(old, new)
    assert breaking == ["train.grad_accum: 2 -> 4"]
    assert harmless == ["launcher.master_port: 1 -> 2", "train.max_steps: 10 -> 20"]


def test_a_checkpoint_of_another_world_size_is_refused(tmp_path: Path) -> None:
    from launcher.checkpoint import CheckpointError, resume_checkpoint
    from launcher.config import to_object
    from tests.test_configs import _compose

    ckpt = tmp_path / "checkpoints" / "step-4"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps(
        {"step": 4, "micro_batch": 8, "world_size": 4, "backend": "deepspeed", "finetune": "full"}))
    (ckpt / COMPLETE).write_text("4")
    cfg = to_object(_compose("backend=deepspeed_zero3"))
    assert resume_checkpoint(cfg, tmp_path, world_size=4) == ckpt
    with pytest.raises(CheckpointError, match="written by 4 ranks but this run has 2"):
        resume_checkpoint(cfg, tmp_path, world_size=2)
    cfg.resume = "never"
    assert resume_checkpoint(cfg, tmp_path, world_size=2) is None
    cfg.resume = str(tmp_path / "checkpoints" / "step-3")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resume_checkpoint(cfg, tmp_path, world_size=4)


def test_a_stop_signal_is_seen_by_every_rank() -> None:
    from launcher.backends.single import SingleBackend
    from launcher.checkpoint import StopRequest
    from launcher.config import to_object
    from tests.test_configs import _compose

    backend = SingleBackend(to_object(_compose("backend=single")))
    stop = StopRequest()
    try:
        assert not stop.requested(backend)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested(backend)
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_failure_report_survives_empty_and_garbled_error_files(tmp_path: Path) -> None:
    from launcher.failures import failure_report, write_record

    errors = tmp_path / "errors"
    errors.mkdir()
    (errors / "rank-0.txt").write_text("")  # a full disk: created, nothing written
    (errors / "rank-2.txt").write_bytes(b"not-a-time \xff\nValueError: x")
    assert failure_report(tmp_path, 1)[0].startswith("workers failed (exit code 1); rank ")
    # The first rank that failed by itself is named, not one that only lost its peer, whatever the order.
    shutil.rmtree(errors)
    write_record(tmp_path, "0", "peer_lost", "RuntimeError: Connection reset by peer", when=1.0)
    write_record(tmp_path, "1", "signal", "killed by SIGKILL (9): kill -9", when=2.0)
    write_record(tmp_path, "1", "error", "later, ignored", when=3.0)  # the first record of a rank stays
    lines = failure_report(tmp_path, 137)
    assert lines[0] == "workers failed (exit code 137); rank 1 failed first: killed by SIGKILL (9): kill -9"
    assert lines[1].startswith("rank 0 then stopped because a peer vanished")
    shutil.rmtree(errors)
    assert "killed by SIGKILL (9)" in failure_report(tmp_path, -9)[0]  # no records at all


@pytest.mark.slow
def test_a_non_finite_loss_stops_without_saving_that_state(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    r = run_launcher("backend=single", "train.max_steps=4", "train.save_steps=1", "optimizer.lr=1e10",
                     "optimizer.warmup_ratio=0", "dataset.cutoff_len=128", f"hydra.run.dir={run_dir}", timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    assert (f"step 2: loss nan, gradient norm nan: training stopped and nothing of this state was saved; the last "
            f"good checkpoint is {run_dir / 'checkpoints' / 'step-1'}") in r.stderr, r.stderr[-2000:]
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step-1"] and "Traceback" not in r.stderr


def test_skip_mode_leaves_weights_and_optimizer_as_they_were() -> None:
    from omegaconf import OmegaConf

    from launcher.backends.base import clip_and_step, make_optimizer
    from launcher.config import Config

    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), {
        "model": {"name_or_path": "x"}, "template": {"name": "x"}, "dataset": {}, "optimizer": {}, "backend": {},
        "finetune": {}, "train": {"nonfinite": "skip"}}))
    model = torch.nn.Linear(3, 2)
    opt, sched = make_optimizer(cfg, list(model.parameters()), 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.tensor([[float("nan"), 1.0, 2.0]])).sum().backward()
    assert not math.isfinite(clip_and_step(cfg, model, opt, sched))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not opt.state
    model(torch.ones(1, 3)).sum().backward()
    assert math.isfinite(clip_and_step(cfg, model, opt, sched)) and opt.state  # a finite step still applies


@pytest.mark.slow
def test_a_full_disk_is_named_and_the_previous_checkpoint_stays(tmp_path: Path) -> None:
    """The run directory on a 100 MB tmpfs: the first 60 MB checkpoint fits, the second does not."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100m", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("needs permission to mount a small tmpfs")
    try:
        run_dir = disk / "run"
        r = run_launcher("backend=single", "train.max_steps=2", "train.save_steps=1", "dataset.cutoff_len=128",
                         f"hydra.run.dir={run_dir}", timeout=300)
        assert r.returncode == 1, r.stderr[-2000:]
        ckpts = run_dir / "checkpoints"
        assert f"no space left on device for checkpoint step-2 in {ckpts}: it needs about " in r.stderr
        assert " were free. The partial save was removed; " in r.stderr and "Traceback" not in r.stderr
        assert sorted(os.listdir(ckpts)) == ["step-1"] and (ckpts / "step-1" / COMPLETE).is_file()
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.slow
def test_resuming_on_changed_data_is_refused_unless_accepted(tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(ROOT / "tests" / "fixtures" / "llamafactory_data", data)
    run_dir = tmp_path / "run"
    common = ("backend=single", f"dataset.dir={data}", "dataset.names=[alpaca_ko,sharegpt_ko]",
              "dataset.cutoff_len=128", "train.save_steps=1", f"dataset.cache_dir={tmp_path / 'cache'}",
              f"hydra.run.dir={run_dir}")
    r = run_launcher(*common, "train.max_steps=2", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    records = json.loads((data / "alpaca_ko.json").read_text())
    records[3]["output"] = "SELECT 1;"  # one record edited
    (data / "alpaca_ko.json").write_text(json.dumps(records, ensure_ascii=False))
    r = run_launcher(*common, "train.max_steps=3", timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"these data files changed: {data / 'alpaca_ko.json'} (changed). Its data cursor" in r.stderr
    assert "resume_new_data=true" in r.stderr and "Traceback" not in r.stderr
    r = run_launcher(*common, "train.max_steps=3", "resume_new_data=true", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"WARNING: resume_new_data=true: these data files changed: {data / 'alpaca_ko.json'} (changed)" in r.stderr
    assert "the data cursor starts again at the beginning of the new data" in r.stdout + r.stderr
    state = json.loads((run_dir / "checkpoints" / "step-3" / "trainer_state.json").read_text())
    assert state["micro_batch"] == 2  # one step (grad_accum=2 micro-batches) into the new data, not 3 steps


def test_a_base_exception_in_a_rank_is_recorded(tmp_path: Path, monkeypatch) -> None:
    """DCP's CheckpointException derives from BaseException: the rank's error record must still be written."""
    import traceback

    from torch.distributed.checkpoint.api import CheckpointException

    import launcher.train
    from launcher.failures import failure_report

    def fails(_run_dir: str) -> None:
        raise CheckpointException("save", {0: (OSError(28, "No space left on device"), traceback.extract_stack())})

    monkeypatch.setattr(launcher.train, "run", fails)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(CheckpointException):
        launcher.train.main([str(tmp_path)])
    assert "CheckpointException" in (tmp_path / "errors" / "rank-1.txt").read_text()
    assert failure_report(tmp_path, 1)[0].startswith("workers failed (exit code 1); rank 1 failed first: ")


def test_out_of_space_is_recognised_inside_dcp_failures() -> None:
    import traceback

    from torch.distributed.checkpoint.api import CheckpointException

    from launcher.checkpoint import out_of_space

    full = CheckpointException("save", {1: (OSError(28, "No space left on device"), traceback.extract_stack())})
    other = CheckpointException("save", {1: (ValueError("bad"), traceback.extract_stack())})
    assert out_of_space(full) and not out_of_space(other) and out_of_space(OSError(28, "x"))
