"""Batched early-exit generation on one device (or TP-sharded), gpt-fast shaped.

The engine composes three pieces, each written once:
  - `passes.Passes`: the KV cache, rows, pending-state fill and exits at their depth;
  - a strategy from `strategies.STRATEGIES` (its exit policy and one round of decoding);
  - `acceptance.Acceptance`: sampling, log-probabilities, stops and telemetry.
Its step functions (`prefill`, `decode_one_token`, `verify`; `score` for prompt scoring) are
what strategies and the server's scheduler are written with; `generate` is the loop: prefill,
accept, then the strategy's rounds until every sequence has stopped.

CPU kernel choice (`packed.PackedWeights`) is entered around each step only, so the
caller's model is left as it was between calls.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

import torch

from megatron.early_exit.inference import greedy_head
from megatron.early_exit.inference.acceptance import Acceptance
from megatron.early_exit.inference.cost_model import best_times, work_clock
from megatron.early_exit.inference.exit_decision import ExitCosts, costs_from_parameters, decider_of
from megatron.early_exit.inference.lean import LeanKernels
from megatron.early_exit.inference.native_loop import step_once
from megatron.early_exit.inference.packed import PackedWeights
from megatron.early_exit.inference.passes import DecodeState, ExitPolicy, Passes, StepOutput, tick
from megatron.early_exit.inference.sampling import make_generator
from megatron.early_exit.inference.scoring import score
from megatron.early_exit.inference.settings import GenerationResult, GenerationSettings, check_values, greedy_tokens
from megatron.early_exit.inference.strategies import STRATEGIES, Batch, get_strategy
from megatron.early_exit.inference.strategies.draft_control import MAX_DRAFT
from megatron.early_exit.model.gpt import HeadOps

# `timed_head`: tokens decoded per timed run, and runs per head (SmolLM2 fp32: a few seconds with the
# int8 copy's quantization)
HEAD_STEPS = 8
HEAD_REPEATS = 3


class _NoPacking:
    available = False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


class EarlyExitEngine:
    """Decoding for one `EarlyExitGPT` on one device. Not thread-safe: one batch at a time."""

    def __init__(
        self,
        model,
        tokenizer=None,
        packed_weights: bool = True,
        layer_range=None,
        compile: bool = False,
        linear_kernel: str = "auto",
        head: str = "auto",
        lean: bool = True,
        draft_vocabulary: bool = True,
    ) -> None:
        """packed_weights: on CPU, run Linears and heads on the kernel measured fastest per weight
        shape, dtype and rows while decoding (`inference/kernels.py`: oneDNN-prepacked weights,
        `F.linear`, `torch.mv`, ...; 2-3x the weight bandwidth of `F.linear` on some CPUs).
        linear_kernel: 'auto' (measure; `EE_LINEAR_KERNEL` may force one) or a kernel name to force.
        head: the final head of requests that need only its token (greedy, no log-probabilities,
        strategies whose round is one pass: full, early_exit): 'auto' (the certified int8 argmax of
        `inference/greedy_head.py` for fp32 heads of >= 4M weights on the CPU where, timed once on
        first use, it makes full decoding faster: `chosen_head`; `EE_GREEDY_HEAD` may force one),
        'int8' (it for any size) or 'full' (the whole fp32 logits always). Tokens are the same
        either way; the final head's confidence then comes from near-exact logits.
        layer_range: the layers this model holds (a pipeline stage's), default all.
        lean: run the supported layers as `lean.LeanLayer` in every pass (the modules' arithmetic
        in fewer tensor operations: the same numbers); False: through the modules.
        compile: run the layers of uniform decode steps through `torch.compile` (opt-in; inductor
        makes its own kernels, so the prepacked weights are not used then); if compilation fails,
        one warning and eager decoding.
        draft_vocabulary: self-speculative drafts project onto the draft vocabulary of the
        checkpoint's calibration record where it has one (`calibration.draft_vocabulary`; one
        device); False: onto the whole vocabulary always. Either way the output is the final head's."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.passes = Passes(model, layer_range)
        if compile:
            self.passes.enable_compile()
        self.packed = PackedWeights(model, linear_kernel) if packed_weights and not compile else _NoPacking()
        self.packed_weights = self.packed.available
        self.passes.lean = lean
        self.passes.lean_kernels = LeanKernels(packed=self.packed.available)  # lean layers: the same kernels
        p = self.passes
        self.config, self.num_layers, self.vocab = p.config, p.num_layers, p.vocab
        self.device, self.dtype, self.exits = p.device, p.dtype, p.exits
        self.acceptance = Acceptance(tokenizer, self.num_layers)
        self.head = greedy_head.check_head(head)
        self._auto_head: str | None = None  # 'auto' as `chosen_head` decided it (timed once)
        if draft_vocabulary:
            self.use_draft_vocabulary(recorded_draft_vocabulary(model))

    def use_draft_vocabulary(self, tokens: list[int] | None) -> None:
        """Self-speculative drafts project onto `tokens` alone (None: the whole vocabulary); only
        where the heads run on one device (a tensor-parallel head's rows are sharded)."""
        if tokens is None or type(self.model.head_ops) is not HeadOps:
            self.passes.draft_vocab = None
            return
        if not tokens:
            raise ValueError("draft_vocabulary: no tokens")
        if min(tokens) < 0 or max(tokens) >= self.vocab:
            raise ValueError(f"draft_vocabulary: token ids must lie in 0..{self.vocab - 1} (another model's record?)")
        self.passes.draft_vocab = torch.tensor(sorted(set(tokens)), dtype=torch.long, device=self.device)

    def depth(self, n: int) -> int:
        """How many layers run before exit n reads the hidden state."""
        return self.passes.depth(n)

    def draft_exits(self) -> list[int]:
        """Exits self-speculative decoding can draft from: those with layers left to verify."""
        return [n for n in self.exits if self.depth(n) < self.num_layers]

    # ----- step functions ------------------------------------------------------------------

    def new_state(self, batch: int, capacity: int) -> DecodeState:
        return self.passes.new_state(batch, capacity)

    def prefill(self, state: DecodeState, prompts: dict[int, list[int]]) -> StepOutput:
        """Whole prompts through every layer (no exits); the final head only on each last position."""
        with self.packed:
            return self.passes.run(state, prompts, ExitPolicy())

    def decode_one_token(
        self, state: DecodeState, tokens: dict[int, int], policy: ExitPolicy, argmax: bool | None = None
    ) -> StepOutput:
        """Feed one token per sequence; each goes as deep as `policy` lets it (pending rows catch up).
        argmax: True when the caller needs only greedy tokens of the final head (the server's
        greedy steps: `greedy_head`), False for its logits; None keeps the current choice."""
        head = contextlib.nullcontext() if argmax is None else self.greedy_head(argmax)
        with self.packed, head:
            if argmax:  # greedy tokens alone: the step in the native loop where it runs there
                out = step_once(self, state, tokens, policy)
                if out is not None:
                    return out
            return self.passes.run(state, {b: [t] for b, t in tokens.items()}, policy)

    def verify(self, state: DecodeState, tokens: dict[int, list[int]], branch: dict | None = None) -> StepOutput:
        """Run every pending row (and `tokens`, fed whole) through the remaining layers; final
        logits of all those rows in `all_logits` (self-speculative verification). `branch`
        (b -> backs): the last len(backs) of `tokens[b]` are alternative drafts (`Passes.run`,
        `can_branch`)."""
        with self.packed:
            return self.passes.run(state, tokens, ExitPolicy(), all_rows=True, branch=branch)

    @property
    def can_branch(self) -> bool:
        """Whether verify passes take alternative drafts: not with exits that hold a transformer
        block (their inputs and K/V are kept per position, and an alternative shares one)."""
        return not self.passes.block_slots

    def score(self, state: DecodeState, prompts: dict[int, list[int]], policy: ExitPolicy) -> StepOutput:
        """A prefill that also scores every prompt row as early exit under `policy` would decode
        there (`scoring.score`): per-row logits in `all_logits`, layers in `row_exit_layer`."""
        with self.packed:
            return score(self.passes, state, prompts, policy)

    def run_round(
        self,
        state: DecodeState,
        running: list[int],
        results: Mapping[int, GenerationResult],
        s: GenerationSettings,
        counts: Mapping[int, list[int]],
        slot_settings: Mapping[int, GenerationSettings] | None = None,
    ) -> list[int]:
        """One round of `s.strategy` for the `running` slots (the server's op for strategies that
        do not share passes); `results[b]`, `counts[b]` belong to slot b. `slot_settings`: where
        the slots belong to several greedy requests, slot b's own settings (equal to `s` but for
        `base.PER_SEQUENCE`: `Batch.slot_settings`)."""
        strategy = get_strategy(s.strategy)
        batch = Batch(s, strategy.policy(self, s, self.allowed_exits(s)), results, counts, slot_settings=slot_settings)
        with self.packed, self.greedy_head(self.argmax_only(s)):
            return strategy.round(self, state, running, batch)

    # ----- validation ----------------------------------------------------------------------

    def check(self, s: GenerationSettings, prompts: list[list[int]]) -> ExitPolicy:
        """Raise ValueError naming the bad setting; returns the exit policy of decode steps."""
        check_values(s, STRATEGIES)
        check_prompts(prompts, self.config.vocab_size)
        outside = [t for t in s.stop_token_ids if not 0 <= t < self.vocab]
        if outside:  # never generated: the stop would silently never happen
            raise ValueError(f"stop_token_ids: {outside} are not token ids of this model (0..{self.vocab - 1})")
        policy = get_strategy(s.strategy).policy(self, s, self.allowed_exits(s))
        c, longest = self.config, max(len(p) for p in prompts)
        if c.position_embedding_type == "learned_absolute" and longest + s.max_new_tokens > c.max_position_embeddings:
            raise ValueError(
                f"max_new_tokens: prompt ({longest}) + {s.max_new_tokens} new tokens exceed the model's "
                f"{c.max_position_embeddings} positions"
            )
        return policy

    def allowed_exits(self, s: GenerationSettings) -> list[int]:
        """The exits a request lets fire: `exit_layers` (default all), at or above `min_exit_layer`."""
        allowed = list(s.exit_layers) if s.exit_layers is not None else list(self.exits)
        unknown = [n for n in allowed if n not in self.exits]
        if unknown:
            raise ValueError(f"exit_layers: {unknown} are not exits of this model (it has {self.exits or 'none'})")
        if s.min_exit_layer is not None:
            if not 1 <= s.min_exit_layer <= self.num_layers:
                raise ValueError(f"min_exit_layer must be in 1..{self.num_layers}, got {s.min_exit_layer}")
            allowed = [n for n in allowed if n >= s.min_exit_layer]
        return allowed

    def argmax_only(self, s: GenerationSettings) -> bool:
        """Whether a request needs nothing of the final head but its token: greedy, no
        log-probabilities, a strategy whose round is one pass and an accept or that reads only
        tokens (`Strategy.token_only`: self_speculative's verify), one device, CPU."""
        strategy = get_strategy(s.strategy)
        return (
            greedy_tokens(s)
            and (strategy.shares_passes or strategy.token_only)
            and type(self.model.head_ops) is HeadOps
            and self.packed_weights
        )

    @contextlib.contextmanager
    def greedy_head(self, on: bool) -> Iterator[None]:
        """Passes meanwhile take the final head's tokens from `head` (the certified int8 argmax
        where it applies: `out.tokens`, `out.all_tokens`) when `on`, else the whole logits; the
        whole logits again afterwards (the server's other step calls keep them)."""
        self.passes.argmax_head = self.chosen_head() if on else "full"
        try:
            yield
        finally:
            self.passes.argmax_head = "full"

    def chosen_head(self) -> str:
        """`head` as greedy requests take it. 'auto', where it would take the int8 head (an fp32 head
        of >= 4M weights: `greedy_head.wants_int8`), is decided once per engine by the clock: full
        decoding's steps timed with either head (`timed_head`), the faster kept. The int8 head saves
        three quarters of the head's bytes, but its steps leave the native decode loop (`native_loop`)
        for the step path: SmolLM2 in fp32 on an AMD EPYC (AVX-512, no AMX) decoded at 54.5 tok/s
        with it against 58.2 with the full head in the loop. Where decisions must not depend on the
        clock (`costs_from_parameters`: the test suite, several processes), or `EE_GREEDY_HEAD` forces
        a head, 'auto' keeps the size rule."""
        if self.head != "auto" or os.environ.get(greedy_head.ENV, "auto") != "auto":
            return self.head
        if self._auto_head is None:
            weight = self.model.output_weight()
            if not greedy_head.wants_int8(weight, "auto") or costs_from_parameters():
                self._auto_head = "auto"
            else:
                self._auto_head = "full"  # meanwhile (nothing it times asks again)
                self._auto_head = timed_head(self)
        return self._auto_head

    def exit_costs(self) -> ExitCosts:
        """The `cost_aware` policy's costs, measured (some tenths of a CPU second) or derived now
        if not yet: a server calls this at start-up, so its first cost_aware request does not pay it."""
        with self.packed:
            return decider_of(self.passes).costs_for(self.passes)

    def draft_costs(self, max_batch: int, context: int = 64) -> list[int]:
        """Self-speculation's round costs ready now at every batch bucket up to `max_batch` (1, 2,
        4, ...; `draft_control.batch_bucket`) where they are timed at all, so that a server's
        rounds never stop to time them: in continuous batching the running self-speculative
        sequences pass through every bucket, and timing one on first use stalled a round for
        seconds (SmolLM2, fp32, 16 clients: single rounds at 0.07x full decoding). The smallest
        and largest buckets are timed, those between priced on the line between them
        (`self_speculative.draft_costs_at`). Returns the buckets timed (none without draft
        exits, or where costs come from parameter counts)."""
        from megatron.early_exit.inference.strategies.draft_control import batch_bucket
        from megatron.early_exit.inference.strategies.self_speculative import draft_costs_at, rounds_timed

        if not self.draft_exits() or not rounds_timed(self):
            return []
        return draft_costs_at(self, sorted({batch_bucket(b) for b in range(1, max_batch + 1)}), context)

    def check_probes(self, allowed: list[int], measure: str) -> None:
        """A measure that reads confidence probes needs them on every allowed exit."""
        missing = [n for n in allowed if self.model.exits[str(n)].confidence is None]
        if missing:
            raise ValueError(f"measure '{measure}' needs confidence probes; exits {missing} have none")

    # ----- the loop ------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], settings: GenerationSettings | None = None) -> list[GenerationResult]:
        """Decode a batch of token-id prompts (each its own length) with one strategy; see `generate`."""
        s = settings or GenerationSettings()
        policy = self.check(s, prompts)
        results = new_results(prompts, s)
        if s.max_new_tokens == 0:
            return results
        # room for a verify pass's alternative drafts past the last position (`self_speculative`)
        extra = MAX_DRAFT if s.draft_alternatives and get_strategy(s.strategy).drafts else 0
        state = self.new_state(len(prompts), max(len(p) for p in prompts) + s.max_new_tokens + 1 + extra)
        self.passes.profile = s.profile
        with self.packed, self.greedy_head(self.argmax_only(s)):
            elapsed, counts, prefill_s = decode_loop(self, state, prompts, results, s, policy)
        drafts = get_strategy(s.strategy).drafts
        self.acceptance.finish(results, s, elapsed, counts, state.exit_time, drafts, prefill_s)
        return results


def decode_loop(
    engine, state, prompts, results, s: GenerationSettings, policy: ExitPolicy
) -> tuple[float, list, float]:
    """Prefill, accept, then the strategy's rounds until every sequence stops. `engine`: anything
    with the step functions and an `acceptance` (the engine, or the pipeline engine's stage 0).
    Returns (seconds, [drafted, accepted] per sequence, seconds of the prefill and its tokens)."""
    strategy = get_strategy(s.strategy)
    counts = [[0, 0] for _ in prompts]
    batch = Batch(s, policy, dict(enumerate(results)), dict(enumerate(counts)), make_generator(s.seed))
    start = tick(engine.device)
    out = engine.prefill(state, dict(enumerate(prompts)))
    running = engine.acceptance.accept(out, batch.results, s, batch.generator)
    prefilled = tick(engine.device) - start
    while running:
        running = strategy.round(engine, state, running, batch)
    return tick(engine.device) - start, counts, prefilled


@torch.no_grad()
def timed_head(engine, steps: int = HEAD_STEPS, repeats: int = HEAD_REPEATS) -> str:
    """'int8' or 'full': the head whose full decoding of one sequence (`steps` tokens after a
    16-token prompt, one round of the `full` strategy: the native loop where it runs) is faster,
    each its best of `repeats` alternating runs (`cost_model.best_times`, `work_clock`), on a state
    of its own."""
    prompt = [(7 * j + 3) % engine.vocab for j in range(16)]
    state = engine.new_state(1, len(prompt) + steps + 2)
    with engine.packed:
        engine.prefill(state, {0: prompt})
    fed, strategy = state.fed[0], get_strategy("full")
    s = GenerationSettings("full", max_new_tokens=steps, ignore_eos=True)

    def decode(head: str):
        def run() -> None:
            batch = Batch(s, ExitPolicy(), {0: GenerationResult(prompt, tokens=[prompt[-1]])}, {0: [0, 0]})
            engine.passes.argmax_head, running = head, [0]
            with engine.packed:
                while running:
                    running = strategy.round(engine, state, running, batch)
            state.reset(0, fed)

        return run

    try:
        runs = {"int8": decode("int8"), "full": decode("full")}
        best = best_times(runs, engine.device, repeats, work_clock(engine.device))
    finally:
        engine.passes.argmax_head = "full"
    return "int8" if best["int8"] < best["full"] else "full"


def recorded_draft_vocabulary(model) -> list[int] | None:
    """The draft vocabulary's tokens in the model's calibration record (`load_checkpoint` puts it
    in `model.calibrated_thresholds`), or None."""
    record = getattr(model, "calibrated_thresholds", None) or {}
    return (record.get("draft_vocabulary") or {}).get("tokens")


def new_results(prompts: list[list[int]], s: GenerationSettings) -> list[GenerationResult]:
    return [GenerationResult(prompt_tokens=list(p), logprobs=[] if s.return_logprobs else None) for p in prompts]


def check_prompts(prompts: list[list[int]], vocab_size: int) -> None:
    if not prompts:
        raise ValueError("prompts: give at least one prompt")
    for j, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompts[{j}] is empty: every prompt needs at least one token")
        if min(p) < 0 or max(p) >= vocab_size:
            raise ValueError(f"prompts[{j}] has token ids outside 0..{vocab_size - 1}")


def summarize(results: list[GenerationResult], num_layers: int) -> dict:
    """Batch-level telemetry: tokens, tokens/s, average exit layer, share of tokens per exit,
    share that left early, and for self_speculative the acceptance rate."""
    layers = [x for r in results for x in r.exit_layers]
    total = len(layers)
    out = {
        "tokens": total,
        "tokens_per_sec": results[0].stats.get("tokens_per_sec") if results else None,
        "average_exit_layer": sum(layers) / total if total else None,
        "exit_share": {n: layers.count(n) / total for n in sorted(set(layers))},
        "early_exit_share": sum(x < num_layers for x in layers) / total if total else 0.0,
    }
    drafted = sum(r.stats.get("drafted", 0) for r in results)
    if drafted:
        out["acceptance_rate"] = sum(r.stats.get("accepted", 0) for r in results) / drafted
    if results and "exit_time_share" in results[0].stats:
        out["exit_time_share"] = results[0].stats["exit_time_share"]
    return out
