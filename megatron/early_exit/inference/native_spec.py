"""A self-speculative round's drafts and its verify pass, one after the other without the Python
between them (`spec_round`): `SelfSpeculative.verified_round`'s greedy rounds from a norm-only exit.

Measured first (CPU reference model, bf16, batch 1, aclsum prompts, 64 tokens, 4.1 tokens a
round): a round cost 2.9 ms, of which the drafts' native call (`native.drafts`) 1.35 and the verify
pass's (`native.verify`) 1.15; the ~0.45 ms left was Python, 0.08 of it making the drafts' call
(`Passes.native_drafts_of`: the pass's checks, the runs of layers and heads looked up, the rotary
tables, the pending rows' slices) and 0.15 the verify pass's (`EarlyExitEngine.verify` ->
`Passes.run` -> `verify_pending`: the pass's setup, the fill counts read per sequence, the checks
of the head and the layers at this row count). A full decode step there is 0.93 ms, so that Python
was a sixth of what self-speculation decodes at.

What does not change from round to round (the runs of layers below and above the exit, the draft
head and the final head as the native calls take them, whether each row count runs natively: the
kernels' choice, looked up again where what chooses them changes, `kernels.selection`) is worked
out once per decode state (`Passes.draft_plan`, `Passes.verify_plan`: the drafts' own path and
`verify_pending` take them too), and `spec_round` makes the two calls `native_drafts_of` and
`verify_pending` make, on the same rows, in the same order (so the same drafts, tokens, K/V and
numbers: `tests/test_native_spec.py`), where the round starts with nothing pending (each
sequence's last token the only one not fed) and every sequence drafts at least one token. Where the
verify pass would not run natively at the row count the drafts made, the drafts are returned alone
and the strategy verifies them its own way; where the drafts would not run natively, None (nothing
done). `Passes.native_spec` (class attribute) False turns it off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron.early_exit.inference import lean, native
from megatron.early_exit.inference.passes import StepOutput


def spec_round(engine, state, tokens: dict[int, int], n: int, caps: dict[int, int], keep=None):
    """A round's drafts from exit n (up to caps[b] for sequence b, from tokens[b]; keep(b, j,
    confidence): whether b drafts another after its draft j, or a `native.EarlyStop`), each
    sequence's last draft fed below the exit too (`Passes.native_drafts_of`), then its verify pass
    (`native.verify` as `Passes.verify_pending` makes it, through the same `Passes.verify_plan`):
    ({b: (drafts, confidences)}, the verify pass's `StepOutput` as `verify_pending` records it, or
    None where that pass would not run natively at the drafts' row count: the caller verifies), or
    None where the round does not run here (nothing done)."""
    passes, seqs = engine.passes, list(tokens)
    if not seqs or min(caps.values()) <= 0 or not getattr(passes, "native_spec", False):
        return None
    d, filled = passes.depth(n), state.cache.filled
    pos = [state.fed[b] for b in seqs]
    plan = verify_ready(passes, state, seqs, d)
    if plan is None:
        return None
    with engine.packed:
        drafted = passes.native_drafts_of(state, tokens, n, caps, keep, feed_last=True)
        if drafted is None:
            return None
        his = [state.fed[b] for b in seqs]  # every sequence drafted (caps >= 1), its last draft fed
        if not plan.takes(passes, sum(hi - p for hi, p in zip(his, pos)), state.pending.dtype):
            return drafted, None
        cos, _, neg = passes.rotary_tables(max(his))[:3]
        logits, toks, conf = native.verify(seqs, pos, his, filled, d, state.pending, plan.run.native, plan.run.shape,
                                           (cos, neg), plan.head)  # fmt: skip
    out = StepOutput()
    passes.record_rows(seqs, [hi - p for hi, p in zip(his, pos)], logits, toks, conf, out)
    return drafted, out


def verify_ready(passes, state, seqs: list[int], d: int):
    """`Passes.verify_plan` at depth d where a round's verify pass for `seqs` can follow its drafts
    in one native call (`spec_round`, `loop_parts`): the fast path, no exit with a block, no int8
    head, a depth inside the model, nothing pending (the last layer holds what every other does:
    one block at d), no hook on the layers, contiguous pending rows; else None."""
    layers = passes.num_layers
    if not passes.fast or passes.block_slots or passes.int8_head() or not 0 < d < layers:
        return None
    if any(state.cache.filled[layers - 1, b] != state.fed[b] for b in seqs):
        return None
    plan = passes.verify_plan(state, d)
    if plan is None or lean.hooks_set(plan.hooks) or not state.pending.is_contiguous():
        return None
    return plan


@dataclass
class LoopParts:
    """What `native.spec_rounds` takes of a decode state for one sequence drafting from one exit
    (`loop_parts`), worked out before its rounds."""

    draft: object  # `Passes.draft_plan`'s: the layers below the exit and the draft head
    verify: object  # `Passes.verify_plan`'s: the layers from the exit on and the final head
    tables: tuple  # the rotary (cos, signed sine) below `room`
    room: int  # the last position the loop may fill + 1 (the cache's and the pending rows' length)


def loop_parts(engine, state, b: int, n: int, max_cap: int) -> LoopParts | None:
    """`native.spec_rounds`' parts for sequence b's rounds drafting up to max_cap tokens from exit n,
    where every one of them runs as `spec_round` runs it (the drafts' and the verify pass's native
    calls, the verify pass at every row count up to max_cap + 1, nothing pending, no hook, no
    exit cache), else None."""
    passes = engine.passes
    if not (getattr(passes, "native_spec", False) and getattr(passes, "native_spec_rounds", False)):
        return None
    verify = None if state.exit_cache is not None else verify_ready(passes, state, [b], passes.depth(n))
    draft = None if verify is None else passes.drafting_plan(state, [b], n)
    if draft is None:
        return None
    run, emb = draft.run.native, passes.model.embedding.word_embeddings.weight
    if not (run.caches_ok and run.dtype == emb.dtype == state.pending.dtype):
        return None
    if not all(verify.takes(passes, rows, state.pending.dtype) for rows in range(1, max_cap + 2)):
        return None
    room = min(state.cache.capacity, state.pending.shape[1])
    cos, _, neg = passes.rotary_tables(room + 1)[:3]
    if cos.dtype != torch.float32 or not (cos.is_contiguous() and neg.is_contiguous()):
        return None
    return LoopParts(draft, verify, (cos, neg), room)
