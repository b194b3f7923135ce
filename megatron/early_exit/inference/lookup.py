"""Drafts from the context itself (prompt lookup): the tokens that followed the first occurrence
of the context's last n tokens.

Summaries, answers about a document and code edits copy spans of their prompt, and there the
exits are weakest: along the tuned SmolLM2's one-sentence summaries of aclsum abstracts, 55% of
positions continue a bigram of the prompt, yet exit 8 agrees with the final head at 33% of them
(34.5% overall) and the final head's confidence at the previous token says nothing about it (AUC
0.52): copying needs the later layers. Drafting from the context costs no layer at all, only the
verify pass's extra rows, so `self_speculative` takes it as one more draft source beside the
exits (`GenerationSettings.prompt_lookup_max`, off by default), chosen each round by the same
controller from the same acceptance counts and costs (`draft_control`); every kept token is still
the final head's greedy token. This is the drafting of HF transformers' `prompt_lookup_num_tokens`
and vLLM's n-gram speculator (Saxena, "Prompt Lookup Decoding", 2023); it is not early exit, and
the sweep reports it in a row of its own.

The search is the C string search over the context as a string of code points (one per token);
the longest suffix that occurs earlier wins (n from `max_ngram` down to 1), at its first
occurrence, as HF's prompt lookup takes it: where the text repeats itself, the latest occurrence
overlaps the suffix and leaves a one-token continuation, and along SmolLM2's summaries (20
abstracts, matches of 2-3 tokens, up to 8 drafts) the first gave 1.58 tokens per round against
1.54.
"""

from __future__ import annotations

LOOKUP = 0  # the draft "exit" of drafts taken from the context: no layer runs before them


def as_text(tokens: list[int]) -> str:
    """Token ids as a string of code points (ids up to 0x10FFFF), for `str.find`."""
    return "".join(map(chr, tokens))


def propose(context: list[int], max_ngram: int, limit: int, text: str | None = None) -> tuple[list[int], int]:
    """(up to `limit` tokens that followed the first occurrence of the context's last n tokens
    before the suffix itself, n): the longest n <= `max_ngram` with such an occurrence, ([], 0)
    where none has one (or `limit` < 1). `text`: `as_text(context)` where the caller has it."""
    length = len(context)
    if limit < 1 or length < 2:
        return [], 0
    text = as_text(context) if text is None else text
    for n in range(min(max_ngram, length - 1), 0, -1):
        start = text.find(text[length - n :], 0, length - 1)  # the first one ending before the last token
        if start >= 0:
            return context[start + n : start + n + limit], n
    return [], 0


def confidences(n: int, max_ngram: int, k: int) -> list[float]:
    """The "confidences" of k drafts proposed at match length n, for the controller's per-bin
    acceptance counts: n / (max_ngram + 1) for the first, (n + 1/2) / (max_ngram + 1) for the ones
    after it, which continue a span the first began (at max_ngram 3 and BINS = 8: bins 2 / 4 / 6
    and 3 / 5 / 7 for lengths 1 / 2 / 3). Copied spans run on: along SmolLM2's summaries a first
    draft at length 3 was kept ~56% of the time and each one after a kept draft more often, so one
    rate for both would cut long proposals short (every round observes first drafts for free)."""
    first = n / (max_ngram + 1)
    return [first] + [first + 0.5 / (max_ngram + 1)] * (k - 1) if k > 0 else []
