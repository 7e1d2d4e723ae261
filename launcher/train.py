"""The worker: ``python -m launcher.train <run_dir>``, started once per rank by the backend's launcher.

It reads the config and the run spec the launcher wrote (``config.yaml``, ``run.json``; it never recomposes Hydra
config), builds everything in a fixed order, then runs a short loop. The loss of an optimizer step is the sum of token losses over every micro-batch
on every rank, divided by the number of supervised tokens in that whole step, so packing, micro-batch size and
world size do not change it.
"""

from __future__ import annotations

import faulthandler
import json
import math
import os
import sys
import time
import traceback
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import datasets
import torch

from launcher.attention import PACKED, attention_of, kernel
from launcher.backends import backend_for, make_backend
from launcher.backends.base import Backend
from launcher.checkpoint import StopRequest, complete_checkpoints, resume, save_checkpoint
from launcher.config import Config, load_run_config
from launcher.evaluate.generation import GenerationEval
from launcher.evaluate.loss import Evaluator, LossFn
from launcher.failures import lost_peer, write_record
from launcher.loss import loss_chunks, token_loss_sum
from launcher.metrics import FlopCounter, MetricsLogger
from launcher.metrics.memory import MIB, device_peak, host_rss, lifetime_peak_rss
from launcher.model import apply_finetune, compute_dtype, load_model, load_tokenizer
from launcher.packing import (ISOLATING_ATTENTION, LEAK_TOLERANCE, RowLoader, RowPlan, count_tokens, isolation_leak,
                              load_plan, plan_path, varlen_attention)
from launcher.preflight import check_ranks
from launcher.runspec import RunSpec, load_run_spec
from launcher.sequence import data_parallel
from launcher.templates import IGNORE_INDEX


def load_rows(spec: RunSpec, split: str = "train") -> RowPlan:
    """The row plan the launcher wrote for ``split`` (which records make up each row)."""
    return load_plan(plan_path(spec.data_path, split))


def plan_steps(n_rows: int, cfg: Config, world_size: int) -> tuple[int, int]:
    """(optimizer steps, micro-batches per epoch per rank) for this data and config (the ranks of a
    sequence-parallel group share their rows)."""
    per_epoch = n_rows // (world_size // cfg.parallel.sequence * cfg.train.micro_batch_size)
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps, per_epoch
    return max(1, int(cfg.train.epochs * per_epoch / cfg.train.grad_accum)), per_epoch


def loss_function(cfg: Config, micro_batch_size: int) -> LossFn:
    """The token loss for micro-batches of ``micro_batch_size`` rows: chunked unless ``train.loss_chunk_tokens`` is 0
    (launcher/loss.py)."""
    return partial(token_loss_sum, chunks=loss_chunks(cfg.train.loss_chunk_tokens, cfg.dataset.cutoff_len,
                                                      micro_batch_size))


def forward_backward(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], backend: Backend,
                     autocast: Any = None, loss_fn: LossFn = token_loss_sum) -> dict[str, float]:
    """Forward and backward over one optimizer step's micro-batches (this rank's share of the step).

    The step's loss is Σ token losses / supervised tokens of the *whole* step, all micro-batches on all ranks:
    the counts are all-reduced first, and each micro-batch's summed loss is scaled by that one denominator. A mean
    per micro-batch (or per rank) would weight tokens by how their micro-batch happened to be filled, so packing
    would change the loss; here packed and unpadded batches of the same records give the same loss and gradients.
    Returns the step's loss and its token counts (summed over ranks).
    """
    autocast = autocast or nullcontext()
    mine = [count_tokens(b) for b in batches]
    counts = torch.tensor([sum(c.supervised for c in mine), sum(c.tokens for c in mine), sum(c.slots for c in mine)],
                          dtype=torch.float64, device=backend.device)
    n_sup, n_tok, n_slots = backend.all_reduce_sum(counts).tolist()
    loss_total = torch.zeros((), dtype=torch.float64, device=backend.device)
    for b in batches:
        with autocast:
            loss_sum = loss_fn(model, b)
        # Backends average gradients over ranks, hence × world_size: the result is Σ token losses / n_sup.
        backend.backward(loss_sum * backend.world_size / max(n_sup, 1.0))
        loss_total += loss_sum.detach().double()
    loss = float(backend.all_reduce_sum(loss_total)) / max(n_sup, 1.0)
    return {"loss": loss, "supervised_tokens": n_sup, "tokens": n_tok, "slots": n_slots}


def refuse_leaking_packing(model: torch.nn.Module, cfg: Config, vocab_size: int, backend: Backend) -> None:
    """Stop before training if this model lets packed records attend to each other (checked on the real model)."""
    flatten = varlen_attention(attention_of(cfg))
    shard = data_parallel(backend.rank, backend.world_size, cfg.parallel.sequence)[1]
    leak = max(per_rank(backend, isolation_leak(model, vocab_size, backend.device, flatten=flatten, shard=shard)))
    if leak <= LEAK_TOLERANCE:
        return
    if backend.rank != 0:
        raise SystemExit(2)
    raise SystemExit(
        f"model {cfg.model.name_or_path} with model.attn_implementation={cfg.model.attn_implementation} lets packed "
        f"records attend to each other: in a start-up check, replacing one record changed the logits of the record "
        f"packed after it by {leak:.1e} (relative; isolated models give 0). Training on packed rows would mix "
        f"records. Set model.attn_implementation=auto (packed attention, which needs no mask: it keeps OPT's records "
        f"apart, for one), or dataset.packing=false (one record per row; the loss is the same, only slower), or use "
        f"a model whose transformers implementation separates packed sequences by position_ids (Llama, Mistral, "
        f"Qwen2, Gemma, GPT-NeoX do; OPT, Bloom, Falcon do not).")


def micro_batches(loader: RowLoader, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """An endless stream of micro-batches across epochs, starting at global micro-batch ``start``."""
    epoch, idx = divmod(start, loader.batches_per_epoch)
    while True:
        yield from loader.batches(epoch, idx)
        epoch, idx = epoch + 1, 0


def build_loader(cfg: Config, spec: RunSpec, backend: Backend, pad_id: int) -> tuple[RowLoader, int]:
    """This rank's micro-batches of the prepared data, and the number of optimizer steps to run."""
    ds = datasets.load_from_disk(str(Path(spec.data_path) / "train"))
    rows = load_rows(spec)
    (dp_rank, dp_world), shard = data_parallel(backend.rank, backend.world_size, cfg.parallel.sequence)
    loader = RowLoader(ds, rows, cfg.train.micro_batch_size, dp_rank, dp_world, cfg.train.seed,
                       pad_id, flatten=varlen_attention(attention_of(cfg)), shard=shard)
    return loader, plan_steps(len(rows), cfg, backend.world_size)[0]


def build_model(cfg: Config, dtype: torch.dtype, empty: bool) -> torch.nn.Module:
    """The model with its fine-tuning method applied (what every backend's ``build`` wraps)."""
    # attention_of decides what ``auto`` loads for this run: packed attention for packed rows, but sdpa under
    # sequence parallelism, whose Ulysses wrapper replaces sdpa and keeps the records apart itself.
    model = load_model(cfg.model, dtype, empty=empty, quantize_4bit=cfg.finetune.method == "qlora",
                       packing=attention_of(cfg) == PACKED)
    torch.manual_seed(cfg.train.seed)  # adapter init must not depend on how each backend loaded the base
    return apply_finetune(model, cfg.finetune)


def check_world(cfg: Config, spec: RunSpec, backend: Backend) -> None:
    """Fail loudly if the workers did not form the process group the launcher started (e.g. a library quietly
    running each process alone): they would all train on the same data and write the same files."""
    kind = backend_for(cfg)
    expected = spec.world_size
    if expected and backend.world_size != expected:
        raise RuntimeError(f"the launcher started {expected} workers but this one sees a world of "
                           f"{backend.world_size}: backend {kind.name!r} did not form the process group.")


def train_step(model: torch.nn.Module, backend: Backend, batches: list[dict[str, torch.Tensor]],
               loss_fn: LossFn = token_loss_sum) -> dict:
    """One optimizer step over this rank's micro-batches; returns the step's metrics (same on every rank) and,
    under "slots", the token slots it used (padding included)."""
    t0 = time.time()
    batches = [{k: v.to(backend.device) for k, v in b.items()} for b in batches]
    totals = forward_backward(model, batches, backend, backend.autocast(), loss_fn)
    grad_norm = backend.step()
    dt = time.time() - t0
    return {"loss": totals["loss"], "lr": backend.lr(), "grad_norm": grad_norm, "tokens": int(totals["tokens"]),
            "supervised_tokens": int(totals["supervised_tokens"]),
            "padding_fraction": 1 - totals["tokens"] / max(totals["slots"], 1.0),
            "step_time": dt, "tokens_per_s": totals["tokens"] / dt, "slots": totals["slots"]}


def check_finite(m: dict, step: int, cfg: Config, run_dir: Path, rank: int) -> None:
    """A non-finite loss or gradient norm (the same on every rank) stops training before anything of that state
    is saved, or, with train.nonfinite=skip, is reported (the backend did not apply the update)."""
    if math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]):
        return
    what = f"step {step}: loss {m['loss']}, gradient norm {m['grad_norm']}"
    if cfg.train.nonfinite == "skip":
        if rank == 0:
            print(f"warning: {what}: update skipped (train.nonfinite=skip)", file=sys.stderr, flush=True)
        return
    done = complete_checkpoints(run_dir)
    last = (f"the last good checkpoint is {done[-1]} (resume=auto continues from it)" if done
            else "no checkpoint was written before it")
    raise SystemExit(f"{what}: training stopped and nothing of this state was saved; {last}. Lower optimizer.lr "
                     f"or check the data; train.nonfinite=skip skips such steps instead (backend=single or fsdp).")


def run(run_dir: str | Path) -> dict:
    """Train as configured in ``run_dir/config.yaml`` and ``run.json``; returns the summary (rank 0 also writes
    summary.json).

    SIGTERM/SIGUSR1 stop after the current step with a checkpoint (the summary then says ``"stopped": true``).
    """
    run_dir = Path(run_dir)
    cfg, spec = load_run_config(run_dir), load_run_spec(run_dir)
    if cfg.dataset.packing and attention_of(cfg) not in ISOLATING_ATTENTION:
        raise SystemExit(f"model.attn_implementation={cfg.model.attn_implementation!r} cannot keep packed records "
                         f"apart; use one of {', '.join(ISOLATING_ATTENTION)} or dataset.packing=false.")
    stop = StopRequest()
    torch.manual_seed(cfg.train.seed)
    backend = make_backend(cfg)
    check_world(cfg, spec, backend)
    if spec.nnodes > 1:  # which rank runs on which node, and a timed all-reduce with the real backend
        check_ranks(backend.rank, backend.world_size, backend.device)
    tokenizer = load_tokenizer(cfg.model)
    loader, total_steps = build_loader(cfg, spec, backend, tokenizer.pad_token_id)
    evaluator = Evaluator.from_config(cfg, spec, backend.rank, backend.world_size, tokenizer.pad_token_id)
    generation = GenerationEval.from_run(cfg, run_dir, tokenizer, backend.rank, backend.world_size, backend.device)
    host_before_model = host_rss()[0]  # what the memory planner's estimate is checked against
    model = backend.build(partial(build_model, cfg), total_steps)
    model.train()
    if cfg.dataset.packing:
        refuse_leaking_packing(model, cfg, len(tokenizer), backend)
    state = resume(backend, run_dir, cfg)

    metrics = MetricsLogger(cfg, run_dir, backend, total_steps, tokenizer.pad_token_id, FlopCounter.from_model(model),
                            host_before_model)
    if generation and cfg.eval.generate.before and state.step == 0:  # the base model, to show the gain
        metrics.log_generation(generation.run(model, 0, backend.autocast(), backend.generating(model)))
    train_loss = loss_function(cfg, cfg.train.micro_batch_size)
    eval_loss = loss_function(cfg, cfg.eval.micro_batch_size or cfg.train.micro_batch_size)
    stream = micro_batches(loader, state.micro_batch)
    gas, every = cfg.train.grad_accum, cfg.train.save_steps
    stopped, ckpt, slots = False, None, 0.0
    while state.step < total_steps and not stopped:
        t0 = time.time()
        batches = [next(stream) for _ in range(gas)]
        data_time = time.time() - t0
        step_metrics = train_step(model, backend, batches, train_loss)
        check_finite(step_metrics, state.step + 1, cfg, run_dir, backend.rank)
        slots += step_metrics.pop("slots")
        metrics.log_step(state.step + 1, step_metrics, batches=batches, data_time=data_time)
        state.step, state.micro_batch = state.step + 1, state.micro_batch + gas
        if evaluator and ((cfg.eval.steps and state.step % cfg.eval.steps == 0) or state.step == total_steps):
            metrics.log_eval(state.step, evaluator.run(model, eval_loss, backend.all_reduce_sum, backend.device,
                                                       backend.autocast()))
        if generation and generation.due(state.step, total_steps):
            metrics.log_generation(generation.run(model, state.step, backend.autocast(),
                                                        backend.generating(model)))
        stopped = stop.requested(backend)
        if stopped or state.step == total_steps or (every and state.step % every == 0):
            ckpt = save_checkpoint(backend, model, run_dir, state, cfg.train.save_total_limit)

    if ckpt is None:  # nothing left to train: the run was complete already
        ckpt = complete_checkpoints(run_dir)[-1]
    summary = metrics.summary(state.step, {
        "world_size": backend.world_size, "checkpoint": str(ckpt), "stopped": stopped,
        "packing": loader.rows.stats.as_dict(), "attention": attention_used(cfg, backend),
        "padding_fraction": round(1 - metrics.tokens / max(slots, 1.0), 6),
        **resource_facts(backend, host_before_model)})
    if backend.rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    stop.close()
    backend.close()
    return summary


def attention_used(cfg: Config, backend: Backend) -> str:
    """The attention implementation the model runs, and for ``packed`` the kernel on this device."""
    attn = attention_of(cfg)
    packed = f"{PACKED} ({kernel(backend.device, compute_dtype(cfg.model))})"
    if cfg.parallel.sequence > 1:  # launcher/sequence.py: Ulysses' all-to-all, then packed over whole rows
        return f"DeepSpeed Ulysses over {cfg.parallel.sequence} ranks, then {packed}"
    return packed if attn == PACKED else attn


def resource_facts(backend: Backend, host_before_model: int) -> dict:
    """What each rank holds: parameter elements and memory in MiB (shows what sharding really did)."""
    local, total = backend.param_counts()
    return {"params_per_rank": {"held": [int(x) for x in per_rank(backend, local)], "total": total},
            "memory_mb_per_rank": {"before_model": per_rank(backend, host_before_model / MIB),
                                   "peak": per_rank(backend, lifetime_peak_rss() / MIB),
                                   "device_peak": per_rank(backend, device_peak(backend.device) / MIB)}}


def per_rank(backend: Backend, value: float) -> list[float]:
    """``value`` of every rank, on every rank."""
    t = torch.zeros(backend.world_size, dtype=torch.float64, device=backend.device)
    t[backend.rank] = value
    return [round(x, 1) for x in backend.all_reduce_sum(t).tolist()]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m launcher.train <run_dir>")
    faulthandler.enable()  # a rank killed by a native crash (SIGSEGV, SIGABRT) still shows where it was
    try:
        run(args[0])
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # BaseException: DCP's CheckpointException is one
        if isinstance(err, SystemExit) and not isinstance(err.code, str):
            raise  # a bare exit status: the rank that explains it has a message of its own
        # Every rank's output is interleaved on the console; this file lets the launcher name the first failure.
        rank = os.environ.get("RANK", "0")
        if lost_peer(err):  # a consequence of another rank's failure: one line here, the cause is named there
            write_record(args[0], rank, "peer_lost", f"{type(err).__name__}: {str(err).strip()}")
            print(f"[rank{rank}] stopped: another rank vanished ({type(err).__name__}: {str(err).strip()[:160]})",
                  file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        write_record(args[0], rank, "error", err.code if isinstance(err, SystemExit) else traceback.format_exc())
        raise


if __name__ == "__main__":
    main()
    # Everything is on disk (checkpoint, summary, metrics, W&B run finished) and the process group is destroyed.
    # Skip interpreter finalisation: there, native threads of the collective libraries (gloo, NCCL) can still be
    # torn down in the wrong order and abort an otherwise finished rank ("terminate called without an active
    # exception": once in a CI run, twice in 22 two-node FSDP runs), failing a job whose work was all saved.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
