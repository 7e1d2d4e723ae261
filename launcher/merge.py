"""``python -m launcher.merge <run_dir or checkpoint> [key=value ...]``: export a checkpoint as a verified Hugging
Face model folder.

The keys are those of the ``merge`` config section (the run's ``config.yaml`` gives the defaults), written Hydra
style with or without the ``merge.`` prefix::

    python -m launcher.merge outputs/tiny_llama-full/2026-11-23_12-00-00
    python -m launcher.merge outputs/.../checkpoints/step-200 dtype=bfloat16 max_shard_size=2GB
    python -m launcher.merge outputs/tiny_llama-lora/... merge.lora=false     # the PEFT adapter alone

Exit codes: 0 written and verified; 2 a problem with the input (checkpoint, config, overrides), nothing written;
1 the written folder failed verification (it is removed).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from launcher.config import ConfigError, MergeConfig, resolve_path
from launcher.validate import validate_merge


def say(msg: str) -> None:
    print(f"[merge] {msg}", file=sys.stderr, flush=True)


def apply_overrides(base: MergeConfig, overrides: list[str]) -> MergeConfig:
    """``key=value`` (or ``merge.key=value``) on top of ``base``, typed and checked by the MergeConfig schema."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"{' '.join(bad)}: overrides are key=value, e.g. dtype=bfloat16 "
                          f"(keys: {', '.join(MergeConfig.__dataclass_fields__)}).")
    dotlist = [o.removeprefix("+").removeprefix("merge.") for o in overrides]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(base), OmegaConf.from_dotlist(dotlist))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{str(err).splitlines()[0]} (merge keys: "
                          f"{', '.join(MergeConfig.__dataclass_fields__)}).") from None
    assert isinstance(cfg, MergeConfig)
    problems = validate_merge(cfg)
    if problems:
        raise ConfigError("Invalid merge settings:\n  - " + "\n  - ".join(problems))
    return cfg


def first_question(ask: str, data_dir: str) -> list[dict[str, str]] | None:
    """The prompt turns of the first record named by ``merge.ask``: an entry of ``<data_dir>/dataset_info.json``
    (its columns and format apply) or a JSON file (alpaca, sharegpt or OpenAI messages). None if it names
    neither."""
    from launcher.formats import to_messages
    from launcher.registry import DatasetEntry, load_registry, read_records

    file = resolve_path(ask)
    if file.is_file():
        entry = None
    else:
        info = resolve_path(data_dir) / "dataset_info.json"
        if not info.is_file() or ask not in json.loads(info.read_text()):
            return None
        (entry,) = load_registry(resolve_path(data_dir), [ask])
        file = entry.files[0]
    for where, record in read_records(file):
        if entry is None:
            sharegpt = isinstance(record, dict) and ("messages" in record or "conversations" in record)
            entry = DatasetEntry(name=file.stem, files=[file], formatting="sharegpt" if sharegpt else "alpaca")
        msgs, _tools = to_messages(record, entry, f"{where} (merge.ask)")
        return msgs[:-1] if msgs[-1]["role"] in ("assistant", "function_call") else msgs
    raise ConfigError(f"{file} (merge.ask) holds no record to ask.")


def run(path: str, overrides: list[str], ask: bool = False) -> int:
    """Export (and verify) the checkpoint at ``path``; with ``ask``, answer merge.ask's first question."""
    from launcher.checkpoint import CheckpointError
    from launcher.registry import DataError
    from launcher.export import VerificationError, export, find_checkpoint
    from launcher.integrity import check

    try:
        src = find_checkpoint(path)
        check(src.checkpoint)  # files against the manifest, pickles weights-only: before any library reads one
        mcfg = apply_overrides(src.cfg.merge, overrides)
        result = export(src.checkpoint, mcfg, log=say)
    except (CheckpointError, ConfigError, DataError) as err:
        say(f"error: {err}")
        return 2
    except VerificationError as err:
        say(f"error: {err}. Nothing was left at the output path.")
        return 1
    m = result.manifest
    v = m.get("verification") or {}
    say(f"model folder: {result.out_dir}")
    if v:
        text = v["reply"] if len(v["reply"]) <= 200 else v["reply"][:200] + "…"
        say(f"probe reply: {text!r}" + (f" (stopped at {v['stopped_at']})" if v["stopped_at"] else
                                               f" (no stop word within {v['new_tokens']} tokens)"))
    else:
        say("not verified (merge.verify=false)")
    say(f"chat with it: python -m launcher.chat {result.out_dir}")
    if ask and mcfg.ask:
        return answer(result.out_dir, mcfg, src.cfg.dataset.dir)
    return 0


def answer(folder: Path, mcfg: MergeConfig, data_dir: str) -> int:
    """Print the exported model's answer to the first held-out question of ``merge.ask``."""
    from launcher.chat import generate_reply, load
    from launcher.registry import DataError

    try:
        messages = first_question(mcfg.ask, data_dir)
    except (DataError, ConfigError) as err:
        say(f"cannot ask the held-out question: {err}")
        return 0  # the model is merged and verified; the demo question is a courtesy
    if messages is None:
        say(f"merge.ask={mcfg.ask!r} is neither a file nor an entry of {data_dir}/dataset_info.json; "
            f"set merge.ask=<entry or file> to see an answer of the trained model")
        return 0
    model, tok = load(folder)
    reply = generate_reply(model, tok, messages, max_new_tokens=mcfg.max_new_tokens)
    question = "\n    ".join(messages[-1]["content"].splitlines())
    print(f"\nheld-out question ({mcfg.ask}):\n    {question}\nanswer of the trained model:\n    "
          + "\n    ".join(reply.text.splitlines() or [""]), flush=True)
    if reply.stop_word is None:
        say(f"(the reply did not reach a stop word within {mcfg.max_new_tokens} tokens)")
    return 0


def after_train(run_dir: Path) -> int:
    """The end of `python -m launcher`: merge the last checkpoint and answer one held-out question."""
    say("merging the last checkpoint (merge.after_train=false skips this)")
    rc = run(str(run_dir), [], ask=True)
    if rc != 0:
        say(f"training itself finished and its checkpoints are kept; merge again with "
            f"`python -m launcher.merge {run_dir}` once the problem above is fixed")
    return rc


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if not args or ("=" in args[0] and not Path(args[0]).exists()):  # no path, or overrides only
        say("usage: python -m launcher.merge <run_dir or checkpoint> [key=value ...]  (--help for more)")
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet()
    return run(args[0], args[1:], ask=False)


def _quiet() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
