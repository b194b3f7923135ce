"""Finished (or streaming) jobs -> the JSON shapes Megatron's and OpenAI's clients parse.

Exit telemetry rides along as extra fields (clients ignore fields they do not know):
`early_exit` on each choice (per-token exit layers and confidences, average exit layer,
share of early exits, acceptance rate for self-speculative decoding) and on each streamed
chunk (the new tokens' exit layers and confidences).
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field

from megatron.early_exit.inference.server.scheduler import Event, Job


@dataclass
class Meta:
    """Per-response constants: OpenAI's id/created/model, and what the request asked to see."""

    model: str
    kind: str  # "cmpl" | "chatcmpl"
    echo_texts: list[str] = field(default_factory=list)  # per sequence; empty unless echo
    logprobs: int | None = None
    include_usage: bool = False
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.id = self.id or f"{self.kind}-{uuid.uuid4().hex[:24]}"
        self.created = self.created or int(time.time())


def _kept(r) -> list[int]:
    """The generated tokens the text is made of (a final stop token is not part of it)."""
    return r.tokens[:-1] if isinstance(r.stopped_by, int) else list(r.tokens)


WINDOW = 6  # tokens of context decoded with each new token (enough for any UTF-8 character)
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_strings(tokenizer, ids: list[int], context: list[int] = ()) -> list[str]:
    """Each token's share of the text, decoded after `context`: joined, they give the text of
    `ids`. A token that ends inside a multi-byte character gets "" and the character goes to
    the token that completes it (decoding one token alone would give U+FFFD instead)."""
    seq = list(context)[-WINDOW:] + list(ids)
    prefix = read = len(seq) - len(ids)  # decode seq[prefix:]; seq[prefix:read] was emitted
    out = []
    for k in range(read, len(seq)):
        before = tokenizer.detokenize(seq[prefix:read])
        now = tokenizer.detokenize(seq[prefix : k + 1])
        if now.endswith("\ufffd") and k + 1 < len(seq) or not now.startswith(before):
            out.append("")  # an unfinished character: wait for the next token
            continue
        out.append(now[len(before) :])
        prefix, read = read, k + 1
    return out


def fit(strings: list[str], text: str) -> list[str]:
    """Make the token strings join to `text` exactly: the final text may be cut before a stop
    string, or hold what a last, unfinished character decodes to."""
    joined = "".join(strings)
    if joined == text or not strings:
        return strings
    if text.startswith(joined):
        return strings[:-1] + [strings[-1] + text[len(joined) :]]
    if joined.startswith(text):
        out, pos = [], 0
        for x in strings:
            x = x[: max(0, len(text) - pos)]
            out.append(x)
            pos += len(x)
        return out
    return strings


def token_bytes(tokenizer, tid: int) -> bytes:
    """A token's raw bytes (one token may hold part of a multi-byte character)."""
    table = getattr(tokenizer, "token_bytes", None)
    if isinstance(table, dict):  # GPT-2 BPE
        return table.get(tid, b"")
    hf, sp = getattr(tokenizer, "tok", None), getattr(tokenizer, "sp", None)
    if hf is not None:
        piece = hf.id_to_token(tid) or ""
        if _byte_level(hf):
            from megatron.early_exit.tokenizer.gpt2_bpe import bytes_to_unicode

            inverse = {c: b for b, c in bytes_to_unicode().items()}
            return b"".join(bytes([inverse[c]]) if c in inverse else c.encode() for c in piece)
        return _piece_bytes(piece)
    if sp is not None:
        return _piece_bytes(sp.IdToPiece(tid))
    return tokenizer.detokenize([tid]).encode()


def _byte_level(hf) -> bool:
    state = hf.decoder.__getstate__() if hf.decoder is not None else b""
    return b"ByteLevel" in (state if isinstance(state, bytes) else str(state).encode())


def _piece_bytes(piece: str) -> bytes:
    """SentencePiece-style: "<0xE2>" is one byte, "\u2581" a space."""
    m = BYTE_PIECE.fullmatch(piece)
    return bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode()


def telemetry(job: Job, i: int) -> dict:
    r = job.results[i]
    out = {
        "exit_layers": r.exit_layers,
        "confidences": [round(c, 6) for c in r.confidences],
        "average_exit_layer": r.stats.get("average_exit_layer"),
        "early_exit_share": r.stats.get("early_exit_share", 0.0),
        "strategy": job.settings.strategy,
    }
    if "acceptance_rate" in r.stats:
        out["acceptance_rate"] = r.stats["acceptance_rate"]
    for key in ("tokens_per_sec", "decode_tokens_per_sec"):  # wall clock, batch neighbours included
        if key in r.stats:
            out[key] = round(r.stats[key], 3)
    return out


def usage(job: Job, n: int) -> dict:
    prompt = sum(len(p) for p in job.prompts[::n])  # each distinct prompt counted once, as OpenAI does
    completion = sum(len(r.tokens) for r in job.results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ----- PUT /api -----------------------------------------------------------------------------


def megatron_response(job: Job, body, tokenizer, elapsed: float) -> dict:
    """Megatron's {text, segments, logprobs} plus EE-LLM's per-token exit layers and confidences.
    With the prompt echoed (or nothing generated) segments cover prompt + generation and
    logprobs every token after the first (Megatron's); otherwise both cover the generation.
    Scored prompts (logprobs with the prompt echoed) also get `prompt_exit_layers`: the layer
    each scored prompt token's logprob came from, as early exit would decode there."""
    echo = echoes_prompt(body)
    texts, segments, logprobs = [], [], []
    for i, r in enumerate(job.results):
        texts.append((body.prompts[i] if echo else "") + (r.text or ""))
        head = token_strings(tokenizer, job.prompts[i]) if echo else []
        segments.append(head + token_strings(tokenizer, r.tokens, job.prompts[i]))
        if body.logprobs:
            scored = job.prompt_logprobs[i][1:] if echo else []
            logprobs.append(scored + list(r.logprobs or []))
    out = {
        "text": texts,
        "segments": segments,
        "logprobs": logprobs if body.logprobs else None,
        "exit_layers": [r.exit_layers for r in job.results],
        "confidences": [r.confidences for r in job.results],
        "finish_reasons": [r.finish_reason for r in job.results],
        "request_time": elapsed,
    }
    if job.score_prompt:  # aligned with the prompt part of logprobs (from the second prompt token)
        out["prompt_exit_layers"] = [layers[1:] for layers in job.prompt_exit_layers]
    if body.print_max_prob:
        out["max_probs"] = out["confidences"]  # /api always measures max_prob
    return out


def echoes_prompt(body) -> bool:
    """PUT /api answers with the prompt when asked to, and when it generates nothing (EE-LLM)."""
    return body.echo_prompts or body.tokens_to_generate == 0


# ----- POST /v1/completions -------------------------------------------------------------------


def completion_response(job: Job, meta: Meta, tokenizer, n: int) -> dict:
    choices = []
    for i, r in enumerate(job.results):
        echo = meta.echo_texts[i] if meta.echo_texts else ""
        choice = {"index": i, "text": echo + (r.text or ""), "finish_reason": r.finish_reason, "logprobs": None}
        if meta.logprobs is not None:
            choice["logprobs"] = _legacy_logprobs(job, i, meta, tokenizer)
        choice["early_exit"] = telemetry(job, i)
        if job.score_prompt:  # aligned with logprobs.token_logprobs' prompt part (the first: null)
            choice["early_exit"]["prompt_exit_layers"] = job.prompt_exit_layers[i]
        choices.append(choice)
    return {
        "id": meta.id,
        "object": "text_completion",
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": usage(job, n),
    }


def _legacy_logprobs(job: Job, i: int, meta: Meta, tokenizer) -> dict:
    """OpenAI's legacy shape: tokens, token_logprobs, top_logprobs, text_offset (into the choice's
    text, or past the prompt without echo); with echo the prompt's tokens come first, the very
    first with logprob null."""
    r = job.results[i]
    kept = _kept(r)
    strings = fit(token_strings(tokenizer, kept, job.prompts[i]), r.text or "")
    lps = list((r.logprobs or [])[: len(kept)])
    tops = list(job.token_top[i][: len(kept)]) if meta.logprobs else [None] * len(kept)
    if meta.echo_texts:
        strings = fit(token_strings(tokenizer, job.prompts[i]), meta.echo_texts[i]) + strings
        lps = job.prompt_logprobs[i] + lps
        tops = (job.prompt_top[i] if meta.logprobs else [None] * len(job.prompts[i])) + tops
    start = 0 if meta.echo_texts else len(tokenizer.detokenize(job.prompts[i]))
    offsets = _offsets(strings, start)
    top_strings = [
        None if not t else {tokenizer.detokenize([k]): v for k, v in t.items()} for t in tops
    ]  # the first prompt token has no distribution to come from
    return {"tokens": strings, "token_logprobs": lps, "top_logprobs": top_strings, "text_offset": offsets}


def _offsets(strings: list[str], start: int) -> list[int]:
    """Where each token's string starts in the text (characters)."""
    out = []
    for x in strings:
        out.append(start)
        start += len(x)
    return out


@dataclass
class StreamState:
    """What a stream has sent so far, per sequence: tokens (the context of the next ones'
    strings), characters (for text_offset), and whether chat's role went out."""

    tokenizer: object
    prompts: list[list[int]]
    offsets: list[int]  # where each sequence's streamed text starts (after an echoed prompt)
    seen: dict[int, list[int]] = field(default_factory=dict)
    started: set[int] = field(default_factory=set)

    def strings(self, ev: Event) -> list[str]:
        """The new tokens' strings, decoded after the sequence's prompt and earlier tokens."""
        before = self.seen.setdefault(ev.index, [])
        out = token_strings(self.tokenizer, ev.tokens, self.prompts[ev.index] + before)
        before.extend(ev.tokens)
        return out


def completion_chunks(ev: Event, job: Job, meta: Meta, n: int, state: StreamState) -> list[dict]:
    """The SSE chunks for one scheduler event (a text delta, or the end of the job)."""
    if ev.kind == "delta":
        chunk = _completion_chunk(meta, ev.index, ev.text, None, _chunk_telemetry(ev))
        if meta.logprobs is not None:
            strings = state.strings(ev)
            tops = [{state.tokenizer.detokenize([k]): v for k, v in t.items()} for t in ev.top] or [None] * len(strings)
            offsets = _offsets(strings, state.offsets[ev.index])
            state.offsets[ev.index] = offsets[-1] + len(strings[-1]) if strings else state.offsets[ev.index]
            lps = {"tokens": strings, "token_logprobs": ev.logprobs, "top_logprobs": tops, "text_offset": offsets}
            chunk["choices"][0]["logprobs"] = lps
        return [chunk]
    chunks = [_completion_chunk(meta, i, "", r.finish_reason, None) for i, r in enumerate(job.results)]
    if meta.include_usage:
        chunks.append({**_completion_chunk(meta, 0, "", None, None), "choices": [], "usage": usage(job, n)})
    return chunks


def _completion_chunk(meta: Meta, i: int, text: str, finish: str | None, ee: dict | None) -> dict:
    return _chunk(meta, "text_completion", {"index": i, "text": text}, finish, ee)


def _chunk(meta: Meta, kind: str, choice: dict, finish: str | None, ee: dict | None) -> dict:
    """One SSE chunk of `kind` ("text_completion" or "chat.completion.chunk") with one choice."""
    choice = {**choice, "finish_reason": finish, "logprobs": None}  # filled in for deltas when asked
    if ee is not None:
        choice["early_exit"] = ee
    return {"id": meta.id, "object": kind, "created": meta.created, "model": meta.model, "choices": [choice]}


def _chunk_telemetry(ev: Event) -> dict:
    return {"exit_layers": ev.exit_layers, "confidences": [round(c, 6) for c in ev.confidences]}


# ----- POST /v1/chat/completions ---------------------------------------------------------------


def chat_response(job: Job, meta: Meta, tokenizer, n: int) -> dict:
    choices = []
    for i, r in enumerate(job.results):
        choice = {
            "index": i,
            "message": {"role": "assistant", "content": r.text or ""},
            "finish_reason": r.finish_reason,
            "logprobs": _chat_logprobs(job, i, meta, tokenizer) if meta.logprobs is not None else None,
            "early_exit": telemetry(job, i),
        }
        choices.append(choice)
    return {
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": usage(job, n),
    }


def _chat_logprobs(job: Job, i: int, meta: Meta, tokenizer) -> dict:
    r = job.results[i]
    kept = _kept(r)
    strings = fit(token_strings(tokenizer, kept, job.prompts[i]), r.text or "")
    tops = job.token_top[i] if meta.logprobs else [{}] * len(kept)
    return {"content": _chat_content(tokenizer, kept, strings, r.logprobs, tops)}


def _chat_content(tokenizer, ids, strings, logprobs, tops) -> list[dict]:
    """OpenAI's logprobs.content: `token` joins to the message, `bytes` is the token's own bytes."""
    content = []
    for j, (t, text) in enumerate(zip(ids, strings)):
        top = [
            {"token": tokenizer.detokenize([k]), "logprob": v, "bytes": list(token_bytes(tokenizer, k))}
            for k, v in (tops[j] if j < len(tops) and tops[j] else {}).items()
        ]
        entry = {"token": text, "logprob": logprobs[j], "bytes": list(token_bytes(tokenizer, t)), "top_logprobs": top}
        content.append(entry)
    return content


def chat_chunks(ev: Event, job: Job, meta: Meta, n: int, state: StreamState) -> list[dict]:
    """SSE chunks for chat; each choice's first chunk carries the assistant role."""
    if ev.kind == "delta":
        delta = {"content": ev.text}
        if ev.index not in state.started:
            state.started.add(ev.index)
            delta = {"role": "assistant", **delta}
        chunk = _chat_chunk(meta, ev.index, delta, None, _chunk_telemetry(ev))
        if meta.logprobs is not None:
            content = _chat_content(state.tokenizer, ev.tokens, state.strings(ev), ev.logprobs, ev.top)
            chunk["choices"][0]["logprobs"] = {"content": content}
        return [chunk]
    chunks = [_chat_chunk(meta, i, {}, r.finish_reason, None) for i, r in enumerate(job.results)]
    if meta.include_usage:
        chunks.append({**_chat_chunk(meta, 0, {}, None, None), "choices": [], "usage": usage(job, n)})
    return chunks


def _chat_chunk(meta: Meta, i: int, delta: dict, finish: str | None, ee: dict | None) -> dict:
    return _chunk(meta, "chat.completion.chunk", {"index": i, "delta": delta}, finish, ee)
