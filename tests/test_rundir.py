"""One run directory, one run: unique timestamped names, a lock held by the live launcher, and a clean-up that
removes only what the rejected launcher itself created."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from launcher.rundir import LOCK_NAME, hold_run_dir, unique_dir
from tests.conftest import run_launcher


def test_colliding_timestamped_directories_get_a_suffix(tmp_path: Path) -> None:
    base = str(tmp_path / "outputs" / "x" / "2026-01-01_00-00-00")
    assert [unique_dir(base) for _ in range(3)] == [base, f"{base}-2", f"{base}-3"]
    assert all(Path(p).is_dir() for p in (base, f"{base}-2", f"{base}-3"))


def test_a_second_launcher_on_a_live_run_directory_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')  # the live run's files
    with hold_run_dir(run_dir):  # this test process plays the first launcher
        r = run_launcher(f"hydra.run.dir={run_dir}", "optimizer.lr=-1", timeout=120)
    assert r.returncode == 2
    assert f"{run_dir} is in use by another launcher (pid {os.getpid()} on host {socket.gethostname()})" in r.stderr
    assert "Traceback" not in r.stderr
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'  # nothing of the live run touched


def test_a_rejected_run_removes_only_what_it_created(tmp_path: Path) -> None:
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("keep me")
    r = run_launcher(f"hydra.run.dir={user_dir}", "optimizer.lr=-1", timeout=120)
    assert r.returncode == 2, r.stderr
    assert sorted(os.listdir(user_dir)) == ["notes.txt"]  # Hydra's files and the lock are gone, the user's stays
    r = run_launcher(f"output_dir={tmp_path / 'out'}", "optimizer.lr=-1", timeout=120)
    assert r.returncode == 2 and not list((tmp_path / "out").iterdir())
    assert LOCK_NAME not in r.stderr
