"""What a generation call asks for (`GenerationSettings`) and what it returns (`GenerationResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron.early_exit.inference.confidence import MEASURES
from megatron.early_exit.inference.exit_decision import EXIT_POLICIES

EXIT_VOCABULARIES = ("auto", "draft", "full")  # `GenerationSettings.exit_vocabulary`


@dataclass
class GenerationSettings:
    """Everything one `generate` call can be asked for (see `generate` for the meaning)."""

    strategy: str = "full"
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False
    early_exit_threshold: float = 0.8
    exit_layers: tuple[int, ...] | None = None
    min_exit_layer: int | None = None
    measure: str | None = None  # None: `default_measure` (learned where the exits carry probes)
    num_draft_tokens: int | str = "auto"  # self_speculative: tokens drafted per round, or "auto" (0..MAX_DRAFT, online)
    draft_exit_layer: int | str | None = "auto"  # self_speculative: the drafting exit, None = the deepest, or "auto"
    return_logprobs: bool = False
    profile: bool = False
    exit_thresholds: dict[int, float] | None = None  # per-exit thresholds (calibrated); override early_exit_threshold
    # early_exit: "cost_aware" lets rows leave only where that saves time at this batch size and
    # skips exits that rarely pay (inference/exit_decision.py); "exact" evaluates every allowed exit
    # for every row (what equality tests against full decoding use).
    exit_policy: str = "cost_aware"
    # early_exit: what a token leaving at an exit is chosen from. "draft": the exit's projection
    # onto the checkpoint's draft vocabulary alone (`calibration.draft_vocabulary`: the fewest
    # tokens making up 99.5% of the final head's top-1 on the calibration text; ~2% of SmolLM2's
    # 49,152), so a leaving token costs a few hundred rows of the head, not all of them; "full":
    # the whole vocabulary; "auto" (default): "draft" where the checkpoint records one, decoding is
    # greedy without log-probabilities and the measure decides without a projection (learned),
    # else "full". A token outside the draft vocabulary cannot leave early then (the calibration
    # counts such tokens as disagreements: `calibrate_thresholds.py`).
    exit_vocabulary: str = "auto"
    # self_speculative: each draft's second choice is verified too (a row of its own in the verify
    # pass), and where the first rejected draft's alternative is the final head's token, that row's
    # token is kept as well ("auto" plans: the alternatives worth their row). Off by default: on the
    # CPU reference model (batch 1) it kept a token in ~1 of 3 rounds yet read 0.99-1.03x of
    # self-speculation without it (a verify pass's extra rows and layouts cost about what they add),
    # and its extra rows change bf16 rounding (fp32: the same tokens).
    draft_alternatives: bool = False
    # self_speculative with draft_exit_layer "auto": also draft from the context itself (`lookup`:
    # the tokens after the first occurrence of its last n <= prompt_lookup_max tokens), a
    # source the controller weighs against the exits each round. 0: off. Not early exit.
    prompt_lookup_max: int = 0


@dataclass
class TextState:
    """Incremental detokenization of one sequence (vLLM's detokenizer): `ids` decoded so far,
    `text` the stable part, `tail` the part a later token may still change (a split character);
    `prefix`/`read` offsets into `ids`: each step decodes only ids[prefix:]."""

    ids: list[int] = field(default_factory=list)
    text: str = ""
    tail: str = ""
    prefix: int = 0
    read: int = 0
    quiet_to: int = 0  # the sequence's tokens up to here hold no stop string's character (`Acceptance.quiet`)


@dataclass
class GenerationResult:
    """One prompt's output. Lists have one entry per generated token.

    exit_layers: the exit each token left at (its layer number; num_layers = the final head; 0 =
    a self-speculative draft from the context, `prompt_lookup_max`, that the final head kept).
    confidences: the confidence of the head that produced the token (the chosen measure for
    an exit, max probability for the final head and for self-speculative drafts; for a draft
    from the context the bin `lookup.confidences` gives it, from its match length).
    logprobs: log-probability of each token under the distribution it was chosen from (the
    final head's for self-speculative, whose output is the final model's); None unless asked.
    finish_reason: "stop" (EOS, a stop token or a stop string) or "length"; stopped_by
    says which. text: the generated text (None without a tokenizer), without a final EOS or
    stop token and cut before a stop string; `tokens` keep everything generated.
    stats: tokens_per_sec (the whole batch's throughput), elapsed_s, prefill_s (the prefill's
    share of it, with each sequence's first token), decode_tokens_per_sec (the batch's tokens after
    each first over the seconds after the prefill: decoding's own throughput; in the server's
    continuous batching, a request's seconds after its own prefill, shared with the sequences
    decoding beside it), average_exit_layer,
    exit_share {layer: share of this sequence's tokens}, early_exit_share, and for
    self_speculative drafted, accepted, acceptance_rate, draft_exits {exit: rounds drafted
    from it}, draft_lengths {g: rounds with g drafts, 0 = a plain step}, draft_rounds {exit: {g:
    rounds with g drafts from it}} and plain_share (the share of rounds with none);
    exit_time_share with `profile`.
    """

    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    logprobs: list[float] | None = None
    text: str | None = None
    finish_reason: str = "length"
    stopped_by: int | str | None = None
    stats: dict = field(default_factory=dict)
    stop_text: TextState | None = field(default=None, repr=False, compare=False)  # for stop strings
    # prompt_lookup_max: the context so far as `lookup.as_text` gives it, extended as tokens come
    # (joining a 4,000-token context anew took 117 us a round, the search in it 7 us)
    lookup_text: str = field(default="", repr=False, compare=False)


def default_measure(config) -> str:
    """The measure early exit decides with when a request names none: `learned` when the
    model's exits carry confidence probes (an exit that does not fire then costs no vocabulary
    projection), else `max_prob`. An explicit measure is always kept."""
    return "learned" if getattr(config, "use_exit_confidence_head", False) else "max_prob"


def calibrated_settings(record: dict | None, where: str) -> dict:
    """`GenerationSettings` fields for a checkpoint's calibrated thresholds ("threshold auto":
    the record tools/eval/calibrate_thresholds.py wrote, `model.calibrated_thresholds`); `where`
    names the input that asked, for the error when the checkpoint has none."""
    if record is None:
        raise ValueError(f"{where}: this checkpoint has no calibrated thresholds (tools/eval/calibrate_thresholds.py)")
    return {
        "early_exit_threshold": 1.0,
        "exit_thresholds": dict(record["thresholds"]),
        "measure": record.get("measure"),
    }


def greedy_tokens(s: GenerationSettings) -> bool:
    """Whether a request needs each token alone: greedy (temperature 0), no log-probabilities."""
    return s.temperature <= 0 and not s.return_logprobs


def check_values(s: GenerationSettings, strategies) -> None:
    """Raise ValueError naming the first setting out of range; `strategies`: the registry."""
    if s.strategy not in strategies:
        raise ValueError(f"strategy must be one of {', '.join(strategies)}, got {s.strategy!r}")
    if s.measure is not None and s.measure not in MEASURES:
        raise ValueError(f"measure must be one of {', '.join(MEASURES)}, got {s.measure!r}")
    if s.exit_policy not in EXIT_POLICIES:
        raise ValueError(f"exit_policy must be one of {', '.join(EXIT_POLICIES)}, got {s.exit_policy!r}")
    if s.exit_vocabulary not in EXIT_VOCABULARIES:
        raise ValueError(f"exit_vocabulary must be one of {', '.join(EXIT_VOCABULARIES)}, got {s.exit_vocabulary!r}")
    if s.exit_vocabulary == "draft" and not greedy_tokens(s):
        raise ValueError(
            "exit_vocabulary draft: greedy decoding without log-probabilities only (a leaving token's "
            "distribution would be cut to the draft vocabulary)"
        )
    if not 0.0 <= s.early_exit_threshold <= 1.0:
        raise ValueError(f"early_exit_threshold must be in [0, 1], got {s.early_exit_threshold}")
    if s.exit_thresholds and not all(0.0 <= t <= 1.0 for t in s.exit_thresholds.values()):
        raise ValueError(f"exit_thresholds must be in [0, 1], got {s.exit_thresholds}")
    if s.max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {s.max_new_tokens}")
    if s.temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {s.temperature}")
    if s.top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {s.top_k}")
    if not 0.0 < s.top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {s.top_p}")
    if s.num_draft_tokens != "auto" and (not isinstance(s.num_draft_tokens, int) or s.num_draft_tokens < 1):
        raise ValueError(f"num_draft_tokens must be an integer >= 1 or 'auto', got {s.num_draft_tokens!r}")
    if not isinstance(s.draft_alternatives, bool):
        raise ValueError(f"draft_alternatives must be true or false, got {s.draft_alternatives!r}")
    if isinstance(s.prompt_lookup_max, bool) or not isinstance(s.prompt_lookup_max, int) or s.prompt_lookup_max < 0:
        raise ValueError(f"prompt_lookup_max must be an integer >= 0 (0 = off), got {s.prompt_lookup_max!r}")
    planned = "auto" in (s.draft_exit_layer, s.num_draft_tokens)  # the controller weighs the sources
    if s.prompt_lookup_max and (s.strategy != "self_speculative" or not planned):
        raise ValueError(
            "prompt_lookup_max: drafts from the context need strategy self_speculative with an 'auto' exit or length"
        )
    if s.draft_exit_layer not in (None, "auto") and not isinstance(s.draft_exit_layer, int):
        raise ValueError(f"draft_exit_layer must be an exit layer, None or 'auto', got {s.draft_exit_layer!r}")
    if any(not isinstance(x, str) or not x for x in s.stop_strings):
        raise ValueError("stop_strings must be non-empty strings")
