"""Preflight of a multi-node run: the launchers of all nodes meet before any work, so that a node that cannot be
reached, runs another config or sees another run directory is named within seconds instead of hanging a
collective for half an hour.

Every node runs one launcher (``launcher.nnodes`` > 1, e.g. via slurm/train.sh). They meet at a
``torch.distributed.TCPStore`` that node 0's launcher serves on ``launcher.master_addr:launcher.master_port + 1``
(the workers' own rendezvous uses ``master_port``), in this order:

1. check in: each node writes who it is (Slurm node name, host, visible GPUs, its resolved config) and a file into
   the run directory. Node 0 waits up to ``launcher.preflight_timeout`` seconds for every node and then checks
   them all: missing nodes, two launchers on one node rank, a config that differs (another checkout or other
   overrides), too few GPUs, a run directory that is not the same shared folder. The verdict names the node.
2. a timed all-reduce among the launchers over gloo: every pair of nodes connects, so a firewall or a wrong
   network interface between two nodes fails here, with the time it took when it works.
3. node 0 prepares the data and writes ``config.yaml`` and ``run.json`` (once, into the shared run directory)
   while the other nodes wait for it, then every node starts its local workers.

Inside the workers, :func:`check_ranks` repeats the all-reduce with the real backend (NCCL on GPUs) and prints
which rank runs on which node, so "rank 5 failed first" can be read as a node name. Every collective after that
has the backend's timeout (``backend.timeout_minutes``).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from launcher.config import Config, flatten

# Keys that legitimately differ between the nodes of one run.
_PER_NODE_KEYS = ("launcher.node_rank",)
# How long the other nodes wait for node 0 to prepare the data (tokenising a large dataset takes a while); node 0
# dying meanwhile is noticed at once, since its store goes away with it.
PREPARE_TIMEOUT_S = 6 * 3600


class PreflightError(RuntimeError):
    """A node is missing or differs from the others; the message names it and says what to check."""


def say(msg: str) -> None:
    print(f"[preflight] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A port nobody listens on now, so concurrent single-node jobs on one machine do not collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def this_node() -> str:
    """Slurm's name for this node (fake nodes on one host share a hostname), else the hostname."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def slurm_node_names() -> list[str]:
    """The job's node names in node-rank order (SLURM_NODEID order), or [] outside a Slurm job."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist or not shutil.which("scontrol"):
        return []
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return out.split()


@dataclass
class NodeInfo:
    """What one node's launcher tells the others when it checks in."""

    rank: int
    name: str
    host: str
    pid: int
    gpus: int
    nproc: int
    token: str  # written into the run directory; node 0 must read the same value there
    config: dict[str, Any]

    def label(self) -> str:
        return f"{self.name} (node rank {self.rank}, host {self.host}, pid {self.pid})"


class NodeGroup:
    """The launchers of one multi-node run, met at node 0's TCPStore. Create with :meth:`join`."""

    def __init__(self, store: dist.TCPStore, rank: int, nnodes: int, names: list[str],
                 timeout: float):
        self.store, self.rank, self.nnodes, self.timeout = store, rank, nnodes, timeout
        self.names = names if len(names) == nnodes else []

    def name(self, rank: int) -> str:
        return f"{self.names[rank]} (node rank {rank})" if self.names else f"node rank {rank}"

    # ------------------------------------------------------------------------------------------- check in
    @classmethod
    def join(cls, cfg: Config, nproc: int, run_dir: Path) -> "NodeGroup":
        """Meet the other nodes and check them (steps 1 and 2 above); raises PreflightError naming the node at
        fault. Returns once every node is known to be fine."""
        lc = cfg.launcher
        rank, n, timeout = lc.node_rank, lc.nnodes, float(lc.preflight_timeout)
        names = slurm_node_names()
        port = lc.master_port + 1
        t0 = time.monotonic()
        if rank != 0:  # quietly, before torch's client (which logs a stack trace per failed try)
            _wait_for_port(lc.master_addr, port, timeout, rank, names)
        try:
            store = dist.TCPStore(lc.master_addr, port, is_master=rank == 0, wait_for_workers=False,
                                  timeout=timedelta(seconds=timeout))
        except (RuntimeError, OSError) as err:  # DistNetworkError is a RuntimeError
            first = _first_line(err)
            if rank == 0:
                raise PreflightError(
                    f"node 0 ({this_node()}) could not serve the preflight store on port {port} "
                    f"(launcher.master_port + 1): {first}. Another job on this node may use it; pick another "
                    f"launcher.master_port (slurm/train.sh derives it from the job id).") from None
            raise _unreachable(lc.master_addr, port, rank, names, timeout, first) from None
        group = cls(store, rank, n, names, timeout)

        resolved = flatten(OmegaConf.to_container(OmegaConf.structured(cfg)))
        resolved["launcher.nproc_per_node"] = nproc  # what None resolved to on this node must agree too
        for key in _PER_NODE_KEYS:
            resolved.pop(key, None)
        token = secrets.token_hex(8)
        marks = run_dir / ".preflight"
        marks.mkdir(parents=True, exist_ok=True)
        (marks / f"node-{rank}").write_text(token)
        me = NodeInfo(rank=rank, name=this_node(), host=socket.gethostname(), pid=os.getpid(),
                      gpus=torch.cuda.device_count(), nproc=nproc, token=token, config=resolved)
        claims = store.add(f"claims/{rank}", 1)
        store.set(f"node/{rank}", json.dumps(asdict(me)))
        if claims > 1:
            raise PreflightError(
                f"two launchers claim node rank {rank} (this one on {me.name}): start exactly one launcher per "
                f"node (srun --ntasks-per-node=1) and give each its own launcher.node_rank.")
        if rank == 0:
            try:
                verdict = group._verdict(me, marks, t0)
            except PreflightError as err:
                group._tell("verdict", str(err))
                raise
            finally:
                shutil.rmtree(marks, ignore_errors=True)
            store.set("verdict", "ok")
        else:
            answer = group._get("verdict", 2 * timeout + 60, "its checks of all nodes")
            store.add("verdict/read", 1)
            if answer != "ok":
                raise PreflightError(f"node 0 found a problem: {answer}")
        group._all_reduce(verdict if rank == 0 else "")
        return group

    def _verdict(self, me: NodeInfo, marks: Path, t0: float) -> str:
        """Node 0: wait for every node, then check them all. Returns the summary line, raises on a problem."""
        deadline, note = t0 + self.timeout, t0 + 30
        while True:
            missing = [r for r in range(1, self.nnodes) if not self.store.check([f"node/{r}"])]
            if not missing:
                break
            now = time.monotonic()
            if now > deadline:
                raise PreflightError(
                    f"{', '.join(self.name(r) for r in missing)} did not check in within {self.timeout:.0f} s "
                    f"(launcher.preflight_timeout): the launcher there did not start, failed before checking in "
                    f"(its error is in the job log), or cannot reach {me.name} at port launcher.master_port + 1.")
            if now > note:
                say(f"waiting for {', '.join(self.name(r) for r in missing)} "
                    f"({now - t0:.0f} s of {self.timeout:.0f} s)")
                note = now + 30
            time.sleep(0.2)
        joined = time.monotonic() - t0
        nodes = [me] + [NodeInfo(**json.loads(self.store.get(f"node/{r}"))) for r in range(1, self.nnodes)]
        problems = []
        for r in range(self.nnodes):
            if int(self.store.add(f"claims/{r}", 0)) > 1:
                problems.append(f"more than one launcher claims node rank {r}: start exactly one launcher per "
                                f"node (srun --ntasks-per-node=1)")
        for node in nodes[1:]:
            diff = sorted(k for k in set(node.config) | set(me.config) if node.config.get(k) != me.config.get(k))
            if diff:
                shown = "; ".join(f"{k}: {me.config.get(k)!r} on {me.name}, {node.config.get(k)!r} there"
                                  for k in diff[:5])
                problems.append(f"{node.label()} composed a different config ({shown}"
                                f"{'; …' if len(diff) > 5 else ''}): every node must run the same checkout "
                                f"with the same overrides")
            seen = _read_mark(marks / f"node-{node.rank}")
            if seen != node.token:
                problems.append(f"{node.label()} does not share the run directory {marks.parent} with {me.name} "
                                f"(its check file is {'missing' if seen is None else 'another'} here): the run "
                                f"directory and dataset.cache_dir must be on a filesystem every node sees")
        for node in nodes:
            if node.gpus and node.gpus < node.nproc:
                problems.append(f"{node.label()} sees {node.gpus} GPU(s) but is to start {node.nproc} workers "
                                f"(launcher.nproc_per_node): ask Slurm for --gpus-per-node={node.nproc}")
        if problems:
            raise PreflightError("; ".join(problems) + ".")
        names = ", ".join(n.name for n in nodes)
        return (f"{self.nnodes} nodes checked in within {joined:.1f} s ({names}), same config and run directory, "
                f"{me.nproc} worker(s) each")

    def _all_reduce(self, summary: str) -> None:
        """Every pair of launchers connects (gloo builds a full mesh) and sums a 16 MiB tensor, timed."""
        numel = 4 << 20
        try:
            dist.init_process_group("gloo", store=dist.PrefixStore("allreduce", self.store), rank=self.rank,
                                    world_size=self.nnodes, timeout=timedelta(seconds=self.timeout))
            warm = torch.ones(1)
            dist.all_reduce(warm)
            t = torch.ones(numel)
            t0 = time.perf_counter()
            dist.all_reduce(t)
            dt = time.perf_counter() - t0
            ok = bool(torch.all(t == self.nnodes)) and int(warm.item()) == self.nnodes
        except (RuntimeError, OSError) as err:
            first = _first_line(err)
            raise PreflightError(
                f"the all-reduce among the node launchers failed on {self.name(self.rank)}: {first}. Every node "
                f"reached node 0, so the network between two of them is the problem (firewall, or a wrong "
                f"interface: set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME).") from None
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        if not ok:
            raise PreflightError(f"the all-reduce among the node launchers gave a wrong sum on "
                                 f"{self.name(self.rank)}: the network corrupts data.")
        if self.rank == 0:
            size = numel * 4
            say(f"{summary}; all-reduce of {size >> 20} MiB among the launchers (gloo/TCP): {dt * 1e3:.0f} ms "
                f"({size / dt / 1e9:.2f} GB/s)")

    # ----------------------------------------------------------------------------------- data preparation
    def prepared(self, error: str | None = None) -> None:
        """Node 0: the run directory holds config.yaml, run.json and the data (or preparing failed with ``error``)."""
        if error:
            self._tell("prepared", error)
        else:
            self.store.set("prepared", "ok")

    def _tell(self, key: str, error: str) -> None:
        """Node 0, about to exit with ``error``: publish it and give the other nodes a few seconds to read it
        before this process (and the store with it) goes away."""
        self.store.set(key, error)
        present = sum(self.store.check([f"node/{r}"]) for r in range(1, self.nnodes))
        deadline = time.monotonic() + 10
        while int(self.store.add(f"{key}/read", 0)) < present and time.monotonic() < deadline:
            time.sleep(0.1)

    def wait_prepared(self) -> None:
        """Other nodes: wait until node 0 has prepared the run; raise if it failed or died meanwhile."""
        answer = self._get("prepared", PREPARE_TIMEOUT_S, "preparing the data and config.yaml")
        self.store.add("prepared/read", 1)
        if answer != "ok":
            raise PreflightError(f"node 0 could not prepare the run: {answer}")

    def _get(self, key: str, timeout: float, what: str) -> str:
        try:
            self.store.wait([key], timedelta(seconds=timeout))
            return self.store.get(key).decode()
        except (RuntimeError, OSError) as err:
            first = _first_line(err)
            raise PreflightError(f"{self.name(0)} stopped answering during {what} ({first}): its launcher "
                                 f"failed or was killed; its error is in the job log.") from None


def prepare_once(cfg: Config, nproc: int, run_dir: Path, prepare: Callable[[], None]) -> NodeGroup | None:
    """Run ``prepare`` (data, config.yaml, run.json) on node 0 only; the other nodes wait for it, after the
    preflight.

    On one node this is just ``prepare()``. Returns the node group, which the caller keeps until its workers
    are done (node 0's launcher serves the store the others use).
    """
    if cfg.launcher.nnodes <= 1:
        prepare()
        return None
    group = NodeGroup.join(cfg, nproc, run_dir)
    if group.rank == 0:
        try:
            prepare()
        except BaseException as err:
            text = str(err).strip().splitlines()
            group.prepared(error=f"{type(err).__name__}: {text[0] if text else ''} (more in its lines of the "
                                 f"job log)")
            raise
        group.prepared()
    else:
        group.wait_prepared()  # node 0 wrote config.yaml and run.json; the workers read them from there
    return group


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].rstrip(".") if text else type(err).__name__


def _unreachable(addr: str, port: int, rank: int, names: list[str], timeout: float, why: str) -> PreflightError:
    head = f"{names[0]} (node rank 0)" if len(names) > 1 else "node rank 0"
    return PreflightError(
        f"node {this_node()} (node rank {rank}) could not reach {head} at {addr}:{port} within {timeout:.0f} s "
        f"({why}). Either node 0's launcher did not start or failed early (its error is in the job log), or "
        f"{addr} is not an address this node can reach (launcher.master_addr).")


def _wait_for_port(addr: str, port: int, timeout: float, rank: int, names: list[str]) -> None:
    """Until node 0's store accepts connections: plain TCP connects, retried quietly for ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((addr, port), timeout=2):
                return
        except OSError as err:
            if time.monotonic() > deadline:
                raise _unreachable(addr, port, rank, names, timeout, _first_line(err)) from None
            time.sleep(0.2)


def _read_mark(path: Path, patience: float = 5.0) -> str | None:
    """The token another node wrote into the run directory; network filesystems may show a new file a few
    seconds late, so look again for a while before calling it missing."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return path.read_text()
        except OSError:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.5)


def check_ranks(rank: int, world_size: int, device: torch.device) -> None:
    """Worker side, right after the process group exists: a timed all-reduce with the real backend (NCCL on GPUs)
    and the map of ranks to nodes, printed by rank 0."""
    names: list[Any] = [None] * world_size
    dist.all_gather_object(names, this_node())
    t = torch.ones(4 << 20, device=device)  # 16 MiB of float32
    dist.all_reduce(torch.ones(1, device=device))  # warm-up: the first collective sets up the connections
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    dist.all_reduce(t)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    if not bool(torch.all(t == world_size)):
        raise RuntimeError(f"preflight all-reduce gave a wrong sum on rank {rank} ({this_node()})")
    by_node: dict[str, list[int]] = {}
    for r, node in enumerate(names):
        by_node.setdefault(str(node), []).append(r)
    ranks = ", ".join(f"{node}: {_ranges(rs)}" for node, rs in by_node.items())
    if rank == 0:
        print(f"[preflight] {world_size} ranks on {len(by_node)} node(s) [{ranks}]; all-reduce of 16 MiB "
              f"({dist.get_backend()}): {dt * 1e3:.0f} ms", flush=True)


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> "ranks 0-2, 5"."""
    runs: list[list[int]] = []
    for r in ranks:
        if runs and r == runs[-1][-1] + 1:
            runs[-1].append(r)
        else:
            runs.append([r])
    text = ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)
    return ("ranks " if len(ranks) > 1 else "rank ") + text
