"""Where a run's numbers go besides metrics.jsonl: the W&B run, the end-of-run summary lines and ``loss.png``."""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
from omegaconf import OmegaConf

from launcher.metrics.memory import GIB

if TYPE_CHECKING:
    from launcher.config import Config

# metrics.jsonl keeps flat names; W&B groups them into panels by prefix.
_WANDB_NAMES = {
    "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens": "train/tokens",
    "supervised_tokens": "train/supervised_tokens", "packing_efficiency": "train/packing_efficiency",
    "eval_loss": "eval/loss", "eval_supervised_tokens": "eval/supervised_tokens", "eval_seconds": "eval/seconds",
    "peak_device_gib": "memory/peak_device_gib", "peak_host_gib": "memory/peak_host_gib",
    "time": "train/elapsed_seconds", "padding_fraction": "train/padding_fraction",
}


def wandb_name(key: str) -> str:
    return _WANDB_NAMES.get(key, f"perf/{key}")


class WandbRun:
    """The job's W&B run, on global rank 0 only. Any W&B error is warned about once and turns W&B off; training
    goes on. The run id is kept in the run directory so a resumed job continues the same W&B run."""

    def __init__(self, cfg: "Config", run_dir: Path):
        self.run = None
        w = cfg.logger.wandb
        self.mode = w.mode
        try:
            import wandb  # here, inside the try: a broken W&B install must not stop training either

            id_file = run_dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(6)
            id_file.write_text(run_id)
            self.run = wandb.init(
                project=w.project, entity=w.entity, name=w.name or f"{cfg.name}/{run_dir.name}", tags=list(w.tags),
                mode=w.mode, dir=str(run_dir), id=run_id, resume="allow",
                config=OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
                settings=wandb.Settings(init_timeout=w.init_timeout, console="off", silent=True))
        except Exception as err:  # noqa: BLE001 - W&B must never stop training
            self._fail(err)

    def _fail(self, err: BaseException) -> None:
        hint = ("; logger.wandb.mode=offline keeps the logs locally for a later `wandb sync`"
                if self.mode == "online" else "")
        print(f"warning: W&B is off for the rest of this run ({type(err).__name__}: "
              f"{' '.join(str(err).split())[:300]}); training goes on{hint}.", file=sys.stderr, flush=True)
        self.run = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log({wandb_name(k): v for k, v in metrics.items()
                          if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}, step=step)
        except Exception as err:  # noqa: BLE001
            self._fail(err)

    def finish(self, summary: dict[str, Any], exit_code: int = 0) -> None:
        if self.run is None:
            return
        try:
            self.run.summary.update({f"summary/{k}": v for k, v in summary.items()
                                     if isinstance(v, (int, float, str)) and v is not None})
            self.run.finish(exit_code=exit_code)
        except Exception as err:  # noqa: BLE001
            self._fail(err)
        self.run = None



def format_summary(s: dict[str, Any]) -> list[str]:
    """The end-of-run summary as a few console lines (the launcher prints them)."""
    lines = [f"done: {s['steps']} steps, {s['tokens']:,} tokens ({s['supervised_tokens']:,} supervised), "
             f"{s['train_seconds']}s training, loss {s['first_loss']:.4f} -> {s['last_loss']:.4f}"]
    if s.get("eval_loss") is not None:
        lines.append(f"eval loss {s['eval_loss']:.4f} (best {s['best_eval_loss']:.4f})")
    if "tokens_per_s" in s:
        perf = (f"MFU {s['mfu']:.1%} on {s['device']}" if s.get("mfu") is not None
                else f"{s['flops_per_s_per_device'] / 1e9:,.1f} GFLOP/s per device ({s['device']})")
        mem = (f"peak device memory {s['peak_device_bytes'] / GIB:.2f} GiB" if s.get("peak_device_bytes")
               else f"peak host memory +{s['peak_host_bytes'] / GIB:.2f} GiB per rank")
        lines.append(f"throughput {s['tokens_per_s']:,.0f} tok/s ({s['tokens_per_s_per_device']:,.0f} per device), "
                     f"{perf}, data wait {s['data_wait_fraction']:.1%} of step time, {mem}")
    return lines


def plot_losses(metrics_path: Path, out: Path, title: str = "") -> Path:
    """Draw train loss per step (and eval loss where evaluated) from metrics.jsonl into a PNG."""
    matplotlib.use("Agg")  # no display needed; also safe inside workers
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # not its font-cache notices in the run log
    import matplotlib.pyplot as plt  # after choosing the backend, which pyplot fixes when first imported

    train, evals = [], []
    for line in metrics_path.read_text().splitlines():
        r = json.loads(line)
        if "loss" in r and r["loss"] is not None and math.isfinite(r["loss"]):
            train.append((r["step"], r["loss"]))
        if "eval_loss" in r:
            evals.append((r["step"], r["eval_loss"]))
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.35 if len(train) > 50 else 1.0, lw=1, label="train loss")
        if len(train) > 50:  # a moving average makes the trend readable on noisy per-step losses
            k = max(len(train) // 20, 2)
            avg = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1])
                   for i in range(len(losses))]
            ax.plot(steps, avg, color="tab:blue", lw=2, label=f"train loss ({k}-step mean)")
    if evals:
        es, el = zip(*evals)
        ax.plot(es, el, "o-", color="tab:orange", lw=2, ms=5, label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per supervised token)")
    ax.set_title(title or metrics_path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out
