"""An exit's learned check in a uniform decode step, in one call.

In a uniform decode step (`Passes.run_uniform`: one new row per sequence, every row a candidate
at every exit) most checks of a learned probe do not fire, and what such a check costs is what
every exit adds to every step. After the fused check (`fused_check.py`) and the norm shared with
the next layer, its arithmetic is one product and a list of floats; what was left was the
general path's Python: `Passes.check_exit` -> `worth_checking` -> `probe_check` ->
`folded_scores` -> `decide`, with the policy's threshold looked up three times, the candidates
listed, the exit's module and folded probe looked up, the threshold's logit worked out, about
fifteen calls, each paid cold right after a layer has streamed its weights through the caches.
Measured in a step (`benchmarks/probe_cost.py`, SmolLM2's shape, AMD EPYC, 1 thread, fp32): the
general path added ~53 us to a layer pair, its product and list alone ~16 us.

`UniformCheck` is that check with everything that does not change during a decode worked out
once per decode state and policy (`uniform_checks`): the exit's module and folded probe, the
threshold's logit, the candidates of each pass size, and under `cost_aware` the decider's
verdict for each pass size, kept while the decider has recorded nothing new
(`ExitDecider.version`), so that a skipped check costs a counter. Its arithmetic and decisions
are the general path's: the same `Passes.shared_norm_scores` (`native.Probe` where the native
kernel is built, else `lean.scaled_rows`, kept for the next lean layer, and the product), the
same comparison against logit(threshold), the same `ExitDecider` calls where rows fire or the
check runs under `cost_aware`; where rows fire, their exit hidden states and
projections are made as `Passes.probe_check` makes them. So tokens, K/V and the decider's
counts equal the general path's (`tests/test_uniform_check.py`).

It applies where the general path would take the fused check with the norm shared: a learned
measure (`probe_logit`), fused checks on, a folded probe reading an RMSNorm, no forced exit, no
profiling. Elsewhere under `cost_aware` (a vocabulary measure such as max_prob, a probe that does
not fold) `PlannedCheck` keeps the verdicts alone and runs the general path's check where it is
due, so that a step runs its layers on through an exit whose check will be skipped; under `exact`
`uniform_checks` gives None there and the general path runs.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from megatron.early_exit.inference import lean
from megatron.early_exit.inference.confidence import get_measure
from megatron.early_exit.inference.exit_decision import decider_of
from megatron.early_exit.inference.fused_check import logit_threshold, sigmoid


class UniformCheck:
    """Exit n's learned check over the rows of a uniform decode step (`__call__`)."""

    def __init__(self, passes, n: int, policy, head, folded) -> None:
        # No decode state kept: the state keeps its checks (`uniform_checks`), and a cycle would
        # hold a finished decode's caches until the garbage collector's next full pass.
        self.passes, self.n, self.policy, self.head = passes, n, policy, head
        self.folded, self.shift = folded, 0.0 if folded is None else folded.shift
        self.bound = logit_threshold(policy.threshold_of(n)) - self.shift  # scores leave the shift out
        # (native probe, bound) as a run of layers takes the check on its way (`Passes.run_layers`),
        # one object for every step (`native.layers_step` compares a step's probes with the last's)
        native = None if folded is None else folded.native
        self.native = None if native is None else (native, self.bound)
        self.exact = policy.mode == "exact"
        self.cands: dict[int, list[int]] = {}  # pass size A -> [0, A): every row is a candidate
        # pass size A -> (decider, its version, its costs, the chance's key, the verdict, whether
        # the rows would start pending rows: `ExitDecider.starts_pending`)
        self.verdicts: dict[int, tuple] = {}
        # (rows, decider, verdict) as `peek` found them for a run of layers, which `passed` counts
        # after the run without working the verdict out again (nothing the run records moves it)
        self.peeked: tuple | None = None

    def __call__(self, state, rows, out, due: bool = False) -> set[int]:
        """The sequences of `rows` (A, 1, h) of decode state `state` that leave at exit n
        (recorded in `out`, as `Passes.check_exit` records them); the check's scaled rows kept
        in `passes.scaled`. `due`: `self.due(rows)` said True for these rows just before."""
        p, a = self.passes, rows.x.shape[0]
        cand = self.candidates(a)
        if not self.exact and not due and not self.worth(rows, a, cand):
            return set()
        scores, bound = p.shared_norm_scores(self.folded, rows.x), self.bound
        fire = [j for j, z in enumerate(scores) if z >= bound]
        if not self.exact:
            fire = decider_of(p).choose(p, self.n, fire, rows, cand, self.policy)
        if not fire:
            return set()
        return self.leave(state, rows, fire, scores, out)

    def candidates(self, a: int) -> list[int]:
        """[0, a): every row of a pass of `a` rows is a candidate."""
        cand = self.cands.get(a)
        if cand is None:
            cand = self.cands[a] = list(range(a))
        return cand

    def due(self, rows) -> bool:
        """Whether the check evaluates `rows` (exact: always; cost_aware: `worth`, a skip counted
        as `__call__` counts it): a uniform step need not stop at an exit none of whose checks is
        due (`Passes.run_uniform`), and calls a due one with `due=True`. Its rows' shape decides, not
        their values, so it can be asked before the layers below the exit have run."""
        if self.exact:
            return True
        a = len(rows.seqs)
        return self.worth(rows, a, self.candidates(a))

    def wanted_probe(self, a: int):
        """The native probe the layer before this exit may run on its output in its own call
        (`Passes.decode_layer`), or None: where the check will evaluate a pass of `a` rows (exact,
        or cost_aware whose latest verdict at this pass size was to evaluate; a verdict made
        again may still skip it, and those scores go unused)."""
        probe = self.folded.native
        if probe is None or self.exact:
            return probe
        kept = self.verdicts.get(a)
        return probe if kept is not None and kept[4] else None

    def worth(self, rows, a: int, cand: list[int]) -> bool:
        """`ExitDecider.worth_checking`, its verdict kept per pass size while the decider has
        recorded nothing since and its costs are the same."""
        decider, kept = self.kept(rows, a, cand)
        return kept[4] or decider.skip(kept[3])

    def kept(self, rows, a: int, cand: list[int]) -> tuple:
        """(the decider, `verdicts[a]` made again where the decider recorded since, its costs
        changed or the rows' sequences now do or do not hold pending rows)."""
        decider = decider_of(self.passes)
        fresh = decider.starts_pending(self.passes, rows, cand)
        kept = self.verdicts.get(a)
        stale = kept is None or kept[0] is not decider or kept[1] != decider.version or kept[2] is not decider.costs
        if stale or kept[5] != fresh:
            key, worth = decider.verdict(self.passes, self.n, rows, cand, self.policy)
            kept = self.verdicts[a] = (decider, decider.version, decider.costs, key, worth, fresh)
        return decider, kept

    def peek(self, rows) -> bool:
        """What `due(rows)` will say when the step reaches this exit with rows of this shape,
        without counting a skip: a verdict depends on this exit's own counts and the costs, not
        on what the exits before it record in the meantime, so a run of layers can be planned
        through several exits before their checks are counted (`passed`)."""
        if self.exact:
            return True
        a = len(rows.seqs)
        decider, kept = self.kept(rows, a, self.candidates(a))
        self.peeked = (rows, decider, kept)
        return kept[4] or decider.refreshes(kept[3])

    def passed(self, rows, evaluated: bool) -> None:
        """A native run of layers went past this exit (`Passes.decode_layers`), its probe run
        where `evaluated` and no row's score reaching the threshold: what `__call__` counts and
        records then (a skip, or an evaluation none of whose rows fired). The verdict `peek` found
        for these rows before the run is the one `due` would find now: what the run recorded
        was other exits' evaluations, which move their own chances alone."""
        if self.exact:
            return
        peeked, self.peeked = self.peeked, None
        if peeked is not None and peeked[0] is rows:
            decider, kept = peeked[1], peeked[2]
            if not kept[4]:
                decider.skip(kept[3])  # `worth`'s count
        else:
            decider = decider_of(self.passes)
            self.due(rows)
        if evaluated:
            decider.choose(self.passes, self.n, [], rows, self.candidates(len(rows.seqs)), self.policy)

    def leave(self, state, rows, fire: list[int], scores: list[float], out) -> set[int]:
        """The rows `fire` leave: their confidences, exit hidden states and projections, as
        `Passes.probe_check` makes them, recorded as `Passes.check_exit` records them."""
        p, n = self.passes, self.n
        conf = [sigmoid(scores[j] + self.shift) for j in fire]
        logits, tokens = p.leavers_logits(state, n, self.head, rows, fire, self.policy.vocab)  # in one call
        for j, a in enumerate(fire if tokens is not None else ()):
            out.argmax[rows.seqs[a]] = tokens[j]
        return p.record_leavers(n, rows.seqs, fire, conf, logits, out)


class PlannedCheck(UniformCheck):
    """Under `cost_aware`, an exit's check that `UniformCheck` does not make in one call (a
    vocabulary measure such as max_prob, a probe that does not fold): the general path's check
    (`Passes.check_exit`, the same numbers and decider calls) where it is due, and `UniformCheck`'s
    verdicts per pass size, so that a uniform step plans its runs of layers through it where it
    will be skipped (`Passes.on_the_way`). Without it every step stopped at every exit to ask
    `worth_checking`, whatever the answer: a skipped max_prob check split the CPU reference
    model's steps into three native calls, and early exit where nothing left ran 0.92-0.96x full
    decoding at batch 1 and 4."""

    def __init__(self, passes, n: int, policy, head) -> None:
        super().__init__(passes, n, policy, head, None)

    def __call__(self, state, rows, out, due: bool = False) -> set[int]:
        """`Passes.check_exit` for every row of `rows`, where cost_aware's verdict says to evaluate
        (`due`: the caller asked it just before, through `due(rows)`, which counted it)."""
        a = len(rows.seqs)
        if not due and not self.worth(rows, a, self.candidates(a)):
            return set()
        return self.passes.check_exit(state, self.n, rows, set(rows.seqs), self.policy, out, due=True)

    def wanted_probe(self, a: int):
        """No probe runs in a layer's call for it."""
        return None


class DraftCheck:
    """A forced exit's check in a uniform decode step (a self-speculative draft): every row leaves
    at exit n with the exit's logits over the draft vocabulary (`Passes.draft_logits`; the whole
    vocabulary without one) and their max-probability, the numbers `Passes.vocab_check` makes for
    a forced exit, without the general path's Python around them (`Passes.check_exit`: the
    candidates, the policy's and the measure's lookups, `worth_checking`, `decide`)."""

    def __init__(self, passes, n: int, head) -> None:
        self.passes, self.n, self.head = passes, n, head
        self.conf = get_measure("max_prob").from_logits
        # an exit that is its RMSNorm alone: where `Passes.norm` would run it without its module,
        # the norm goes into the draft projection's call (`Passes.draft_logits`) and no exit
        # hidden state is made
        self.norm = lean.exit_norm(head)
        self.norm_args = None if self.norm is None else (self.norm.weight, self.norm.eps)
        # (the draft vocabulary, its rows of the head's output weight), kept for the decode state's
        # life as its checks are (weights do not change in the middle of a decode)
        self.rows: tuple | None = None

    def due(self, rows) -> bool:
        """A forced exit is always evaluated (`UniformCheck.due`)."""
        return True

    def peek(self, rows) -> bool:
        """`UniformCheck.peek`: always."""
        return True

    def __call__(self, state, rows, out, due: bool = True) -> set[int]:
        """Every sequence of `rows` (A, 1, h): recorded in `out` as leaving at exit n."""
        p, n, seqs, norm = self.passes, self.n, rows.seqs, self.norm
        if p.draft_vocab is not None and norm is not None and p.lean and not lean.watched((norm,)):
            made = p.native_draft(self.head, rows.x, self.norm_args, self.draft_rows())  # all of it in one call
            if made is not None:
                return self.record(seqs, *made, out)
            logits, part = p.draft_logits(self.head, rows.x, parts=True, norm=self.norm_args)
            conf = self.conf(part).tolist()
        elif p.draft_vocab is not None:
            hidden = p.exit_hidden(state, n, self.head, rows, list(range(len(seqs))))  # (A, 1, h)
            made = p.native_draft(self.head, hidden, None, self.draft_rows())
            if made is not None:
                return self.record(seqs, *made, out)
            logits, part = p.draft_logits(self.head, hidden, parts=True)
            conf = self.conf(part).tolist()
        else:
            hidden = p.exit_hidden(state, n, self.head, rows, list(range(len(seqs))))  # (A, 1, h)
            logits = p.exit_logits(self.head, hidden)
            conf = self.conf(logits).tolist()
        for a, b in enumerate(seqs):
            out.logits[b], out.exit_layer[b], out.confidence[b] = logits[a], n, conf[a]
        return set(seqs)

    def draft_rows(self) -> torch.Tensor:
        """`Passes.draft_rows` of the exit's head, looked up once per draft vocabulary."""
        ids = self.passes.draft_vocab
        if self.rows is None or self.rows[0] is not ids:
            self.rows = (ids, self.passes.draft_rows(self.head))
        return self.rows[1]

    def record(self, seqs: list[int], logits, tokens: list[int], conf: list[float], out) -> set[int]:
        """Every sequence leaves at exit n with its row of `logits`, its greedy token (`out.argmax`:
        the draft loop need not look for it in the logits) and its confidence."""
        n = self.n
        for a, b in enumerate(seqs):
            out.logits[b], out.exit_layer[b], out.confidence[b], out.argmax[b] = logits[a], n, conf[a], tokens[a]
        return set(seqs)


Check = UniformCheck | PlannedCheck | DraftCheck
KEPT_POLICIES = 16  # a server's one decode state sees every request's policy: the latest this many are kept


def uniform_checks(passes, state, policy, by_depth: dict[int, list[int]]) -> dict[int, Check | None]:
    """exit n -> its `UniformCheck` under `policy`, or `DraftCheck` where `policy` forces it (None
    where the general path must run), made
    once per decode state, policy and setting of the passes' fused checks and profiling (the
    latest KEPT_POLICIES of them: requests with thresholds of their own must not grow it)."""
    last = state.memo.get(("uniform checks", "last"))  # a decode's steps pass the same policy object:
    if last is not None and last[0] is policy and last[1] is passes.fused_checks and last[2] is passes.profile:
        return last[3]  # found by identity, without hashing the policy (~5 us a step right after a layer)
    kept = state.remembered(("uniform checks",), OrderedDict)
    key = (policy, passes.fused_checks, passes.profile)
    checks = kept.get(key)
    if checks is None:
        checks = kept[key] = _make(passes, state, policy, by_depth)
        if len(kept) > KEPT_POLICIES:
            kept.popitem(last=False)
    state.memo[("uniform checks", "last")] = (policy, passes.fused_checks, passes.profile, checks)
    return checks


def _make(passes, state, policy, by_depth) -> dict[int, Check | None]:
    measure = get_measure(policy.measure)
    checks: dict[int, Check | None] = {}
    for n in (n for exits in by_depth.values() for n in exits):
        folded, head = None, passes.exit_head(state, n)
        if policy.force == n:
            checks[n] = None if passes.profile else DraftCheck(passes, n, head)
            continue
        if measure.probe_logit and passes.fused_checks and not passes.profile:
            folded = passes.folded_probe(state, head)
        usable = policy.threshold_of(n) < 1.0 and n not in policy.observe
        if usable and applies(folded):
            checks[n] = UniformCheck(passes, n, policy, head, folded)
        elif usable and policy.mode == "cost_aware" and not passes.profile and n not in passes.block_slots:
            checks[n] = PlannedCheck(passes, n, policy, head)
        else:
            checks[n] = None
    return checks


def layer_probe(checks: dict, exits: list[int] | None, a: int):
    """The native probe of the first of `exits` (at one depth) whose check (`uniform_checks`) is
    a `UniformCheck` that wants one (`UniformCheck.wanted_probe`) for a pass of `a` rows, or None."""
    for n in exits or ():
        check = checks.get(n)
        if isinstance(check, UniformCheck):
            return check.wanted_probe(a)
    return None


def applies(folded) -> bool:
    """Whether a uniform step's check of a probe folded as `folded` (None: not foldable) runs in
    one call: the probe reads an RMSNorm, whose rows the next layer shares."""
    return folded is not None and folded.norm == "rms"
