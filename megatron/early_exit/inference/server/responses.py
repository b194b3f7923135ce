"""Finished (or streaming) jobs -> the JSON shapes Megatron's and OpenAI's clients parse.

Exit telemetry rides along as extra fields (clients ignore fields they do not know):
`early_exit` on each choice (per-token exit layers and confidences, average exit layer,
share of early exits, acceptance rate for self-speculative decoding) and on each streamed
chunk (the new tokens' exit layers and confidences).
"""

from __future__ import annotations

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
    return out


def usage(job: Job, n: int) -> dict:
    prompt = sum(len(p) for p in job.prompts[::n])  # each distinct prompt counted once, as OpenAI does
    completion = sum(len(r.tokens) for r in job.results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ----- PUT /api -----------------------------------------------------------------------------


def megatron_response(job: Job, body, tokenizer, elapsed: float) -> dict:
    """Megatron's {text, segments, logprobs} plus EE-LLM's per-token exit layers and confidences."""
    texts, segments, logprobs = [], [], []
    for i, r in enumerate(job.results):
        prompt_ids = job.prompts[i] if body.echo_prompts else []
        texts.append((body.prompts[i] if body.echo_prompts else "") + (r.text or ""))
        segments.append([tokenizer.detokenize([t]) for t in prompt_ids + r.tokens])
        if body.logprobs:  # Megatron: one per token after the first, over prompt + generation
            logprobs.append(job.prompt_logprobs[i][1:] + list(r.logprobs or []))
    out = {
        "text": texts,
        "segments": segments,
        "logprobs": logprobs if body.logprobs else None,
        "exit_layers": [r.exit_layers for r in job.results],
        "confidences": [r.confidences for r in job.results],
        "finish_reasons": [r.finish_reason for r in job.results],
        "request_time": elapsed,
    }
    if body.print_max_prob:
        out["max_probs"] = out["confidences"]  # /api always measures max_prob
    return out


# ----- POST /v1/completions -------------------------------------------------------------------


def completion_response(job: Job, meta: Meta, tokenizer, n: int) -> dict:
    choices = []
    for i, r in enumerate(job.results):
        echo = meta.echo_texts[i] if meta.echo_texts else ""
        choice = {"index": i, "text": echo + (r.text or ""), "finish_reason": r.finish_reason, "logprobs": None}
        if meta.logprobs is not None:
            choice["logprobs"] = _legacy_logprobs(job, i, meta, tokenizer)
        choice["early_exit"] = telemetry(job, i)
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
    ids, lps = list(kept), list((r.logprobs or [])[: len(kept)])
    tops = list(job.token_top[i][: len(kept)]) if meta.logprobs else [None] * len(kept)
    if meta.echo_texts:
        ids = job.prompts[i] + ids
        lps = job.prompt_logprobs[i] + lps
        tops = (job.prompt_top[i] if meta.logprobs else [None] * len(job.prompts[i])) + tops
    strings = [tokenizer.detokenize([t]) for t in ids]
    offset = 0 if meta.echo_texts else len(tokenizer.detokenize(job.prompts[i]))
    offsets = []
    for s in strings:
        offsets.append(offset)
        offset += len(s)
    top_strings = [
        None if not t else {tokenizer.detokenize([k]): v for k, v in t.items()} for t in tops
    ]  # the first prompt token has no distribution to come from
    return {"tokens": strings, "token_logprobs": lps, "top_logprobs": top_strings, "text_offset": offsets}


def completion_chunks(ev: Event, job: Job, meta: Meta, n: int) -> list[dict]:
    """The SSE chunks for one scheduler event (a text delta, or the end of the job)."""
    if ev.kind == "delta":
        return [_completion_chunk(meta, ev.index, ev.text, None, _chunk_telemetry(ev))]
    chunks = [_completion_chunk(meta, i, "", r.finish_reason, None) for i, r in enumerate(job.results)]
    if meta.include_usage:
        chunks.append({**_completion_chunk(meta, 0, "", None, None), "choices": [], "usage": usage(job, n)})
    return chunks


def _completion_chunk(meta: Meta, i: int, text: str, finish: str | None, ee: dict | None) -> dict:
    return _chunk(meta, "text_completion", {"index": i, "text": text}, finish, ee)


def _chunk(meta: Meta, kind: str, choice: dict, finish: str | None, ee: dict | None) -> dict:
    """One SSE chunk of `kind` ("text_completion" or "chat.completion.chunk") with one choice."""
    choice = {**choice, "finish_reason": finish, "logprobs": None}
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
    content = []
    for j, t in enumerate(_kept(r)):
        s = tokenizer.detokenize([t])
        top = job.token_top[i][j] if meta.logprobs else {}
        content.append(
            {
                "token": s,
                "logprob": r.logprobs[j],
                "bytes": list(s.encode("utf-8")),
                "top_logprobs": [
                    {
                        "token": tokenizer.detokenize([k]),
                        "logprob": v,
                        "bytes": list(tokenizer.detokenize([k]).encode()),
                    }
                    for k, v in top.items()
                ],
            }
        )
    return {"content": content}


def chat_chunks(ev: Event, job: Job, meta: Meta, n: int, started: set[int]) -> list[dict]:
    """SSE chunks for chat; each choice's first chunk carries the assistant role."""
    if ev.kind == "delta":
        delta = {"content": ev.text}
        if ev.index not in started:
            started.add(ev.index)
            delta = {"role": "assistant", **delta}
        return [_chat_chunk(meta, ev.index, delta, None, _chunk_telemetry(ev))]
    chunks = [_chat_chunk(meta, i, {}, r.finish_reason, None) for i, r in enumerate(job.results)]
    if meta.include_usage:
        chunks.append({**_chat_chunk(meta, 0, {}, None, None), "choices": [], "usage": usage(job, n)})
    return chunks


def _chat_chunk(meta: Meta, i: int, delta: dict, finish: str | None, ee: dict | None) -> dict:
    return _chunk(meta, "chat.completion.chunk", {"index": i, "delta": delta}, finish, ee)
