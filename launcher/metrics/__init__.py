"""What a user watches while training runs, all from rank 0: a progress bar (or plain periodic lines when stdout
is not a terminal, e.g. a Slurm log), ``metrics.jsonl`` in the run directory, an optional W&B run, and at the end a
summary and ``loss.png``.

This module holds :class:`MetricsLogger`; its parts live next to it: ``flops`` (model FLOPs, MFU, peak FLOP/s
table), ``memory`` (the one reader of host and device memory), ``progress`` (console bar and lines), ``report``
(W&B, summary lines, loss plot). Token counts come from :func:`launcher.packing.count_tokens`.

Per-rank skew
    Every rank sums its own step wall times, data-wait times, model FLOPs and token counts; at each logging step one
    small all-reduce of a (world × 7) table gathers them with every rank's peak memory. ``step_time_skew`` is the
    slowest/fastest rank's step time over the logging interval and ``data_time_slowest`` the slowest rank's mean
    data wait. Ranks synchronise inside every step (gradient reduction, ZeRO-3 gathers), so a skew above 1 points
    at work outside the collectives (data loading, host-side work, a rank that logs or saves); a slow device slows
    every rank alike and shows up as low MFU instead.

Peak memory
    Device: ``torch.cuda.max_memory_allocated`` (what tensors held). Host: the process's resident-set high-water mark
    (``VmHWM``), reset when training starts so model loading does not hide the steady state; both are the maximum
    over ranks.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from launcher.evaluate.generation import GENERATIONS_FILE, Result, append_generations
from launcher.metrics.flops import (PEAK_BF16_FLOPS, FlopCounter, device_peak_flops, peak_flops_for,
                                    real_token_mask)
from launcher.metrics.memory import GIB, device_peak, host_rss, reset_peak_memory
from launcher.metrics.progress import Progress, duration, library_progress, progress_mode
from launcher.metrics.report import WandbRun, format_summary, plot_losses, wandb_name
from launcher.packing import count_tokens

if TYPE_CHECKING:
    from launcher.config import Config

__all__ = ["MetricsLogger", "FlopCounter", "PEAK_BF16_FLOPS", "Progress", "device_peak_flops", "format_summary",
           "library_progress", "peak_flops_for", "plot_losses", "progress_mode", "real_token_mask", "wandb_name"]


class MetricsLogger:
    """Collects per-step metrics on every rank; rank 0 prints, writes metrics.jsonl and logs to W&B.

    Create it once the model is built and its checkpoint loaded, just before the first step: creating it counts
    the model's FLOPs, resets the peak-memory counters, opens the outputs and starts the clock. Then call
    :meth:`log_step` on every rank after every optimizer step, :meth:`log_eval` after an evaluation, and
    :meth:`summary` at the end.

    ``flop_counter`` is :meth:`FlopCounter.from_model` of the built model (None: no FLOPs counted), and
    ``host_baseline`` the resident bytes before the model was built (None: now), which the memory planner's
    estimate is checked against."""

    def __init__(self, cfg: "Config", run_dir: Path, backend: Any, total_steps: int, pad_id: int,
                 flop_counter: FlopCounter | None = None, host_baseline: int | None = None):
        self.cfg, self.run_dir, self.backend = cfg, run_dir, backend
        self.enabled = backend.rank == 0
        self.total_steps, self.log_every, self.pad_id = total_steps, cfg.train.log_every, pad_id
        self.cutoff_len = cfg.dataset.cutoff_len // cfg.parallel.sequence  # a rank's slots: its slice of each row
        self.path = run_dir / "metrics.jsonl"
        self.host_baseline = host_rss()[0] if host_baseline is None else host_baseline
        self.host_after_build = host_rss()
        self.flop_counter = flop_counter
        self.device_name, self.peak_flops = device_peak_flops(backend.device, cfg.logger.peak_flops)
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.eval_losses: list[tuple[int, float]] = []
        self.generations: list[dict[str, Any]] = []  # {step, scores, records_per_s} of each generation eval
        self.tokens = self.supervised = 0
        self.flops = 0.0
        self.step_seconds = self.data_seconds = 0.0
        self.peak_host = self.peak_device = 0
        self.skews: list[float] = []
        self._interval = torch.zeros(5, dtype=torch.float64)  # this rank's sums since the last log (see _gather)
        self._interval_steps = 0
        if self.enabled and backend.device.type == "cuda" and not self.peak_flops:
            print(f"note: no peak FLOP/s known for {self.device_name!r}, so MFU is not reported; set "
                  f"logger.peak_flops to its dense bf16 FLOP/s to get it.", file=sys.stderr, flush=True)
        reset_peak_memory(backend.device)
        # Rank 0's outputs; metrics.jsonl is appended to (a resumed run's earlier steps stay).
        self._file = self.path.open("a", encoding="utf-8") if self.enabled else None
        self._wandb = WandbRun(cfg, run_dir) if self.enabled and cfg.logger.wandb.enabled else None
        self._progress = (Progress(total_steps, "train", cfg.logger.progress, every_s=None) if self.enabled
                          else None)
        self.start_time = time.time()
        self._eta_from: tuple[float, int] | None = None  # (time, step) after this attempt's first step

    # ---- per step
    def log_step(self, step: int, metrics: dict[str, Any], batches: Sequence[dict[str, torch.Tensor]] = (),
                 data_time: float = 0.0) -> None:
        """Record optimizer step ``step`` (from 1; a resumed run starts later). ``metrics`` has loss, lr,
        grad_norm, tokens, supervised_tokens (summed over ranks) and step_time (this rank's seconds of compute);
        ``batches`` are this rank's micro-batches and ``data_time`` the seconds it waited for them before. The
        logged step_time and tokens/s include that wait. Every rank calls this at every step: logging steps
        gather across ranks with one small all-reduce."""
        dt = metrics["step_time"] + data_time
        world = self.backend.world_size
        flops = real = slots = 0.0
        for b in batches:
            counts = count_tokens(b)
            f = self.flop_counter.batch(b, self.pad_id)[0] if self.flop_counter else 0.0
            # Packing efficiency: real tokens over what the rows could hold (PackStats' slots, rows × cutoff_len).
            flops, real, slots = flops + f, real + counts.tokens, slots + counts.rows * self.cutoff_len
        self._interval += torch.tensor([dt, data_time, flops, real, slots], dtype=torch.float64)
        self._interval_steps += 1
        tokens, sup = metrics.get("tokens", 0), metrics.get("supervised_tokens", 0)
        self.tokens += tokens
        self.supervised += sup
        self.step_seconds += dt
        self.data_seconds += data_time
        loss = metrics.get("loss")
        if loss is not None and math.isfinite(loss):
            self.first_loss = loss if self.first_loss is None else self.first_loss
            self.last_loss = loss
        record: dict[str, Any] = {
            **metrics, "step_time": dt,
            "tokens_per_s": tokens / dt, "tokens_per_s_per_device": tokens / dt / world,
            "supervised_tokens_per_s": sup / dt, "supervised_tokens_per_s_per_device": sup / dt / world,
            "data_time": data_time,
        }
        if step % self.log_every == 0 or step == self.total_steps or step == 1:
            record.update(self._gather())
        first = self._eta_from is None
        if first:  # the first step (of this attempt) warms up: the ETA counts from its end
            self._eta_from = (time.time(), step)
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time() - self.start_time, 3), **record}
        self._write(step, record)
        self._progress.update(step if first else 1, info=f"loss {loss:.4f}")
        if "step_time_skew" in record:
            self._progress.print(self._line(step, record))

    def _write(self, step: int, record: dict[str, Any]) -> None:
        """One line of metrics.jsonl, flushed (a crash loses no logged step), and the same record to W&B."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb:
            self._wandb.log(record, step)

    def _gather(self) -> dict[str, float]:
        """Sum a (world × 7) table over ranks in one all-reduce: each rank's row holds its step and data seconds,
        model FLOPs, real tokens and token slots since the last log, and its peak host and device memory. Returns
        the interval's throughput (FLOP/s, MFU, packing efficiency), skew and memory peaks."""
        w, r = self.backend.world_size, self.backend.rank
        table = torch.zeros(w, 7, dtype=torch.float64)
        table[r, :5] = self._interval
        table[r, 5] = host_rss()[1] - self.host_baseline
        table[r, 6] = device_peak(self.backend.device)
        table = self.backend.all_reduce_sum(table.to(self.backend.device)).cpu()
        secs = float(self._interval[0])  # this rank's wall time of the interval's steps
        n_steps = max(self._interval_steps, 1)
        self._interval.zero_()
        self._interval_steps = 0
        step_secs, flops = table[:, 0], float(table[:, 2].sum())
        self.flops += flops
        skew = float(step_secs.max() / step_secs.min()) if float(step_secs.min()) > 0 else float("nan")
        self.skews.append(skew)
        self.peak_host = max(self.peak_host, int(table[:, 5].max()))
        self.peak_device = max(self.peak_device, int(table[:, 6].max()))
        out = {"flops_per_s": flops / secs, "flops_per_s_per_device": flops / secs / w,
               "packing_efficiency": float(table[:, 3].sum() / max(float(table[:, 4].sum()), 1.0)),
               "step_time_skew": skew, "slowest_rank": int(step_secs.argmax()),
               "data_time_slowest": float(table[:, 1].max()) / n_steps,
               "peak_host_gib": float(table[:, 5].max()) / GIB}
        if self.peak_flops:
            out["mfu"] = flops / secs / (w * self.peak_flops)
        if self.backend.device.type == "cuda":
            out["peak_device_gib"] = float(table[:, 6].max()) / GIB
        return out

    def _line(self, step: int, r: dict[str, Any]) -> str:
        t0, s0 = self._eta_from or (0.0, step)
        eta = (time.time() - t0) / (step - s0) * (self.total_steps - step) if step > s0 else None
        perf = f"mfu {r['mfu']:.1%}" if "mfu" in r else f"{r['flops_per_s_per_device'] / 1e9:,.1f} GFLOP/s/dev"
        mem = (f"mem {r['peak_device_gib']:.1f}G" if "peak_device_gib" in r else f"host +{r['peak_host_gib']:.2f}G")
        return (f"step {step:>5}/{self.total_steps}  loss {r['loss']:.4f}  lr {r['lr']:.2e}  "
                f"grad_norm {r['grad_norm']:.3f}  tok/s {r['tokens_per_s']:,.0f} "
                f"({r['tokens_per_s_per_device']:,.0f}/dev)  {perf}  data {r['data_time'] * 1000:.0f}ms  "
                f"skew {r['step_time_skew']:.2f}  {mem}  eta {duration(eta) if eta is not None else '?'}")

    # ---- evaluation
    def log_eval(self, step: int, result: dict[str, float]) -> None:
        """Record an evaluation (``result`` from :class:`launcher.evaluate.loss.Evaluator`); rank 0 prints and logs
        it."""
        self.eval_losses.append((step, result["loss"]))
        if not self.enabled:
            return
        self._write(step, {"step": step, "eval_loss": result["loss"],
                           "eval_supervised_tokens": result["supervised_tokens"], "eval_seconds": result["seconds"]})
        self._progress.print(f"eval  {step:>5}/{self.total_steps}  loss {result['loss']:.4f}  "
                             f"({result['supervised_tokens']:,} supervised tokens, {result['seconds']:.1f}s)")

    def log_generation(self, result: Result | None) -> None:
        """Record a generation evaluation (only rank 0 has a result): metrics.jsonl, eval_generations.jsonl, a
        table on the console and in W&B."""
        if not self.enabled or result is None:
            return
        self.generations.append({"step": result.step, "scores": result.scores,
                                 "records_per_s": round(result.records_per_s, 3)})
        self._write(result.step, {"step": result.step, **result.flat()})
        append_generations(self.run_dir / GENERATIONS_FILE, result)
        self._progress.print(f"generate  {result.step:>5}/{self.total_steps}  {len(result.rows)} answers in "
                             f"{result.seconds:.1f}s ({result.records_per_s:.2f} records/s), "
                             f"{self.run_dir / GENERATIONS_FILE}")
        for line in result.table():
            self._progress.print("  " + line)
        if self._wandb:
            self._wandb.log_table("generate/answers", result.rows, result.step)

    # ---- end
    def summary(self, steps: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The run's totals; rank 0 also closes the outputs, finishes the W&B run and draws loss.png."""
        world = self.backend.world_size
        secs = max(self.step_seconds, 1e-9)
        s: dict[str, Any] = {
            "steps": steps,
            "tokens": self.tokens,
            "supervised_tokens": self.supervised,
            "train_seconds": round(time.time() - self.start_time, 1),
            "first_loss": self.first_loss,
            "last_loss": self.last_loss,
            "tokens_per_s": self.tokens / secs,
            "tokens_per_s_per_device": self.tokens / secs / world,
            "supervised_tokens_per_s": self.supervised / secs,
            "flops_per_s_per_device": self.flops / secs / world,
            "mfu": self.flops / secs / (world * self.peak_flops) if self.peak_flops else None,
            "device": self.device_name,
            "data_wait_fraction": self.data_seconds / secs,
            "step_time_skew_max": max(self.skews) if self.skews else None,
            "peak_host_bytes": self.peak_host,  # over the host baseline taken before the model was built
            "host_after_build_bytes": self.host_after_build[0] - self.host_baseline,  # this rank's
            "peak_device_bytes": self.peak_device or None,
            "eval_loss": self.eval_losses[-1][1] if self.eval_losses else None,
            "best_eval_loss": min(v for _, v in self.eval_losses) if self.eval_losses else None,
            "generation": self.generations,
            **(extra or {}),
        }
        if self.enabled:
            if self._progress:
                self._progress.close()
            if self._file:
                self._file.close()
            if self.cfg.logger.plot:
                try:
                    s["loss_plot"] = str(plot_losses(self.path, self.run_dir / "loss.png",
                                                   f"{self.cfg.name}  ·  {self.run_dir.name}"))
                except Exception as err:  # noqa: BLE001 - a plot must not fail a finished run
                    print(f"warning: could not draw loss.png: {err}", file=sys.stderr, flush=True)
            if self._wandb:
                self._wandb.finish(s)
        return s
