"""The strategy interface and its registry.

A decoding strategy says two things: which exit policy its passes run under (`policy`, where
it also checks the settings it reads), and what one round of decoding does for the running
sequences (`round`). A round works through the engine's step functions alone
(`decode_one_token`, `verify`, `state.reset`) and takes tokens through `engine.acceptance`,
so the same strategy runs on one device, under tensor parallelism, in the server and (when
`pipeline` is set: rounds that only call `decode_one_token`) on the pipeline engine, whose
`decode_one_token` is EE-LLM's pipelined step.

`shares_passes`: a round is exactly one `decode_one_token(policy)` and an `accept`; the
server then merges the running sequences of every such request with an equal policy into one
pass. Otherwise the server runs the strategy's own round per request (without a sampling
generator under broadcasting: such strategies decode greedily, as self_speculative does).

A new strategy is one module that subclasses `Strategy` and calls `register_strategy`; the
CLI (`tools/generate.py --plugin MODULE`), the API schemas and the sweep read the names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch

from megatron.early_exit.inference.native_loop import native_rounds
from megatron.early_exit.inference.passes import DecodeState, ExitPolicy
from megatron.early_exit.inference.settings import GenerationResult, GenerationSettings


@dataclass
class Batch:
    """What a round works on: slot b's result and [drafted, accepted] counts, the settings,
    the policy `Strategy.policy` returned, and the request's generator (None: greedy or replayed).
    `slot_settings`: where the slots belong to several requests decoded in one round (the
    server), each slot's own settings; they differ from `settings` only in what one sequence
    reads alone (`PER_SEQUENCE`: its length, stops, seed), so the round's plan is shared."""

    settings: GenerationSettings
    policy: ExitPolicy
    results: Mapping[int, GenerationResult]
    counts: Mapping[int, list[int]]
    generator: torch.Generator | None = None
    slot_settings: Mapping[int, GenerationSettings] | None = None
    # what a strategy works out once for the batch's rounds and reuses (self_speculative: its
    # controller, exits and draft lengths per batch bucket)
    memo: dict = field(default_factory=dict, compare=False, repr=False)

    def settings_of(self, b: int) -> GenerationSettings:
        """Slot b's settings (its stops and length)."""
        return self.settings if self.slot_settings is None else self.slot_settings[b]


# Settings one sequence reads alone (where it stops, its sampling seed): requests that differ in
# nothing else may share a strategy's round (`round_key`).
PER_SEQUENCE = ("max_new_tokens", "seed", "stop_token_ids", "stop_strings", "ignore_eos")


def round_key(s: GenerationSettings) -> GenerationSettings:
    """`s` with its per-sequence settings at their defaults: requests whose keys are equal can
    share one round of their strategy (every setting a round's plan reads is equal)."""
    return replace(s, **{name: GenerationSettings.__dataclass_fields__[name].default for name in PER_SEQUENCE})


class Strategy:
    """One decoding strategy (see the module docstring). The base class is full decoding."""

    name: ClassVar[str] = ""
    pipeline: ClassVar[bool] = False  # runs on the pipeline engine
    shares_passes: ClassVar[bool] = True  # a round = one decode_one_token(policy) + accept
    drafts: ClassVar[bool] = False  # reports drafted / accepted counts
    # A round of a greedy request without log-probabilities reads only the final head's tokens
    # (`out.tokens` / `out.all_tokens` where no logits came): the engine may use the int8 head.
    token_only: ClassVar[bool] = False

    def policy(self, engine, s: GenerationSettings, allowed: list[int]) -> ExitPolicy:
        """Check the settings this strategy reads (ValueError naming one); the passes' policy.
        `allowed`: the exits the request allows (exit_layers, min_exit_layer applied)."""
        return ExitPolicy()

    def round(self, engine, state: DecodeState, running: list[int], batch: Batch) -> list[int]:
        """One round for the `running` slots; returns those still running, sorted. Greedy rounds
        that need tokens alone run as many steps as they can in one native call where it applies
        (`native_loop.native_rounds`: full decoding, exact early exit with learned checks)."""
        made = native_rounds(engine, state, running, batch)
        if made is not None:
            return made
        tokens = {b: batch.results[b].tokens[-1] for b in running}
        out = engine.decode_one_token(state, tokens, batch.policy)
        return engine.acceptance.accept(out, batch.results, batch.settings, batch.generator)


STRATEGIES: dict[str, Strategy] = {}


def register_strategy(strategy: Strategy) -> Strategy:
    """Add (or replace) a strategy under its name; returns it."""
    if not strategy.name:
        raise ValueError(f"strategy: {type(strategy).__name__} has no name")
    STRATEGIES[strategy.name] = strategy
    return strategy


def strategy_names() -> tuple[str, ...]:
    """Every registered strategy's name, in registration order."""
    return tuple(STRATEGIES)


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {name!r}")
    return STRATEGIES[name]
