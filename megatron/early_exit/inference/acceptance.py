"""Token acceptance, written once: the engine, the pipeline engine and the server all take
tokens through `Acceptance.accept`.

For the sequences a pass produced a token for, in the order it produced them (shallowest
exit first, then by slot): one draw from the request's own generator over their logits
(greedy: argmax, or the token a pipeline stage already chose), then per sequence the token,
its exit layer, confidence and log-probability are recorded and the stops checked (EOS
unless ignored, stop tokens, stop strings, max_new_tokens). Because the generator is consumed
in this one order everywhere, a seed gives the same tokens alone, batched, served or
pipelined.

Stop strings are checked on incrementally detokenized text (`IncrementalText`, the scheme of
vLLM's detokenizer): each step decodes only the tokens since the last stable point, so a
step costs in proportion to the new tokens, not the whole output. A token whose text holds no
character of any stop string is not decoded at all (`Acceptance.quiet`: each token's text
after a plain left context, worked out once): no stop string can end in its text, and the
next token that may end one decodes every token since the last check. Decoding each token
twice through SentencePiece's Python wrapper had cost ~30 us a token (CPU reference model: 1.3%
of a full decoding step in bf16, ~6% of one leaving at exit 3, ~0.12 ms of a self-speculative
round's ~0.24 ms of Python).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from megatron.early_exit.inference.passes import StepOutput
from megatron.early_exit.inference.sampling import choose
from megatron.early_exit.inference.settings import GenerationResult, GenerationSettings, TextState

CONTEXT_TOKENS = 5  # tokens of prompt kept as left context when streaming (vLLM's choice)


def decoded(results) -> int:
    """The tokens after each result's first (which the prefill makes): what decoding made."""
    return sum(max(len(r.tokens) - 1, 0) for r in results)


def biased(logits: torch.Tensor, bias: Mapping[int, float]) -> torch.Tensor:
    """OpenAI's logit_bias: each id's value added to its logit, [A, V] -> [A, V]."""
    ids = torch.tensor(list(bias), device=logits.device)
    values = torch.tensor(list(bias.values()), device=logits.device, dtype=logits.dtype)
    return logits.index_add(-1, ids, values.expand(logits.shape[0], -1))


class IncrementalText:
    """Incremental detokenization with one tokenizer: `feed` new ids into a `TextState` and get
    the newly stable text. Decoding ids[prefix:] against ids[prefix:read] gives the new text
    with the left context word-boundary rules need (SentencePiece's leading spaces); text that
    ends in a split UTF-8 character waits in `tail` for the next token."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def start(self, context: list[int]) -> TextState:
        """A state whose text starts after `context` (a few of its last tokens give the left context)."""
        return TextState(ids=list(context), prefix=max(len(context) - CONTEXT_TOKENS, 0), read=len(context))

    def feed(self, st: TextState, new_ids: list[int]) -> str:
        """Append `new_ids`; returns the text that became stable (appended to `st.text`)."""
        st.ids.extend(new_ids)
        before = self.tokenizer.detokenize(st.ids[st.prefix : st.read])
        after = self.tokenizer.detokenize(st.ids[st.prefix :])
        if not after.startswith(before):  # the context decoded differently: fall back to the difference
            before = after[: len(before)]
        new = after[len(before) :]
        if new.endswith("\ufffd"):
            st.tail = new
            return ""
        st.text += new
        st.tail = ""
        st.prefix, st.read = st.read, len(st.ids)
        return new


class Acceptance:
    """Choosing, recording and stopping tokens for one tokenizer (None: ids only) and model depth."""

    def __init__(self, tokenizer, num_layers: int) -> None:
        self.tokenizer, self.num_layers = tokenizer, num_layers
        self.detok = IncrementalText(tokenizer) if tokenizer is not None else None
        self.texts: dict[int, str] = {}  # token -> its text after `context` (`token_text`)
        self.context: tuple[list[int], str] | None = None

    def accept(
        self,
        out: StepOutput,
        results: Mapping[int, GenerationResult],
        s: GenerationSettings,
        generator: torch.Generator | None,
        seqs: list[int] | None = None,
        logit_bias: Mapping[int, float] | None = None,
    ) -> list[int]:
        """Take one token for each of `seqs` (default: every sequence `out` has, in its order) into
        `results[b]`; returns those still running, sorted. `logit_bias` (OpenAI's: id -> value
        added to its logit) steers the choice only; log-probabilities stay the model's."""
        seqs = out.order() if seqs is None else seqs
        if not seqs:
            return []
        running = []
        for b, tok in zip(seqs, self.choose(out, seqs, s, generator, logit_bias)):
            r = results[b]
            self.append(r, tok, out.exit_layer[b], out.confidence[b], out.logits.get(b))
            if not self.stopped(r, s):
                running.append(b)
        return sorted(running)

    def choose(self, out: StepOutput, seqs: list[int], s: GenerationSettings, generator, logit_bias=None) -> list[int]:
        """One draw over `seqs` in order (greedy: a pipeline stage's token where it sent no logits)."""
        if s.temperature <= 0 and not logit_bias and out.argmax and all(b in out.argmax for b in seqs):
            return [out.argmax[b] for b in seqs]  # the heads' own argmax (native heads make it with the logits)
        if s.temperature <= 0 and any(b not in out.logits for b in seqs):
            return [out.tokens[b] if b not in out.logits else int(out.logits[b].argmax()) for b in seqs]
        stacked = torch.stack([out.logits[b] for b in seqs])  # (A, V)
        if logit_bias:
            stacked = biased(stacked, logit_bias)
        return choose(stacked, s.temperature, s.top_k, s.top_p, generator).tolist()

    def append(self, r: GenerationResult, tok: int, layer: int, conf: float, logits: torch.Tensor | None) -> None:
        """Record one generated token in `r`: the token, the exit it left at, its confidence, and
        (when `r` collects log-probabilities) its log-probability under `logits` [V]."""
        r.tokens.append(int(tok))
        r.exit_layers.append(int(layer))
        r.confidences.append(float(conf))
        if r.logprobs is not None:
            r.logprobs.append(float(torch.log_softmax(logits.float(), -1)[tok]))

    def stopped(self, r: GenerationResult, s: GenerationSettings) -> bool:
        """Whether `r` is done after its newest token (EOS unless `ignore_eos`, a stop token, a stop
        string, or `max_new_tokens`); sets its finish_reason and stopped_by when it is."""
        tok = r.tokens[-1]
        eos = self.tokenizer.eod if self.tokenizer is not None and not s.ignore_eos else None
        if tok in s.stop_token_ids or tok == eos:
            r.finish_reason, r.stopped_by = "stop", tok
            return True
        if s.stop_strings and self.tokenizer is not None:
            stop = self._stop_string(r, s.stop_strings)
            if stop is not None:
                r.finish_reason, r.stopped_by = "stop", stop
                return True
        if len(r.tokens) >= s.max_new_tokens:
            r.finish_reason = "length"
            return True
        return False

    def _stop_string(self, r: GenerationResult, stops: tuple[str, ...]) -> str | None:
        """The first of `stops` that the text of `r.tokens` now contains, looking only at the
        text new since the last check (earlier text was checked before)."""
        st = r.stop_text if r.stop_text is not None else self.detok.start([])
        r.stop_text = st
        if not st.tail and self.quiet(r.tokens[max(len(st.ids), st.quiet_to) :], stops):
            st.quiet_to = len(r.tokens)  # each token looked at once
            return None  # checked with the next token whose text may end one
        seen = len(st.text)
        self.detok.feed(st, r.tokens[len(st.ids) :])
        longest = max(map(len, stops))
        window = st.text[max(seen - longest + 1, 0) :] + st.tail
        for stop in stops:
            if stop in window:
                return stop
        return None

    def quiet(self, ids: list[int], stops: tuple[str, ...]) -> bool:
        """Whether no stop string can end in the text `ids` add: none of their texts (`token_text`)
        holds a character of `stops` or a part of one (a byte of a character split over tokens
        decodes alone as U+FFFD)."""
        chars = set().union(*stops)
        for t in ids:
            text = self.texts.get(t)
            if text is None:
                text = self.texts[t] = self.token_text(t)
            if "\ufffd" in text or not chars.isdisjoint(text):
                return False
        return True

    def token_text(self, t: int) -> str:
        """The text token t adds after a plain left context ("a": so that SentencePiece keeps a
        leading space it would strip at the start of a text, and NullTokenizer's space between
        ids shows); U+FFFD where that context decodes otherwise beside it."""
        if self.context is None:
            try:
                ids = self.tokenizer.tokenize("a")
            except ValueError:  # a tokenizer of ids alone (NullTokenizer): a token as the context
                ids = [0]
            self.context = ids, self.tokenizer.detokenize(ids)
        ids, text = self.context
        both = self.tokenizer.detokenize([*ids, t])
        return both[len(text) :] if both.startswith(text) else "\ufffd"

    def text(self, r: GenerationResult) -> str:
        """The text of `r`'s tokens so far (needs a tokenizer): without a final stop token and cut
        before a stop string."""
        toks = r.tokens[:-1] if isinstance(r.stopped_by, int) else r.tokens
        # Decode with the prompt so that word boundaries (e.g. SentencePiece's) come out right.
        head = self.tokenizer.detokenize(r.prompt_tokens)
        both = self.tokenizer.detokenize(r.prompt_tokens + toks)
        text = both[len(head) :] if both.startswith(head) else self.tokenizer.detokenize(toks)
        if isinstance(r.stopped_by, str) and r.stopped_by in text:
            text = text[: text.index(r.stopped_by)]
        return text

    @staticmethod
    def decode_rate(results: list[GenerationResult], elapsed: float, prefill_s: float) -> dict:
        """prefill_s, and decode_tokens_per_sec: the tokens after each sequence's first (which the
        prefill makes) over the seconds after the prefill's: decoding's own speed, whatever the
        prompts' length (an aclsum abstract's prefill took a third of a one-sentence summary's
        time, and early exit and self-speculation change decoding alone)."""
        return {"prefill_s": prefill_s, "decode_tokens_per_sec": decoded(results) / max(elapsed - prefill_s, 1e-9)}

    def finish(
        self,
        results: list[GenerationResult],
        s: GenerationSettings,
        elapsed: float,
        counts=None,
        exit_time: float = 0.0,
        drafts: bool = False,
        prefill_s: float | None = None,
    ) -> None:
        """Fill in each result's text and stats once decoding is over. `elapsed`: seconds the
        batch took (tokens_per_sec counts every result's tokens over it); counts[b]: [drafted,
        accepted(, a dict of more stats)], reported when the strategy `drafts`; exit_time: seconds spent in exits (with
        `profile`); prefill_s: seconds of them the prefill took, with each sequence's first token
        (decode_tokens_per_sec counts the tokens after each first over the rest)."""
        total = sum(len(r.tokens) for r in results)
        for b, r in enumerate(results):
            r.text = self.text(r) if self.tokenizer is not None else None
            r.stop_text, r.lookup_text = None, ""
            layers = r.exit_layers
            r.stats = {
                "strategy": s.strategy,
                "tokens_per_sec": total / max(elapsed, 1e-9),  # the batch's tokens over the call (prefill included)
                "elapsed_s": elapsed,
                **({} if prefill_s is None else self.decode_rate(results, elapsed, prefill_s)),
                "average_exit_layer": sum(layers) / len(layers) if layers else None,
                "exit_share": {n: layers.count(n) / len(layers) for n in sorted(set(layers))},
                "early_exit_share": sum(x < self.num_layers for x in layers) / len(layers) if layers else 0.0,
            }
            if drafts:
                drafted, accepted = counts[b][:2]
                r.stats.update(drafted=drafted, accepted=accepted, acceptance_rate=accepted / max(drafted, 1))
                r.stats.update(counts[b][2] if len(counts[b]) > 2 else {})  # the strategy's own telemetry
            if s.profile:
                r.stats["exit_time_share"] = exit_time / max(elapsed, 1e-9)
