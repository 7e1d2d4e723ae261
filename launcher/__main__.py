"""``python -m launcher [overrides]``: compose and validate the config, prepare the data, spawn the workers.

The launcher does everything that can fail on user input (config, model path, data) before any worker starts,
then writes the resolved config into the run directory; workers read only that file.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from launcher.config import Config, ConfigError, register_configs, to_object, validate

register_configs()


def say(msg: str) -> None:
    print(f"[launcher] {msg}", file=sys.stderr, flush=True)


def workers_per_node(cfg: Config) -> int:
    if cfg.backend.name == "single":
        return 1
    if cfg.launcher.nproc_per_node:
        return cfg.launcher.nproc_per_node
    import torch

    return torch.cuda.device_count() or 2


def free_port() -> int:
    """A port nobody listens on now, so concurrent single-node jobs on one machine do not collide."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_command(cfg: Config, nproc: int) -> list[str]:
    """The exact command that starts this node's workers."""
    if cfg.backend.name == "single":
        return [sys.executable, "-m", "launcher.train", cfg.run_dir]
    lc = cfg.launcher
    # The CLI that sits next to this interpreter, so an un-activated venv works too.
    ds_cli = Path(sys.executable).parent / "deepspeed"
    cmd = [str(ds_cli) if ds_cli.exists() else "deepspeed", "--num_gpus", str(nproc), "--master_addr",
           lc.master_addr, "--master_port", str(lc.master_port), "--no_local_rank", "--log_level", "warning"]
    if lc.nnodes > 1:
        # Each node's launcher starts only its own workers: no ssh/pdsh between nodes.
        cmd += ["--hostfile", str(deepspeed_hostfile(cfg, nproc)), "--no_ssh", "--num_nodes", str(lc.nnodes),
                "--node_rank", str(lc.node_rank)]
    return cmd + ["--module", "launcher.train", cfg.run_dir]


def deepspeed_hostfile(cfg: Config, nproc: int) -> Path:
    """The hostfile `deepspeed --no_ssh` insists on for more than one node (without one it refuses with "Num nodes
    is >1 but no extra nodes available via hostfile"). With --no_ssh it only counts nodes and slots: the names are
    never contacted (rendezvous is master_addr:master_port), so placeholders do. Every node writes the same file."""
    path = Path(cfg.run_dir) / "deepspeed_hostfile"
    text = "".join(f"node{i} slots={nproc}\n" for i in range(cfg.launcher.nnodes))
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


def worker_env(cfg: Config, nproc: int) -> dict[str, str]:
    env = dict(os.environ)
    threads = cfg.launcher.omp_num_threads or max(1, (os.cpu_count() or 1) // nproc)
    # Without this each CPU worker starts one thread per core and they fight (≈15× slower on 2 cores).
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def quiet_libraries() -> None:
    """Progress bars of library internals (shard writing, Arrow saving) are noise in a launcher's log."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # say it, instead of DeepSpeed warning that it guessed


def prepare_run(cfg: Config, run_dir: Path) -> None:
    """Everything before the workers: model files, data, the resolved config."""
    from launcher.data import prepare
    from launcher.model import check_available, load_tokenizer, materialize
    from launcher.packing import load_plan, plan_path
    from launcher.config import resolve_path

    check_available(cfg.model)
    materialize(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    tok_dir = resolve_path(cfg.model.name_or_path)
    t0 = time.time()
    data_path, stats, hit = prepare(cfg.dataset, cfg.template, tokenizer, tok_dir, cfg.train.seed)
    plan = load_plan(plan_path(data_path, "train"))
    say(f"data: {stats.used} records for training, {stats.eval_records} held out, "
        f"{stats.dropped_errors} dropped for errors, {stats.dropped_overlong} dropped for length, "
        f"{stats.truncated} truncated; {stats.tokens:,} tokens ({stats.supervised_tokens:,} supervised) "
        f"[{'cache hit' if hit else f'prepared in {time.time() - t0:.1f}s'}: {data_path}]")
    say(f"packing: {plan.stats.describe()}")
    for err in stats.errors:
        say(f"  skipped: {err}")
    from launcher.inspect_data import write_report

    say(f"data report (statistics, samples with trained tokens marked): "
        f"{write_report(run_dir, data_path, stats, tokenizer, cfg.dataset.cutoff_len)}")
    cfg.data_path = str(data_path)
    cfg.run_dir = str(run_dir)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def spawn(cmd: list[str], env: dict[str, str]) -> int:
    """Run the workers in their own process group; forward Ctrl-C/SIGTERM/SIGUSR1 to all of them."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def forward(signum, _frame):
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, forward)
    rc = proc.wait()
    try:  # no orphan may outlive the launcher
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return rc


def print_summary(run_dir: Path) -> None:
    path = run_dir / "summary.json"
    if not path.is_file():
        return
    s = json.loads(path.read_text())
    say(f"done: {s['steps']} steps, {s['tokens']:,} tokens ({s['supervised_tokens']:,} supervised), "
        f"{s['train_seconds']}s training, loss {s['first_loss']:.4f} -> {s['last_loss']:.4f}")
    if "padding_fraction" in s:
        say(f"padding: {s['padding_fraction']:.1%} of the token slots trained on were padding")
    say(f"checkpoint: {s['checkpoint']}")
    say(f"run directory: {run_dir}")


def run(dcfg: DictConfig) -> int:
    cfg = to_object(dcfg)
    validate(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    nproc = workers_per_node(cfg)
    if cfg.launcher.master_port is None:
        cfg.launcher.master_port = free_port()
    if cfg.dry_run:
        cfg.run_dir = str(run_dir)
        print(shlex.join(worker_command(cfg, nproc)))
        return 0
    quiet_libraries()
    from launcher.preflight import prepare_once

    # Multi-node: the nodes meet and check each other first, then node 0 alone prepares the shared run directory.
    nodes = prepare_once(cfg, nproc, run_dir, lambda: prepare_run(cfg, run_dir))  # noqa: F841 (kept alive)
    cmd = worker_command(cfg, nproc)
    say(f"starting {nproc} worker(s) per node × {cfg.launcher.nnodes} node(s): {shlex.join(cmd)}")
    if cfg.backend.name == "single":
        from launcher.train import run as train_run

        train_run(run_dir)
        rc = 0
    else:
        rc = spawn(cmd, worker_env(cfg, nproc))
    if rc != 0:
        say(f"workers failed with exit code {rc}; the failing rank's error is above. Run directory: {run_dir}")
        return rc
    print_summary(run_dir)
    if cfg.merge.after_train and cfg.launcher.node_rank == 0:  # one node merges, from the shared run directory
        from launcher.merge import after_train

        return after_train(run_dir)
    return 0


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    from launcher.data import DataError
    from launcher.preflight import PreflightError
    from launcher.templates import TemplateError

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    fresh = not (run_dir / "config.yaml").exists()
    try:
        rc = run(dcfg)
    except (ConfigError, DataError, TemplateError) as err:
        say(f"error: {err}")
        rc = 2
    except PreflightError as err:
        say(f"preflight failed: {err}")
        rc = 3
    # Only node 0 may tidy up: the other nodes of a multi-node run share its run directory.
    node0 = OmegaConf.select(dcfg, "launcher.node_rank", default=0, throw_on_resolution_failure=False) in (0, None)
    if fresh and node0 and (rc == 2 or dcfg.get("dry_run")):
        shutil.rmtree(run_dir, ignore_errors=True)  # a rejected or dry run leaves no half-made run directory
        out_root = Path(dcfg.output_dir).resolve()
        for parent in run_dir.resolve().parents:  # nor the empty outputs/<name>/ folders above it
            if out_root not in parent.parents or any(parent.iterdir()):
                break
            parent.rmdir()
    sys.exit(rc)


if __name__ == "__main__":
    main()
