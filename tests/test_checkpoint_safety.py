"""Checkpoints that cannot lie or attack, on every backend.

- Damage in the middle of a checkpoint's main file is refused by merge and by an explicit resume, naming the
  file, before any library reads it; resume=auto goes back to the newest intact checkpoint, loudly, and continues
  exactly.
- A crafted pickle (a ``__reduce__`` that would create a marker file) in any file the project or its libraries
  unpickle is refused by merge and resume, naming the file, even with a manifest rewritten to match; the marker
  never appears. The worker-side loaders (DeepSpeed's engine loader, DCP's reader and planner) refuse it too.

The trained runs are those of tests/test_backends.py (trained once per session); each test damages a copy.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from launcher.checkpoint import CheckpointError
from launcher.config import load_run_config
from launcher.integrity import checked_resume, write_manifest
from tests.conftest import run_launcher
from tests.test_backends import losses_of, train

MAIN_FILE = {"single": "state.pt", "zero3": "zero_pp_rank_0_mp_rank_00_optim_states.pt", "fsdp": "model/__0_0.distcp"}


class Payload:
    """Pickles as a call of os.system: unpickling it with a free unpickler creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def copy_run(backend: str, tmp_path_factory, dest: Path):
    run = train(tmp_path_factory, backend, "full")
    shutil.copytree(run.dir, dest, ignore=shutil.ignore_patterns("merged", "adapter"))
    return run, dest, dest / "checkpoints" / "step-12"


def merge_refuses(capsys, target: Path, *words: str) -> None:
    from launcher.merge import main

    rc = main([str(target)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and err.count("error:") == 1, err
    for w in words:
        assert w in err, (w, err)


def resume_refuses(run_dir: Path, ckpt: Path, *words: str) -> None:
    """The launcher's own pre-worker check, in this process (the CLI path is tested once per backend below)."""
    cfg = load_run_config(run_dir)
    cfg.resume = str(ckpt)
    with pytest.raises(CheckpointError) as err:
        checked_resume(cfg, run_dir, cfg.launcher.nproc_per_node or 1, print)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def overwrite_middle(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(os.urandom(4096))


# ------------------------------------------------------------------------------------------ damage
@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["single", "zero3", "fsdp"])
def test_a_damaged_checkpoint_is_refused_naming_the_file(backend: str, tmp_path_factory, tmp_path: Path,
                                                         capsys) -> None:
    run, run_dir, ckpt = copy_run(backend, tmp_path_factory, tmp_path / "run")
    damaged = ckpt / MAIN_FILE[backend]
    overwrite_middle(damaged)
    merge_refuses(capsys, ckpt, f"{damaged} has other contents than it was saved with")
    r = run_launcher(*run.overrides, f"hydra.run.dir={run_dir}", f"resume={ckpt}", timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"{damaged} has other contents than it was saved with" in r.stderr and "Traceback" not in r.stderr
    assert not (run_dir / "errors").exists(), "no worker may start"


@pytest.mark.slow
def test_resume_auto_skips_a_damaged_checkpoint_loudly_and_continues_exactly(tmp_path_factory,
                                                                             tmp_path: Path) -> None:
    run, run_dir, ckpt = copy_run("single", tmp_path_factory, tmp_path / "run")
    (ckpt / "rng" / "rank-0.json").write_text("{}")  # cut short by a full disk, say
    r = run_launcher(*run.overrides, f"hydra.run.dir={run_dir}", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"WARNING: checkpoint {ckpt} is damaged: {ckpt / 'rng' / 'rank-0.json'} has 2 bytes" in r.stderr
    assert f"moved it to {run_dir / 'checkpoints' / 'damaged-step-12'}" in r.stderr
    assert f"resuming from {run_dir / 'checkpoints' / 'step-6'}" in r.stderr
    assert losses_of(run_dir) == run.losses  # steps 7-12 again, exactly as the first time


# ------------------------------------------------------------------------------------------ crafted pickles
def _torch_file_with_payload(path: Path, marker: Path) -> None:
    obj = torch.load(path, weights_only=False)  # (this test's own trusted file)
    obj["extra"] = Payload(marker)
    torch.save(obj, path)


def _dcp_metadata_with_payload(folder: Path, marker: Path) -> None:
    with open(folder / ".metadata", "rb") as f:
        md = pickle.load(f)
    md.planner_data = Payload(marker)
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(md, f)


def _dcp_bytes_entry_with_payload(folder: Path, marker: Path) -> None:
    """Point the optimizer's ``param_groups.0.lr`` bytes entry at a torch.save of the payload."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    with open(folder / ".metadata", "rb") as f:
        md = pickle.load(f)
    index = MetadataIndex("param_groups.0.lr")
    info = md.storage_data[index]
    blob = io.BytesIO()
    torch.save(Payload(marker), blob)
    data = folder / info.relative_path
    offset = data.stat().st_size
    with open(data, "ab") as f:
        f.write(blob.getvalue())
    md.storage_data[index] = replace(info, offset=offset, length=len(blob.getvalue()))
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(md, f)


CRAFTED = {
    # case: (backend, file inside step-12, how to plant the payload)
    "deepspeed-model-states": ("zero3", "zero_pp_rank_0_mp_rank_00_model_states.pt", _torch_file_with_payload),
    "deepspeed-optim-states": ("zero3", "zero_pp_rank_1_mp_rank_00_optim_states.pt", _torch_file_with_payload),
    "rng": ("zero3", "rng/rank-0.pt", lambda p, m: torch.save({"torch": Payload(m)}, p)),  # (an older layout)
    "state.pt": ("single", "state.pt", _torch_file_with_payload),
    "fsdp-metadata": ("fsdp", "model/.metadata", lambda p, m: _dcp_metadata_with_payload(p.parent, m)),
    "scheduler.pt": ("fsdp", "scheduler.pt", _torch_file_with_payload),
    # (the entry lives in whichever rank's .distcp the metadata says; the message names it and the entry)
    "optimizer-bytes": ("fsdp", "optimizer/.metadata", lambda p, m: _dcp_bytes_entry_with_payload(p.parent, m)),
}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_a_crafted_pickle_never_runs(case: str, tmp_path_factory, tmp_path: Path, capsys) -> None:
    backend, name, plant = CRAFTED[case]
    run, run_dir, ckpt = copy_run(backend, tmp_path_factory, tmp_path / "run")
    marker = tmp_path / "PWNED"
    plant(ckpt / name, marker)
    write_manifest(ckpt)  # an attacker rewrites the manifest to match
    where = (f"{ckpt / 'optimizer'}/__", ".distcp (entry 'param_groups.0.lr')") if case == "optimizer-bytes" \
        else (str(ckpt / name),)
    words = (*where, "holds a Python object that is not plain checkpoint data", "refused")
    merge_refuses(capsys, ckpt, *words)
    resume_refuses(run_dir, ckpt, *words)
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_the_workers_own_loaders_refuse_crafted_pickles(tmp_path_factory, tmp_path: Path) -> None:
    """Defence in depth: the loaders the workers use refuse a payload even without the launcher's check."""
    from launcher.safe_load import SafePlanner, SafeReader, torch_load

    marker = tmp_path / "PWNED"
    _, _, ckpt = copy_run("fsdp", tmp_path_factory, tmp_path / "run")
    _dcp_metadata_with_payload(ckpt / "model", marker)
    with pytest.raises(CheckpointError, match="model/.metadata holds a Python object"):
        SafeReader(str(ckpt / "model")).read_metadata()
    _dcp_bytes_entry_with_payload(ckpt / "optimizer", marker)
    planner = SafePlanner()
    planner.flatten_state_dict, planner.state_dict = False, {}
    md = pickle.loads((ckpt / "optimizer" / ".metadata").read_bytes())  # (trusted: the test's own file)
    info = md.storage_data[next(k for k in md.storage_data if k.fqn == "param_groups.0.lr")]
    with open(ckpt / "optimizer" / info.relative_path, "rb") as f:
        f.seek(info.offset)
        blob = io.BytesIO(f.read(info.length))
    item = type("ReadItem", (), {"dest_index": type("I", (), {"fqn": "param_groups.0.lr"})()})()
    with pytest.raises(CheckpointError, match="'param_groups.0.lr' holds a Python object"):
        planner.load_bytes(item, blob)
    _torch_file_with_payload(ckpt / "scheduler.pt", marker)
    with pytest.raises(CheckpointError, match="scheduler.pt holds a Python object"):
        torch_load(ckpt / "scheduler.pt", where=ckpt / "scheduler.pt")
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_load_checkpoint_goes_through_the_safe_loader(tmp_path_factory, tmp_path: Path) -> None:
    """DeepSpeed's engine reads its files through ``checkpoint_engine.load``; guard_deepspeed replaces it."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from launcher.safe_load import guard_deepspeed

    marker = tmp_path / "PWNED"
    _, _, ckpt = copy_run("zero3", tmp_path_factory, tmp_path / "run")
    path = ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    _torch_file_with_payload(path, marker)
    engine = type("Engine", (), {"checkpoint_engine": TorchCheckpointEngine()})()
    guard_deepspeed(engine)
    with pytest.raises(CheckpointError, match="optim_states.pt holds a Python object"):
        engine.checkpoint_engine.load(str(path), map_location="cpu")
    assert not marker.exists()
    intact = engine.checkpoint_engine.load(str(ckpt / "zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    assert "optimizer_state_dict" in intact  # an untouched file still loads
