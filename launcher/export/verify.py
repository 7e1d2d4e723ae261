"""Verify an export in a fresh interpreter (``multiprocessing`` with the spawn context, so nothing of the
exporting process's state can mask a problem): it reloads the folder with ``from_pretrained`` and checks it against
the checkpoint: every tensor present, none empty or non-finite, the parameter count, logits on fixed probe
conversations against the training-time module (float32: ``merge.atol``), the chat template against the training
template (text and token ids), and a generated reply that must stop at the stop word when the model emits it.
"""

from __future__ import annotations

import gc
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterator

import torch
import transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from launcher.backends.base import Reader
from launcher.chat import generate_reply
from launcher.config import ConfigError, MergeConfig
from launcher.export.locate import Source, base_model_dir, check_complete, find_checkpoint, open_source, skeletons
from launcher.export.write import ExportPlan, stop_token_ids
from launcher.metrics.memory import MIB, lifetime_peak_rss
from launcher.model import load_tokenizer
from launcher.templates import IGNORE_INDEX, Template, TemplateError


# Fixed probe conversations for verification: the logits of the whole conversation are compared, the first
# prompt is answered by generation. Short, so verification costs little even for a large model.
PROBES: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "직원 테이블에서 나이가 40 이상인 사람 수는?\nCREATE TABLE emp(id INT, age INT);"},
     {"role": "assistant", "content": "SELECT COUNT(*) FROM emp WHERE age >= 40;"}],
    [{"role": "system", "content": "You are a careful assistant."},
     {"role": "user", "content": "Name one prime number."},
     {"role": "assistant", "content": "7"},
     {"role": "user", "content": "And another?"},
     {"role": "assistant", "content": "11"}],
]


class VerificationError(Exception):
    """The written folder does not reproduce the checkpoint."""


@contextmanager
def _child_env() -> Iterator[None]:
    """The environment the spawned interpreter starts with (it copies os.environ when it starts)."""
    wanted = {"TOKENIZERS_PARALLELISM": "false",
              "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, os.cpu_count() or 1)))}
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_verification(src: Source, mcfg: MergeConfig, folder: Path, plan: ExportPlan, log: Any = print) -> dict:
    """Run :func:`verify` on ``folder`` in a fresh interpreter (nothing of this one's state can mask a problem)."""
    t0 = time.time()
    try:
        with _child_env(), ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            result = pool.submit(verify, src.checkpoint, folder, plan.out_dtype, plan.adapter_only, plan.parameters,
                                 mcfg).result()
    except (VerificationError, ConfigError) as err:  # ConfigError: also CheckpointError
        raise VerificationError(f"the exported folder failed verification: {err}") from None
    except BrokenProcessPool:
        raise VerificationError("the exported folder failed verification: the verification process died (out of "
                                "memory, or killed)") from None
    result["seconds"] = round(time.time() - t0, 1)
    diff = result["max_logit_diff"]
    log(f"verified in a fresh process ({result['seconds']}s): {result['parameters']:,} parameters, max logit "
        f"difference {diff:.2e} vs the training-time weights (limit {result['tolerance']:.1e}), chat template "
        f"identical to training on {result['template_probes']} probes")
    return result


def _reference_logits(reader: Reader, trained: torch.nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Logits of the training-time module (float32, LoRA unmerged) rebuilt from the checkpoint."""
    source = check_complete(reader, trained, Path("checkpoint"))
    trained.load_state_dict({n: reader.get(s).float() for n, s in source.items()}, strict=True, assign=True)
    trained.eval()
    with torch.no_grad():
        return [trained(input_ids=ids[None]).logits[0].float() for ids in inputs]


def verify(checkpoint: Path, folder: Path, dtype: torch.dtype, adapter_only: bool, parameters: int,
           mcfg: MergeConfig) -> dict:
    """Check the export in ``folder`` against ``checkpoint`` (run by :func:`run_verification` in a fresh
    interpreter); raise VerificationError naming the first difference, return the measurements."""
    # Library notices would go straight to the user's console from this process; its result says what matters.
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.simplefilter("ignore")
    src = find_checkpoint(checkpoint)
    cfg = src.cfg

    # 1. The exported chat template formats prompts exactly as training did: text and token ids.
    tok = AutoTokenizer.from_pretrained(folder)
    template = Template(cfg.template, load_tokenizer(cfg.model))
    inputs, prompt_msgs, n = [], None, 0
    for msgs in PROBES:
        try:
            want = template.render(msgs)
            want_ids = template.encode(msgs)
        except TemplateError:
            continue  # e.g. a template without a system slot
        got = tok.apply_chat_template(msgs, tokenize=False)
        if got != want:
            raise VerificationError(f"the exported chat_template renders {got!r} where training rendered {want!r}")
        prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        if prompt != template.render(msgs[:-1], add_generation_prompt=True):
            raise VerificationError(f"the exported chat_template's generation prompt {prompt!r} differs from "
                                    f"training's {template.render(msgs[:-1], add_generation_prompt=True)!r}")
        ids = tok(got, add_special_tokens=False)["input_ids"]
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        if ids != want_ids.input_ids:
            raise VerificationError(f"the exported tokenizer turns the rendered probe into ids {ids} but training "
                                    f"encoded {want_ids.input_ids}")
        if ids[:len(p_ids)] != p_ids or want_ids.labels[len(p_ids)] == IGNORE_INDEX:
            raise VerificationError("the generation prompt is not exactly the untrained prefix of the training "
                                    "encoding, so the model would be prompted differently from how it was trained")
        inputs.append(torch.tensor(ids))
        prompt_msgs = prompt_msgs or msgs[:-1]
        n += 1
    if not n:
        raise VerificationError(f"template {cfg.template.name!r} cannot render any probe conversation")

    # 2. generation_config stops at every stop word.
    gen = GenerationConfig.from_pretrained(folder)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    stops = stop_token_ids(tok, list(cfg.template.stop_words), str(folder))
    if not set(stops) <= set(eos):
        raise VerificationError(f"generation_config.json eos_token_id={eos} lacks the stop words' ids {stops}")

    # 3. Reference: the training-time module from the checkpoint, in float32. Freed before the export is loaded.
    base_dir = base_model_dir(cfg)
    trained, _, _ = skeletons(cfg, base_dir)
    expected_params = sum(p.numel() for p in trained.parameters())  # on the skeleton: tied weights once
    reader = open_source(src, trained, base_dir)
    ref = _reference_logits(reader, trained, inputs)
    del reader, trained
    gc.collect()

    # 4. Load the export the way a user would.
    if adapter_only:
        base = AutoModelForCausalLM.from_pretrained(base_model_dir(cfg), dtype=dtype)
        model = PeftModel.from_pretrained(base, folder)
        info: dict[str, list] = {}
        expected = expected_params
    else:
        model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True)
        expected = parameters  # the plan's count, from the base model's skeleton
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise VerificationError(f"from_pretrained reported {problems}")
    for name, t in model.state_dict().items():
        if t.numel() == 0:
            raise VerificationError(f"{name} is empty after loading")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise VerificationError(f"{name} holds NaN or inf after loading")
    count = sum(p.numel() for p in model.parameters())
    if count != expected:
        raise VerificationError(f"the loaded model has {count:,} parameters, the checkpoint {expected:,}")
    model.eval()
    diff, top = 0.0, 0.0
    agree = total = 0
    with torch.no_grad():
        for ids, r in zip(inputs, ref):
            got = model(input_ids=ids[None]).logits[0].float()
            diff = max(diff, float((got - r).abs().max()))
            top = max(top, float(r.abs().max()))
            agree += int((got.argmax(-1) == r.argmax(-1)).sum())
            total += r.shape[0]
    tol = mcfg.atol if dtype == torch.float32 else mcfg.atol_low_precision * top
    if diff > tol:
        raise VerificationError(f"logits differ from the training-time weights by up to {diff:.3e} "
                                f"(allowed {tol:.1e} for {_name(dtype)}): the weights were not exported "
                                f"faithfully")

    # 5. A reply through the exported template and generation_config: it must end at the stop word if it has one.
    model.generation_config = gen
    reply = generate_reply(model, tok, prompt_msgs, max_new_tokens=mcfg.max_new_tokens)
    if any(t in eos for t in reply.token_ids[:-1]):
        raise VerificationError(f"generation continued past a stop token: {reply.token_ids}")
    return {"max_logit_diff": diff, "tolerance": tol, "reference_max_logit": top,
            "argmax_agreement": agree / max(total, 1), "parameters": count, "template_probes": n,
            "dtype": _name(dtype), "probe_prompt": prompt_msgs[-1]["content"],
            "reply": reply.text, "stopped_at": reply.stop_word, "new_tokens": len(reply.token_ids),
            "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> int:
    return int(lifetime_peak_rss() / MIB)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
