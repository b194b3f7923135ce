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

`RoundPlan` works out once per decode state, draft exit and batch size what does not change from
round to round (the runs of layers below and above the exit, the draft head and the final head as
the native calls take them, whether each row count runs natively: the kernels' choice, looked up
again where what chooses them changes, `kernels.selection`), and `spec_round` makes the two calls
`native_drafts_of` and `verify_pending` would make, on the same rows, in the same order (so the
same drafts, tokens, K/V and numbers: `tests/test_native_spec.py`), where the round starts with
nothing pending (each sequence's last token the only one not fed) and every sequence drafts at
least one token. Where the verify pass would not run natively at the row count the drafts made,
the drafts are returned alone and the strategy verifies them its own way; where the drafts would
not run natively, None (nothing done). `Passes.native_spec` (class attribute) False turns it off.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron.early_exit.inference import kernels, lean, native
from megatron.early_exit.inference.passes import StepOutput
from megatron.early_exit.inference.uniform_check import DraftCheck


@dataclass
class RoundPlan:
    """What `spec_round` takes of a decode state for rounds drafting from exit n at one batch size."""

    depth: int  # the exit's depth: drafts run layers 0 .. depth - 1, the verify pass the rest
    below: lean.NativeRun
    above: lean.NativeRun
    draft_head: tuple  # as `native.drafts` takes it: packed rows, their count, the ids, the norm's args
    final: native.DecodeHead
    hooks: tuple  # the hook dicts of every module the calls stand for (`lean.hooks_set`)
    selection: tuple  # `kernels.selection()` when the row counts' kernels were looked up
    verify_rows: dict[int, bool] = field(default_factory=dict)  # rows -> the verify pass runs natively

    def verifies(self, passes, rows: int, dtype) -> bool:
        """Whether a verify pass over `rows` rows of `dtype` runs in one native call
        (`Passes.verify_pending`'s checks of the layers' and the head's kernels at that row count),
        looked up once."""
        ok = self.verify_rows.get(rows)
        if ok is None:
            m = passes.model
            ok = lean.runs_natively(self.above, rows, passes.lean_kernels) and passes.vocab_native(
                rows, dtype, m.output_weight(), m.decoder.final_layernorm
            )
            self.verify_rows[rows] = ok
        return ok


def round_plan(passes, state, n: int, batch: int) -> RoundPlan | None:
    """The plan of rounds drafting from exit n for `batch` sequences of `state`, or None where
    `native_drafts_of` or `verify_pending` would not run its calls (an exit with a block or more
    than its norm, no draft vocabulary, a kernel other than the native one at a drafting step's
    row count, profiling, a pipeline stage, the general path forced): memoised per state, exit and
    batch size, made again where the kernels' selection changed."""
    if not getattr(passes, "native_spec", False) or not passes.native_drafting or not passes.fast:
        return None
    if passes.profile or passes.start or passes.block_slots or passes.draft_vocab is None:
        return None
    if passes.device.type != "cpu" or not native.library() or not passes.plain_embedding():
        return None
    key, selection = ("spec round", n, batch), kernels.selection()
    kept = state.memo.get(key)
    if kept is not None and kept.selection == selection:
        return kept or None
    passes.lean_kernels.sync()
    made = _round_plan(passes, state, n, batch, selection)
    state.memo[key] = made if made is not None else _NoPlan(selection)
    return made


class _NoPlan:
    """A memoised "no plan" for a selection of kernels (falsy)."""

    def __init__(self, selection: tuple) -> None:
        self.selection = selection

    def __bool__(self) -> bool:
        return False


def _round_plan(passes, state, n: int, batch: int, selection: tuple) -> RoundPlan | None:
    d, layers = passes.depth(n), passes.num_layers
    if d <= 0 or d >= layers:
        return None
    check = state.remembered(("drafts", n), lambda: DraftCheck(passes, n, passes.exit_head(state, n)))
    below, above = passes.layer_run(state, 0, d), passes.layer_run(state, d, layers)
    if check.norm is None or below is None or above is None:
        return None
    emb, rows = passes.model.embedding.word_embeddings.weight, check.draft_rows()
    for a in range(1, batch + 1):  # the drafting steps' rows: every sequence, then fewer as they stop
        if not lean.runs_natively(below, a, passes.lean_kernels):
            return None
        if not passes.draft_head_native(check.head, check.norm_args, rows, a, emb.dtype):
            return None
    m = passes.model
    norm = m.decoder.final_layernorm
    final = native.DecodeHead(
        kernels.native_copy(m.output_weight()), passes.vocab, None, None if norm is None else (norm.weight, norm.eps)
    )
    draft_head = (kernels.native_copy(rows), len(passes.draft_vocab), passes.draft_vocab, check.norm_args)
    watched = (check.norm,) if norm is None else (check.norm, norm)
    hooks = below.hooks + above.hooks + lean.hook_dicts(watched)
    return RoundPlan(d, below, above, draft_head, final, hooks, selection)


def spec_round(engine, state, tokens: dict[int, int], n: int, caps: dict[int, int], keep=None):
    """A round's drafts from exit n (up to caps[b] for sequence b, from tokens[b]; keep(b, j,
    confidence): whether b drafts another after its draft j), each sequence's last draft fed below
    the exit too, then its verify pass: ({b: (drafts, confidences)}, the verify pass's `StepOutput`
    as `verify_pending` records it, or None where that pass would not run natively at the drafts'
    row count: the caller verifies), or None where the round does not run here (nothing done)."""
    passes, seqs = engine.passes, list(tokens)
    if not seqs or min(caps.values()) <= 0:
        return None
    made_plan = round_plan(passes, state, n, len(seqs))
    if made_plan is None or passes.int8_head() or lean.hooks_set(made_plan.hooks):
        return None
    filled, layers = state.cache.filled, passes.num_layers
    room = min(state.cache.capacity, state.pending.shape[1])
    pos = [state.fed[b] for b in seqs]
    if any(p + caps[b] + 1 > room or filled[layers - 1, b] != p for b, p in zip(seqs, pos)):
        return None  # past the cache's room, or rows pending (the last layer holds what every other does)
    if not (made_plan.below.native.caches_ok and state.pending.is_contiguous()):
        return None
    plan, d = made_plan, made_plan.depth
    cos, _, neg = passes.rotary_tables(max(p + caps[b] for b, p in zip(seqs, pos)) + 1)[:3]
    pending = [state.pending[b, p : p + caps[b] + 1] for b, p in zip(seqs, pos)]
    ask = None if keep is None else (lambda s, j, c: keep(seqs[s], j, c))
    emb = passes.model.embedding.word_embeddings.weight
    with engine.packed:
        made = native.drafts([tokens[b] for b in seqs], emb, plan.below.native, plan.below.shape, (cos, neg),
                             list(zip(seqs, pos)), pending, plan.draft_head, ask, True)  # fmt: skip
        if made is None:
            return None
        his = [p + len(drafts) + 1 for p, (drafts, _) in zip(pos, made)]  # every sequence drafted (caps >= 1)
        for b, hi in zip(seqs, his):
            state.fed[b] = hi
            filled[:d, b] = hi
        drafted = dict(zip(seqs, made))
        rows = sum(hi - p for hi, p in zip(his, pos))
        if not plan.verifies(passes, rows, state.pending.dtype):
            return drafted, None
        logits, toks, conf = native.verify(seqs, pos, his, filled, d, state.pending, plan.above.native,
                                           plan.above.shape, (cos, neg), plan.final)  # fmt: skip
    out = StepOutput()
    passes.record_rows(seqs, [hi - p for hi, p in zip(his, pos)], logits, toks, conf, out)
    return drafted, out
