"""slurm/train.sh and slurm/merge.sh against real Slurm daemons: the local cluster of scripts/slurm_up.sh (two fake
nodes n1, n2 on this host; .ci/run starts it). One launcher per node, one CPU worker each, DeepSpeed ZeRO-3.

Four jobs in all, to keep it to a few minutes: an uninterrupted ZeRO-3 run; an FSDP run (accelerate launch on
each node) that is then scancel-ed and must not come back; the ZeRO-3 run again, stopped with USR1 (it
checkpoints, requeues itself and resumes to the same losses); and a merge job that waits for it (afterok).
Every wait has a deadline; a job that misses it is cancelled and its log printed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.distributed]

NODES = 2
STEPS = 10  # enough steps after the signal that the run cannot finish before it lands
OVERRIDES = ["backend=deepspeed_zero3", "launcher.nproc_per_node=1", "launcher.omp_num_threads=1",
             f"train.max_steps={STEPS}", "train.grad_accum=1", "train.log_every=1", "optimizer.warmup_ratio=0",
             "launcher.preflight_timeout=60"]
JOB_DEADLINE_S = 420  # one job on a busy 2-core machine takes 1-2 minutes


def _slurm_problem() -> str | None:
    """Why the local cluster cannot run the tests, or None."""
    for tool in ("sbatch", "scontrol", "sinfo", "scancel"):
        if shutil.which(tool) is None:
            return f"{tool} not found (start a local cluster: sudo bash scripts/slurm_up.sh {NODES})"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20).stdout
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True,
                               timeout=20).stdout.split("\n")
    except (subprocess.SubprocessError, OSError) as err:
        return f"Slurm does not answer ({err})"
    if "UP" not in ping:
        return f"slurmctld is not up ({ping.strip() or 'no answer'}); start it: sudo bash scripts/slurm_up.sh {NODES}"
    usable = {line.split()[0] for line in nodes if line.strip() and line.split()[1] in ("idle", "mix", "alloc")}
    if len(usable) < NODES:
        return f"need {NODES} usable nodes, sinfo shows: {' | '.join(n for n in nodes if n.strip())}"
    return None


@pytest.fixture(scope="module")
def slurm() -> None:
    """Skip (with the reason) where no Slurm runs, except in CI: there .ci/run starts it, so a missing cluster
    is a failure, not a skip."""
    problem = _slurm_problem()
    if problem and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must run the Slurm tests, but: {problem}")
    if problem:
        pytest.skip(problem)


class Job:
    """One submitted job: its id, log file and run directory; every wait is bounded."""

    def __init__(self, jid: int, log: Path, run_dir: Path | None):
        self.id, self.log, self.run_dir = jid, log, run_dir

    def state(self) -> dict[str, str]:
        try:
            out = subprocess.run(["scontrol", "-o", "show", "job", str(self.id)], capture_output=True, text=True,
                                 timeout=60).stdout
        except subprocess.TimeoutExpired:  # slurmctld starved by a busy machine: ask again at the next poll
            return {"JobState": "UNKNOWN (scontrol timed out)"}
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else f"(no log at {self.log})"

    def fail(self, why: str) -> None:
        s = self.state()
        subprocess.run(["scancel", str(self.id)], capture_output=True, timeout=30)
        pytest.fail(f"job {self.id}: {why} (JobState={s.get('JobState')} Reason={s.get('Reason')} "
                    f"ExitCode={s.get('ExitCode')} Restarts={s.get('Restarts')})\n--- {self.log} ---\n"
                    f"{self.text()[-8000:]}")

    def wait_until(self, ready, what: str, deadline: float) -> None:
        """Poll every 0.5 s until ``ready()``; fail with the log when the job ends first or time runs out."""
        while not ready():
            s = self.state()
            if s.get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                                     "COMPLETED") and not ready():
                self.fail(f"ended before {what}")
            if time.monotonic() > deadline:
                self.fail(f"no {what} within the deadline")
            time.sleep(0.5)

    def wait_done(self, deadline: float) -> dict[str, str]:
        """Wait for the final state (a requeued job passes through PENDING/REQUEUED and runs again)."""
        while True:
            s = self.state()
            if s.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return s
            if time.monotonic() > deadline:
                self.fail("did not finish within the deadline")
            time.sleep(0.5)


def submit(tmp: Path, script: str, *args: str, sbatch: tuple[str, ...] = (), run_dir: Path | None = None) -> Job:
    log = tmp / "logs" / f"{Path(script).stem}-%j.out"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LAUNCHER_PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"}
    if run_dir is not None:
        env["LAUNCHER_RUN_DIR"] = str(run_dir)
    r = subprocess.run(["sbatch", "--parsable", f"--output={log}", *sbatch, script, *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"sbatch failed: {r.stderr}"
    jid = int(r.stdout.strip().split(";")[0])
    return Job(jid, Path(str(log).replace("%j", str(jid))), run_dir)


def losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {x["step"]: x["loss"] for x in lines if "loss" in x}  # generation-eval records carry no loss


def leaked(jid: int) -> list[str]:
    """Processes that outlived the job: their environment still names it (proctrack/linuxproc loses orphans)."""
    found = []
    for env_file in Path("/proc").glob("[0-9]*/environ"):
        try:
            env = env_file.read_bytes().split(b"\0")
            if f"SLURM_JOB_ID={jid}".encode() in env:
                found.append(f"{env_file.parent.name}: {(env_file.parent / 'cmdline').read_bytes()[:120]!r}")
        except OSError:
            pass
    return found


@pytest.fixture(scope="module")
def jobs(slurm, tmp_path_factory) -> list[Job]:
    """Cancels whatever a test left queued or running, so a failure cannot block the next test's nodes."""
    submitted: list[Job] = []
    yield submitted
    ids = [str(j.id) for j in submitted]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def reference(jobs, tmp_path_factory) -> Job:
    """The uninterrupted 2-node run."""
    tmp = tmp_path_factory.mktemp("slurm-reference")
    job = submit(tmp, "slurm/train.sh", *OVERRIDES, sbatch=(f"--nodes={NODES}", "--job-name=ref"),
                 run_dir=tmp / "run")
    jobs.append(job)
    job.state_at_end = job.wait_done(time.monotonic() + JOB_DEADLINE_S)
    return job


def test_two_node_zero3_job_trains(reference: Job) -> None:
    s, log = reference.state_at_end, reference.text()
    if s.get("JobState") != "COMPLETED" or s.get("ExitCode") != "0:0":
        reference.fail("did not complete with exit code 0")
    summary = json.loads((reference.run_dir / "summary.json").read_text())
    assert summary["world_size"] == NODES and summary["steps"] == STEPS, summary
    assert sorted(losses(reference.run_dir)) == list(range(1, STEPS + 1))
    # one launcher per node, each starting its own workers with --no_ssh, after the nodes checked in
    assert f"{NODES} nodes checked in" in log, log
    for rank in range(NODES):
        assert re.search(rf"^{rank}: \[launcher\] starting 1 worker\(s\) per node × {NODES} node\(s\): .*"
                         rf"--no_ssh --num_nodes {NODES} --node_rank {rank} ", log, re.M), log
    assert re.search(rf"\[preflight\] {NODES} ranks on {NODES} node\(s\) \[n1: rank 0, n2: rank 1\]", log), log
    shards = list((reference.run_dir / "checkpoints" / f"step-{STEPS}").rglob("*optim_states.pt"))
    assert len(shards) == NODES, "ZeRO-3 writes one optimizer shard per rank"


def test_two_node_fsdp_job_trains_and_scancel_ends_it_for_good(jobs, reference, tmp_path_factory) -> None:
    """backend=fsdp: each node's launcher runs `accelerate launch --num_machines 2 --machine_rank R`. Then a plain
    scancel (SIGTERM to every process): the workers may save, but the job must end, not requeue itself (only USR1
    requeues)."""
    tmp = tmp_path_factory.mktemp("slurm-fsdp")
    overrides = [o for o in OVERRIDES if not o.startswith(("backend=", "train.max_steps="))]
    job = submit(tmp, "slurm/train.sh", "backend=fsdp", "train.max_steps=500", *overrides,
                 sbatch=(f"--nodes={NODES}", "--job-name=fsdp"), run_dir=tmp / "run")
    jobs.append(job)
    deadline = time.monotonic() + JOB_DEADLINE_S
    metrics = job.run_dir / "metrics.jsonl"
    job.wait_until(lambda: metrics.is_file() and max(losses(job.run_dir), default=0) >= 2, "step 2", deadline)
    log = job.text()
    for rank in range(NODES):
        assert re.search(rf"^{rank}: \[launcher\] starting .*accelerate launch .*--num_machines {NODES} "
                         rf"--machine_rank {rank} --main_process_ip n1 ", log, re.M), log
    assert re.search(rf"\[preflight\] {NODES} ranks on {NODES} node\(s\) \[n1: rank 0, n2: rank 1\]", log), log
    # the first two steps see the same data and weights as the ZeRO-3 run: same losses up to summation order
    got = {k: v for k, v in losses(job.run_dir).items() if k <= 2}
    assert got == pytest.approx({k: losses(reference.run_dir)[k] for k in (1, 2)}, rel=1e-4)

    subprocess.run(["scancel", str(job.id)], check=True, timeout=30)
    job.wait_done(deadline)
    time.sleep(8)  # past cred_expire (5 s): a requeued job would be PENDING or RUNNING again by now
    s, log = job.state(), job.text()
    assert s.get("JobState") == "CANCELLED" and s.get("Restarts") == "0", (s, log[-3000:])
    assert "received SIGTERM" in log and "requeueing job" not in log, log[-3000:]


@pytest.fixture(scope="module")
def requeued(jobs, reference, tmp_path_factory) -> tuple[Job, Job]:
    """The same run, sent USR1 after step 2 (as Slurm does before a time limit), plus a merge job waiting for it."""
    tmp = tmp_path_factory.mktemp("slurm-requeue")
    train = submit(tmp, "slurm/train.sh", *OVERRIDES, sbatch=(f"--nodes={NODES}", "--job-name=requeue"),
                   run_dir=tmp / "run")
    jobs.append(train)
    merge = submit(tmp, "slurm/merge.sh", str(train.run_dir), sbatch=(f"--dependency=afterok:{train.id}",))
    jobs.append(merge)
    deadline = time.monotonic() + 2 * JOB_DEADLINE_S
    merge.pending_reason = merge.state().get("Reason")
    metrics = train.run_dir / "metrics.jsonl"
    train.wait_until(lambda: metrics.is_file() and max(losses(train.run_dir), default=0) >= 2,
                     "step 2 in metrics.jsonl", deadline)
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(train.id)], check=True, timeout=30)
    train.state_at_end = train.wait_done(deadline)
    merge.state_at_end = merge.wait_done(deadline)
    return train, merge


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_loss(reference: Job, requeued) -> None:
    train, _ = requeued
    s, log = train.state_at_end, train.text()
    if s.get("JobState") != "COMPLETED" or s.get("ExitCode") != "0:0" or s.get("Restarts") != "1":
        train.fail("was not requeued exactly once and then completed")
    assert "received SIGUSR1" in log and "requeueing job" in log, log
    assert log.count("(attempt 1)") == 1 and log.count("(attempt 2)") == 1, "--open-mode=append keeps both attempts"
    stops = re.findall(r"checkpoints/step-(\d+) saved at step", log)
    resumed = re.findall(r"resumed from \S+/checkpoints/step-(\d+)", log)
    assert stops and resumed and stops[0] == resumed[0] and 2 <= int(stops[0]) < STEPS, (stops, resumed)
    got, want = losses(train.run_dir), losses(reference.run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got[STEPS] == want[STEPS], f"final loss {got[STEPS]} after requeue, {want[STEPS]} uninterrupted"
    assert got == want, "every step's loss equals the uninterrupted run's"
    assert not leaked(train.id), leaked(train.id)


def test_merge_job_runs_after_train_and_writes_a_loadable_model(requeued) -> None:
    train, merge = requeued
    assert merge.pending_reason == "Dependency", merge.pending_reason
    s = merge.state_at_end
    if s.get("JobState") != "COMPLETED" or s.get("ExitCode") != "0:0":
        merge.fail("did not complete with exit code 0")
    assert s["StartTime"] >= train.state_at_end["EndTime"], (s["StartTime"], train.state_at_end["EndTime"])
    out = train.run_dir / "merged" / f"step-{STEPS}"
    assert (out / "config.json").is_file(), merge.text()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("SELECT", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
