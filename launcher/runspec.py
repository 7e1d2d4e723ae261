"""The run spec: what the launcher decides while starting a run, kept apart from the user's config.

``<run_dir>/config.yaml`` is the composed config exactly as the user wrote it (``launcher.master_port: null``
stays null); ``<run_dir>/run.json`` next to it holds what the launcher worked out: the run directory, where the
prepared data is, the world and the rendezvous. Workers read both and never recompose Hydra config. Resuming
compares only the user configs, so nothing here can make a resume look like a change of settings.

On several nodes each launcher builds its own spec (same values: ``launcher.master_port`` must be set there);
node 0 prepares the data and writes ``run.json`` once into the shared run directory.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from launcher.config import ConfigError

RUN_SPEC = "run.json"


@dataclass(frozen=True)
class RunSpec:
    """Facts of one run that are not settings: learnt by the launcher at start, the same on every node."""

    run_dir: str  # absolute; config.yaml, run.json, checkpoints/, metrics.jsonl live here
    nproc_per_node: int  # workers per node (launcher.nproc_per_node, or one per GPU, or 2 on a CPU-only machine)
    nnodes: int = 1
    world_size: int = 1  # ranks the workers must form (the backend's count: nproc_per_node × nnodes, or 1)
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # the workers' rendezvous (launcher.master_port, or a free port on one node)
    data_path: str = ""  # prepared training data: train/ (and eval/ with dataset.val_size), with their row plans
    eval_data_path: str = ""  # prepared validation set (eval.datasets); "": data_path's eval split, if any

    def with_data(self, data_path: Path, eval_data_path: Path | None = None) -> "RunSpec":
        """This spec with the prepared data's locations filled in."""
        return replace(self, data_path=str(data_path), eval_data_path=str(eval_data_path or ""))

    def write(self) -> Path:
        """Write ``<run_dir>/run.json`` atomically (a resumed run replaces the earlier start's)."""
        path = Path(self.run_dir) / RUN_SPEC
        tmp = path.with_name(f".{RUN_SPEC}.{os.getpid()}")
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        os.replace(tmp, path)
        return path


def load_run_spec(run_dir: str | Path) -> RunSpec:
    """Read the spec the launcher wrote into a run directory (workers use this)."""
    path = Path(run_dir) / RUN_SPEC
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: pass a run directory written by `python -m launcher`.")
    data = json.loads(path.read_text())
    known = {f.name for f in fields(RunSpec)}
    return RunSpec(**{k: v for k, v in data.items() if k in known})
