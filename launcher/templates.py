"""Chat templates: conversation messages -> text, token ids and labels.

A template is config (``conf/template/<name>.yaml``): slots of markup with holes such as ``{{content}}``. Rules that
make the encoding safe:

* Content is data, never markup. Control tokens are recognised only in the template's own slots; a record whose
  text contains ``<|eot_id|>`` or ``{{content}}`` is tokenised as that plain text.
* Every reply is tokenised on its own, starting right after the reply header that ends the prompt slot, so the
  prompt part is exactly what the model sees at inference (``add_generation_prompt=True``), and the trained labels
  cover the reply plus its end-of-turn marker.
* launcher/chat_jinja.py writes the same format as a Hugging Face ``chat_template``, so a model exported after
  training formats prompts exactly as training did (tests check it with ``tokenizer.apply_chat_template``).

Messages and tools are as launcher/messages.py describes them; this module renders and encodes them.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from launcher.config import TemplateConfig
from launcher.messages import Messages, arguments_text, parse_tool_calls

IGNORE_INDEX = -100
PROMPT_ROLES = ("user", "observation")
REPLY_ROLES = ("assistant", "function_call")
SYSTEM_POSITIONS = ("turn", "first_user", "last_user")
# Which holes each slot may contain; anything else in braces is literal markup.
_HOLES = {"prefix": (), "system": ("content",), "user": ("content",), "assistant": ("content",), "separator": (),
          "observation": ("content",), "function_call": ("content",), "tool_call": ("name", "arguments"),
          "tools": ("content", "tools"), "tool_item": ("tool",)}
HOLE_RE = re.compile(r"(\{\{(?:content|tools|tool|name|arguments)\}\})")


class TemplateError(ValueError):
    """A conversation (or template definition) this template cannot render."""


@dataclass
class Encoded:
    """One conversation as training ids; ``labels`` is -100 where no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def num_supervised(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


Piece = tuple[str, bool]  # (text, is_markup)


@dataclass
class _Turn:
    """Pieces of one unit of the encoding, tokenised together."""

    pieces: list[Piece] = field(default_factory=list)

    def text(self) -> str:
        return "".join(t for t, _ in self.pieces)


# ------------------------------------------------------------------------------------------------ template
class Template:
    """Renders and encodes conversations for one chat format."""

    def __init__(self, cfg: TemplateConfig, tokenizer: Any):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.bos = tokenizer.bos_token or ""
        self.eos = tokenizer.eos_token or ""
        specials = {"{{bos}}": self.bos, "{{eos}}": self.eos}
        self.slots: dict[str, str] = {}  # each slot's markup, bos/eos filled in (chat_jinja.py reads them too)
        for name, allowed in _HOLES.items():
            slot = getattr(cfg, name)
            for k, v in specials.items():
                slot = slot.replace(k, v)
            used = {h[2:-2] for h in HOLE_RE.findall(slot)}
            if used - set(allowed):
                raise TemplateError(f"template {cfg.name!r}: slot {name!r} may contain only "
                                    f"{', '.join('{{%s}}' % a for a in allowed) or 'no holes'}, "
                                    f"found {', '.join('{{%s}}' % u for u in sorted(used - set(allowed)))}.")
            self.slots[name] = slot
        if cfg.system_position not in SYSTEM_POSITIONS:
            raise TemplateError(f"template {cfg.name!r}: system_position={cfg.system_position!r} is not one of "
                                f"{', '.join(SYSTEM_POSITIONS)}.")
        if cfg.tools and cfg.system_position != "turn":
            raise TemplateError(f"template {cfg.name!r}: a tools slot needs system_position: turn (the tools are "
                                f"rendered in the system turn).")
        if bool(cfg.function_call) != bool(cfg.tool_call):
            raise TemplateError(f"template {cfg.name!r}: function_call and tool_call go together; set both or neither.")
        added = sorted(tokenizer.get_added_vocab(), key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, added)) + ")") if added else None
        self._added = set(added)
        # Slots split once into literal parts and hole names; markup split once into control tokens and text.
        self._parts = {name: [(p[2:-2], True) if HOLE_RE.fullmatch(p) else (p, False)
                              for p in HOLE_RE.split(slot) if p] for name, slot in self.slots.items()}
        self._markup_atoms: dict[str, list[tuple[bool, str]]] = {}

    # ---------------------------------------------------------------- slots
    def _fill(self, slot_name: str, **holes: str | list[Piece]) -> list[Piece]:
        """A slot as pieces: its literal text is markup, what fills a hole is data (unless given as pieces)."""
        pieces: list[Piece] = []
        for part, is_hole in self._parts[slot_name]:
            if not is_hole:
                pieces.append((part, True))
            else:
                value = holes[part]
                pieces += value if isinstance(value, list) else [(value, False)]
        return pieces

    def _require(self, slot_name: str, role: str) -> str:
        if not self.slots[slot_name]:
            raise TemplateError(f"template {self.cfg.name!r} has no {slot_name!r} slot, so it cannot render "
                                f"{role} turns; pick a template with tool support (e.g. llama3, qwen)")
        return slot_name

    def _tool_list(self, tools: list[dict[str, Any]]) -> list[Piece]:
        pieces: list[Piece] = []
        for tool in tools:
            pieces += self._fill("tool_item", tool=json.dumps(tool, ensure_ascii=False, indent=self.cfg.tool_indent))
        return pieces

    def _calls(self, content: str) -> list[Piece]:
        try:
            calls = parse_tool_calls(content)
        except ValueError as err:
            raise TemplateError(str(err)) from None
        pieces: list[Piece] = []
        for i, (name, arguments) in enumerate(calls):
            if i:
                pieces.append(("\n", True))
            pieces += self._fill("tool_call", name=name, arguments=arguments_text(arguments))
        return pieces

    # ---------------------------------------------------------------- rendering
    def _turns(self, messages: Messages, tools: Sequence[dict[str, Any]] | None = None,
               generation: bool = False) -> tuple[_Turn, list[tuple[_Turn, _Turn, _Turn]]]:
        """Split a conversation into a head (prefix + system) and (separator, prompt, reply) triples.

        With ``generation`` the conversation ends with a prompt and the last triple's reply is empty.
        """
        msgs = list(messages)
        system = self.cfg.default_system
        if msgs and msgs[0]["role"] == "system":
            system = msgs.pop(0)["content"]
        if generation:
            msgs.append({"role": "assistant", "content": ""})
        if not msgs or len(msgs) % 2:
            raise TemplateError("a conversation must alternate prompt and reply turns and end with a reply")
        for i in range(0, len(msgs), 2):
            prompt, reply = msgs[i]["role"], msgs[i + 1]["role"]
            if prompt not in PROMPT_ROLES or reply not in REPLY_ROLES:
                raise TemplateError(f"turn {i} is {prompt!r} then {reply!r}; expected user/observation then "
                                    f"assistant/function_call")
        position = self.cfg.system_position
        user_turns = [i for i in range(0, len(msgs), 2) if msgs[i]["role"] == "user"]
        system_at = None
        if system and position != "turn":
            if not user_turns:
                raise TemplateError("the system prompt goes into a user turn, and this conversation has none")
            system_at = user_turns[0] if position == "first_user" else user_turns[-1]

        head = _Turn(self._fill("prefix"))
        if tools:
            if not self.cfg.tools:
                raise TemplateError(f"template {self.cfg.name!r} has no 'tools' slot, so it cannot render a "
                                    f"conversation with tools; pick a template with tool support (e.g. llama3, qwen)")
            head.pieces += self._fill("tools", content=system or "", tools=self._tool_list(list(tools)))
        elif system and position == "turn":
            head.pieces += self._fill("system", content=system)

        triples = []
        for i in range(0, len(msgs), 2):
            prompt, reply = msgs[i], msgs[i + 1]
            sep = _Turn(self._fill("separator") if i else [])
            if prompt["role"] == "user":
                content: str | list[Piece] = prompt["content"]
                if i == system_at:
                    content = self._fill("system", content=system) + [(prompt["content"], False)]
                p = _Turn(self._fill("user", content=content))
            else:
                p = _Turn(self._fill(self._require("observation", "observation"), content=prompt["content"]))
            if generation and i == len(msgs) - 2:
                r = _Turn()
            elif reply["role"] == "assistant":
                r = _Turn(self._fill("assistant", content=reply["content"]))
            else:
                self._require("function_call", "function_call")
                r = _Turn(self._fill("function_call", content=self._calls(reply["content"])))
            triples.append((sep, p, r))
        if self.cfg.efficient_eos and not generation:
            triples[-1][2].pieces.append((self.eos, True))
        return head, triples

    def _layout(self, messages: Messages, tools: Sequence[dict[str, Any]] | None
                ) -> tuple[list[_Turn], int, list[int], list[int]]:
        """Turns for encoding: head, the (separator, prompt, reply) triples, then alternative first prompts.

        Returns (turns, number of pairs, pairs a truncated conversation may start at, pairs that have an
        alternative prompt). Truncation starts a conversation only at a user turn (never at a tool result whose
        call was cut away). With ``system_position: first_user`` the system prompt lives in the first user turn,
        so every later user turn also gets a version carrying it, used when truncation makes it the first.
        """
        head, triples = self._turns(messages, tools)
        msgs = [m for m in messages if m["role"] != "system"]
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else self.cfg.default_system
        starts = [k for k in range(len(triples)) if msgs[2 * k]["role"] == "user"]
        alts: list[int] = []
        extra: list[_Turn] = []
        if system and self.cfg.system_position == "first_user":
            for k in starts[1:]:
                content = self._fill("system", content=system) + [(msgs[2 * k]["content"], False)]
                alts.append(k)
                extra.append(_Turn(self._fill("user", content=content)))
        return [head, *(t for triple in triples for t in triple), *extra], len(triples), starts, alts

    def check(self, messages: Messages, tools: Sequence[dict[str, Any]] | None = None) -> None:
        """Raise TemplateError if this template cannot render the conversation (cheaper than rendering it):
        tool turns or tools without the template's tool slots, a misplaced system prompt, bad turn order."""
        roles = {m["role"] for m in messages}
        if tools and not self.cfg.tools:
            raise TemplateError(f"template {self.cfg.name!r} has no 'tools' slot, so it cannot render a "
                                f"conversation with tools; pick a template with tool support (e.g. llama3, qwen)")
        for role in ("observation", "function_call"):
            if role in roles:
                self._require(role, role)
        if self.cfg.system_position != "turn" and "user" not in roles and (
                "system" in roles or self.cfg.default_system):
            raise TemplateError("the system prompt goes into a user turn, and this conversation has none")
        body = [m["role"] for m in messages if m["role"] != "system"]
        if (any(m["role"] == "system" for m in messages[1:]) or not body or len(body) % 2
                or any(r not in (PROMPT_ROLES if i % 2 == 0 else REPLY_ROLES) for i, r in enumerate(body))):
            raise TemplateError("a conversation must alternate prompt and reply turns and end with a reply")
        for m in messages:
            if m["role"] == "function_call":
                self._calls(m["content"])

    def render(self, messages: Messages, add_generation_prompt: bool = False,
               tools: Sequence[dict[str, Any]] | None = None) -> str:
        """The conversation as text: what ``tokenizer.apply_chat_template(..., tokenize=False)`` prints with
        :func:`launcher.chat_jinja.to_jinja` as the chat template. With ``add_generation_prompt`` the conversation
        ends with a prompt turn and the text ends with the reply header."""
        head, triples = self._turns(messages, tools, generation=add_generation_prompt)
        return head.text() + "".join(t.text() for triple in triples for t in triple)

    # ---------------------------------------------------------------- encoding
    def _atoms(self, turn: _Turn) -> list[tuple[bool, str]]:
        """(is_special, text) atoms: control tokens from markup, and plain-text runs between them."""
        atoms: list[tuple[bool, str]] = []
        run: list[str] = []  # text since the last control token: one run, tokenised as HF would tokenise it
        for text, markup in turn.pieces:
            if not markup:
                run.append(text)
                continue
            parts = self._markup_atoms.get(text)
            if parts is None:
                split = self._special_re.split(text) if self._special_re else [text]
                parts = self._markup_atoms[text] = [(p in self._added, p) for p in split if p]
            for special, part in parts:
                if special:
                    if run:
                        atoms.append((False, "".join(run)))
                        run = []
                    atoms.append((True, part))
                else:
                    run.append(part)
        if run:
            text = "".join(run)
            if text:
                atoms.append((False, text))
        return atoms

    def encode_batch(
        self,
        conversations: Iterable[Messages],
        cutoff_len: int,
        train_on_prompt: bool = False,
        mask_history: bool = False,
        tools: Sequence[Sequence[dict[str, Any]] | None] | None = None,
    ) -> list[Encoded | None]:
        """Encode many conversations with one batched tokenizer call.

        ``tools`` (one list per conversation, or None) are rendered into the system turn. Returns None for a
        conversation that cannot fit ``cutoff_len`` with at least one trained token.
        """
        conversations = list(conversations)
        tools = tools if tools is not None else [None] * len(conversations)
        layouts = [self._layout(c, t) for c, t in zip(conversations, tools)]
        atoms = [[self._atoms(t) for t in turns] for turns, _, _, _ in layouts]
        runs = [text for conv in atoms for turn in conv for special, text in turn if not special]
        it = iter(self._tokenize_text(runs))
        special_id = self._special_ids
        out: list[Encoded | None] = []
        for (_, n_pairs, starts, alts), conv in zip(layouts, atoms):
            turn_ids = [
                [tid for special, text in turn for tid in ([special_id[text]] if special else next(it))]
                for turn in conv
            ]
            out.append(_assemble(turn_ids, n_pairs, starts, alts, cutoff_len, train_on_prompt, mask_history))
        return out

    @functools.cached_property
    def _special_ids(self) -> dict[str, int]:
        return {tok: self.tokenizer.convert_tokens_to_ids(tok) for tok in self._added}

    def _tokenize_text(self, texts: list[str]) -> list[list[int]]:
        """Token ids of plain-text runs, control-token look-alikes included as text (never as control tokens)."""
        if not texts:
            return []
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:  # a slow (Python) tokenizer
            return self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        # The Rust tokenizer directly: the transformers wrapper's per-text conversion costs as much as the
        # tokenisation itself. encode_special_tokens=True is what split_special_tokens=True sets.
        previous = backend.encode_special_tokens
        backend.encode_special_tokens = True
        try:
            encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
            return [e.ids for e in encode(texts, add_special_tokens=False)]
        finally:
            backend.encode_special_tokens = previous

    def encode(self, messages: Messages, cutoff_len: int = 1 << 30, tools: Sequence[dict[str, Any]] | None = None,
               **kw: bool) -> Encoded | None:
        return self.encode_batch([messages], cutoff_len, tools=[tools], **kw)[0]



def _assemble(turn_ids: list[list[int]], n_pairs: int, starts: list[int], alts: list[int], cutoff: int,
              train_on_prompt: bool, mask_history: bool) -> Encoded | None:
    """Concatenate head + (separator, prompt, reply) triples, dropping the earliest pairs first when over
    ``cutoff``.

    ``turn_ids`` holds the head, the triples, then the alternative prompts of the pairs in ``alts`` (used when that
    pair becomes the first). A truncated conversation starts at one of ``starts`` (a user turn). The head (prefix
    and system prompt) is always kept; when the last start alone is still too long, the end is cut off, and the
    record is given up only if not one reply token would remain.
    """
    head = turn_ids[0]
    triples = [turn_ids[1 + 3 * i: 4 + 3 * i] for i in range(n_pairs)]
    alt = dict(zip(alts, turn_ids[1 + 3 * n_pairs:]))

    def prompt(i: int, first: int) -> list[int]:
        return alt.get(i, triples[i][1]) if i == first else triples[i][1]

    def length(first: int) -> int:
        return len(head) + sum(len(prompt(i, first)) + len(triples[i][2]) + (len(triples[i][0]) if i > first else 0)
                               for i in range(first, n_pairs))

    candidates = [0] + [k for k in starts if k > 0]
    first = next((k for k in candidates if length(k) <= cutoff), candidates[-1])
    input_ids, labels = list(head), [IGNORE_INDEX] * len(head) if not train_on_prompt else list(head)
    for i in range(first, n_pairs):
        sep, _, reply = triples[i]
        p = (sep if i > first else []) + prompt(i, first)
        trained = not mask_history or i == n_pairs - 1
        input_ids += p + reply
        labels += (list(p) if train_on_prompt else [IGNORE_INDEX] * len(p))
        labels += list(reply) if trained or train_on_prompt else [IGNORE_INDEX] * len(reply)
    truncated = first > 0
    if len(input_ids) > cutoff:
        input_ids, labels, truncated = input_ids[:cutoff], labels[:cutoff], True
    if all(t == IGNORE_INDEX for t in labels):
        return None
    return Encoded(input_ids, labels, truncated)
