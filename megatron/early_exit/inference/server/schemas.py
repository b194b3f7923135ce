"""Request bodies of the REST server, validated strictly so that every error names its field.

Strict mode: a JSON string is not a number and `"true"` is not a boolean (EE-LLM's server
treated the mere presence of a flag as true; here `false` means false). Ranges are checked
here; what depends on the model (exit layers, lengths against the KV cache) is checked when
the request is turned into a job (`requests.py`).

Three bodies:
  MegatronRequest     PUT /api, Megatron-LM's and EE-LLM's fields
  CompletionRequest   POST /v1/completions (OpenAI), plus `early_exit`, `top_k`, `ignore_eos`
  ChatRequest         POST /v1/chat/completions (OpenAI), same extensions
Unknown top-level fields are ignored (clients send fields we have no use for); unknown
fields inside `early_exit` are errors, since a typo there would silently change decoding.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from megatron.early_exit.inference.confidence import measure_names
from megatron.early_exit.inference.exit_decision import EXIT_POLICIES
from megatron.early_exit.inference.settings import EXIT_VOCABULARIES
from megatron.early_exit.inference.strategies import strategy_names

MAX_PROMPTS = 128  # Megatron's limit on prompts per PUT /api
MAX_SEQUENCES = 512  # prompts x n of one request (split into batches of --max-batch-size)


def early_exit_modes() -> tuple[str, ...]:
    """`early_exit.mode` values: "off" (= full) and every other registered strategy."""
    return ("off", *(n for n in strategy_names() if n != "full"))


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


def threshold_value(v: float | str) -> float | str:
    """A confidence threshold: a number in [0, 1], or "auto" (calibrated per-exit thresholds)."""
    if isinstance(v, str) and v != "auto":
        raise ValueError(f'must be a number in [0, 1] or "auto", got {v!r}')
    if not isinstance(v, str) and not 0.0 <= v <= 1.0:
        raise ValueError(f"must be in [0, 1], got {v}")
    return v


class EarlyExitOptions(BaseModel):
    """The `early_exit` object of the OpenAI endpoints (DESIGN.md section 6 for the meaning)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    # Names from the registries (checked below; the OpenAPI schema lists them as enums).
    mode: str = Field("early_exit", json_schema_extra=lambda s: s.update(enum=list(early_exit_modes())))
    threshold: float | str = Field(0.8)  # "auto": the checkpoint's calibrated per-exit thresholds
    # None: learned where the model's exits carry confidence probes, else max_prob (`default_measure`).
    measure: str | None = Field(None, json_schema_extra=lambda s: s.update(enum=list(measure_names())))
    exit_layers: list[int] | None = Field(None, min_length=1, max_length=256)
    min_layer: int | None = Field(None, ge=1)
    # self_speculative: "auto" chooses each round from measured acceptance (plain steps when no draft pays).
    num_draft_tokens: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = "auto"
    draft_exit_layer: Annotated[int, Field(ge=1)] | Literal["auto"] | None = "auto"  # None: the deepest exit
    draft_alternatives: bool = False  # self_speculative: verify drafts' second choices too (`GenerationSettings`)
    # self_speculative: also draft from the context, n-grams up to this long (0: off; not early exit)
    prompt_lookup_max: int = Field(0, ge=0, le=16)
    # None: GenerationSettings' default (cost_aware); checked against the engine's names (a 400).
    exit_policy: str | None = Field(None, json_schema_extra=lambda s: s.update(enum=list(EXIT_POLICIES)))
    # None: GenerationSettings' default ("auto": a leaving token from the draft vocabulary where
    # the checkpoint records one and decoding is greedy); "draft" / "full" force either (a 400 if bad).
    exit_vocabulary: str | None = Field(None, json_schema_extra=lambda s: s.update(enum=list(EXIT_VOCABULARIES)))

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, v: float | str) -> float | str:
        return threshold_value(v)

    @field_validator("mode")
    @classmethod
    def _known_mode(cls, v: str) -> str:
        if v not in early_exit_modes():
            raise ValueError(f"must be one of {', '.join(early_exit_modes())}, got {v!r}")
        return v

    @field_validator("measure")
    @classmethod
    def _known_measure(cls, v: str | None) -> str | None:
        if v is not None and v not in measure_names():
            raise ValueError(f"must be one of {', '.join(measure_names())}, got {v!r}")
        return v


class MegatronRequest(_Body):
    """PUT /api. Defaults are Megatron's: temperature 1.0 with top_k 0 and top_p 0.0 samples
    from the whole distribution; `temperature: 0` (or `top_k: 1`) is greedy. top_p 0.0 means
    off; top_k and top_p cannot both be set (Megatron's rule). A string `prompts` is one
    prompt; `exit_layers: []` means every exit (EE-LLM's client sends it)."""

    prompts: list[str] | str
    tokens_to_generate: int = Field(64, ge=0)
    logprobs: bool = False
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(0.0, ge=0.0, le=1.0)
    add_BOS: bool = False
    stop_token: int | None = Field(None, ge=0)
    stop_on_eol: bool = False
    stop_on_double_eol: bool = False
    random_seed: int | None = Field(None, ge=0, lt=2**63)
    echo_prompts: bool = False
    # EE-LLM
    use_early_exit: bool = False
    early_exit_thres: float | str = Field(1.0)  # "auto": the checkpoint's calibrated per-exit thresholds
    exit_layers: list[int] | None = Field(None, max_length=256)
    print_max_prob: bool = False
    exit_policy: str | None = Field(None, json_schema_extra=lambda s: s.update(enum=list(EXIT_POLICIES)))
    exit_vocabulary: str | None = Field(None, json_schema_extra=lambda s: s.update(enum=list(EXIT_VOCABULARIES)))

    @field_validator("early_exit_thres")
    @classmethod
    def _threshold(cls, v: float | str) -> float | str:
        return threshold_value(v)

    @model_validator(mode="after")
    def _one_filter(self) -> MegatronRequest:
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts]
        if not 1 <= len(self.prompts) <= MAX_PROMPTS:
            raise ValueError(f"prompts: give 1..{MAX_PROMPTS} prompts")
        if self.exit_layers == []:
            self.exit_layers = None
        if self.top_k > 0 and self.top_p > 0.0:
            raise ValueError("top_p: cannot set both top_k and top_p (Megatron's rule); set one of them to 0")
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool = False


class _OpenAIBody(_Body):
    """Fields shared by completions and chat."""

    model: str | None = Field(None, max_length=256)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    ignore_eos: bool = False
    user: str | None = None
    early_exit: EarlyExitOptions | None = None
    logit_bias: dict[str, float] | None = Field(None, max_length=1024)
    # Not implemented: accepted by the schema only so that requests.py refuses them by name.
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    response_format: Any = None

    @model_validator(mode="after")
    def _supported(self) -> _OpenAIBody:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0.0:
                raise ValueError(f"{name}: penalties are not supported; leave it at 0")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > 16 or any(not s for s in stops):
            raise ValueError("stop: give at most 16 non-empty strings")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(_OpenAIBody):
    """POST /v1/completions. `prompt` is a string, a list of strings, a list of token ids or
    a list of such lists; `echo` + `logprobs` with `max_tokens: 0` scores the prompt."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=1)
    suffix: None = None

    @model_validator(mode="after")
    def _prompt_shape(self) -> CompletionRequest:
        p = self.prompt
        if isinstance(p, list) and (len(p) == 0 or len(p) > MAX_PROMPTS):
            raise ValueError(f"prompt: give 1..{MAX_PROMPTS} prompts")
        if isinstance(p, list) and p and isinstance(p[0], list) and any(len(x) == 0 for x in p):
            raise ValueError("prompt: a token-id prompt is empty")
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_OpenAIBody):
    """POST /v1/chat/completions, rendered with the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=5)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        return self
