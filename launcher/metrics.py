"""What a user watches while training runs, all from rank 0: a progress bar (or plain periodic lines when stdout
is not a terminal, e.g. a Slurm log), ``metrics.jsonl`` in the run directory, an optional W&B run, and at the end a
summary and ``loss.png``.

Throughput and MFU
    Model FLOPs of one optimizer step are counted from the architecture and the actual batch (not the 6·N rule of
    thumb over padded slots). Per real token:

    * matmuls: ``2·N_lin`` forward, ``2·N_lin`` for input gradients, ``2·N_lin_trainable`` for weight gradients,
      where ``N_lin`` counts the weights of every ``nn.Linear`` (LoRA adapters and ``lm_head`` included,
      embedding lookups and norms excluded). Full fine-tuning gives the familiar ``6·N_lin``; LoRA about ``4·N_lin``.
    * causal attention: ``12 · layers · heads · head_dim · c`` (QKᵀ and AV, forward and twice that backward),
      where ``c = position + 1`` is the token's actual context inside its packed record. Sliding windows are ignored.

    Gradient-checkpointing recomputation is not counted (that would be hardware FLOPs utilisation, not MFU).
    ``MFU = model FLOPs / step time / (world size × peak)`` with the peak dense bf16 FLOP/s of the GPU from
    :data:`PEAK_BF16_FLOPS` (or ``logger.peak_flops``). On CPU (no meaningful peak) the achieved FLOP/s is reported
    and MFU is left out.

Per-rank skew
    Every rank sums its own step wall times, data-wait times, model FLOPs and token counts; at each logging step one
    small all-reduce of a (world × 8) table gathers them with every rank's peak memory. ``step_time_skew`` is the
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
import os
import re
import secrets
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import torch

from launcher.templates import IGNORE_INDEX

if TYPE_CHECKING:
    from launcher.config import Config

GIB = 1024**3

# Peak dense (no 2:4 sparsity) bf16 tensor-core FLOP/s per device, from the vendors' data sheets. Keys are matched
# as whole words in the lower-cased torch.cuda.get_device_name(), first match wins, so specific names come first.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("gb200", 2.5e15),
    ("b200", 2.25e15),
    ("gh200", 989e12),
    ("h200 nvl", 836e12),
    ("h200", 989e12),
    ("h100 nvl", 835e12),
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # SXM
    ("h800 pcie", 756e12),
    ("h800", 989e12),
    ("h20", 148e12),
    ("a100", 312e12),
    ("a800", 312e12),
    ("l40s", 362e12),
    ("l40", 181e12),
    ("l4", 121e12),
    ("a10g", 70e12),  # AWS' A10 variant; NVIDIA publishes no sheet, ≈70 TFLOP/s is the commonly quoted figure
    ("a10", 125e12),
    ("a30", 165e12),
    ("a40", 150e12),
    ("rtx 6000 ada", 364e12),
    ("rtx a6000", 155e12),
    ("5090", 209.5e12),  # GeForce figures: fp32 accumulate, which is what PyTorch's bf16 matmuls use
    ("4090", 165.2e12),
    ("3090", 71e12),
    ("mi325x", 1307e12),
    ("mi300x", 1307e12),
    ("mi250x", 383e12),
    ("mi250", 362e12),
]


def peak_flops_for(name: str) -> float | None:
    """Peak dense bf16 FLOP/s for a GPU name as CUDA reports it (e.g. "NVIDIA H100 80GB HBM3"), or None."""
    low = name.lower()
    for key, flops in PEAK_BF16_FLOPS:
        if re.search(rf"(?<![a-z0-9]){re.escape(key)}(?![a-z0-9])", low):
            return flops
    return None


def device_peak_flops(device: torch.device, override: float | None = None) -> tuple[str, float | None]:
    """(device name, peak bf16 FLOP/s or None): None on CPU and for GPUs missing from the table."""
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, override or peak_flops_for(name)


# --------------------------------------------------------------------------------------------- FLOPs
def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a DeepSpeed engine and/or PEFT wrapper."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _numel(p: torch.nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", 0) or p.numel())  # ZeRO-3 leaves an empty tensor and keeps the size here


class FlopCounter:
    """Model FLOPs of a training step from the architecture and the step's batches (see the module docstring)."""

    def __init__(self, linear: int, linear_trainable: int, layers: int, heads: int, head_dim: int):
        self.linear, self.linear_trainable = linear, linear_trainable
        self.attn_coeff = 12 * layers * heads * head_dim

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "FlopCounter":
        inner = _unwrap(model)
        linear = trainable = 0
        seen: set[int] = set()
        for m in inner.modules():
            if isinstance(m, torch.nn.Linear) and id(m.weight) not in seen:
                seen.add(id(m.weight))
                n = _numel(m.weight)
                linear += n
                trainable += n if m.weight.requires_grad else 0
        c = inner.config
        c = getattr(c, "text_config", None) or c
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        return cls(linear, trainable, c.num_hidden_layers, heads, head_dim)

    def per_token_matmul(self) -> int:
        return 4 * self.linear + 2 * self.linear_trainable

    def batch(self, batch: dict[str, torch.Tensor], pad_id: int) -> tuple[float, int]:
        """(model FLOPs, real tokens) of one micro-batch; trailing padding counts for neither."""
        real = real_token_mask(batch, pad_id)
        n_real, context = torch.stack([real.sum(), ((batch["position_ids"] + 1) * real).sum()]).tolist()
        if "num_tokens" in batch:  # collate counts the real tokens itself
            n_real = int(batch["num_tokens"])
        return float(self.per_token_matmul() * n_real + self.attn_coeff * context), int(n_real)


def real_token_mask(batch: dict[str, torch.Tensor], pad_id: int) -> torch.Tensor:
    """1 for real tokens, 0 for the padding that collate appends to short rows.

    Padding is the row's last segment (its position ids restart at 0) when it holds only ``pad_id`` and no label;
    a real record always has a supervised token, so it is never mistaken for padding."""
    ids, pos, labels = batch["input_ids"], batch["position_ids"], batch["labels"]
    width = ids.shape[1]
    idx = torch.arange(width, device=ids.device).expand_as(ids)
    start = torch.where(pos == 0, idx, torch.zeros_like(idx)).amax(dim=1, keepdim=True)
    tail = idx >= start
    is_pad_tail = ((ids == pad_id) | ~tail).all(dim=1, keepdim=True) & ((labels == IGNORE_INDEX) | ~tail).all(
        dim=1, keepdim=True) & (start > 0)
    return (~(tail & is_pad_tail)).long()


# --------------------------------------------------------------------------------------------- memory
def host_rss() -> tuple[int, int]:
    """(current, peak) resident bytes of this process (peak since start or the last reset)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return peak, peak


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak counters afresh (host: Linux's clear_refs "5"; elsewhere the lifetime peak stays)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def device_peak(device: torch.device) -> int:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0


# --------------------------------------------------------------------------------------------- console
def progress_mode(setting: str = "auto", stream: Any = None) -> str:
    """"bar" on a terminal, "lines" otherwise (Slurm logs, pipes, CI)."""
    if setting != "auto":
        return setting
    stream = stream or sys.stdout
    return "bar" if getattr(stream, "isatty", lambda: False)() and os.environ.get("TERM") != "dumb" else "lines"


class Progress:
    """A rank-0 progress indicator with ETA.

    ``bar``: a rich progress bar; lines printed through :meth:`print` appear above it. ``lines``: no bar, only a
    plain line every ``every_s`` seconds (and at the end), so a log file gets a few readable lines, not a redraw per
    step. ``every_s=None`` leaves lines mode silent (the caller prints its own periodic lines).
    """

    def __init__(self, total: int, desc: str, mode: str = "auto", enabled: bool = True,
                 every_s: float | None = 30.0, stream: Any = None, unit: str = ""):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.mode = progress_mode(mode, self.stream)
        self.done = 0
        self.start = self.last_line = time.time()
        self._bar = None
        if enabled and self.mode == "bar":
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                     TextColumn("{task.fields[info]}"),
                                     console=Console(file=self.stream), transient=False)
            self._task = self._bar.add_task(desc, total=total, info="")
            self._bar.start()

    def eta(self) -> float:
        rate = self.done / max(time.time() - self.start, 1e-9)
        return (self.total - self.done) / rate if rate > 0 else float("nan")

    def update(self, n: int = 1, info: str = "") -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, advance=n, info=info)
        elif self.every_s is not None and (time.time() - self.last_line >= self.every_s or self.done >= self.total):
            self.last_line = time.time()
            pct = 100 * self.done / max(self.total, 1)
            print(f"{self.desc}: {self.done:,}/{self.total:,}{self.unit} ({pct:.0f}%), "
                  f"elapsed {_duration(time.time() - self.start)}, eta {_duration(self.eta())}"
                  + (f"  {info}" if info else ""), file=self.stream, flush=True)

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


@contextmanager
def library_progress(mode: str = "auto", every_s: float = 30.0, enabled: bool = True) -> Iterator[None]:
    """While preparing data: keep the ``datasets`` progress bars (they have an ETA) on a terminal; elsewhere turn
    each bar into a plain line every ``every_s`` seconds and one when it completes, so a Slurm log gets a few
    readable lines instead of a carriage-return redraw per batch. ``enabled=False`` (other nodes) silences them."""
    from datasets.utils import tqdm as hf_tqdm

    if enabled and progress_mode(mode, sys.stderr) == "bar":
        yield
        return

    def display(bar: Any, msg: str | None = None, pos: int | None = None) -> bool:
        now = time.time()
        if not hasattr(bar, "_line_at"):  # tqdm's first refresh, from its __init__
            bar._line_at, bar._line_done = now, False
            return True
        done = bar.total is not None and bar.n >= bar.total
        if enabled and (now - bar._line_at >= every_s or done and not bar._line_done):
            bar._line_at, bar._line_done = now, done
            bar.fp.write(bar.format_meter(**{**bar.format_dict, "ncols": 0}).strip() + "\n")
            bar.fp.flush()
        return True

    original = hf_tqdm.display
    hf_tqdm.display = display
    try:
        yield
    finally:
        hf_tqdm.display = original


def _duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


# --------------------------------------------------------------------------------------------- W&B
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
            import wandb
            from omegaconf import OmegaConf

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


# --------------------------------------------------------------------------------------------- the logger
class MetricsLogger:
    """Collects per-step metrics on every rank; rank 0 prints, writes metrics.jsonl and logs to W&B.

    Create it before the model is built (it records the host memory baseline the memory planner is checked
    against), call :meth:`start` once the model exists, :meth:`log_step` on every rank after every optimizer step,
    :meth:`log_eval` after an evaluation, and :meth:`summary` at the end."""

    def __init__(self, cfg: "Config", run_dir: Path, backend: Any, total_steps: int, pad_id: int):
        self.cfg, self.run_dir, self.backend = cfg, run_dir, backend
        self.enabled = backend.rank == 0
        self.total_steps, self.log_every, self.pad_id = total_steps, cfg.train.log_every, pad_id
        self.path = run_dir / "metrics.jsonl"
        self.host_baseline = host_rss()[0]
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.eval_losses: list[tuple[int, float]] = []
        self.tokens = self.supervised = 0
        self.flops = 0.0
        self.step_seconds = self.data_seconds = 0.0
        self.peak_host = self.peak_device = 0
        self.skews: list[float] = []
        self._interval = torch.zeros(5, dtype=torch.float64)  # this rank's sums since the last log (see _gather)
        self._interval_steps = 0
        self._file = None
        self._progress: Progress | None = None
        self._wandb: WandbRun | None = None
        self.flop_counter: FlopCounter | None = None

    def start(self, model: torch.nn.Module) -> None:
        """The model is built: count its FLOPs, reset the peak-memory counters, open the outputs, start timing."""
        self.flop_counter = FlopCounter.from_model(model)
        self.device_name, self.peak_flops = device_peak_flops(self.backend.device, self.cfg.logger.peak_flops)
        self.host_after_build = host_rss()
        if self.enabled and self.backend.device.type == "cuda" and not self.peak_flops:
            print(f"note: no peak FLOP/s known for {self.device_name!r}, so MFU is not reported; set "
                  f"logger.peak_flops to its dense bf16 FLOP/s to get it.", file=sys.stderr, flush=True)
        reset_peak_memory(self.backend.device)
        if self.enabled:
            self._file = self.path.open("a", encoding="utf-8")
            if self.cfg.logger.wandb.enabled:
                self._wandb = WandbRun(self.cfg, self.run_dir)
            self._progress = Progress(self.total_steps, "train", self.cfg.logger.progress, every_s=None)
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
            f, n = self.flop_counter.batch(b, self.pad_id) if self.flop_counter else (0.0, 0)
            flops, real, slots = flops + f, real + n, slots + b["input_ids"].shape[0] * self.cfg.dataset.cutoff_len / (
                self.cfg.parallel.sequence)
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
                f"skew {r['step_time_skew']:.2f}  {mem}  eta {_duration(eta) if eta is not None else '?'}")

    # ---- evaluation
    def log_eval(self, step: int, result: dict[str, float]) -> None:
        """Record an evaluation (``result`` from :class:`launcher.evaluate.Evaluator`); rank 0 prints and logs it."""
        self.eval_losses.append((step, result["loss"]))
        if not self.enabled:
            return
        self._write(step, {"step": step, "eval_loss": result["loss"],
                           "eval_supervised_tokens": result["supervised_tokens"], "eval_seconds": result["seconds"]})
        self._progress.print(f"eval  {step:>5}/{self.total_steps}  loss {result['loss']:.4f}  "
                             f"({result['supervised_tokens']:,} supervised tokens, {result['seconds']:.1f}s)")

    # ---- end
    def summary(self, steps: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The run's totals; rank 0 also closes the outputs, finishes the W&B run and draws loss.png."""
        world = self.backend.world_size
        secs = max(self.step_seconds, 1e-9)
        s: dict[str, Any] = {
            "steps": steps,
            "tokens": self.tokens,
            "supervised_tokens": self.supervised,
            "train_seconds": round(time.time() - self.start_time, 1) if hasattr(self, "start_time") else 0.0,
            "first_loss": self.first_loss,
            "last_loss": self.last_loss,
            "tokens_per_s": self.tokens / secs,
            "tokens_per_s_per_device": self.tokens / secs / world,
            "supervised_tokens_per_s": self.supervised / secs,
            "flops_per_s_per_device": self.flops / secs / world,
            "mfu": self.flops / secs / (world * self.peak_flops) if getattr(self, "peak_flops", None) else None,
            "device": getattr(self, "device_name", self.backend.device.type),
            "data_wait_fraction": self.data_seconds / secs,
            "step_time_skew_max": max(self.skews) if self.skews else None,
            "peak_host_bytes": self.peak_host,  # over the host baseline taken before the model was built
            "host_after_build_bytes": (self.host_after_build[0] - self.host_baseline
                                       if hasattr(self, "host_after_build") else None),  # this rank's
            "peak_device_bytes": self.peak_device or None,
            "eval_loss": self.eval_losses[-1][1] if self.eval_losses else None,
            "best_eval_loss": min(v for _, v in self.eval_losses) if self.eval_losses else None,
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
    import logging

    import matplotlib

    matplotlib.use("Agg")  # no display needed; also safe inside workers
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # not its font-cache notices in the run log
    import matplotlib.pyplot as plt

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
