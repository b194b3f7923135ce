"""Early-exit generation: KV cache, batched per-sequence exits, self-speculation, telemetry.

Modules: passes (KV cache rows, pending-state fill, exits at their depth), strategies/ (one
unit per decoding strategy, registered by name), confidence (registered measures),
acceptance (sampling, log-probabilities, stops, telemetry, incremental detokenization),
engine (the loop), pipeline (EE-LLM's pipeline early exit), packed (CPU prepacked weights).

from megatron.early_exit.inference import generate
results = generate(model, tokenizer, [tokenizer.tokenize("Hello")], strategy="early_exit",
                   early_exit_threshold=0.8, max_new_tokens=32)
results[0].text, results[0].exit_layers, results[0].confidences, results[0].stats
"""

from __future__ import annotations

from collections.abc import Sequence

from megatron.early_exit.inference.confidence import MEASURES, Measure, measure_names, register_measure
from megatron.early_exit.inference.engine import EarlyExitEngine, summarize
from megatron.early_exit.inference.passes import DecodeState, ExitPolicy, StepOutput
from megatron.early_exit.inference.plugins import load_plugins
from megatron.early_exit.inference.settings import GenerationResult, GenerationSettings
from megatron.early_exit.inference.strategies import STRATEGIES, Strategy, register_strategy, strategy_names


def generate(
    model, tokenizer, prompts: list[list[int]], *,
    strategy: str = "full",
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_token_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    ignore_eos: bool = False,
    early_exit_threshold: float = 0.8,
    exit_layers: Sequence[int] | None = None,
    min_exit_layer: int | None = None,
    measure: str | None = None,
    num_draft_tokens: int | str = "auto",
    draft_exit_layer: int | str | None = "auto",
    return_logprobs: bool = False,
    profile: bool = False,
    exit_policy: str = "cost_aware",
    draft_alternatives: bool = False,
    prompt_lookup_max: int = 0,
    exit_vocabulary: str = "auto",
) -> list[GenerationResult]:  # fmt: skip
    """Decode `prompts` (lists of token ids, any lengths) as one batch; one result per prompt.

    model: an `EarlyExitGPT` (any device, any dtype); tokenizer: gives `text`, EOS (its
    `eod`) and stop strings, or None (token ids only; stop_strings are then ignored).

    strategy: a name in `STRATEGIES` (built in below; plugins register more):
      "full": the final head for every token.
      "early_exit": after each allowed exit, each running sequence whose confidence
        (`measure`, a name in `MEASURES`: max_prob, top2_margin, entropy, or learned = the
        exit's probe; default: learned when the exits carry probes, else max_prob) reaches
        `early_exit_threshold` takes that exit's token; the others go deeper. 1.0 never
        exits early (same tokens as "full"), 0.0 always takes the first allowed exit.
        `exit_layers` restricts which exits may fire, `min_exit_layer` drops shallower ones.
        Skipped layers' K/V are recomputed exactly when a later token goes deeper.
        `exit_policy` "cost_aware" (default) lets tokens leave only where that saves time at
        the batch size and skips exits that rarely pay; "exact" evaluates every allowed exit
        for every token (inference/exit_decision.py). `exit_vocabulary`: see `GenerationSettings`.
      "self_speculative": greedy only, lossless: draft up to `num_draft_tokens` from
        `draft_exit_layer` (None: the deepest exit), verify with one pass of the deeper layers,
        keep the agreeing prefix plus the final head's token. "auto" (the default
        for both) chooses the exit and length each round from measured acceptance and the
        cost model, and decodes plainly when no draft pays; `draft_alternatives` and
        `prompt_lookup_max` (drafts from the context too: not early exit): see `GenerationSettings`.
    Sampling: temperature 0 is greedy; otherwise top_k (0 = off) and top_p (1 = off) filter,
    and `seed` makes it reproducible. A sequence ends at EOS (unless ignore_eos), at one of
    `stop_token_ids`, when its text contains one of `stop_strings`, or after max_new_tokens;
    each sequence of the batch ends on its own. `return_logprobs` fills `logprobs`;
    `profile` adds the share of time spent in exit heads (synchronising the device). Bad
    settings raise ValueError naming the setting."""
    exits = tuple(exit_layers) if exit_layers is not None else None
    settings = GenerationSettings(  # positional: the fields in their declared order
        strategy, max_new_tokens, temperature, top_k, top_p, seed, tuple(stop_token_ids), tuple(stop_strings),
        ignore_eos, early_exit_threshold, exits, min_exit_layer, measure, num_draft_tokens, draft_exit_layer,
        return_logprobs, profile, exit_policy=exit_policy, draft_alternatives=draft_alternatives,
        prompt_lookup_max=prompt_lookup_max, exit_vocabulary=exit_vocabulary)  # fmt: skip
    return EarlyExitEngine(model, tokenizer).generate(prompts, settings)


__all__ = [
    "MEASURES",
    "STRATEGIES",
    "DecodeState",
    "EarlyExitEngine",
    "ExitPolicy",
    "GenerationResult",
    "GenerationSettings",
    "Measure",
    "StepOutput",
    "Strategy",
    "generate",
    "load_plugins",
    "measure_names",
    "register_measure",
    "register_strategy",
    "strategy_names",
    "summarize",
]
