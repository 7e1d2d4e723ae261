"""``dataset.overlong=cut_prompt``: keep every reply whole and shorten the prompt until the record fits.

Retrieval-augmented records are long because of their prompt (a question plus many retrieved documents), while
the reply is short. ``truncate`` drops whole earlier turns or cuts the reply's end, ``drop`` loses the record;
this mode instead cuts user-message *text*: the longest user message loses text from its end (for the shipped
RAG data: the last documents; the question comes first), and if that message is emptied and the record still
does not fit, the other user messages are cut the same way, the earliest first. System prompt, markup, tool
results and every reply stay whole. A record whose replies and markup alone exceed ``cutoff_len`` is dropped
(and counted as dropped for length).

Text is cut at token boundaries of the message's own tokenisation and decoded back, then the conversation is
encoded again with the template, so the result is exactly what the template renders for the shortened text.
"""

from __future__ import annotations

from typing import Any, Sequence

from launcher.templates import Encoded, Messages, Template

NO_LIMIT = 1 << 30


def encode_cut_prompt(template: Template, conversations: Sequence[Messages], cutoff_len: int,
                      tools: Sequence[Sequence[dict[str, Any]] | None], **kw: bool) -> list[Encoded | None]:
    """Like :meth:`Template.encode_batch`, but an over-long record has its prompt cut (module docstring); such a
    record comes back with ``truncated=True``, one that cannot fit as None."""
    whole = template.encode_batch(conversations, NO_LIMIT, tools=tools, **kw)
    return [enc if enc is None or len(enc.input_ids) <= cutoff_len
            else _cut(template, list(msgs), tls, cutoff_len, len(enc.input_ids) - cutoff_len, kw)
            for msgs, tls, enc in zip(conversations, tools, whole)]


def _cut(template: Template, messages: Messages, tools: Sequence[dict[str, Any]] | None, cutoff_len: int,
         over: int, kw: dict[str, bool]) -> Encoded | None:
    """Cut user texts of one conversation ``over`` tokens too long; None if emptying them all is not enough."""
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    ids = dict(zip(users, template._tokenize_text([messages[i]["content"] for i in users])))
    longest = max(users, key=lambda i: len(ids[i]), default=None)
    msgs = [dict(m) for m in messages]
    for i in ([longest] if longest is not None else []) + [i for i in users if i != longest]:
        while over > 0 and ids[i]:
            # Decoding a token prefix and re-encoding may merge differently: measure again, cut again if needed.
            ids[i] = ids[i][:max(0, len(ids[i]) - over)]
            msgs[i]["content"] = template.tokenizer.decode(ids[i]).rstrip("\ufffd")  # no half character at the end
            enc = template.encode(msgs, NO_LIMIT, tools, **kw)
            if enc is None:
                return None
            over = len(enc.input_ids) - cutoff_len
        if over <= 0:
            return Encoded(enc.input_ids, enc.labels, truncated=True)
    return None
