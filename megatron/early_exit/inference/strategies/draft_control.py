"""The online controller of dynamic self-speculation: which exit to draft from and how many
tokens to draft, chosen each round from measured acceptance and a cost model (after DEL,
arXiv 2504.05598).

Model. Drafting g tokens from exit n, each accepted with probability a_n independently (the
verify pass keeps the agreeing prefix, then the final head's own token), a round yields
E[tokens] = 1 + a + ... + a^g = (1 - a^(g+1)) / (1 - a) tokens and costs, in units of one full
decode step, g * draft[n] (a pass that stops at exit n) + 1 + g * row[n] (the verify pass: a
full step plus the g drafted rows through the layers above exit n and the head). g = 0 is a
plain full step: 1 token for 1 unit. The controller picks the (n, g) with the most expected
tokens per unit; when nothing beats 1, it decodes plainly, so a bad exit costs (almost) nothing.

Acceptance. Per exit, Beta counts of accepted / rejected drafts, every count decayed by
`decay` per observed draft, so the estimate follows a change within ~1 / (1 - decay) drafts
(a round rejected at its first draft observes one). Only the drafts up to the first rejection
are observed; that is exactly what a geometric acceptance model needs. An exit that has not
drafted for `interval[n]` rounds drafts one token (exploration; on a round that would be plain, at
one sequence, as a chosen plan drafts, the early stop ending it: `try_plan`), so a recovered exit is found
again; intervals are set so that exploring costs about `explore_share` of decoding time (a try's
round priced as the loop clock prices it, less the plain round it replaces: `interval`) while
tries keep failing at first, and each exploratory try that drafts nothing accepted doubles that
exit's interval, up to MAX_BACKOFF times (an accepted draft resets it): with exits that never
agree, exploring then costs explore_share / MAX_BACKOFF, so lossless decoding stays within ~1% of
full decoding instead of the whole budget (the demo's SmolLM2 read 0.976x at a 2% budget), and a
recovered exit is still found within MAX_BACKOFF intervals.

A try on a round that would decode plainly reads the exit's token on the way instead of drafting
it (`Plan.observe`: the same observation, the exit's check and no verify row), where that one
drafted token would not pay for itself at the exit's estimate (a good exit's first tries still
draft it); a try of an exit shallower than the round's draft exit reads its token on the first
draft step. Timed on the demo's SmolLM2 (bf16, batch 1, Intel Xeon), a round reading exit 8 / 15
/ 22 on the way cost 1.11 plain rounds, one drafting its token 1.42 / 1.57 / 1.73 (in the decode
loop about 2: its MLP exit's draft steps through Python, its verify takes the general pass); with
all of its exits below paying, its tries were most of what lossless decoding lost (0.95-0.98x).

Observing plain rounds. A plain round drafts nothing, so it used to teach nothing: after a
stretch of rejections left an exit just below paying, decoding stayed plain until the exit's
exploration was due, after the stretch had passed (CPU reference model, bf16, 12 abstracts: 105
to 168 plain rounds in a pass in 3 of 6 processes, 32-36 in a row within one abstract, with exit
3 estimated at 0.50 where its plan needed 0.51; with observing, at most 33 in a pass). A plain
round whose best plan comes within OBSERVE_NEAR of paying, from an exit a plan chose within the
last OBSERVE_WINDOW rounds, now reads that exit's greedy token on the way (`Plan.observe`,
`ExitPolicy.observe`: the exit's check, ~0.03 of a step, and no draft) and learns from it as from
a round that drafted that one token. Exits no plan chose lately are left to exploration, at no
such cost: the demo's SmolLM2, whose exit 8 settles just above OBSERVE_NEAR without ever paying,
would otherwise pay the check on every plain round. Except at a cold start: an exit whose own
observations hold fewer than OBSERVE_EVIDENCE drafts is observed while it is near paying. Where
the loop clock times such rounds at more than OBSERVE_COST of a plain one in a batch (16 sequences:
0.2, the exit's check on every row), exits near paying are not read (`observing_pays`); tries still are. A
controller starts from the calibration record's prior, whose few drafts' worth keep an exit's
lower bound (`sure`) below paying until its own drafts add to it, and exploration adds one draft
every ~30 rounds: the CPU reference model (bf16, exit 3 accepted 88% of the time, a verify pass
timed at 1.25 plain steps) decoded 497 of its first 526 rounds plainly (0.93x full decoding in
that sweep) and drafted from the second pass over the same abstracts on. The margin (`sure`) weighs a
drafting plan against the round it would replace: where that is a plain round reading an exit, at
that round's timed rate (`plain_rate`), not a plain round's 1. At one sequence such rounds run
several at once (`Plan.run`, `SelfSpeculative.reading_run`): each step's reading is learned as it
comes, and `reads_on` ends the run where the next round's plan would differ, so the decisions are
round-by-round planning's without a round's Python around each step.

Observing under a deeper draft. A round that drafts from a deeper exit passes the shallower
ones on its way up; the controller learned about a shallower exit only from its own rounds, so
after a run of rejections left it below a deeper exit, it was tried again only by exploration (a
one-token try every ~30 rounds, each failure doubling the interval), and decoding stayed on the
dearer exit: one sweep of the CPU reference model (bf16) drafted 132 of 134 rounds from exit 6
(1.26x) and one in fp32 84 of 142 (1.28x), where runs on exit 3 read 1.4x and more. Where a
shallower exit's best plan comes within OBSERVE_NEAR of the chosen plan's rate, the round's first
draft step reads its greedy token on the way (`Plan.observe`; its check, ~0.01 of a round) and the
controller learns from it as from a one-draft round. Replayed along full decoding's tokens from
8 starting prompts, 3 passes each (`benchmarks/draft_policy.py --orders 8 --passes 3`, costs
timed per run), the worst start rose from 1.426 to 1.470 and from 1.482 to 1.509 (means 1.470 ->
1.480, 1.511 -> 1.517); the sweeps since have drafted from exit 6 in 2-7% of rounds. No window
as for plain rounds: the exit is stale precisely because no plan chose it lately.

Warm start. Where the checkpoint's calibration record (`early_exit_thresholds.json`) holds each
exit's top-1 agreement with the final head, that exit's prior holds WARM_DRAFTS drafts accepted
at that rate besides Beta(1, 1), instead of trying every exit at once: an exit that pays drafts
from the first round, and one that does not is first tried after its interval, which such a
prior lengthens (exploring it costs WARM_EXPLORE_SHARE of the time instead of `explore_share`).
The prior does not decay: the decayed counts (~14 drafts' worth) follow the text, and the record
keeps a run of rejections from turning a good exit off for an interval (measured on the CPU
reference model, bf16: counts that started at the record and decayed with the rest left 28% of
one run's rounds plain, and the rate at 1.20x against 1.25-1.40x). Without the record (or one
written before agreement was recorded), every exit is tried once at the start.

Early stop. Per exit and max-probability bin, Beta counts of whether a draft with that
confidence was accepted (prior: one draft at the exit's acceptance). A
round's plan caps its length (`Plan.limit`): the planned length g where drafts never stop early or
several sequences decode (a draft step costs a batch about as much for one of them as for all),
else the longest length allowed; each sequence's drafts stop where one more does not pay:
a further draft adds a token only where every draft so far is accepted and it is too, with
probability P(drafts so far accepted | their confidences) * a_n (the product of their bins'
acceptance, then the exit's), and it costs draft[n] + row[n] at the round's planned rate. A
geometric plan alone drafts the same g tokens after a sure draft as after an unsure one; on the
CPU reference model (exit 3 at 77% agreement on its summaries: 57% below max-probability 0.1,
86% at 0.2-0.3, over 90% from 0.3), simulated along full decoding's own tokens, the stop lifts
a round's expected tokens per unit of time from 1.28 (geometric g) to 1.35-1.38 at round costs
timed then (`benchmarks/draft_policy.py` replays it); BINS = 8
because at 4 the lowest bin mixed drafts accepted 57% and 86% of the time.

Alternative drafts (`Plan.alternatives`, `GenerationSettings.draft_alternatives`, off by default).
A draft's second choice can go to the verify pass as a row of its own; where the first rejected
draft's alternative is the final head's token, the round keeps one token more. Per round and
sequence the controller verifies the alternatives whose expected token, P(drafts before it
accepted) * P(it rejected) * P(an alternative catches a rejection) (decayed counts, `caught_share`),
pays for its row (`DraftCosts.alt`) at the plan's rate, and only if together they pay for the
pass's fixed part (`alt_base`); plans themselves are chosen without them. On the CPU reference
model (exit 3: 81% agreement, its second choice right at 55-62% of its rejections) about one
round in three kept a token, and self-speculation read 0.99-1.03x of itself without them: the
extra rows and layouts cost about what they bring on this CPU.

Drafts from the context (`LOOKUP`, key 0: `lookup.py`, asked for by `prompt_lookup_max`). The
tokens after an earlier occurrence of the context's last n tokens are a source with no draft step
(draft[0] = 0) whose verify rows run every layer; `plan` prices it per round from each running
sequence's proposal, its first draft at its match length's bin and the ones after it at that
length's continuation bin (`lookup.confidences`: a copied span, once begun, runs on), a sequence
without a proposal gaining the final head's token alone, and picks it where it beats every exit's
plan and the plain step; the early stop weighs each further draft at its own bin. It is never
explored: every round that does not draft from it observes its proposal's first token against the
final head's (`update`, one draft's worth).

Costs (`DraftCosts`) come from rounds timed on this machine (`draft_costs.py`: a round's base
cost besides its drafts is measured too), from a measured `cost_model.DecodeCosts`, or from the
config's weight counts (decoding is memory-bound: a pass costs the bytes of the weights it reads),
with the documented defaults `FIXED_LAYERS` and `ROW_SHARE`; `self_speculative.draft_costs_for`
chooses. Nothing here reads a clock: with the same costs, the same tokens give the same
decisions on every rank (tensor parallelism, which prices from weight counts) and in tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megatron.early_exit.inference.lookup import LOOKUP

FIXED_LAYERS = 1.0  # what a step does once (embedding, bookkeeping, Python), in layers' worth of time
ROW_SHARE = 0.1  # one more row through a weight matrix, as a share of reading it (memory-bound decode)
# The longest draft "auto" considers; the early stop ends most rounds before it. At 8, 30% of the CPU
# reference model's rounds (exit 3, bf16, batch 1, aclsum) drafted all 8. At 12 its self-speculative decoding
# took 0.961 / 0.974x the time per prompt (bf16, 80 / 120 pairs; fp32 0.976x), but in the sweep, alternating
# with 8 (three runs each), its speedup did not differ (1.16-1.33x against 1.18-1.36x) and its efficiency fell
# from 0.96-1.01 to 0.81-0.88: rounds are priced on the line through 1 and 4 drafts (`draft_costs.LENGTHS`),
# and from ~5 verify rows each row costs its compute (1 / 4 / 8 / 12 drafts 1.45 / 2.48 / 4.29 / 6.04 ms, AMD
# EPYC): 12 drafts priced 14% low, so the controller drafted them too often. Kept at 8.
MAX_DRAFT = 8
BINS = 8  # max-probability bins for the early stop (equal widths)
WARM_DRAFTS = 4.0  # what a calibration record's agreement is worth, in observed drafts
WARM_EXPLORE_SHARE = 0.02  # exploration budget of an exit whose acceptance the calibration record gave
MAX_BACKOFF = 4  # failed exploratory tries stretch an exit's interval up to this many times
OBSERVE_NEAR = 0.9  # a plain round observes the exit whose best plan reaches this rate (1.0 pays)
OBSERVE_WINDOW = 64  # ... and that a plan chose within this many rounds
OBSERVE_EVIDENCE = 6.0  # ... or whose decayed counts hold fewer drafts than this (a cold start)
ALT_ROWS = 2.0  # an alternative draft's verify row, in drafted rows (it also runs the layers below the exit)
LOOP_DECAY = 0.9  # per timed plain round: the loop's unit follows the host within ~10 of them
# per timed drafting round: an exit's factor holds ~50 of them. Its rounds' kept tokens swing from one
# to nine (and the factor with them): at 0.9 it read 0.75-1.47 within one pass over 12 abstracts (CPU
# reference, bf16), turning exit 3 plain for stretches where it paid throughout
EXCESS_DECAY = 0.98
LOOP_PRIOR = 4.0  # drafting rounds' worth of "the timed costs hold in the loop" (factor 1) before its own
# plain rounds run at once at most (`DraftController.plain_run`): a request's stop and a server's
# joining requests wait for the run's end at most this many steps
MAX_PLAIN_RUN = 16
LOOP_PLAIN_EVERY = 64  # drafting rounds timed at a batch bucket after which a plain round times its unit again
# the plain rounds a unit's plain plan runs at once (`SelfSpeculative.plain_run`): the unit is a plain
# round's share of such a run, what decoding that drafts nothing costs a token (see `LoopClock`)
UNIT_RUN = 8
# a bucket's first UNIT_SETTLE units come every UNIT_EARLY drafting rounds (then every LOOP_PLAIN_EVERY),
# each the mean of those so far: a cold first unit does not stand for the next 64 drafting rounds
UNIT_SETTLE = 4
UNIT_EARLY = 8
OBSERVE_COST = 0.1  # a plain round reads an exit near paying only where that costs at most this share of the round
MARGIN = 1.0  # a drafting plan must pay at its acceptance estimate less this many of its standard deviations


@dataclass
class DraftCosts:
    """Costs in units of one full decode step. draft[n]: one token drafted at exit n (layers up
    to it, its head); row[n]: one more drafted row in the verify pass (layers above n, head);
    base[n]: what a round drafting from exit n costs besides (its verify pass with no drafted
    row; a full step, 1.0, where not given: the weight-count model)."""

    draft: dict[int, float]
    row: dict[int, float]
    base: dict[int, float] = field(default_factory=dict)
    # alt[n]: one alternative draft's row in the verify pass (through every layer and the head;
    # where not given, ALT_ROWS drafted rows' worth); alt_base[n]: what a verify pass with any
    # alternative costs besides (its layouts, the layers below the exit on the general path)
    alt: dict[int, float] = field(default_factory=dict)
    alt_base: dict[int, float] = field(default_factory=dict)

    def alt_row(self, n: int) -> float:
        return self.alt.get(n, ALT_ROWS * self.row[n])

    def round_time(self, n: int, g: int) -> float:
        return 1.0 if g == 0 else g * self.draft[n] + self.base.get(n, 1.0) + g * self.row[n]


def expected_tokens(a: float, g: int) -> float:
    """Tokens a round of g drafts yields with per-draft acceptance a: (1 - a^(g+1)) / (1 - a)."""
    return float(g + 1) if a >= 1.0 else (1.0 - a ** (g + 1)) / (1.0 - a)


def lower(share: float, count: float, z: float) -> float:
    """A share estimated from `count` observations (a Beta posterior's mean), less z of its
    standard deviations sqrt(share (1 - share) / (count + 1)); not below 0."""
    return max(share - z * math.sqrt(share * (1.0 - share) / (count + 1.0)), 0.0)


def weight_counts(c) -> tuple[float, float, float]:
    """(one layer, its MLP, the vocabulary projection): weights each pass reads, from the config
    alone, so that every tensor-parallel layout and the single process price passes alike."""
    h, d = c.hidden_size, c.head_dim
    attn = h * (c.num_attention_heads + 2 * c.num_query_groups) * d + c.num_attention_heads * d * h
    mlp = h * c.ffn_hidden_size * (3 if c.swiglu else 2)
    return float(attn + mlp), float(mlp), float(c.vocab_size * h)


def costs_from_config(c, depth: dict[int, int], draft_vocab: int | None = None, lookup: bool = False) -> DraftCosts:
    """Relative costs from the weights each pass reads: layers, an exit's head (its MLP or block
    and its projection: onto `draft_vocab` tokens where drafts have a draft vocabulary) and the
    final head; `depth[n]`: layers before exit n. `lookup`: drafts from the context too (key
    `LOOKUP`: no draft step, each row through every layer)."""
    layer, mlp, vocab = weight_counts(c)
    drafted = vocab if draft_vocab is None else vocab * draft_vocab / c.vocab_size
    exit_cost = (drafted + (mlp if c.use_exit_mlp else 0.0) + (layer if c.use_exit_block else 0.0)) / layer
    full = FIXED_LAYERS + c.num_layers + vocab / layer
    draft = {n: (FIXED_LAYERS + d + exit_cost) / full for n, d in depth.items()}
    row = {n: ROW_SHARE * (c.num_layers - d + vocab / layer) / full for n, d in depth.items()}
    if lookup:
        draft[LOOKUP], row[LOOKUP] = 0.0, ROW_SHARE * (c.num_layers + vocab / layer) / full
    return DraftCosts(draft, row)


def costs_from_measured(c, depth: dict[int, int], lookup: bool = False) -> DraftCosts:
    """Relative costs from a measured `cost_model.DecodeCosts`: a drafted row costs its `row`
    per layer above the exit, and ROW_SHARE of the head; a round's verify pass is a full step
    whose layers above the exit take the pending path (`pend` each, `pend_pass` once). `lookup`: as
    `costs_from_config`."""
    layer, head = c.streamed("layer"), c.streamed("head")  # rounds alternate shallow and full depth: weights streamed
    full = c.fixed + c.num_layers * layer + head
    draft = {n: (c.fixed + d * layer + c.vocab.get(n, head)) / full for n, d in depth.items()}
    if lookup:  # no draft step; its rows and verify pass priced as an exit's at depth 0
        draft[LOOKUP], depth = 0.0, {**depth, LOOKUP: 0}
    row = {n: ((c.num_layers - d) * c.row + ROW_SHARE * head) / full for n, d in depth.items()}
    base = {n: 1.0 + ((c.num_layers - d) * c.pend + c.pend_pass) / full for n, d in depth.items()}
    return DraftCosts(draft, row, base)


@dataclass
class ExitStats:
    """One exit's decayed acceptance counts, confidence bins and rounds since it last drafted."""

    accepted: float = 0.0
    rejected: float = 0.0
    idle: int = 0
    backoff: int = 1  # the interval's multiple: doubled by each failed exploratory try, up to MAX_BACKOFF
    exploring: bool = False  # the exit's last plan was an exploratory try (its update is due)
    chosen_ago: int = 1 << 30  # rounds since a plan (not an exploratory try) last drafted from the exit
    bins: list[list[float]] = field(default_factory=lambda: [[0.0, 0.0] for _ in range(BINS)])
    caught: float = 0.0  # decayed count of rejections whose alternative draft was the final head's token
    missed: float = 0.0  # ... and of those whose alternative was not


class LoopClock:
    """What rounds cost in the decode loop itself, against what `DraftCosts` says they cost.

    `draft_costs` times rounds in isolation and keeps each kind's best time; in the loop the same
    rounds cost more, and not alike: on the CPU reference model (bf16, batch 1) a draft step from
    exit 3 took 0.328 of a plain step in the loop against 0.24-0.285 timed, a verify pass 1.21
    against 1.10-1.15. Where an exit is far from paying that moves nothing (replayed at either
    set of costs the CPU reference's controller reads 1.41), but where it is near, the timed costs
    keep it drafting at a loss: the tuned SmolLM2 drafted 107 rounds from exit 8 at 25% acceptance
    with a timed draft of 0.246 and a base of 1.02 and read 0.86x full decoding. Each round's wall
    time is recorded per batch bucket: plain rounds' (a decayed mean: the unit) and, per exit, each
    drafting round's ratio to what its costs predict in that unit (a decayed mean starting from
    LOOP_PRIOR rounds of 1.0, which decay with the rest); `factor` scales the exit's predicted
    round time. Like with like: drafting rounds against plain rounds of the same loop, so the
    host's speed cancels. A plain round that reads an exit's token on the way (`Plan.observe`)
    costs that check besides and is not the unit (it is timed apart: `observe_cost`): at batch
    16 (CPU reference, bf16) the cold start's plain rounds all observed, 5.8-6.8 ms against a
    plain round's 3.5, and that unit read the drafting rounds at 0.6 of their predicted time where
    they took 1.15x it (self-speculation 0.97x full decoding). Where a bucket has no unit, or has
    timed LOOP_PLAIN_EVERY drafting rounds since its last plain one, the next round is plain and
    reads no exit (`unit_due`, `DraftController.plan`): an exit that always pays would otherwise
    never be checked against the loop's own plain round. That round runs UNIT_RUN plain rounds at
    once, and the unit is their mean: the plain rounds a drafting round competes with run so
    (`DraftController.plain_run`, at least UNIT_RUN of them where the unit is due), not one
    round at a time. On an AMD EPYC (CPU reference, bf16, batch 1, a 32-token decode) a lone plain
    round cost 2.36 ms where full decoding's steps cost 1.77: against that unit, rounds drafting
    one token from exit 3 (2.97 ms for 1.24 tokens, 1.35 units a token) read as break-even and
    self-speculation decoded at 0.88x full decoding."""

    def __init__(self) -> None:
        self.plain: dict[int, float] = {}  # batch bucket -> decayed mean seconds of a plain round
        self.excess: dict[tuple[int, int], tuple[float, float]] = {}  # (bucket, exit) -> (sum, weight)
        self.since: dict[int, int] = {}  # batch bucket -> drafting rounds timed since its last plain round
        self.observing: dict[int, float] = {}  # batch bucket -> decayed mean seconds of a plain round reading an exit
        self.units: dict[int, int] = {}  # batch bucket -> plain rounds (runs) timed into its unit

    def observe_cost(self, bucket: int) -> float | None:
        """What reading an exit on a plain round adds to it at this bucket, as a share of a plain
        round (None: not timed yet). At 16 sequences (CPU reference, bf16) 0.2, at one ~0.1."""
        seen, unit = self.observing.get(bucket), self.plain.get(bucket)
        return None if seen is None or unit is None else seen / unit - 1.0

    def record_observing(self, bucket: int, seconds: float) -> None:
        """A plain round that read an exit on the way took `seconds` (`observe_cost`)."""
        decay_into(self.observing, bucket, seconds)

    def unit_due(self, bucket: int) -> bool:
        """Whether the bucket's next round should be a plain one, timed as its unit: none timed yet,
        or LOOP_PLAIN_EVERY drafting rounds timed since the last (UNIT_EARLY while the bucket has
        fewer than UNIT_SETTLE of them). The first is often a cold one: a process's first request,
        its first steps after a prefill (CPU reference, bf16, batch 1, AMD EPYC: 1.81 ms a step where
        the next read 1.3-1.6), and in a process that then drafted every round it stood for 64 of
        them, the unit 1.76 ms against full decoding's 1.31: rounds drafting from exit 3 read 1.3x
        their real rate, and self-speculation decoded at 0.93x full decoding drafting at a loss."""
        if bucket not in self.plain:
            return True
        every = LOOP_PLAIN_EVERY if self.units.get(bucket, 0) >= UNIT_SETTLE else UNIT_EARLY
        return self.since.get(bucket, 0) >= every

    def factor(self, bucket: int, n: int) -> float:
        total, weight = self.excess.get((bucket, n), (LOOP_PRIOR, LOOP_PRIOR))
        return total / weight

    def forget(self, bucket: int, exits: list[int], rounds: int = 1) -> None:
        """`rounds` rounds that did not draft from `exits`: each one's factor decays toward its prior (1,
        LOOP_PRIOR rounds' worth) at EXCESS_DECAY a round, so that what an exit's last rounds read does not
        stand for good once no plan chooses it. Kept as it was, one unlucky first round (a draft rejected at
        once, `worth` 0.25) put exit 3's factor at 1.25 with its acceptance estimate at 0.62, below exit 6's
        plans and below the margin where its token is read under them, and neither moved again: replayed
        with the CPU reference's exits (acceptance 0.84 / 0.90, rounds at their true costs, 20 seeds of 600
        rounds, scratch), 4 of 20 runs drafted mostly from exit 6 and the worst made 1.44 tokens a unit of
        time; forgetting, none did and the worst made 1.56 (mean 1.62 -> 1.65). From the noisy timed costs
        one sweep of stop 80 read (a verify row at 0, a base at 1.39 plain steps), 10 -> 4 of 20 runs mostly
        from exit 6, the worst 1.15 -> 1.41 (mean 1.43 -> 1.48)."""
        d = EXCESS_DECAY**rounds
        for n in exits:
            held = self.excess.get((bucket, n))
            if held is not None:
                self.excess[(bucket, n)] = (d * held[0] + (1.0 - d) * LOOP_PRIOR, d * held[1] + (1.0 - d) * LOOP_PRIOR)

    def record(self, bucket: int, n: int | None, predicted: float, seconds: float, worth: float = 1.0) -> None:
        """One round's wall time: a plain round's (`n` None) or a drafting round's from exit n whose
        costs predicted `predicted` plain rounds and whose kept tokens were `worth` times what the
        controller expected of its drafts (`DraftController.worth`). The factor is the ratio of
        decayed sums, the rounds' plain rounds' worth of time over the time their costs give the
        tokens they kept (predicted x worth), so that an exit's rate is what its rounds made per unit
        of time: the geometric model prices a round's drafts at the exit's mean acceptance, while
        the early stop drafts on where they are sure, and kept 1.3-1.4x the tokens it expected of
        as many drafts (CPU reference, bf16, batch 1: priced by time alone, exit 3 read 0.95-1.0
        at its lower bound and decoded plainly for whole runs, 0.92x full decoding, where drafting
        from it every round decoded at 1.26x)."""
        if n is None:  # the unit: the mean of its first records, then decayed (LOOP_DECAY)
            k = self.units[bucket] = self.units.get(bucket, 0) + 1
            decay_into(self.plain, bucket, seconds, max(1.0 / k, 1.0 - LOOP_DECAY))
            self.since[bucket] = 0
            return
        self.since[bucket] = self.since.get(bucket, 0) + 1
        unit = self.plain.get(bucket)
        if unit is None or predicted <= 0.0:
            return
        total, weight = self.excess.get((bucket, n), (LOOP_PRIOR, LOOP_PRIOR))  # the prior decays with the rest
        self.excess[(bucket, n)] = (EXCESS_DECAY * total + seconds / unit, EXCESS_DECAY * weight + predicted * worth)


def decay_into(means: dict[int, float], bucket: int, seconds: float, weight: float = 1.0 - LOOP_DECAY) -> None:
    """means[bucket] <- its decayed mean with `seconds` at `weight` (the first time, `seconds`)."""
    last = means.get(bucket)
    means[bucket] = seconds if last is None else (1.0 - weight) * last + weight * seconds


def batch_bucket(running: int) -> int:
    """The batch size whose costs price a round of `running` sequences: the next power of two
    (a shrinking batch is then timed a few times, not once per size)."""
    return 1 << max(running - 1, 0).bit_length()


@dataclass
class Plan:
    exit: int | None  # None: a plain full step
    length: int
    rate: float  # expected tokens per unit of time
    explore: bool = False
    limit: int | None = None  # the most drafts a sequence takes this round (None: `length`); the stop may take fewer
    # The exit whose greedy token the round reads and learns from: a plain round's on its step, a
    # drafting round's (a shallower exit than the draft's) on its first draft step.
    observe: int | None = None
    # Each draft's second choice goes to the verify pass too (`kv_cache.RowIndex`): where the
    # first rejected draft's alternative is the final head's token, its row's token is kept as well.
    alternatives: bool = False
    drafted: int = 0  # set by the round: the most drafts a sequence took (what the loop clock prices)
    # set by the round: tokens kept per sequence, and what the controller expected of its drafts (`worth`)
    kept: float = 0.0
    expected: float = 0.0
    # A plain plan: the plain rounds it may run at once (`DraftController.plain_run`: those before any
    # exit is due a try, in which nothing the controller weighs changes; a reading plan's, MAX_PLAIN_RUN,
    # `reads_on` ending them where the next plan would differ), and those it ran (set by the round)
    run: int = 1
    steps: int = 1
    # Per sequence, its proposal from the context (`lookup.propose`: tokens, match length), where
    # the request drafts from it: what a `LOOKUP` plan drafts, and what other rounds observe.
    proposals: dict[int, tuple[list[int], int]] | None = None

    @property
    def cap(self) -> int:
        return self.length if self.limit is None else self.limit


class DraftController:
    """Chooses (draft exit, draft length) each round; learns from every verify round."""

    def __init__(
        self, costs: DraftCosts, decay: float = 0.93, prior: tuple[float, float] = (1.0, 1.0),
        explore_share: float = 0.05, stop_early: bool = True, agreement: dict[int, float] | None = None,
        bin_decay: float = 0.995, margin: float = MARGIN,
    ) -> None:  # fmt: skip
        self.decay, self.bin_decay, self.prior, self.margin = decay, bin_decay, prior, margin
        self.explore_share, self.stop_early = explore_share, stop_early
        self._costs = costs
        self.stats = {n: ExitStats() for n in costs.draft}
        self.loop: LoopClock | None = None  # `use_loop_clock`: rounds' own wall times correct the costs
        self.bucket = 1  # the batch bucket of the latest plan (`plan`): its loop clock prices and times it
        self.planned: list[int] = []  # the exits the latest plan weighed
        self.lengths: list[int] = []  # ... and the draft lengths
        self.priors = dict.fromkeys(costs.draft, prior)  # per exit: a warm start adds the record's drafts
        self.share = {n: explore_share for n in costs.draft}  # per exit: a warm start lowers it
        exits = [n for n in self.stats if n != LOOKUP]  # the context's drafts are observed, never explored
        for n in exits:
            self.stats[n].idle = self.interval(n, len(exits))  # every exit is tried once at the start
        self.warm_start(agreement or {})

    @property
    def costs(self) -> DraftCosts:
        return self._costs

    @costs.setter
    def costs(self, costs: DraftCosts) -> None:
        """New costs (another batch size, a measured set); a source they price that the controller
        has not met yet (the context's drafts, `LOOKUP`, asked for by a later request) starts
        fresh, observed from its first round on (`self_speculative.lookup_observations`), never explored."""
        self._costs = costs
        for n in costs.draft:
            if n not in self.stats:
                self.stats[n], self.priors[n], self.share[n] = ExitStats(), self.prior, self.explore_share

    def warm_start(self, agreement: dict[int, float]) -> None:
        """Add WARM_DRAFTS drafts accepted at `agreement[n]` (exit n's top-1 agreement with the
        final head on the calibration text) to its prior instead of trying it at once:
        an exit that pays drafts from the first round, one that does not waits its interval,
        which a prior makes longer: exploring it may cost WARM_EXPLORE_SHARE of the time."""
        for n, share in agreement.items():
            if n in self.stats:
                if not 0.0 <= share <= 1.0:
                    raise ValueError(f"agreement of exit {n}: {share} is not a share in [0, 1]")
                pa, pr = self.priors[n]
                self.priors[n] = (pa + WARM_DRAFTS * share, pr + WARM_DRAFTS * (1.0 - share))
                self.stats[n].idle = 0
                self.share[n] = min(self.explore_share, WARM_EXPLORE_SHARE)

    def interval(self, n: int, num_exits: int) -> int:
        """Rounds between exploratory drafts from exit n: a rejected try costs its round less the
        plain round it replaces, a one-draft round's time (its verify pass's fixed part besides
        the draft and its row: `DraftCosts.round_time`) at the loop clock's factor, less 1; times
        the exit's back-off (each failed try doubles it, up to MAX_BACKOFF). Priced at the draft
        and its row alone (0.15 of a step), tries of the CPU reference model's exits 3 and 6 (bf16,
        batch 1, AMD EPYC) came every ~15 rounds and each cost ~1 step more than a plain one (the
        verify pass's fixed part, a decode state's first round from the exit): on 32-token decodes
        that stayed plain otherwise, 1.2 of the 2.8 ms a request that self-speculation lost."""
        c = self.costs  # round_time(n, 1) * factor - 1, summed so that a base of 1 and no factor add exact zeros
        slack = c.base.get(n, 1.0) - 1.0 + (self.factor(n) - 1.0) * c.round_time(n, 1)
        extra = c.draft[n] + c.row[n] + max(slack, 0.0)
        return max(1, math.ceil(num_exits * extra * self.stats[n].backoff / self.share[n]))

    def acceptance(self, n: int) -> float:
        st, (pa, pr) = self.stats[n], self.priors[n]
        return (st.accepted + pa) / (st.accepted + st.rejected + pa + pr)

    def rate(self, n: int, g: int, low: bool = False, clocked: bool = True) -> float:
        """Expected tokens per unit of time of g drafts from exit n; `low`: at the acceptance's
        lower bound (`sure`); `clocked` False: at the costs alone, without the loop clock's factor."""
        st, (pa, pr) = self.stats[n], self.priors[n]
        a = self.acceptance(n)
        a = lower(a, st.accepted + st.rejected + pa + pr, self.margin) if low else a
        return expected_tokens(a, g) / (self.costs.round_time(n, g) * (self.factor(n) if clocked else 1.0))

    def sure(self, plan: Plan, lookup: list[list[float]] | None, floor: float = 1.0) -> bool:
        """Whether a drafting plan pays (rate above `floor`: the plain round it would otherwise be,
        `plain_rate`) at its acceptance estimate less `margin` of the estimate's standard deviations.
        Decayed counts hold ~14 drafts, so an exit below break-even reads above it now and then:
        the tuned SmolLM2's exit 8, accepted 26% of the time, drafted 65 of ~180 rounds of one
        sweep at a loss (0.93x full decoding)."""
        if plan.exit == LOOKUP:
            return self.lookup_rate(lookup, plan.length, low=True) > floor
        return self.rate(plan.exit, plan.length, low=True) > floor

    def plain_rate(self, observing: bool) -> float:
        """Tokens per unit of time of the plain round a round that drafts nothing would be: 1; where it
        reads an exit on the way (`observing`), 1 / (1 + what reading costs at this bucket, as the
        loop clock timed it: `LoopClock.observe_cost`). The margin weighs a drafting plan against
        the round it replaces: on an AMD EPYC (CPU reference, bf16, batch 1, 128 tokens of
        `decode_speed`'s prompt) a plain round reading exit 3 took 1.19 ms against full decoding's
        0.97 ms a token (its step as a plain one, the round's Python besides), and such rounds, 40%
        of the time, came in stretches of 20-40 while exit 3's plans read 1.03-1.17 tokens a unit
        (0.84-0.98 less the margin): each gave up ~25% against drafting."""
        cost = None if not observing or self.loop is None else self.loop.observe_cost(self.bucket)
        return 1.0 / (1.0 + max(cost or 0.0, 0.0))

    def factor(self, n: int) -> float:
        """How much dearer exit n's rounds are in the loop than its costs say (`LoopClock`; 1
        without it). A plan's rate carries it; the early stop and the alternatives weigh their
        costs at that rate times it, so that they decide as without it: the loop clock moves
        the choice between drafting and a plain round, and between exits, alone."""
        return 1.0 if self.loop is None else self.loop.factor(self.bucket, n)

    def observing_pays(self) -> bool:
        """Whether a plain round may read an exit near paying: always for one sequence (plain rounds
        are few there, and reading ended plain stretches of 30-170 rounds where a drafting round
        gains ~40%: see the module docstring); in a batch, where its cost at this bucket (the loop
        clock's, where timed) is at most OBSERVE_COST of the round. At 16 sequences (CPU reference,
        bf16) such rounds read the exit on 16 rows for 0.2 of a round and came at nearly every plain
        round (the exits sat near paying, a drafting round gaining ~10% where it paid):
        self-speculation decoded at 0.88x full decoding where every fixed plan read 0.90-0.97x."""
        cost = None if self.loop is None or self.bucket == 1 else self.loop.observe_cost(self.bucket)
        return cost is None or cost <= OBSERVE_COST

    def use_loop_clock(self) -> None:
        """Price plans with the loop's own round times too (`LoopClock`); off by default (a
        replay, and decisions that must not depend on the clock)."""
        if self.loop is None:
            self.loop = LoopClock()

    def plain_run(self, exits: list[int]) -> int:
        """After `plan` chose a plain round reading no exit: how many plain rounds in a row, this one
        first, would choose the same (up to MAX_PLAIN_RUN). Until an exit is due a try (`interval`)
        nothing the choice reads changes in a plain round that reads no exit (no acceptance is
        learned; an exit near paying drops out of reach as its rounds since chosen grow, none comes
        in; the loop clock's unit was just timed or is this round), so those rounds can run as one:
        full decoding's steps in one native call (`SelfSpeculative.plain_round`)."""
        if not exits:
            return 1
        ahead = min(self.interval(n, len(exits)) - self.stats[n].idle for n in exits)
        return max(1, min(MAX_PLAIN_RUN, 1 + ahead))

    def reads_on(self, n: int) -> bool:
        """After a step of a reading run (plain rounds reading exit n, its observation learned:
        `update`), whether the next round's plan would read n again (no exit due a try, no drafting
        plan paying, n the exit near paying that a plain round reads): counted then as `plan`
        counts a round, the run going on with it. One native call runs such rounds where it would
        have run one (`SelfSpeculative.reading_run`): on an AMD EPYC (CPU reference, bf16, batch 1)
        a reading round cost 1.19 ms against full decoding's 0.97 a token, the round's Python
        (~0.2 ms) besides a step that costs a plain one. The same decisions as round by round: what
        `plan` reads besides (the loop clock) changes only when a round is timed, after the run."""
        exits = self.planned
        if any(self.stats[m].idle >= self.interval(m, len(exits)) for m in exits):
            return False
        for m in exits:
            self.stats[m].idle += 1
            self.stats[m].chosen_ago += 1
        best, near, _ = self.best_plan(exits, self.lengths, None)
        if best.exit is None and near[0] == n:
            return True
        for m in exits:  # not this round: `plan` counts it
            self.stats[m].idle -= 1
            self.stats[m].chosen_ago -= 1
        return False

    def ran_plain(self, exits: list[int], rounds: int) -> None:
        """A plain run made `rounds` rounds at once: the rounds after its first counted as `plan`
        counts each (every exit's rounds idle and since chosen)."""
        for n in exits:
            self.stats[n].idle += rounds - 1
            self.stats[n].chosen_ago += rounds - 1

    def timed(self, plan: Plan, seconds: float) -> None:
        """A round of `plan` (drafted `plan.drafted`, at the bucket `plan` was made at) took `seconds`.
        A plain round that read an exit on the way is not the unit (`LoopClock`): it is timed as
        what reading an exit costs (`LoopClock.observe_cost`). A drafting round that read a
        shallower exit counts as its exit's round: that is how the plan ran (its drafts step
        through Python then), and left out, the CPU reference's exit 6 at batch 4 read 0.92 of its
        predicted time where such rounds took 1.37x it, and drafted at a loss."""
        if self.loop is None:
            return
        drafted = plan.exit if plan.exit is not None and plan.drafted else None
        self.loop.forget(self.bucket, [m for m in self.planned if m != drafted], max(plan.steps, 1))
        if plan.observe is not None and not plan.drafted:  # a reading run's rounds: each its share
            self.loop.record_observing(self.bucket, seconds / max(plan.steps, 1))
        elif plan.exit is None:  # a plain run's rounds: each its share (the unit a drafting round competes with)
            self.loop.record(self.bucket, None, 1.0, seconds / max(plan.steps, 1))
        else:
            n = plan.exit if plan.drafted else None
            predicted = self.costs.round_time(n, plan.drafted) if n is not None else 1.0
            worth = plan.kept / plan.expected if plan.expected > 0.0 else 1.0
            self.loop.record(self.bucket, n, predicted, seconds, worth)

    def worth(self, n: int, rounds: list[tuple[list[float], int]]) -> tuple[float, float]:
        """(tokens a round from exit n kept per sequence, tokens the controller expected of its drafts
        at the exit's acceptance: `expected_tokens`), from its observations as `update` takes them (call
        it before `update`); (0, 0) for the context's drafts (priced per bin: `lookup_rate`)."""
        if n == LOOKUP or not rounds:
            return 0.0, 0.0
        a = self.acceptance(n)
        kept = sum(ok + 1 for _, ok in rounds) / len(rounds)
        return kept, sum(expected_tokens(a, len(confs)) for confs, _ in rounds) / len(rounds)

    def caught_share(self, n: int) -> float:
        """P(a rejected draft's alternative is the final head's token): decayed counts and a
        Beta(1, 1) prior (the first rejections with alternatives correct it)."""
        st = self.stats[n]
        return (st.caught + 1.0) / (st.caught + st.missed + 2.0)

    def worth_verifying(self, plan: Plan, confs: list[float]) -> list[int]:
        """The drafts (indices) whose alternative is worth a verify row: it adds a token where the
        drafts before it are accepted, it is rejected, and the alternative is the final head's
        token, P = prod(draft_ok before) * (1 - draft_ok) * `caught_share`, against its row's
        cost at the plan's rate."""
        n, keep, before, net = plan.exit, [], 1.0, 0.0
        for j, conf in enumerate(confs):
            ok = self.draft_ok(n, conf)
            value = self.alternative_value(plan, before, ok)
            if value >= 0.0:
                keep.append(j)
                net += value
            before *= ok
        return keep if net >= plan.rate * self.factor(n) * self.costs.alt_base.get(n, 0.0) else []  # and the fixed part

    def alternative_value(self, plan: Plan, before: float, ok: float) -> float:
        """What verifying a draft's alternative is worth, in tokens, where the drafts before it are
        all accepted with probability `before` and it is with probability `ok`: the chance that
        it adds a token, before * (1 - ok) * `caught_share`, less its row's cost at the plan's rate."""
        n = plan.exit
        return before * (1.0 - ok) * self.caught_share(n) - plan.rate * self.factor(n) * self.costs.alt_row(n)

    def update_alternatives(self, n: int, caught: list[int]) -> None:
        """Learn from one verify round's rejections that had alternatives: 1 where it was kept."""
        st, d = self.stats[n], self.decay ** len(caught)
        st.caught = st.caught * d + sum(caught)
        st.missed = st.missed * d + len(caught) - sum(caught)

    def lookup_rate(self, lookup: list[list[float]], g: int, low: bool = False) -> float:
        """Expected tokens per unit of time of a round drafting up to g tokens from the context,
        where each running sequence's proposal has the per-draft confidences `lookup[b]`
        (`lookup.confidences`; empty: no proposal, that sequence gains the final head's token
        alone): 1 + the chance that the first is kept + that the first two are + ...; `low`: each
        bin's acceptance at its lower bound."""
        ok = self.draft_ok_low if low else self.draft_ok
        tokens = 0.0
        for confs in lookup:
            kept = 1.0
            tokens += 1.0
            for conf in confs[:g]:
                kept *= ok(LOOKUP, conf)
                tokens += kept
        g = min(g, max(map(len, lookup)))
        return tokens / len(lookup) / (self.costs.round_time(LOOKUP, g) * self.factor(LOOKUP))

    def plan(
        self, exits: list[int], lengths: list[int], batch: int = 1, alternatives: bool = False,
        lookup: list[list[float]] | None = None,
    ) -> Plan:  # fmt: skip
        """The best (exit, length) among `exits` x `lengths` (lengths > 0), or a plain step when
        none beats it; an exit overdue for exploration drafts one token (the shortest length).
        `batch`: sequences decoding this round; at 1 (with the early stop) a chosen plan's drafts
        go up to the longest length (`Plan.limit`), the stop ending them. `alternatives`: a drafting
        plan may verify drafts' second choices too (`Plan.alternatives`): which, each round, is
        `worth_verifying`'s choice; plans are chosen without them (what they add is small, and an
        exit must pay on its own drafts). `lookup`: per running sequence, its proposal from the
        context (`lookup.propose`) as its drafts' confidences (`lookup.confidences`), where the
        request drafts from it too: a candidate source beside the exits, priced at their per-bin
        acceptance."""
        self.bucket = batch_bucket(batch)  # the loop clock's bucket: its plans priced, its round timed
        self.planned, self.lengths = exits, lengths  # what this round's plan weighed (`ran_plain`, `reads_on`)
        due = [n for n in exits if self.stats[n].idle >= self.interval(n, len(exits))]
        for n in exits:
            self.stats[n].idle += 1
            self.stats[n].chosen_ago += 1
            self.stats[n].exploring = False  # a try whose round never reached `update` is forgotten
        if self.loop is not None and exits and self.loop.unit_due(self.bucket):
            return Plan(None, 0, 1.0, run=UNIT_RUN)  # the loop clock's unit: plain rounds reading no exit (tries wait)
        trying = None
        if due:
            trying = max(due, key=lambda m: self.stats[m].idle)
            self.stats[trying].idle, self.stats[trying].exploring = 0, True
        best, near, top = self.best_plan(exits, lengths, lookup)
        if trying is not None and (tried := self.try_plan(trying, best, lengths, batch)) is not None:
            return tried
        if best.exit is None:
            # a try reads the exit's token on the way (its check: no draft, no verify row); else an
            # exit near paying is read (its check's cost)
            best.observe = trying if trying is not None else near[0] if self.observing_pays() else None
            if trying is None and best.observe is not None and batch == 1 and lookup is None:
                best.run = MAX_PLAIN_RUN  # a reading run: `reads_on` ends it where the next plan would differ
            return best
        self.stats[best.exit].idle = self.stats[best.exit].chosen_ago = 0
        best.alternatives = alternatives  # which drafts' alternatives are verified: `worth_verifying`
        if self.stop_early and batch == 1:
            # the early stop ends the drafts; in a batch a draft step costs about as much for
            # one sequence as for all, so one that drafts on holds the round up: g caps there
            best.limit = max(lengths)
        if trying is not None:  # a shallower exit's try: its token read on the first draft step's way up
            best.observe = trying
            return best
        # a shallower exit near the plan's rate: its token read on the first draft step's way up
        shallower = [n for n in exits if n < best.exit and top[n] >= OBSERVE_NEAR * best.rate]
        best.observe = max(shallower, key=lambda n: top[n], default=None)
        return best

    def try_plan(self, trying: int, best: Plan, lengths: list[int], batch: int) -> Plan | None:
        """The plan of exit `trying`'s try (it is due) beside the round's `best` plan, or None where
        the round reads its token on the way instead (`Plan.observe`) or drafts from a deeper exit
        (its first draft step reads it). A try drafts the shortest length where the round would
        draft from no deeper exit; on a round that would be plain, where that token pays at the
        costs alone, and at one sequence as a chosen plan would (the early stop ending its drafts)."""
        g, shallower = min(lengths), best.exit not in (None, LOOKUP) and trying < best.exit
        if best.exit is not None and not shallower:
            return Plan(trying, g, self.rate(trying, g), explore=True)  # cap: one draft
        if best.exit is None and self.rate(trying, g, clocked=False) > 1.0:
            # on a plain round at one sequence it drafts as a chosen plan would, the early stop
            # weighing each further draft against a plain round's rate at least (`keep_drafting`):
            # a try of one draft cannot show what the stop gains (CPU reference, bf16: rounds from
            # exit 3 kept 1.2x the tokens expected of their drafts, 1.4x at 8 drafts), and the
            # loop clock learned from such tries alone kept a paying exit plain for whole runs.
            # It drafts where its token pays at the costs alone: the loop clock's factor is learned
            # from drafting rounds only, so a try it turned into a reading (no draft) left a factor
            # read off a few rounds (1.41 on exit 3) in place for good
            limit = max(lengths) if self.stop_early and batch == 1 else None
            return Plan(trying, g, max(self.rate(trying, g), 1.0), explore=True, limit=limit)
        return None

    def best_plan(self, exits: list[int], lengths: list[int], lookup: list[list[float]] | None) -> tuple:
        """(the plan with the most expected tokens per unit of time that pays at its estimate less
        the margin, or a plain one; (the exit near paying that a plain round would read, its rate);
        each exit's best rate), changing nothing."""
        best, near, top, c = Plan(None, 0, 1.0), (None, OBSERVE_NEAR), {}, self.costs
        for n in exits:  # `rate`'s numbers, the exit's acceptance and factor read once (a reading run asks each step)
            a, f = self.acceptance(n), self.factor(n)
            readable = self.stats[n].chosen_ago <= OBSERVE_WINDOW or self.thin(n)
            for g in lengths:
                r = expected_tokens(a, g) / (c.round_time(n, g) * f)
                top[n] = max(top.get(n, 0.0), r)
                if r > best.rate + 1e-9:
                    best = Plan(n, g, r)
                if r >= near[1] and readable:
                    near = (n, r)
        if lookup and LOOKUP in self.stats and any(lookup):
            for g in lengths:
                r = self.lookup_rate(lookup, g)
                if r > best.rate + 1e-9:
                    best = Plan(LOOKUP, g, r)
        if best.exit is not None and self.margin:  # it pays only if its estimate is not too high against
            floor = self.plain_rate(near[0] is not None and self.observing_pays())  # the plain round it would be
            if not self.sure(best, lookup, floor):
                best = Plan(None, 0, 1.0)
        return best, near, top

    def update(self, n: int, rounds: list[tuple[list[float], int]]) -> None:
        """Learn from one verify round of exit n: per sequence, its drafts' confidences and how
        many of them agreed. Observed: drafts up to and including the first rejection."""
        st = self.stats[n]
        seen = sum(min(ok + 1, len(confs)) for confs, ok in rounds)
        d, db = self.decay**seen, self.bin_decay**seen  # one decay per observation
        st.accepted *= d
        st.rejected *= d
        for b in st.bins:
            b[0] *= db
            b[1] *= db
        for confs, ok in rounds:
            st.accepted += ok
            st.rejected += 1 if ok < len(confs) else 0
            for j, conf in enumerate(confs[: ok + 1]):
                st.bins[self.bin(conf)][0 if j < ok else 1] += 1.0
        if any(ok > 0 for _, ok in rounds):
            st.backoff = 1
        elif st.exploring:
            st.backoff = min(2 * st.backoff, MAX_BACKOFF)
        st.exploring = False

    def thin(self, n: int) -> bool:
        """Whether exit n's own observations (decayed counts) hold fewer than OBSERVE_EVIDENCE drafts."""
        st = self.stats[n]
        return st.accepted + st.rejected < OBSERVE_EVIDENCE

    def bin(self, conf: float) -> int:
        return min(int(conf * BINS), BINS - 1)

    def draft_ok(self, n: int, conf: float) -> float:
        """P(a draft of exit n with max-probability `conf` is accepted): the bin's counts, and a
        prior of one draft at the exit's acceptance (exits' max-probabilities are not calibrated:
        the CPU reference model's exit 3 has 57% of its drafts below 0.1 accepted)."""
        return self.bin_ok(n, self.bin(conf))

    def bin_ok(self, n: int, i: int) -> float:
        """`draft_ok` of exit n's confidence bin i."""
        acc, rej = self.stats[n].bins[i]
        return (acc + self.acceptance(n)) / (acc + rej + 1)

    def draft_ok_low(self, n: int, conf: float) -> float:
        """`draft_ok` less `margin` of its standard deviations (its bin's counts and the prior's one)."""
        acc, rej = self.stats[n].bins[self.bin(conf)]
        return lower(self.draft_ok(n, conf), acc + rej + 1, self.margin)

    def stop_numbers(self, plan: Plan) -> tuple[float, float, list[float]] | None:
        """`keep_drafting`'s rule for this round's drafts from the plan's exit (their confidences
        not known before; no alternatives) as numbers a native loop applies without asking back
        (`native.EarlyStop`): (the bar, the exit's acceptance, each confidence bin's `draft_ok`),
        the same doubles `keep_drafting` computes; None where every draft is kept."""
        if not self.stops(plan):
            return None
        if plan.alternatives:
            raise ValueError("a plan verifying alternatives stops its drafts through keep_drafting")
        n = plan.exit
        return self.stop_bar(plan), self.acceptance(n), [self.bin_ok(n, i) for i in range(BINS)]

    def stops(self, plan: Plan) -> bool:
        """Whether the early stop ends the plan's drafts (not a try capped at its length, which drafts it whole)."""
        return self.stop_early and plan.exit is not None and not (plan.explore and plan.limit is None)

    def stop_bar(self, plan: Plan) -> float:
        """What another draft's chance of adding a token must reach: a draft and its row at the plan's rate."""
        n = plan.exit
        return plan.rate * self.factor(n) * (self.costs.draft[n] + self.costs.row[n])

    def keep_drafting(self, plan: Plan, confs: list[float], next_conf: float | None = None) -> bool:
        """Whether a sequence whose drafts this round have confidences `confs` should draft
        another: P(they are all accepted) * a_n, the chance that one more adds a token, against
        what it costs at the plan's rate. `next_conf`: the next draft's confidence where it is
        known before drafting it (the context's proposals): its bin's acceptance instead of a_n."""
        if not self.stops(plan):
            return True
        n = plan.exit
        before = 1.0
        for conf in confs:
            before *= self.draft_ok(n, conf)
        a = self.acceptance(n) if next_conf is None else self.draft_ok(n, next_conf)
        gain = before * a
        if plan.alternatives:  # rejected, it may still add a token (its alternative's), where that pays its row
            gain += max(self.alternative_value(plan, before, a), 0.0)
        return gain >= self.stop_bar(plan)
