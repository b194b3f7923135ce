"""Validated request bodies -> scheduler jobs: tokenisation, chat template, limits, engine checks.

Everything that can be wrong with a request is found here, before it is queued, and raised
as an `ApiError` naming the field in the endpoint's own vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from megatron.early_exit.inference.engine import EarlyExitEngine
from megatron.early_exit.inference.server.errors import ApiError, engine_error
from megatron.early_exit.inference.server.scheduler import Job
from megatron.early_exit.inference.server.schemas import (
    MAX_SEQUENCES,
    ChatRequest,
    CompletionRequest,
    MegatronRequest,
)
from megatron.early_exit.inference.settings import GenerationSettings, calibrated_settings
from megatron.early_exit.inference.strategies import STRATEGIES, get_strategy


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

    @cached_property
    def max_prompt_chars(self) -> int | None:
        """The longest text that could fit in --max-prompt-tokens: longer ones are refused
        before tokenizing (an 8 MB prompt would hold a worker for seconds)."""
        per_token = max_token_chars(self.tokenizer)
        return None if per_token is None else per_token * self.limits.max_prompt_tokens

    def tokenize(self, text: str, name: str) -> list[int]:
        cap, most = self.max_prompt_chars, self.limits.max_prompt_tokens
        if cap is not None and len(text) > cap:
            raise ApiError(
                400, f"{name}: {len(text)} characters cannot fit in --max-prompt-tokens {most} (no token of this "
                f"vocabulary stands for more than {cap // most} characters)", name,
            )  # fmt: skip
        try:
            return self.tokenizer.tokenize(text)
        except ValueError as e:  # e.g. NullTokenizer's text is whitespace-separated ids
            raise ApiError(400, f"{name}: {e}", name) from None


def max_token_chars(tokenizer) -> int | None:
    """An upper bound on the characters one token stands for (a token string's length bounds
    its text: one symbol per byte or per character), or None when it cannot be told."""
    if isinstance(getattr(tokenizer, "encoder", None), dict):  # GPT-2 BPE: vocab.json symbols
        return max(map(len, tokenizer.encoder))
    if hasattr(tokenizer, "tok"):  # Hugging Face tokenizers
        return max(map(len, tokenizer.tok.get_vocab(with_added_tokens=True)), default=None)
    if hasattr(tokenizer, "sp"):  # SentencePiece pieces (byte pieces <0xNN> are longer than their text)
        return max(len(tokenizer.sp.IdToPiece(i)) for i in range(tokenizer.sp.GetPieceSize()))
    return None


# Engine setting names -> the fields that set them, per endpoint.
MEGATRON_NAMES = {
    "exit_layers": "exit_layers",
    "early_exit_threshold": "early_exit_thres",
    "exit_thresholds": "early_exit_thres",
    "exit_policy": "exit_policy",
    "exit_vocabulary": "exit_vocabulary",
    "max_new_tokens": "tokens_to_generate",
    "stop_token_ids": "stop_token",
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
    "exit_thresholds": "early_exit.threshold",
    "exit_policy": "early_exit.exit_policy",
    "exit_vocabulary": "early_exit.exit_vocabulary",
    "num_draft_tokens": "early_exit.num_draft_tokens",
    "draft_alternatives": "early_exit.draft_alternatives",
    "prompt_lookup_max": "early_exit.prompt_lookup_max",
    "max_new_tokens": "max_tokens",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
}


def megatron_job(body: MegatronRequest, ctx: Context) -> Job:
    tok = ctx.tokenizer
    # Megatron prepends the end-of-document id (GPT-2 has no BOS); tokenizers with a BOS get it.
    bos = [tok.bos if tok.bos is not None else tok.eod] if body.add_BOS else []
    for j, p in enumerate(body.prompts):
        if not p and not body.add_BOS:
            raise ApiError(400, f"prompts[{j}] is empty: an empty prompt needs add_BOS: true", "prompts")
    prompts = [bos + ctx.tokenize(p, f"prompts[{j}]") for j, p in enumerate(body.prompts)]
    greedy = body.top_k == 1  # EE-LLM's client asks for greedy decoding this way
    stops = ("\n\n",) if body.stop_on_double_eol else ()
    stops += ("\n",) if body.stop_on_eol else ()
    settings = GenerationSettings(
        strategy="early_exit" if body.use_early_exit else "full",
        max_new_tokens=body.tokens_to_generate,
        temperature=0.0 if greedy else body.temperature,
        top_k=0 if greedy else body.top_k,
        top_p=body.top_p if body.top_p > 0.0 else 1.0,  # Megatron's 0.0 means "off"
        seed=body.random_seed,
        stop_token_ids=(body.stop_token,) if body.stop_token is not None else (),
        stop_strings=stops,
        exit_layers=tuple(body.exit_layers) if body.exit_layers is not None else None,
        return_logprobs=body.logprobs,
        **threshold_fields(ctx, body.early_exit_thres, None, "early_exit_thres"),
        **({"exit_policy": body.exit_policy} if body.exit_policy is not None else {}),
        **({"exit_vocabulary": body.exit_vocabulary} if body.exit_vocabulary is not None else {}),
    )
    names = {**MEGATRON_NAMES, "self_speculative": "use_early_exit"}
    scored = body.logprobs and (body.echo_prompts or body.tokens_to_generate == 0)  # else logprobs of new tokens
    if scored:
        check_scoring_policy(body.exit_policy, settings.strategy, "exit_policy", "logprobs with echo_prompts")
    return _job(ctx, prompts, settings, names, "prompts", "tokens_to_generate", score_prompt=scored)


def completion_job(body: CompletionRequest, ctx: Context) -> Job:
    check_openai(body, ctx)
    p = body.prompt
    if isinstance(p, str):
        prompts = [ctx.tokenize(p, "prompt")]
    elif isinstance(p[0], str):
        prompts = [ctx.tokenize(x, f"prompt[{j}]") for j, x in enumerate(p)]
    elif isinstance(p[0], int):
        prompts = [list(p)]
    else:
        prompts = [list(x) for x in p]
    max_new = body.max_tokens if body.max_tokens is not None else 16
    top = body.logprobs or 0
    settings = _openai_settings(body, max_new, body.logprobs is not None, ctx)
    prompts = [x for x in prompts for _ in range(body.n)]
    scored = body.echo and body.logprobs is not None  # lm-eval's loglikelihood: score the given text
    if scored and body.early_exit is not None:
        policy = body.early_exit.exit_policy
        check_scoring_policy(policy, settings.strategy, "early_exit.exit_policy", "echo with logprobs")
    if scored and body.stream:  # the echoed prompt goes out before it is scored: its logprobs would be lost
        raise ApiError(400, "stream: prompt log-probabilities (echo with logprobs) are not streamed; set stream "
                       "false", "stream")  # fmt: skip
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
        logit_bias=logit_bias(body, ctx),
    )


def chat_job(body: ChatRequest, ctx: Context) -> tuple[Job, str]:
    """The job and the rendered prompt text."""
    check_openai(body, ctx)
    text = render_chat(ctx.tokenizer, [{"role": m.role, "content": m.text()} for m in body.messages])
    ids = ctx.tokenize(text, "messages")
    room = ctx.limits.max_seq_length - len(ids)
    asked = body.max_completion_tokens or body.max_tokens
    max_new = asked if asked is not None else max(1, min(ctx.limits.max_new_tokens, room))
    settings = _openai_settings(body, max_new, body.logprobs, ctx)
    prompts = [ids] * body.n
    top = body.top_logprobs or 0
    bias = logit_bias(body, ctx)
    job = _job(ctx, prompts, settings, OPENAI_NAMES, "messages", "max_tokens", top_logprobs=top, stream=body.stream,
               logit_bias=bias)  # fmt: skip
    return job, text


def check_scoring_policy(exit_policy: str | None, strategy: str, field: str, scoring: str) -> None:
    """Prompt scoring takes each prompt token's exit by the `exact` rule (inference/scoring.py);
    an explicit `cost_aware`, which decides per pass from the batch, conflicts with it."""
    if exit_policy == "cost_aware" and strategy != "full" and get_strategy(strategy).shares_passes:
        raise ApiError(
            400, f"{field}: cost_aware conflicts with prompt scoring ({scoring}), which takes each prompt token's "
            f"exit by the exact rule: give {field} exact or leave it out", field,
        )  # fmt: skip


def check_openai(body, ctx: Context) -> None:
    """Our model's name (404 otherwise, as vLLM answers), and no field we do not implement."""
    if body.model is not None and body.model != ctx.model_name:
        raise ApiError(404, f"model: the model `{body.model}` does not exist (this server serves "
                       f"`{ctx.model_name}`)", "model", "not_found_error")  # fmt: skip
    for name in ("tools", "tool_choice", "functions"):
        if getattr(body, name) not in (None, []):
            raise ApiError(400, f"{name}: tool calling is not supported by this server", name)
    fmt = body.response_format
    if fmt is not None and fmt != {"type": "text"}:
        raise ApiError(400, 'response_format: only {"type": "text"} is supported', "response_format")


def logit_bias(body, ctx: Context) -> dict[int, float]:
    """OpenAI's {"token id": bias in -100..100} as {id: bias}."""
    out = {}
    for key, value in (body.logit_bias or {}).items():
        if not key.isdigit() or int(key) >= ctx.tokenizer.vocab_size:
            raise ApiError(400, f"logit_bias: {key!r} is not a token id of this model "
                           f"(0..{ctx.tokenizer.vocab_size - 1})", "logit_bias")  # fmt: skip
        if not -100.0 <= value <= 100.0:
            raise ApiError(400, f"logit_bias: the bias of {key} must be in -100..100, got {value}", "logit_bias")
        out[int(key)] = value
    return out


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


def threshold_fields(ctx: Context, threshold: float | str, measure: str | None, name: str) -> dict:
    """GenerationSettings fields of a threshold: a number, or "auto": the checkpoint's calibrated
    per-exit thresholds and their measure (the code path of tools/generate.py --early-exit-thres auto)."""
    if threshold != "auto":
        return {"early_exit_threshold": threshold, "measure": measure}
    if ctx.batch_at_a_time:
        raise ApiError(400, f"{name}: auto (per-exit thresholds) is not available with pipeline parallelism", name)
    try:
        fields = calibrated_settings(getattr(ctx.engine.model, "calibrated_thresholds", None), f"{name}: auto")
    except ValueError as e:
        raise ApiError(400, str(e), name) from None
    if measure is not None and measure != fields["measure"]:
        field = name.rsplit(".", 1)[0] + ".measure"
        raise ApiError(400, f"{field}: the calibrated thresholds are for measure {fields['measure']!r}, "
                       f"got {measure!r}", field)  # fmt: skip
    return fields


def _openai_settings(body, max_new: int, logprobs: bool, ctx: Context) -> GenerationSettings:
    ee = body.early_exit
    mode = ee.mode if ee is not None else "off"
    kw = {}
    if ee is not None:
        kw = dict(
            **threshold_fields(ctx, ee.threshold, ee.measure, "early_exit.threshold"),
            **({"exit_policy": ee.exit_policy} if ee.exit_policy is not None else {}),
            **({"exit_vocabulary": ee.exit_vocabulary} if ee.exit_vocabulary is not None else {}),
            exit_layers=tuple(ee.exit_layers) if ee.exit_layers is not None else None,
            min_exit_layer=ee.min_layer,
            num_draft_tokens=ee.num_draft_tokens,
            draft_exit_layer=ee.draft_exit_layer,
            draft_alternatives=ee.draft_alternatives,
            prompt_lookup_max=ee.prompt_lookup_max,
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
    logit_bias: dict[int, float] | None = None,
) -> Job:
    """Check limits and the engine's own rules, then make the job (the server splits one with
    more sequences than --max-batch-size into batches)."""
    lim = ctx.limits
    if len(prompts) > MAX_SEQUENCES:
        raise ApiError(400, f"n: {len(prompts)} sequences (prompts x n) exceed {MAX_SEQUENCES} per request", "n")
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
    own_rounds = strategy is not None and not strategy.shares_passes
    if own_rounds and top_logprobs:
        raise ApiError(
            400, f"logprobs: top alternatives are not available with {settings.strategy} decoding", "logprobs"
        )
    if logit_bias and (own_rounds or ctx.batch_at_a_time):
        what = f"{settings.strategy} decoding" if own_rounds else "pipeline parallelism"
        raise ApiError(400, f"logit_bias: not available with {what}", "logit_bias")
    if ctx.batch_at_a_time and (score_prompt or top_logprobs):
        what = "prompt log-probabilities" if score_prompt else "top alternatives"
        raise ApiError(400, f"logprobs: {what} are not available with pipeline parallelism", "logprobs")
    try:
        policy = ctx.engine.check(settings, prompts)
    except ValueError as e:
        raise engine_error(e, {**names, "prompts": prompt_field}, prompt_field) from None
    return Job(prompts, settings, policy, score_prompt=score_prompt, top_logprobs=top_logprobs, stream=stream,
               logit_bias=logit_bias or {})  # fmt: skip
