"""``python -m launcher [overrides]``: compose and validate the config, prepare the data, spawn the workers.

The launcher does everything that can fail on user input (config, model path, data) before any worker starts,
then writes into the run directory the config as the user composed it (``config.yaml``) and what it decided while
starting (``run.json``, :mod:`launcher.runspec`: data paths, world, rendezvous); workers read only those files.
"""

from __future__ import annotations

import contextlib
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

from launcher.backends import backend_for
from launcher.config import Config, ConfigError, register_configs, to_object
from launcher.rundir import RunDirBusy, entries, hold_run_dir, remove_created
from launcher.runspec import RunSpec
from launcher.validate import validate

register_configs()


def say(msg: str) -> None:
    print(f"[launcher] {msg}", file=sys.stderr, flush=True)


def quiet_libraries() -> None:
    """Progress bars of library internals (shard writing, Arrow saving) are noise in a launcher's log."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def prepare_run(cfg: Config, spec: RunSpec) -> None:
    """Everything before the workers: model files, data, then config.yaml (checked against an earlier run's when
    resuming in the same run directory) and run.json."""
    from launcher.data import prepare
    from launcher.evaluate.generation import prepare_prompts
    from launcher.integrity import check_same_data, checked_resume
    from launcher.model import load_tokenizer, materialize
    from launcher.packing import load_plan, plan_path
    from launcher.config import resolve_path

    run_dir, world_size = Path(spec.run_dir), spec.world_size
    check_resumable(cfg, run_dir)
    ckpt = checked_resume(cfg, run_dir, world_size, say)  # verified before any worker reads it
    backend_for(cfg).check_config(cfg, world_size)
    materialize(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    tok_dir = resolve_path(cfg.model.name_or_path)
    t0 = time.time()
    from launcher.metrics import library_progress

    with library_progress(cfg.logger.progress, cfg.logger.progress_every_s, cfg.launcher.node_rank == 0):
        data_path, stats, hit = prepare(cfg.dataset, cfg.template, tokenizer, tok_dir, cfg.train.seed)
    check_same_data(cfg, ckpt, data_path, run_dir, say)  # a checkpoint's data cursor fits only its own data
    plan = load_plan(plan_path(data_path, "train"))
    say(f"data: {stats.used} records for training, {stats.eval_records} held out, "
        f"{stats.dropped_errors} dropped for errors, {stats.dropped_overlong} dropped for length, "
        f"{stats.truncated} truncated, {stats.prompt_cut} with their prompt cut; {stats.tokens:,} tokens ({stats.supervised_tokens:,} supervised) "
        f"[{'cache hit' if hit else f'prepared in {time.time() - t0:.1f}s'}: {data_path}]")
    if stats.mix.get("mixed"):
        from launcher.mixing import mix_table

        for line in mix_table(stats.mix):
            say(line)
    say(f"packing: {plan.stats.describe()}")
    for err in stats.errors:
        say(f"  skipped: {err}")
    from launcher.inspect_data import write_report

    say(f"data report (statistics, samples with trained tokens marked): "
        f"{write_report(run_dir, data_path, stats, tokenizer, cfg.dataset.cutoff_len)}")
    eval_path = None
    if cfg.eval.datasets:  # a validation dataset: prepared like training data, its "train" split is the eval set
        from dataclasses import replace

        eval_cfg = replace(cfg.dataset, names=list(cfg.eval.datasets), val_size=0.0, max_samples=cfg.eval.max_samples,
                           weights=[], mix_size=None, mix_strategy=None, interleave_probs=None)  # evaluated whole
        with library_progress(cfg.logger.progress, cfg.logger.progress_every_s, cfg.launcher.node_rank == 0):
            eval_path, estats, _ = prepare(eval_cfg, cfg.template, tokenizer, tok_dir, cfg.train.seed)
        say(f"eval data: {estats.used} records of {', '.join(cfg.eval.datasets)}, {estats.tokens:,} tokens "
            f"({estats.supervised_tokens:,} supervised): {eval_path}")
    n_prompts = prepare_prompts(cfg, tokenizer, run_dir)
    if n_prompts:
        say(f"generation eval: {n_prompts} held-out prompts of {', '.join(cfg.eval.generate.datasets)}, answered "
            f"{'before training, ' if cfg.eval.generate.before else ''}"
            f"{f'every {cfg.eval.generate.steps} steps and ' if cfg.eval.generate.steps else ''}after training")
    write_run_config(cfg, run_dir)
    spec.with_data(data_path, eval_path).write()
    if ckpt is not None:
        say(f"resuming from {ckpt}")


def check_resumable(cfg: Config, run_dir: Path) -> None:
    """In a run directory that already holds a run, go on only if training can continue it exactly (before
    anything in it is touched)."""
    from launcher.checkpoint import config_changes

    path = run_dir / "config.yaml"
    if not path.exists():
        return
    if cfg.resume == "never":
        raise ConfigError(f"{run_dir} already holds a run and resume=never: pass another hydra.run.dir (or none, "
                          f"for a new timestamped one), or resume=auto to continue this run.")
    breaking, harmless = config_changes(OmegaConf.to_container(OmegaConf.load(path)),
                                        OmegaConf.to_container(OmegaConf.structured(cfg)))
    if breaking:
        raise ConfigError(
            f"{path} was written by an earlier run with other settings, so this run could not continue it "
            f"exactly:\n  - " + "\n  - ".join(breaking) + "\nUse the earlier values, or start a new run in "
            "another hydra.run.dir (or none, for a new timestamped one).")
    for line in harmless:
        if not line.startswith("launcher."):  # ports and node addresses differ from start to start anyway
            say(f"changed since the last start: {line}")
    for stale in (run_dir / "summary.json", run_dir / "errors"):  # results of the earlier attempt
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def write_run_config(cfg: Config, run_dir: Path) -> None:
    """Write the composed config as the user wrote it, for the workers and for later resumes (atomically: a
    resumed run replaces the earlier one's)."""
    path = run_dir / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    os.replace(tmp, path)


class ProcessTree:
    """The worker launcher and everything it started, remembered while they live so that none outlives the job
    (torchrun starts workers in sessions of their own, out of reach of the process group)."""

    def __init__(self, pid: int):
        import psutil

        self.root = psutil.Process(pid)
        self.known: dict[int, "psutil.Process"] = {pid: self.root}

    def refresh(self) -> None:
        import psutil

        try:
            for p in self.root.children(recursive=True):
                self.known.setdefault(p.pid, p)
        except psutil.Error:
            pass

    def workers(self) -> list:
        """The training processes (``-m launcher.train``), not the launchers between them and us."""
        import psutil

        self.refresh()
        found = []
        for p in self.known.values():
            try:
                cmd = p.cmdline()
                # `python -m launcher.train`; the launchers in between only pass `--module launcher.train` on.
                if p.is_running() and any(a == "-m" and b == "launcher.train" for a, b in zip(cmd, cmd[1:])):
                    found.append(p)
            except psutil.Error:
                pass
        return found

    def wait_for_workers(self, timeout: float) -> None:
        """Give training processes time to finish a checkpoint even if a launcher in between already exited
        (under `scancel` every process of the job gets SIGTERM, and those launchers quit at once)."""
        import psutil

        psutil.wait_procs(self.workers(), timeout=timeout)

    def kill(self) -> None:
        import psutil

        for p in self.known.values():
            try:
                if p.is_running():  # is_running also checks the pid was not reused
                    p.kill()
            except psutil.Error:
                pass
        try:
            os.killpg(self.root.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def spawn(cmd: list[str], env: dict[str, str]) -> tuple[int, int | None]:
    """Run the workers; return their exit code and the stop signal received, if any.

    SIGTERM, SIGUSR1 and a first Ctrl-C are passed to the training processes only: they finish the step, save a
    checkpoint and exit 0. (The `deepspeed` and `accelerate` launchers in between would kill them at once.)
    A second Ctrl-C, or a signal before any worker exists, ends everything immediately.
    """
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    tree = ProcessTree(proc.pid)
    received: list[int] = []

    def on_signal(signum: int, _frame) -> None:
        repeated = bool(received)
        received.append(signum)
        workers = tree.workers()
        if not workers or (repeated and signum == signal.SIGINT):
            say(f"{signal.Signals(signum).name}: stopping the workers now")
            tree.kill()
            return
        if not repeated:
            say(f"{signal.Signals(signum).name}: asking {len(workers)} worker(s) to finish the step, save a "
                f"checkpoint and stop")
        for w in workers:
            try:
                w.send_signal(signum)
            except Exception:
                pass

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, on_signal)
    while True:
        try:
            rc = proc.wait(timeout=1)
            break
        except subprocess.TimeoutExpired:
            tree.refresh()
    if received:
        tree.wait_for_workers(timeout=300)
    tree.kill()  # no orphan may outlive the launcher
    return rc, (received[0] if received else None)


def report_failure(run_dir: Path, rc: int) -> None:
    """Name the rank that failed first (later failures are usually other ranks losing contact with it)."""
    from launcher.failures import failure_report

    for line in failure_report(run_dir, rc):
        say(line)
    say(f"run directory: {run_dir}")


def print_summary(run_dir: Path) -> None:
    path = run_dir / "summary.json"
    if not path.is_file():
        return
    s = json.loads(path.read_text())
    if s["first_loss"] is None:  # resumed a run that had finished already
        say(f"nothing to do: the run had finished all {s['steps']} steps")
    else:
        from launcher.metrics import format_summary

        for line in format_summary(s):
            say(line)
    if "padding_fraction" in s:
        say(f"padding: {s['padding_fraction']:.2%} of the token slots trained on were padding")
    if s.get("attention"):
        say(f"attention: {s['attention']}")
    say(f"checkpoint: {s['checkpoint']}")
    if s.get("loss_plot"):
        say(f"loss curve: {s['loss_plot']}")
    say(f"run directory: {run_dir}")


def run(dcfg: DictConfig) -> int:
    from launcher.checkpoint import STOPPED_EXIT_CODE

    # No downloads at run time unless asked for (README, "Models"): a model that is not on disk fails in a second
    # instead of after the hub client's retries, and no process waits on the network for files it already has.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = to_object(dcfg)
    validate(cfg)
    from launcher.evaluate.generation import check_config

    check_config(cfg.eval.generate)
    from launcher.model import check_available

    check_available(cfg.model)  # before the memory planner, which reads the model's config.json
    run_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    backend = backend_for(cfg)
    nproc = backend.workers_per_node(cfg)
    lc = cfg.launcher
    from launcher.preflight import free_port

    # Where this run happens (workers and rendezvous) goes into the run spec; the config stays as composed.
    spec = RunSpec(run_dir=str(run_dir), nproc_per_node=nproc, nnodes=lc.nnodes,
                   world_size=backend.world_size(cfg, nproc), master_addr=lc.master_addr,
                   master_port=free_port() if lc.master_port is None else lc.master_port)
    if cfg.parallel.sequence > 1:
        from launcher.sequence import check as check_sequence

        check_sequence(cfg, spec.world_size)
    memory_plan = None
    if cfg.planner.enabled:  # before anything is prepared: a job that cannot fit stops here
        from launcher.planner import check_memory

        memory_plan = check_memory(cfg, nproc, say, refuse=not cfg.dry_run)
    if cfg.dry_run:
        print(shlex.join(backend.worker_command(cfg, spec)))
        return 0
    quiet_libraries()
    from launcher.preflight import prepare_once

    # Multi-node: the nodes meet and check each other first, then node 0 alone prepares the shared run directory.
    nodes = prepare_once(cfg, nproc, run_dir, lambda: prepare_run(cfg, spec))  # noqa: F841 (kept alive)
    if memory_plan is not None and cfg.launcher.node_rank == 0:
        (run_dir / "memory_plan.json").write_text(json.dumps(memory_plan, indent=1))
    cmd = backend.worker_command(cfg, spec)
    say(f"starting {nproc} worker(s) per node × {cfg.launcher.nnodes} node(s): {shlex.join(cmd)}")
    if backend.in_process:
        from launcher.train import run as train_run

        rc, stop = 0, None
        try:
            train_run(run_dir)
        except SystemExit as err:  # a message for the user (disk full, non-finite loss): no traceback
            if not isinstance(err.code, str):
                raise
            say(f"error: {err.code}")
            return 1
    else:
        rc, stop = spawn(cmd, backend.worker_env(cfg, nproc))
        backend.after_workers(cfg, spec)
    # (an earlier attempt's summary was removed when this one started)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    if summary.get("stopped") or (rc != 0 and stop is not None):
        saved = (f"checkpoint {summary['checkpoint']} saved at step {summary['steps']}" if summary else
                 "stopped before a new checkpoint was written")
        say(f"stopped on request: {saved}. Continue with the same command plus hydra.run.dir={run_dir} "
            f"(exit code {STOPPED_EXIT_CODE}: requeue).")
        return STOPPED_EXIT_CODE
    if rc != 0:
        report_failure(run_dir, rc)
        return rc
    print_summary(run_dir)
    if cfg.merge.after_train and cfg.launcher.node_rank == 0:  # one node merges, from the shared run directory
        from launcher.merge import after_train

        return after_train(run_dir)
    return 0


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    from launcher.registry import DataError
    from launcher.preflight import PreflightError
    from launcher.templates import TemplateError

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    before = entries(run_dir)
    # Only node 0 locks and tidies up: the other nodes of a multi-node run share its run directory.
    node0 = OmegaConf.select(dcfg, "launcher.node_rank", default=0, throw_on_resolution_failure=False) in (0, None)
    try:
        with hold_run_dir(run_dir) if node0 else contextlib.nullcontext():
            fresh = not (run_dir / "config.yaml").exists()
            try:
                rc = run(dcfg)
            except (ConfigError, DataError, TemplateError) as err:
                say(f"error: {err}")
                rc = 2
            except PreflightError as err:
                say(f"preflight failed: {err}")
                rc = 3
            if fresh and node0 and (rc == 2 or dcfg.get("dry_run")):
                remove_created(run_dir, before, Path(dcfg.output_dir).resolve())  # no half-made run directory
    except RunDirBusy as err:
        say(f"error: {err}")
        rc = 2
    sys.exit(rc)


if __name__ == "__main__":
    main()
