"""Validated request bodies -> scheduler jobs: tokenisation, chat template, limits, engine checks.

Everything that can be wrong with a request is found here, before it is queued, and raised
as an `ApiError` naming the field in the endpoint's own vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.early_exit.inference.engine import EarlyExitEngine
from megatron.early_exit.inference.server.errors import ApiError, engine_error
from megatron.early_exit.inference.server.scheduler import Job
from megatron.early_exit.inference.server.schemas import ChatRequest, CompletionRequest, MegatronRequest
from megatron.early_exit.inference.settings import GenerationSettings
from megatron.early_exit.inference.strategies import STRATEGIES


@dataclass
class Limits:
    max_prompt_tokens: int
    max_new_tokens: int
    max_seq_length: int  # prompt + generated tokens of one sequence (the KV cache's capacity)
    max_batch_size: int


@dataclass
class Context:
    """What building a job needs: the engine (for its checks), its tokenizer, the limits.

    batch_at_a_time: the engine decodes whole batches (pipeline parallel, `BatchScheduler`):
    no prompt scoring and no top alternatives, which need logits its `generate` does not return."""

    engine: EarlyExitEngine
    tokenizer: object
    limits: Limits
    model_name: str
    batch_at_a_time: bool = False


# Engine setting names -> the fields that set them, per endpoint.
MEGATRON_NAMES = {
    "exit_layers": "exit_layers",
    "early_exit_threshold": "early_exit_thres",
    "max_new_tokens": "tokens_to_generate",
    "prompts": "prompts",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
}
OPENAI_NAMES = {
    "exit_layers": "early_exit.exit_layers",
    "min_exit_layer": "early_exit.min_layer",
    "measure": "early_exit.measure",
    "draft_exit_layer": "early_exit.draft_exit_layer",
    "self_speculative": "early_exit.mode",
    "strategy": "early_exit.mode",
    "early_exit_threshold": "early_exit.threshold",
    "num_draft_tokens": "early_exit.num_draft_tokens",
    "max_new_tokens": "max_tokens",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
}


def megatron_job(body: MegatronRequest, ctx: Context) -> Job:
    tok = ctx.tokenizer
    bos = [tok.bos] if body.add_BOS and tok.bos is not None else []
    prompts = [bos + tok.tokenize(p) for p in body.prompts]
    stops = ("\n\n",) if body.stop_on_double_eol else ()
    stops += ("\n",) if body.stop_on_eol else ()
    settings = GenerationSettings(
        strategy="early_exit" if body.use_early_exit else "full",
        max_new_tokens=body.tokens_to_generate,
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p if body.top_p > 0.0 else 1.0,  # Megatron's 0.0 means "off"
        seed=body.random_seed,
        stop_token_ids=(body.stop_token,) if body.stop_token is not None else (),
        stop_strings=stops,
        early_exit_threshold=body.early_exit_thres,
        exit_layers=tuple(body.exit_layers) if body.exit_layers is not None else None,
        return_logprobs=body.logprobs,
    )
    names = {**MEGATRON_NAMES, "self_speculative": "use_early_exit"}
    return _job(ctx, prompts, settings, names, "prompts", "tokens_to_generate", score_prompt=body.logprobs)


def completion_job(body: CompletionRequest, ctx: Context) -> Job:
    p = body.prompt
    if isinstance(p, str):
        prompts = [ctx.tokenizer.tokenize(p)]
    elif isinstance(p[0], str):
        prompts = [ctx.tokenizer.tokenize(x) for x in p]
    elif isinstance(p[0], int):
        prompts = [list(p)]
    else:
        prompts = [list(x) for x in p]
    max_new = body.max_tokens if body.max_tokens is not None else 16
    top = body.logprobs or 0
    settings = _openai_settings(body, max_new, body.logprobs is not None)
    prompts = [x for x in prompts for _ in range(body.n)]
    scored = body.echo and body.logprobs is not None  # lm-eval's loglikelihood: score the given text
    return _job(
        ctx,
        prompts,
        settings,
        OPENAI_NAMES,
        "prompt",
        "max_tokens",
        score_prompt=scored,
        top_logprobs=top,
        stream=body.stream,
    )


def chat_job(body: ChatRequest, ctx: Context) -> tuple[Job, str]:
    """The job and the rendered prompt text."""
    text = render_chat(ctx.tokenizer, [{"role": m.role, "content": m.text()} for m in body.messages])
    ids = ctx.tokenizer.tokenize(text)
    room = ctx.limits.max_seq_length - len(ids)
    asked = body.max_completion_tokens or body.max_tokens
    max_new = asked if asked is not None else max(1, min(ctx.limits.max_new_tokens, room))
    settings = _openai_settings(body, max_new, body.logprobs)
    prompts = [ids] * body.n
    top = body.top_logprobs or 0
    job = _job(ctx, prompts, settings, OPENAI_NAMES, "messages", "max_tokens", top_logprobs=top, stream=body.stream)
    return job, text


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The tokenizer's Jinja chat template over `messages`, ending with the assistant's turn."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ApiError(400, "messages: this model's tokenizer has no chat template; use /v1/completions", "messages")
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    special = {}
    for name, tid in (("bos_token", tokenizer.bos), ("eos_token", tokenizer.eod)):
        special[name] = tokenizer.detokenize([tid]) if tid is not None else ""
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True, **special)
    except TemplateError as e:
        raise ApiError(400, f"messages: the chat template rejected them: {e}", "messages") from None


def _openai_settings(body, max_new: int, logprobs: bool) -> GenerationSettings:
    ee = body.early_exit
    mode = ee.mode if ee is not None else "off"
    kw = {}
    if ee is not None:
        kw = dict(
            early_exit_threshold=ee.threshold,
            measure=ee.measure,
            exit_layers=tuple(ee.exit_layers) if ee.exit_layers is not None else None,
            min_exit_layer=ee.min_layer,
            num_draft_tokens=ee.num_draft_tokens,
            draft_exit_layer=ee.draft_exit_layer,
        )
    return GenerationSettings(
        strategy={"off": "full"}.get(mode, mode),
        max_new_tokens=max_new,
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        seed=body.seed,
        stop_strings=body.stop_strings(),
        ignore_eos=body.ignore_eos,
        return_logprobs=logprobs,
        **kw,
    )


def _job(
    ctx: Context,
    prompts: list[list[int]],
    settings: GenerationSettings,
    names: dict[str, str],
    prompt_field: str,
    new_field: str,
    score_prompt: bool = False,
    top_logprobs: int = 0,
    stream: bool = False,
) -> Job:
    """Check limits and the engine's own rules, then make the job."""
    lim = ctx.limits
    if len(prompts) > lim.max_batch_size:
        raise ApiError(
            400, f"{prompt_field}: {len(prompts)} sequences exceed the server's --max-batch-size {lim.max_batch_size}",
            "n" if prompt_field != "prompts" and len(set(map(tuple, prompts))) < len(prompts) else prompt_field,
        )  # fmt: skip
    for p in prompts:
        if len(p) > lim.max_prompt_tokens:
            raise ApiError(400, f"{prompt_field}: {len(p)} tokens exceed --max-prompt-tokens {lim.max_prompt_tokens}",
                           prompt_field)  # fmt: skip
    if settings.max_new_tokens > lim.max_new_tokens:
        raise ApiError(400, f"{new_field}: {settings.max_new_tokens} exceeds --max-new-tokens {lim.max_new_tokens}",
                       new_field)  # fmt: skip
    longest = max(len(p) for p in prompts)
    if longest + settings.max_new_tokens > lim.max_seq_length:
        raise ApiError(
            400, f"{new_field}: prompt ({longest} tokens) + {settings.max_new_tokens} new tokens exceed "
            f"--max-seq-length {lim.max_seq_length}", new_field,
        )  # fmt: skip
    strategy = STRATEGIES.get(settings.strategy)
    if strategy is not None and not strategy.shares_passes and top_logprobs:
        raise ApiError(
            400, f"logprobs: top alternatives are not available with {settings.strategy} decoding", "logprobs"
        )
    if ctx.batch_at_a_time and (score_prompt or top_logprobs):
        what = "prompt log-probabilities" if score_prompt else "top alternatives"
        raise ApiError(400, f"logprobs: {what} are not available with pipeline parallelism", "logprobs")
    try:
        policy = ctx.engine.check(settings, prompts)
    except ValueError as e:
        raise engine_error(e, {**names, "prompts": prompt_field}, prompt_field) from None
    return Job(prompts, settings, policy, score_prompt=score_prompt, top_logprobs=top_logprobs, stream=stream)
