"""Chat templates: conversation messages -> token ids and labels.

A template is config (``conf/template/<name>.yaml``): slots of markup with a ``{{content}}`` hole. Two rules make
the encoding safe:

* Content is data, never markup. Control tokens are recognised only in the template's own slots; a record whose
  text contains ``<|eot_id|>`` or ``{{content}}`` is tokenised as that plain text.
* Every assistant reply is tokenised on its own, starting right after the generation header, so the prompt part
  is exactly what the model sees at inference (``add_generation_prompt=True``), and the trained labels cover the
  reply plus its end-of-turn marker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from launcher.config import TemplateConfig

IGNORE_INDEX = -100
PROMPT_ROLES = ("user", "observation")
REPLY_ROLES = ("assistant", "function_call")


class TemplateError(ValueError):
    """A conversation this template cannot render."""


@dataclass
class Encoded:
    """One conversation as training ids; ``labels`` is -100 where no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def num_supervised(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass
class _Turn:
    """Pieces of one unit of the encoding: (text, is_markup) pairs, tokenised together."""

    pieces: list[tuple[str, bool]] = field(default_factory=list)
    trained: bool = False

    def add(self, slot: str, content: str | None = None) -> None:
        if content is None:
            self.pieces.append((slot, True))
            return
        before, _, after = slot.partition("{{content}}")
        self.pieces += [(before, True), (content, False), (after, True)]


class Template:
    """Renders and encodes conversations for one chat format."""

    def __init__(self, cfg: TemplateConfig, tokenizer: Any):
        self.cfg = cfg
        self.tokenizer = tokenizer
        specials = {"{{bos}}": tokenizer.bos_token or "", "{{eos}}": tokenizer.eos_token or ""}
        self._slot = {
            name: _fill(getattr(cfg, name), specials)
            for name in ("prefix", "system", "user", "assistant", "observation", "function_call", "separator")
        }
        added = sorted(tokenizer.get_added_vocab(), key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, added)) + ")") if added else None
        self._added = set(added)

    # ---------------------------------------------------------------- rendering
    def _turns(self, messages: Sequence[dict[str, str]]) -> tuple[_Turn, list[tuple[_Turn, _Turn, _Turn]]]:
        """Split a conversation into a head (prefix + system) and (separator, prompt, reply) triples."""
        msgs = list(messages)
        system = self.cfg.default_system
        if msgs and msgs[0]["role"] == "system":
            system = msgs.pop(0)["content"]
        head = _Turn()
        head.add(self._slot["prefix"])
        if system and not self.cfg.system_in_user:
            head.add(self._slot["system"], system)
        if len(msgs) % 2 or not msgs:
            raise TemplateError("a conversation must alternate prompt and reply turns and end with a reply")
        pairs = []
        for i in range(0, len(msgs), 2):
            prompt, reply = msgs[i], msgs[i + 1]
            if prompt["role"] not in PROMPT_ROLES or reply["role"] not in REPLY_ROLES:
                raise TemplateError(
                    f"turn {i} is {prompt['role']!r} then {reply['role']!r}; expected user/observation then "
                    "assistant/function_call")
            sep, p, r = _Turn(), _Turn(), _Turn(trained=True)
            if i > 0:
                sep.add(self._slot["separator"])
            content = prompt["content"]
            if i == 0 and system and self.cfg.system_in_user:
                p.add(self._slot["system"], system)
            p.add(self._require(prompt["role"]), content)
            r.add(self._require(reply["role"]), reply["content"])
            pairs.append((sep, p, r))
        return head, pairs

    def _require(self, role: str) -> str:
        slot = self._slot["user" if role == "user" else "assistant" if role == "assistant" else role]
        if not slot:
            raise TemplateError(f"template {self.cfg.name!r} has no {role!r} slot, so it cannot render {role} "
                                f"turns; pick a template with tool support (e.g. llama3, qwen)")
        return slot

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The conversation as text (what the official Jinja chat template would print)."""
        msgs = list(messages)
        if add_generation_prompt:
            msgs = msgs + [{"role": "assistant", "content": ""}]
        head, pairs = self._turns(msgs)
        turns = [head] + [t for triple in pairs for t in triple]
        if add_generation_prompt:
            turns = turns[:-1]
        return "".join(text for turn in turns for text, _ in turn.pieces)

    # ---------------------------------------------------------------- encoding
    def _atoms(self, turn: _Turn) -> list[tuple[bool, str]]:
        """(is_special, text) atoms: control tokens from markup, and plain-text runs between them."""
        atoms: list[tuple[bool, str]] = []
        for text, markup in turn.pieces:
            parts = self._special_re.split(text) if (markup and self._special_re) else [text]
            for part in parts:
                if not part:
                    continue
                special = markup and part in self._added
                if not special and atoms and not atoms[-1][0]:
                    atoms[-1] = (False, atoms[-1][1] + part)  # one run: tokenised as HF would tokenise it
                else:
                    atoms.append((special, part))
        return atoms

    def encode_batch(
        self,
        conversations: Iterable[Sequence[dict[str, str]]],
        cutoff_len: int,
        train_on_prompt: bool = False,
        mask_history: bool = False,
    ) -> list[Encoded | None]:
        """Encode many conversations with one batched tokenizer call.

        Returns None for a conversation that cannot fit ``cutoff_len`` with at least one trained token.
        """
        structured = [self._turns(c) for c in conversations]
        atoms = [[self._atoms(t) for t in [head] + [x for triple in pairs for x in triple]]
                 for head, pairs in structured]
        runs = [text for conv in atoms for turn in conv for special, text in turn if not special]
        ids = self.tokenizer(runs, add_special_tokens=False, split_special_tokens=True)["input_ids"] if runs else []
        it = iter(ids)
        out: list[Encoded | None] = []
        for (head, pairs), conv in zip(structured, atoms):
            turn_ids = [
                [tid for special, text in turn
                 for tid in ([self.tokenizer.convert_tokens_to_ids(text)] if special else next(it))]
                for turn in conv
            ]
            out.append(_assemble(turn_ids, len(pairs), cutoff_len, train_on_prompt, mask_history))
        return out

    def encode(self, messages: Sequence[dict[str, str]], cutoff_len: int = 1 << 30, **kw: bool) -> Encoded | None:
        return self.encode_batch([messages], cutoff_len, **kw)[0]


def _fill(slot: str, specials: dict[str, str]) -> str:
    for k, v in specials.items():
        slot = slot.replace(k, v)
    return slot


def _assemble(turn_ids: list[list[int]], n_pairs: int, cutoff: int, train_on_prompt: bool,
              mask_history: bool) -> Encoded | None:
    """Concatenate head + (separator, prompt, reply) triples, dropping the earliest first when over ``cutoff``.

    The head (prefix and system prompt) is always kept; when the last pair alone is still too long, its reply is
    cut at the end, and the record is given up only if not one reply token would remain.
    """
    head = turn_ids[0]
    triples = [turn_ids[1 + 3 * i: 4 + 3 * i] for i in range(n_pairs)]
    first = 0
    total = len(head) + sum(len(p) + len(r) for _, p, r in triples) + sum(len(t[0]) for t in triples[1:])
    while total > cutoff and first < n_pairs - 1:
        first += 1  # drop the earliest pair; the new first pair loses its separator
        total -= sum(map(len, triples[first - 1])) + len(triples[first][0])
    input_ids, labels = list(head), [IGNORE_INDEX] * len(head) if not train_on_prompt else list(head)
    for i in range(first, n_pairs):
        sep, prompt, reply = triples[i]
        prompt = (sep if i > first else []) + prompt
        trained = not mask_history or i == n_pairs - 1
        input_ids += prompt + reply
        labels += (list(prompt) if train_on_prompt else [IGNORE_INDEX] * len(prompt))
        labels += list(reply) if trained or train_on_prompt else [IGNORE_INDEX] * len(reply)
    truncated = first > 0
    if len(input_ids) > cutoff:
        input_ids, labels, truncated = input_ids[:cutoff], labels[:cutoff], True
    if all(t == IGNORE_INDEX for t in labels):
        return None
    return Encoded(input_ids, labels, truncated)
