"""Train the tiny model's byte-level BPE tokenizer on the shipped sample and write ``models/tiny_llama/``.

The tokenizer is Llama-3-shaped: the Llama 3 pre-tokenizer regex, then byte-level BPE (every byte is in the
vocabulary, so any text encodes and decodes exactly), trained with the Hugging Face ``tokenizers`` library on
``data/text2sql_ko.json``, ``data/text2sql_ko_heldout.json`` and the schemas of ``scripts/make_text2sql.py``.
The sample alone supports only about 2,300 merges, so the corpus also lists the 2,350 Hangul syllables of
KS X 1001 (the common ones): the rest of the vocabulary goes to single-token syllables, which makes Korean text
outside the sample cost about one token per syllable instead of three bytes.

Ids: the BPE vocabulary takes ids ``0 .. BPE_VOCAB-1`` (bytes first); the special tokens follow in the order
of ``SPECIAL_TOKENS``, as in Llama 3, whose specials also come after its BPE vocabulary. The total is 4096.
The post-processor adds no special token (``add_bos_token`` is false), so encoding never adds
``<|begin_of_text|>``: chat templates write it themselves.

Also writes ``config.json`` (a 4-layer ``LlamaConfig``; no weights ship, the launcher initialises them from a
seed) and ``README.md``. Every file is byte-identical on every run.

Usage::

    python scripts/build_tokenizer.py           # regenerate models/tiny_llama/ in place
    python scripts/build_tokenizer.py --check   # exit 1 if the committed files differ from a fresh build
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "models" / "tiny_llama"
DATA_FILES = [ROOT / "data" / "text2sql_ko.json", ROOT / "data" / "text2sql_ko_heldout.json"]

# Llama 3's split: contractions, letter runs with one leading non-letter, up to three digits, punctuation
# runs, newlines, other whitespace. Letter runs keep Korean words whole, so merges stay inside a word.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_TOKENS = [
    # Llama 3
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|finetune_right_pad_id|>", "<|eom_id|>", "<|python_tag|>",
    # ChatML (Qwen)
    "<|im_start|>", "<|im_end|>",
    # Gemma
    "<start_of_turn>", "<end_of_turn>",
    # Phi-3
    "<|user|>", "<|assistant|>", "<|system|>", "<|end|>",
    # Llama 2 / Mistral
    "<s>", "</s>", "<unk>",
]
VOCAB_SIZE = 4096  # BPE vocabulary + special tokens
BPE_VOCAB = VOCAB_SIZE - len(SPECIAL_TOKENS)
BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"
MODEL_MAX_LENGTH = 2048
ROPE_THETA = 500000.0
# Role names that chat templates write between header tokens, and the blank line after a Llama 3 header:
# they are not in the data, but listing them lets BPE learn them, so a template's fixed text costs a few
# tokens instead of one per letter.
TEMPLATE_WORDS = ["system", "user", "assistant", "model", "tool", "ipython"]
# The 2,350 precomposed syllables of KS X 1001 are exactly those that EUC-KR encodes in two bytes.
COMMON_SYLLABLES = [chr(c) for c in range(ord("가"), ord("힣") + 1) if len(chr(c).encode("euc_kr")) == 2]
EXTRA_REPEATS = 2  # the extra lists are seen twice: BpeTrainer's min_frequency=2 ignores anything rarer

README = f"""\
# tiny_llama

A 4-layer Llama (hidden size 256, vocabulary {VOCAB_SIZE}) for tests and the quickstart: `config.json` and a
byte-level BPE tokenizer trained on the shipped Korean text-to-SQL sample (`data/`). No weights ship: the
launcher initialises them from `model.init_seed`. Regenerate with `python scripts/build_tokenizer.py`
(after `python scripts/make_text2sql.py` if the data changed); `--check` verifies the committed files.
"""


def corpus() -> Iterator[str]:
    """Every text the tokenizer should compress well, in a fixed order."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_text2sql import SCHEMAS  # the schemas, whole, even where records show only some tables

    for schema in SCHEMAS.values():
        yield schema.ddl()
    for path in DATA_FILES:
        if not path.is_file():
            raise SystemExit(f"{path} is missing: run `python scripts/make_text2sql.py` first")
        for record in json.loads(path.read_text(encoding="utf-8")):
            for key in ("system", "instruction", "input", "output"):
                if record.get(key):
                    yield record[key]
            for user, assistant in record.get("history", []):
                yield user
                yield assistant
    for _ in range(EXTRA_REPEATS):
        # Each word is its own pre-token, without a leading space, as after a header token; "\n\n" is one.
        yield "\n\n".join(TEMPLATE_WORDS)
        yield "\n".join(COMMON_SYLLABLES)


def train_tokenizer() -> Tokenizer:
    """Byte-level BPE over the Llama 3 split, specials appended after the BPE vocabulary."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, min_frequency=2, show_progress=False, special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the data or not
    )
    tok.train_from_iterator(corpus(), trainer)
    if tok.get_vocab_size() != BPE_VOCAB:
        raise SystemExit(f"BPE stopped at {tok.get_vocab_size()} tokens, wanted {BPE_VOCAB}: the corpus has too "
                         f"few distinct merges; lower VOCAB_SIZE")
    # normalized=False: the text of a special token is matched as written, never lower-cased or split.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def llama_config(vocab_size: int, bos_id: int, eos_id: int, pad_id: int) -> LlamaConfig:
    """The tiny model: Llama 3's shape (GQA, rope_theta 500k, untied head) at a size that trains on a CPU."""
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MODEL_MAX_LENGTH,
        rope_theta=ROPE_THETA, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, dtype="float32",
        architectures=["LlamaForCausalLM"],
    )


def make_portable(out_dir: Path) -> None:
    """Let transformers 4.x (which LLaMA-Factory, vLLM and others still pin) read the folder the same way.

    transformers 5 names its own class ``TokenizersBackend`` in tokenizer_config.json, which 4.x lacks, no
    longer writes special_tokens_map.json, keeps rope_theta only under ``rope_parameters``, where 4.x does
    not look (it would silently use 10000), and writes ``dtype`` where 4.x before 4.56 reads ``torch_dtype``.
    5.x reads the portable forms just the same, without a warning.
    """
    def rewrite(name: str, **updates: object) -> None:
        path = out_dir / name
        data = json.loads(path.read_text(encoding="utf-8"))
        data.update(updates)
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    rewrite("tokenizer_config.json", tokenizer_class="PreTrainedTokenizerFast")
    rewrite("config.json", rope_theta=ROPE_THETA, torch_dtype="float32")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def build(out_dir: Path) -> PreTrainedTokenizerFast:
    """Write every file of ``models/tiny_llama`` into ``out_dir``; returns the tokenizer."""
    fast = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(), bos_token=BOS, eos_token=EOS, pad_token=PAD,
        model_max_length=MODEL_MAX_LENGTH, clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(out_dir)
    ids = {t: fast.convert_tokens_to_ids(t) for t in (BOS, EOS, PAD)}
    vocab_size = -(-len(fast) // 64) * 64  # embedding rows padded to a multiple of 64, as real models do
    llama_config(vocab_size, ids[BOS], ids[EOS], ids[PAD]).save_pretrained(out_dir)
    make_portable(out_dir)
    (out_dir / "README.md").write_text(README, encoding="utf-8")
    return fast


def llama3_lengths(tokenizer: PreTrainedTokenizerFast, path: Path) -> list[int]:
    """Tokens per record of ``path`` rendered in the Llama 3 chat format (the launcher's default template)."""
    def turn(role: str, content: str) -> str:
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>"

    texts = []
    for r in json.loads(path.read_text(encoding="utf-8")):
        pairs = [*r.get("history", []), [f"{r['instruction']}\n{r['input']}", r["output"]]]
        texts.append(BOS + (turn("system", r["system"]) if r.get("system") else "")
                     + "".join(turn("user", u) + turn("assistant", a) for u, a in pairs))
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="build into a temporary folder and exit 1 if models/tiny_llama differs")
    args = parser.parse_args(argv)
    if not args.check:
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        tokenizer = build(OUT_DIR)
        print(f"wrote {', '.join(sorted(p.name for p in OUT_DIR.iterdir()))} to {OUT_DIR}")
        lengths = llama3_lengths(tokenizer, DATA_FILES[0])
        print(f"{len(tokenizer)} tokens; {DATA_FILES[0].name} in the llama3 chat format: min {min(lengths)}, "
              f"mean {sum(lengths) / len(lengths):.1f}, max {max(lengths)} tokens per record")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        fresh = {p.name: p.read_bytes() for p in Path(tmp).iterdir()}
    stale = [name for name, data in sorted(fresh.items())
             if not (OUT_DIR / name).is_file() or (OUT_DIR / name).read_bytes() != data]
    if stale:
        print(f"out of date in {OUT_DIR}: {', '.join(stale)}; run `python scripts/build_tokenizer.py`",
              file=sys.stderr)
        return 1
    print(f"{OUT_DIR}: up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
