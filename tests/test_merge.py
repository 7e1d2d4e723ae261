"""The merge step: checkpoints of every backend -> verified Hugging Face folders; broken checkpoints -> clear errors.

Runs are trained for 2 steps through the real launcher (module fixtures, shared by the tests below); every merge
runs the real `python -m launcher.merge` CLI, whose verification reloads the folder in a fresh process. The
checks here add references independent of the export's own code: DeepSpeed's `zero_to_fp32` consolidation and
PEFT's `merge_and_unload`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launcher.integrity import write_manifest
from launcher.preflight import free_port
from tests.conftest import ROOT, run_launcher

PY = sys.executable
PROBE_IDS = [[0, 2, 5, 17, 300, 301, 4, 2, 99, 3], [0, 7, 8, 9, 1000, 2000, 3000, 4]]


def train(out: Path, *overrides: str) -> Path:
    port = free_port()
    # planner.force: these runs test the export; the tiny model fits even when a shared machine looks full.
    r = run_launcher(*overrides, "train.max_steps=2", "train.grad_accum=1", f"launcher.master_port={port}",
                     f"output_dir={out}", "planner.force=true", timeout=900, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (summary,) = out.rglob("summary.json")
    (summary.parent / "launcher-output.txt").write_text(r.stdout + r.stderr)
    return summary.parent


def merge(target: Path | str, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([PY, "-m", "launcher.merge", str(target), *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def merged_ok(r: subprocess.CompletedProcess, folder: Path) -> dict:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    manifest = json.loads((folder / "manifest.json").read_text())
    for name, entry in manifest["files"].items():  # the manifest describes exactly the folder's files
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == entry["sha256"], name
    assert set(manifest["files"]) | {"manifest.json"} == {str(p.relative_to(folder)) for p in folder.rglob("*")
                                                          if p.is_file()}
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    return manifest


@pytest.fixture(scope="module")
def zero3_full(tmp_path_factory) -> Path:
    """The default job (2 ZeRO-3 workers), 2 steps: it ends by merging and answering a held-out question."""
    return train(tmp_path_factory.mktemp("z3full"), "backend=deepspeed_zero3", "launcher.nproc_per_node=2",
                 "merge.after_train=true")


@pytest.fixture(scope="module")
def zero3_lora(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("z3lora"), "backend=deepspeed_zero3", "launcher.nproc_per_node=2",
                 "finetune=lora", "optimizer.lr=1e-2")


@pytest.fixture(scope="module")
def zero2_lora(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("z2lora"), "backend=deepspeed_zero2", "launcher.nproc_per_node=2",
                 "finetune=lora", "optimizer.lr=1e-2")


@pytest.fixture(scope="module")
def single_full(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """backend=single, with the default `merge.after_train=true`: training ends by merging and answering."""
    out = tmp_path_factory.mktemp("single")
    r = run_launcher("backend=single", "train.max_steps=2", "train.grad_accum=1", "merge.after_train=true",
                     "planner.force=true", f"output_dir={out}",
                     timeout=900, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (summary,) = out.rglob("summary.json")
    return summary.parent, r


def deepspeed_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's own (eager) consolidation: the reference for the lazy reader."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


def fresh_process_logits(folder: Path, dtype: str = "float32") -> list[torch.Tensor]:
    """Load the folder with plain transformers in a new interpreter (nothing of launcher imported)."""
    out = folder.parent / f"logits-{folder.name}.pt"
    code = ("import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.{dtype}).eval()\n"
            f"with torch.no_grad():\n"
            f"    torch.save([m(input_ids=torch.tensor([ids])).logits[0].float() for ids in {PROBE_IDS}], sys.argv[2])\n")
    r = subprocess.run([PY, "-c", code, str(folder), str(out)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out)


def reference_logits(run_dir: Path, state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Logits of the training-time module (as the worker built it) with ``state`` loaded."""
    from launcher.config import load_run_config
    from launcher.model import apply_finetune, load_model

    cfg = load_run_config(run_dir)
    model = apply_finetune(load_model(cfg.model), cfg.finetune)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0].float() for ids in PROBE_IDS]


# ------------------------------------------------------------------------------------------ round trips
@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_full_round_trip(zero3_full: Path) -> None:
    output = (zero3_full / "launcher-output.txt").read_text()
    assert "held-out question (text2sql_ko_heldout):" in output and "answer of the trained model:" in output
    folder = zero3_full / "merged" / "step-2"
    m = merged_ok(subprocess.CompletedProcess([], 0, "", output), folder)
    assert m["source"]["step"] == 2 and "ZeRO-3" in m["source"]["layout"]
    assert m["config_sha256"] == hashlib.sha256((zero3_full / "config.yaml").read_bytes()).hexdigest()
    assert m["dtype"] == "float32" and m["verification"]["max_logit_diff"] <= 1e-5
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    # The export reproduces DeepSpeed's own consolidation, loaded by transformers in a fresh process.
    ref = reference_logits(zero3_full, deepspeed_state(zero3_full / "checkpoints" / "step-2"))
    for got, want in zip(fresh_process_logits(folder), ref):
        assert (got - want).abs().max() <= 1e-5
    # Tokenizer: the training template as chat_template; generation stops at <|eot_id|>.
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(folder)
    msgs = [{"role": "user", "content": "안녕"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n안녕<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert eot in GenerationConfig.from_pretrained(folder).eos_token_id
    assert tok.eos_token == "<|eot_id|>"  # llama3's replace_eos


@pytest.mark.slow
@pytest.mark.distributed
def test_zero_reader_equals_deepspeed_consolidation(zero3_full: Path, zero3_lora: Path, zero2_lora: Path) -> None:
    """The lazy reader yields exactly DeepSpeed's tensors, ZeRO-2 and 3, trained and frozen (LoRA base) alike."""
    from launcher.backends.deepspeed import ZeroReader

    for run in (zero3_full, zero3_lora, zero2_lora):
        ckpt = run / "checkpoints" / "step-2"
        want = deepspeed_state(ckpt)
        reader = ZeroReader(ckpt)
        assert set(reader.shapes()) == set(want)
        for name, t in want.items():
            assert torch.equal(reader.get(name), t), name


def assert_peft_merge(run: Path, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """PEFT's own merge_and_unload of the training-time module gives the exported weights."""
    from safetensors.torch import load_file

    from launcher.config import load_run_config
    from launcher.model import apply_finetune, load_model

    cfg = load_run_config(run)
    model = apply_finetune(load_model(cfg.model), cfg.finetune)
    state = deepspeed_state(run / "checkpoints" / "step-2") if state is None else state
    loaded = model.load_state_dict(state, strict=False)
    assert not loaded.unexpected_keys
    assert not [k for k in loaded.missing_keys if "lora_" in k]  # only the frozen base may come from the model
    want = model.merge_and_unload().state_dict()
    got = load_file(folder / "model.safetensors")
    assert set(got) == set(want)
    assert max(float((got[k] - want[k]).abs().max()) for k in got) <= 1e-6


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_lora_merged_equals_peft_merge(zero3_lora: Path) -> None:
    folder = zero3_lora / "merged" / "step-2"
    m = merged_ok(merge(zero3_lora), folder)
    assert m["lora"] == "merged" and m["verification"]["max_logit_diff"] <= 1e-5
    assert_peft_merge(zero3_lora, folder)
    lora_b = [v for k, v in deepspeed_state(zero3_lora / "checkpoints" / "step-2").items() if "lora_B" in k]
    assert any(float(v.detach().abs().max()) > 0 for v in lora_b), "the adapters trained, so the merge is not a no-op"


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_lora_adapter_only_in_bfloat16(zero3_lora: Path) -> None:
    folder = zero3_lora / "adapter" / "step-2"
    m = merged_ok(merge(zero3_lora, "merge.lora=false", "dtype=bfloat16"), folder)
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    assert not (folder / "model.safetensors").exists()
    assert m["lora"] == "adapter" and m["dtype"] == "bfloat16"
    v = m["verification"]
    assert 0 < v["max_logit_diff"] <= v["tolerance"]  # reported, not hidden: bfloat16 rounds
    from safetensors.torch import load_file

    tensors = load_file(folder / "adapter_model.safetensors")
    assert tensors and all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert all("lora_" in k for k in tensors)


@pytest.mark.slow
def test_training_ends_by_merging_and_answering(single_full) -> None:
    """The default job's ending: a merged, verified folder and one answer to a held-out question."""
    run, r = single_full
    assert "held-out question (text2sql_ko_heldout):" in r.stdout and "answer of the trained model:" in r.stdout
    question = json.loads((ROOT / "data" / "text2sql_ko_heldout.json").read_text())[0]["instruction"]
    assert question.splitlines()[0] in r.stdout
    m = merged_ok(r, run / "merged" / "step-2")
    assert m["source"]["layout"].startswith("single") and m["verification"]["max_logit_diff"] <= 1e-5


@pytest.mark.slow
def test_single_process_full_sharded(single_full, tmp_path: Path) -> None:
    run, _ = single_full
    folder = tmp_path / "sharded"
    m = merged_ok(merge(run, "max_shard_size=1MB", f"output_dir={folder}"), folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((folder / s).is_file() for s in shards)
    assert not (folder / "model.safetensors").exists()
    assert m["verification"]["max_logit_diff"] <= 1e-5
    state = torch.load(run / "checkpoints" / "step-2" / "state.pt", weights_only=True)["model"]
    for got, want in zip(fresh_process_logits(folder), reference_logits(run, state)):
        assert (got - want).abs().max() <= 1e-5


@pytest.mark.slow
def test_tied_embeddings_are_saved_once(tmp_path: Path) -> None:
    """A model with tie_word_embeddings (Qwen2.5-0.5B, Gemma): lm_head is not written, from_pretrained re-ties."""
    model = tmp_path / "tied"
    shutil.copytree(ROOT / "models" / "tiny_llama", model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    r = run_launcher("backend=single", "train.max_steps=1", f"model.name_or_path={model}", "merge.after_train=true",
                     "merge.ask=", "planner.force=true",
                     f"output_dir={tmp_path / 'out'}", timeout=900, env={"OMP_NUM_THREADS": "1"})
    (summary,) = (tmp_path / "out").rglob("summary.json")
    folder = summary.parent / "merged" / "step-1"
    m = merged_ok(r, folder)
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        sizes = {n: math.prod(f.get_slice(n).get_shape()) for n in f.keys()}
    assert "lm_head.weight" not in sizes and "model.embed_tokens.weight" in sizes
    assert m["parameters"] == m["verification"]["parameters"] == sum(sizes.values())
    assert m["verification"]["max_logit_diff"] <= 1e-5


@pytest.mark.slow
@pytest.mark.distributed
def test_lora_checkpoint_without_the_frozen_base(zero3_lora: Path, tmp_path: Path) -> None:
    """Checkpoints saved with exclude_frozen_parameters hold only the adapters: the base comes from the model."""
    run, ckpt = _copy_run(zero3_lora, tmp_path / "run")
    for f in ckpt.glob("*_model_states.pt"):
        state = torch.load(f, weights_only=False)
        state["frozen_param_shapes"], state["frozen_param_fragments"] = {}, {}
        torch.save(state, f)
    write_manifest(ckpt)  # (a checkpoint written that way would have this manifest)
    m = merged_ok(merge(run), run / "merged" / "step-2")
    assert "base weights of" in m["source"]["layout"] and m["verification"]["max_logit_diff"] <= 1e-5
    assert_peft_merge(run, run / "merged" / "step-2")


needs_fsdp = pytest.mark.skipif(not (ROOT / "conf" / "backend" / "fsdp.yaml").is_file(),
                                reason="the FSDP2 backend (issue 5) is not in this tree yet")


def dcp_state(ckpt: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """torch's own DCP -> torch.save conversion: the reference for the FSDP2 reader."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(ckpt / "model"), str(tmp / "consolidated.pt"))
    return torch.load(tmp / "consolidated.pt", weights_only=True)


@pytest.fixture(scope="module")
def fsdp_full(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("fsdpfull"), "backend=fsdp", "launcher.nproc_per_node=2")


@pytest.fixture(scope="module")
def fsdp_lora(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("fsdplora"), "backend=fsdp", "launcher.nproc_per_node=2", "finetune=lora",
                 "optimizer.lr=1e-2")


@needs_fsdp
@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_full_round_trip(fsdp_full: Path, tmp_path: Path) -> None:
    folder = fsdp_full / "merged" / "step-2"
    m = merged_ok(merge(fsdp_full), folder)
    assert "FSDP2" in m["source"]["layout"] and m["verification"]["max_logit_diff"] <= 1e-5
    state = dcp_state(fsdp_full / "checkpoints" / "step-2", tmp_path)
    for got, want in zip(fresh_process_logits(folder), reference_logits(fsdp_full, state)):
        assert (got - want).abs().max() <= 1e-5


@needs_fsdp
@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_lora_round_trip(fsdp_lora: Path, tmp_path: Path) -> None:
    folder = fsdp_lora / "merged" / "step-2"
    m = merged_ok(merge(fsdp_lora), folder)
    assert m["lora"] == "merged" and m["verification"]["max_logit_diff"] <= 1e-5
    assert_peft_merge(fsdp_lora, folder, dcp_state(fsdp_lora / "checkpoints" / "step-2", tmp_path))


# ------------------------------------------------------------------------------------------ failures
def _copy_run(run: Path, dest: Path) -> tuple[Path, Path]:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("merged", "adapter"))
    return dest, dest / "checkpoints" / "step-2"


def _break_truncate(ckpt: Path) -> None:
    f = ckpt / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _break_config(run: Path) -> None:
    p = run / "config.yaml"
    p.write_text(p.read_text().replace("method: full", "method: lora"))


BREAKAGES = {
    # name: (how to break the copy, words the one-paragraph error must contain)
    "incomplete": (lambda run, ckpt: (ckpt / "COMPLETE").unlink(), ["step-2", "COMPLETE"]),
    # (the manifest check names these; tests/test_checkpoint_safety.py has damage in the middle of a file)
    "missing_rank": (lambda run, ckpt: (ckpt / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink(),
                     ["zero_pp_rank_1_mp_rank_00_optim_states.pt is missing"]),
    "truncated": (lambda run, ckpt: _break_truncate(ckpt), ["zero_pp_rank_1_mp_rank_00_optim_states.pt has",
                                                            "cut short"]),
    # A self-consistent checkpoint (manifest rewritten) without weights: the reader's own check names it.
    "no_weights": (lambda run, ckpt: ([f.unlink() for f in ckpt.glob("*_states.pt")], write_manifest(ckpt)),
                   ["holds no model weights"]),
    "config_edited": (lambda run, ckpt: _break_config(run), ["does not match", "tensor(s) missing"]),
    "no_checkpoint": (lambda run, ckpt: shutil.rmtree(run / "checkpoints"), ["no complete checkpoint"]),
}


def merge_in_process(capsys, target: Path, *overrides: str) -> tuple[int, str]:
    """The CLI's main() in this process (no interpreter start-up per case); (exit code, stderr)."""
    from launcher.merge import main

    rc = main([str(target), *overrides])
    return rc, capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_broken_checkpoints_give_one_clear_error(zero3_full: Path, tmp_path: Path, capsys, breakage: str) -> None:
    run, ckpt = _copy_run(zero3_full, tmp_path / "run")
    damage, words = BREAKAGES[breakage]
    damage(run, ckpt)
    rc, err = merge_in_process(capsys, ckpt if breakage in ("incomplete", "truncated") else run)
    assert rc == 2, err
    assert err.count("error:") == 1 and len(err.strip().splitlines()) == 1, err  # one paragraph
    for w in words:
        assert w in err, (w, err)
    assert not (run / "merged").exists()


@pytest.mark.slow
def test_non_finite_weights_are_refused(single_full, tmp_path: Path, capsys) -> None:
    run, ckpt = _copy_run(single_full[0], tmp_path / "run")
    state = torch.load(ckpt / "state.pt", weights_only=True)
    state["model"]["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    torch.save(state, ckpt / "state.pt")
    write_manifest(ckpt)  # a checkpoint saved with a NaN in it: intact, and still refused
    rc, err = merge_in_process(capsys, run)
    assert rc == 2 and "not finite" in err and "model.layers.1.mlp.up_proj.weight" in err, err
    assert not (run / "merged").exists()


@pytest.mark.slow
def test_failed_verification_leaves_no_folder(single_full, tmp_path: Path) -> None:
    """bfloat16 cannot meet an absurd tolerance: verification fails for real, and nothing looks complete."""
    run, _ = _copy_run(single_full[0], tmp_path / "run")
    r = merge(run, "dtype=bfloat16", "atol_low_precision=1e-12")
    assert r.returncode == 1 and "failed verification" in r.stderr and "logits differ" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (run / "merged").exists()


# ------------------------------------------------------------------------------------------ generation stop
def stop_machine(export: Path, dest: Path) -> tuple[list[int], int]:
    """A copy of an exported folder whose weights make greedy decoding follow a fixed chain of tokens.

    Attention and MLP outputs are zeroed, so the last hidden state is the current token's normalised embedding;
    the chain tokens' embeddings are orthogonal unit vectors and lm_head maps each to its successor:
    end of prompt -> A -> B -> <|eot_id|> -> C -> C ... A real model with a known answer, without training.
    """
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    shutil.copytree(export, dest)
    tok = AutoTokenizer.from_pretrained(dest)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    last = tok(prompt, add_special_tokens=False)["input_ids"][-1]
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    a, b, c = (tok(" SELECT", add_special_tokens=False)["input_ids"][-1], tok(" FROM", add_special_tokens=False)[
        "input_ids"][-1], tok(" WHERE", add_special_tokens=False)["input_ids"][-1])
    chain = [last, a, b, eot, c]
    assert len(set(chain)) == len(chain)
    w = load_file(dest / "model.safetensors")
    hidden = w["model.embed_tokens.weight"].shape[1]
    for k in w:
        if k.endswith(("o_proj.weight", "down_proj.weight")):
            w[k].zero_()
    w["model.norm.weight"].fill_(1.0)
    w["lm_head.weight"].zero_()
    for i, t in enumerate(chain):
        unit = torch.nn.functional.one_hot(torch.tensor(i), hidden).float()
        w["model.embed_tokens.weight"][t] = unit
        w["lm_head.weight"][chain[min(i + 1, len(chain) - 1)]] += 50 * unit
    save_file(w, dest / "model.safetensors", metadata={"format": "pt"})
    return [a, b, eot], c


@pytest.mark.slow
def test_generation_stops_at_the_stop_word(single_full, tmp_path: Path) -> None:
    from transformers import GenerationConfig

    from launcher.chat import generate_reply, load

    run, _ = single_full
    folder = tmp_path / "machine"
    (a, b, eot), c = stop_machine(run / "merged" / "step-2", folder)
    model, tok = load(folder)
    msgs = [{"role": "user", "content": "hi"}]
    reply = generate_reply(model, tok, msgs, max_new_tokens=10)
    assert reply.token_ids == [a, b, eot] and reply.stop_word == "<|eot_id|>"
    assert reply.text == tok.decode([a, b]) and "<|eot_id|>" not in reply.text
    # It is the exported generation_config that stops it: without the stop word's id decoding runs on.
    gen = GenerationConfig.from_pretrained(folder)
    gen.eos_token_id = [tok.convert_tokens_to_ids("<|end_of_text|>")]
    model.generation_config = gen
    reply = generate_reply(model, tok, msgs, max_new_tokens=10)
    assert reply.token_ids[:4] == [a, b, eot, c] and reply.stop_word is None and len(reply.token_ids) == 10
    # The CLI answers the same.
    r = subprocess.run([PY, "-m", "launcher.chat", str(folder), "--prompt", "hi", "--max-new-tokens", "10"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == tok.decode([a, b]).strip()


# ------------------------------------------------------------------------------------------ units
def test_overrides_are_checked() -> None:
    from launcher.config import ConfigError, MergeConfig
    from launcher.merge import apply_overrides

    m = apply_overrides(MergeConfig(), ["merge.dtype=bfloat16", "max_shard_size=2GB", "lora=false"])
    assert (m.dtype, m.max_shard_size, m.lora) == ("bfloat16", "2GB", False)
    for bad, words in [(["dtype=fp8"], "merge.dtype"), (["shard=1"], "shard"), (["max_shard_size=lots"], "size"),
                       (["dtype"], "key=value")]:
        with pytest.raises(ConfigError, match=words):
            apply_overrides(MergeConfig(), bad)


def test_take_spans_partitions() -> None:
    from launcher.backends.deepspeed import take

    parts = [torch.arange(0, 5), torch.arange(5, 7), torch.arange(7, 12)]
    assert take(parts, 3, 6).tolist() == [3, 4, 5, 6, 7, 8]
    assert take(parts, 5, 2).tolist() == [5, 6]
    with pytest.raises(IndexError):
        take(parts, 10, 5)


def test_dcp_reader_reads_a_sharded_save(tmp_path: Path) -> None:
    """The FSDP2 layout (step-N/model: DCP .metadata + .distcp) read tensor by tensor; damage is named."""
    import torch.distributed.checkpoint as dcp

    from launcher.backends.fsdp import DcpReader
    from launcher.checkpoint import CheckpointError

    torch.manual_seed(0)
    sd = {"model.embed_tokens.weight": torch.randn(64, 16), "lm_head.weight": torch.randn(64, 16),
          "model.norm.weight": torch.rand(16)}
    folder = tmp_path / "step-1" / "model"
    dcp.save(sd, checkpoint_id=str(folder), no_dist=True)
    reader = DcpReader(folder)
    assert reader.shapes() == {k: v.shape for k, v in sd.items()}
    reader.prefetch(["lm_head.weight", "model.norm.weight"])
    for k, v in sd.items():
        assert torch.equal(reader.get(k), v)
    (data,) = folder.glob("*.distcp")
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cut short"):
        DcpReader(folder)
    data.unlink()
    with pytest.raises(CheckpointError, match=data.name):
        DcpReader(folder)
