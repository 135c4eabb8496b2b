"""How a chat template's re-rendering of a session's earlier turns compares with the tokens that were sampled.

Call ``k`` of a session continues call ``k-1`` token for token when its prompt starts with call ``k-1``'s prompt +
completion. When the template re-renders the earlier turn otherwise, trajectory mode cannot append call ``k`` to the
earlier sample, and :mod:`trainwire.rl.transitions` starts a new one there (a chain break). :func:`classify` says
why a prompt does not continue the previous call, from the two texts:

* ``retokenized``: the same text, other tokens (the model sampled a non-canonical BPE split, which the tokenizer
  does not reproduce from the text);
* ``tool_call_json``: the text differs inside a ``<tool_call>`` (the parser's arguments re-serialized by the
  template: spacing, key order, escapes);
* ``whitespace``: the texts differ only in whitespace (around a tool call, a stripped content);
* ``end_of_turn``: the sampled turn did not end with the end-of-turn token (cut by max_tokens) and the template
  closes it;
* ``system_prompt``: the re-rendered prompt differs at its start (a default system prompt inserted or dropped);
* ``other``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def continues(prev: Sequence[int], prompt: Sequence[int]) -> bool:
    return len(prompt) >= len(prev) and list(prompt[: len(prev)]) == list(prev)


def classify(prev: Sequence[int], prompt: Sequence[int], decode: Callable[[list[int]], str], eos: int) -> str:
    """Why ``prompt`` does not start with ``prev`` (the previous call's prompt + completion)."""
    a, b = decode(list(prev)), decode(list(prompt))
    if b.startswith(a):
        return "retokenized"
    i = next((n for n, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    if i < 40:
        return "system_prompt"
    if prev and prev[-1] != eos:
        return "end_of_turn"
    opened, closed = a.rfind("<tool_call>", 0, i + 1), a.rfind("</tool_call>", 0, i + 1)
    if opened > closed:
        return "tool_call_json"
    if "".join(b[i:].split()).startswith("".join(a[i:].split())):
        return "whitespace"
    return "other"


def rerender_report(sessions: Sequence[Sequence[dict]], decode: Callable[[list[int]], str], eos: int) -> dict:
    """Over recorded sessions (each a list of call rows, in order, with ``prompt_token_ids`` and
    ``completion_token_ids``): how many calls follow an earlier call, how many of those continue it token for
    token, and the others by :func:`classify`'s reason."""
    out: dict = {"sessions": len(sessions), "continuations": 0, "exact": 0, "breaks": {}}
    for calls in sessions:
        for before, call in zip(calls, calls[1:]):
            prev = list(before["prompt_token_ids"]) + list(before["completion_token_ids"])
            out["continuations"] += 1
            if continues(prev, call["prompt_token_ids"]):
                out["exact"] += 1
            else:
                why = classify(prev, call["prompt_token_ids"], decode, eos)
                out["breaks"][why] = out["breaks"].get(why, 0) + 1
    n = out["continuations"]
    out["break_rate"] = (n - out["exact"]) / n if n else 0.0
    return out
