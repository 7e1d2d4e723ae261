"""launcher/preflight.py: node launchers meet at node 0's store, and a node that is missing, unreachable, configured
differently or not sharing the run directory is named in a clear error within the timeout, never a hang.

Each "node" is a separate process on this machine (the launcher-level check needs one process per node)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

NODE = r"""
import json, sys
from pathlib import Path
from launcher.config import (BackendConfig, Config, DatasetConfig, FinetuneConfig, ModelConfig, OptimizerConfig,
                             TemplateConfig)
from launcher.preflight import NodeGroup, PreflightError

a = json.loads(sys.argv[1])
cfg = Config(model=ModelConfig(name_or_path="models/tiny_llama"), template=TemplateConfig(name="llama3"),
             dataset=DatasetConfig(), optimizer=OptimizerConfig(lr=a["lr"]), backend=BackendConfig(),
             finetune=FinetuneConfig())
lc = cfg.launcher
lc.nnodes, lc.node_rank, lc.master_addr, lc.master_port = a["nnodes"], a["rank"], "127.0.0.1", a["port"]
lc.preflight_timeout = a["timeout"]
try:
    group = NodeGroup.join(cfg, 1, Path(a["run_dir"]))
    if group.rank == 0:
        group.prepared()
    else:
        group.wait_prepared()
except PreflightError as err:
    print("ERR", err, flush=True)
    sys.exit(3)
print("OK", flush=True)
"""


def free_port_pair() -> int:
    """An even port p with p and p+1 free (the launchers' preflight store listens on master_port + 1)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1] & ~1
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def start(rank: int, port: int, run_dir: Path, nnodes: int = 2, timeout: int = 20, lr: float = 2e-5):
    args = json.dumps({"rank": rank, "nnodes": nnodes, "port": port, "run_dir": str(run_dir), "timeout": timeout,
                       "lr": lr})
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "SLURMD_NODENAME": f"fake{rank + 1}"}
    return subprocess.Popen([sys.executable, "-c", NODE, args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, limit: float = 120) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=limit)
    return proc.returncode, out


def test_two_nodes_check_in_and_time_an_all_reduce(tmp_path: Path) -> None:
    port = free_port_pair()
    procs = [start(r, port, tmp_path) for r in (0, 1)]
    (rc0, out0), (rc1, out1) = finish(procs[0]), finish(procs[1])
    assert (rc0, rc1) == (0, 0), out0 + out1
    assert "2 nodes checked in" in out0 and "fake1, fake2" in out0, out0
    assert "all-reduce of 16 MiB among the launchers" in out0, out0
    assert not (tmp_path / ".preflight").exists(), "node 0 removes the check files"


def test_a_missing_node_is_named_within_the_timeout(tmp_path: Path) -> None:
    port = free_port_pair()
    t0 = time.monotonic()
    rc, out = finish(start(0, port, tmp_path, nnodes=3, timeout=4))
    assert rc == 3 and time.monotonic() - t0 < 60, out
    assert "node rank 1, node rank 2 did not check in within 4 s (launcher.preflight_timeout)" in out, out


def test_node_0_unreachable_is_named_by_the_other_node(tmp_path: Path) -> None:
    port = free_port_pair()
    rc, out = finish(start(1, port, tmp_path, timeout=3))
    assert rc == 3, out
    assert f"node fake2 (node rank 1) could not reach node rank 0 at 127.0.0.1:{port + 1} within 3 s (" in out, out


def test_a_node_with_another_config_and_run_directory_is_named_on_every_node(tmp_path: Path) -> None:
    port = free_port_pair()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    procs = [start(0, port, tmp_path / "a"), start(1, port, tmp_path / "b", lr=1e-4)]
    (rc0, out0), (rc1, out1) = finish(procs[0]), finish(procs[1])
    assert rc0 == 3 and rc1 == 3, out0 + out1
    for out in (out0, out1):
        assert "fake2 (node rank 1" in out and "composed a different config" in out, out
        assert "optimizer.lr: 2e-05 on fake1, 0.0001 there" in out, out
        assert "does not share the run directory" in out, out
