"""``python -m launcher.chat <model_dir> [--prompt "..."]``: talk to an exported model.

It formats the conversation with the folder's own ``chat_template`` (the training template, written by the
export) and generates until one of ``generation_config.json``'s ``eos_token_id`` — the template's stop words — so
what you see is what a serving stack that honours those two files would produce. With ``--prompt`` it answers
once and exits; without, it reads turns from stdin (an empty line or Ctrl-D quits, ``/reset`` clears history).
A PEFT adapter folder (``merge.lora=false``) is loaded on top of the base model it names.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class Reply:
    """One generated reply: the text without the stop word, the new token ids, and the stop word it ended at
    (None when it ran out of ``max_new_tokens`` first)."""

    text: str
    token_ids: list[int]
    stop_word: str | None


def stop_ids(model: Any) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]


def generate_reply(model: Any, tokenizer: Any, messages: list[dict[str, str]], max_new_tokens: int = 256,
                   sample: bool = False, streamer: Any = None) -> Reply:
    """Answer the last user turn of ``messages`` with the tokenizer's chat template; greedy unless ``sample``."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The template writes bos itself; letting the tokenizer add another would prompt differently from training.
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=sample, streamer=streamer,
                             **({} if sample else {"temperature": None, "top_p": None, "top_k": None}))
    new = out[0, ids.shape[1]:].tolist()
    stops = stop_ids(model)
    ended = bool(new) and new[-1] in stops
    body = new[:-1] if ended else new
    return Reply(tokenizer.decode(body, skip_special_tokens=True),
                 new, tokenizer.convert_ids_to_tokens(new[-1]) if ended else None)


def load(model_dir: str | Path, dtype: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) from an exported folder, merged weights or a PEFT adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder = Path(model_dir)
    if not folder.is_dir() or not ((folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()):
        raise SystemExit(f"error: {folder} is not an exported model folder (no config.json or adapter_config.json); "
                         f"pass the folder `python -m launcher.merge` printed.")
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    if (folder / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    model.generation_config = GenerationConfig.from_pretrained(folder)
    model.eval()
    if torch.cuda.is_available():
        model.to("cuda")
    return model, AutoTokenizer.from_pretrained(folder)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launcher.chat", description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", help="a folder written by `python -m launcher.merge`")
    ap.add_argument("--prompt", help="answer this once and exit (otherwise: interactive)")
    ap.add_argument("--system", help="a system message to start the conversation with")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--sample", action="store_true", help="sample with generation_config.json's settings "
                                                          "(default: greedy)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model, tok = load(args.model_dir, args.dtype)
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        reply = generate_reply(model, tok, history + [{"role": "user", "content": args.prompt}],
                               args.max_new_tokens, args.sample)
        print(reply.text)
        if reply.stop_word is None:
            print(f"[stopped after {args.max_new_tokens} new tokens without a stop word]", file=sys.stderr)
        return 0
    from transformers import TextStreamer

    print(f"chatting with {args.model_dir} (empty line or Ctrl-D quits, /reset clears the history)",
          file=sys.stderr)
    start = list(history)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        if not line.strip():
            return 0
        if line.strip() == "/reset":
            history = list(start)
            continue
        history.append({"role": "user", "content": line})
        reply = generate_reply(model, tok, history, args.max_new_tokens, args.sample,
                               streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True))
        history.append({"role": "assistant", "content": reply.text})


if __name__ == "__main__":
    sys.exit(main())
