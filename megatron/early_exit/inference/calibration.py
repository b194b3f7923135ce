"""Per-exit thresholds with a statistical guarantee: CALM's Learn-Then-Test calibration.

CALM (Schuster et al., arXiv 2207.07061) calibrates early exit with Learn-Then-Test (LTT,
Angelopoulos et al., arXiv 2110.01052). Here the loss of a token is 1 when the early-exit
decision (the first exit whose confidence >= its threshold, else the final head) emits a
token other than the final head's top-1, teacher-forced on held-out text. Text is cut into
chunks of equal length; a chunk's loss is its tokens' mean disagreement, in [0, 1], and
the chunks are **assumed i.i.d.** (exchangeable: the calibration and test chunks are random
splits of one pool). The risk R(t) is the expected chunk loss = the expected token share.

Guarantee: with probability >= 1 - epsilon over the calibration chunks, R(t_hat) <= delta.

- **Path.** Threshold vectors t(lambda_0) ... t(lambda_m), conservative to aggressive, fixed
  before testing: `quantile`: t_e(lambda) = the (1 - lambda) quantile of exit e's confidence
  on a separate fitting part of the chunks (each exit alone would fire on a share lambda);
  `shared`: t_e(lambda) = 1 - lambda for every exit (CALM's single threshold);
  `precision`: t_e(lambda) = the lowest confidence at which exit e's most confident tokens on
  the fitting part still disagree with the final head at most a share lambda^2 of the time (each
  exit alone; 1.0 where none does; lambda squared: finer steps where risks are small). The
  quantile path lets every exit out on the same share of tokens, so the exit whose probe ranks
  worst sets how far every exit goes: on SmolLM2 with exits after layers 8 to 29, whose
  agreement with the final head runs from 35 to 86%, the quantile path let 17% of steps leave,
  most at exit 8, and the exits after layers 25-29 ~1% each.
  lambda_0 = 0 gives thresholds 1.0: nothing exits (the engine never fires at 1.0), risk 0.
- **p-values** (`bound`), one method per calibration (the smaller of two valid p-values is
  not a valid p-value), both for i.i.d. losses in [0, 1]:
  `wsr` (default): Waudby-Smith & Ramdas's betting p-value (LTT appendix B), which adapts to
  the losses' variance: per-chunk disagreement varies little, so it proves a risk much closer
  to delta than Hoeffding-Bentkus from the same chunks;
  `hb`: Hoeffding-Bentkus (LTT, section 3), worst-case variance:
  p = min(exp(-n h1(min(R_hat, delta), delta)), e * P(Binomial(n, delta) <= ceil(n R_hat))).
- **Fixed-sequence testing.** Test H_j: R(t_j) > delta for j = 1, 2, ... in path order and
  stop at the first p-value > epsilon; every earlier hypothesis is rejected with
  family-wise error <= epsilon; the most aggressive rejected vector is returned.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from megatron.early_exit.inference import confidence as conf_measures
from megatron.early_exit.model.gpt import ModelOutput


@dataclass
class ExitScores:
    """Teacher-forced per-token facts of C chunks of L tokens and E exits (in layer order). A
    chunk is a piece of text (`teacher_forced_scores`) or one prompt's decode steps
    (`generation_scores`: as many as its answer has, the rest of its L padding, `mask` False)."""

    exits: list[int]
    confidence: torch.Tensor  # [C, L, E] fp32: each exit's confidence in its token
    agree: torch.Tensor  # [C, L, E] bool: the exit's top-1 equals the final head's
    final: torch.Tensor | None = None  # [C, L] long: the final head's top-1 (`draft_vocabulary`)
    mask: torch.Tensor | None = None  # [C, L] bool: the chunk's tokens (None: all L of every chunk)

    def select(self, chunks: torch.Tensor) -> ExitScores:
        final = self.final[chunks] if self.final is not None else None
        mask = self.mask[chunks] if self.mask is not None else None
        return ExitScores(self.exits, self.confidence[chunks], self.agree[chunks], final, mask)

    def tokens_of(self, x: torch.Tensor) -> torch.Tensor:
        """x [C, L, ...] -> [tokens, ...]: its rows at the chunks' tokens (padding left out)."""
        return x.flatten(0, 1) if self.mask is None else x[self.mask]

    def chunk_mean(self, x: torch.Tensor) -> torch.Tensor:
        """x [C, L] -> [C]: each chunk's mean over its own tokens."""
        if self.mask is None:
            return x.mean(-1)
        m = self.mask.to(x.dtype)
        return (x * m).sum(-1) / m.sum(-1).clamp(min=1)


@torch.no_grad()
def teacher_forced_scores(model, chunks: torch.Tensor, measure: str, batch_size: int = 8) -> ExitScores:
    """Run the full model over token chunks [C, L] once; each exit's confidence and agreement."""
    vocab = model.config.real_vocab_size or model.config.vocab_size
    conf, agree, tops = [], [], []
    for start in range(0, chunks.shape[0], batch_size):
        h, rotary = model.embed_input(chunks[start : start + batch_size], None, None)
        h, exit_inputs = model.run_layers(h, rotary)  # exits evaluated here, not by the model
        final = ModelOutput()
        model.final_head(final, h)
        final_top = final.logits[..., :vocab].argmax(-1)  # (b, s)
        tops.append(final_top.cpu())
        c_b, a_b = [], []
        for n, x in exit_inputs:
            head = model.exits[str(n)]
            hidden = head.hidden(x, rotary)
            logits = head.project(hidden, model.tied_output_weight(), model.head_ops)[..., :vocab]  # (b, s, V)
            a_b.append(logits.argmax(-1) == final_top)
            if measure == "learned":
                c_b.append(torch.sigmoid(head.confidence_logit(head.probe_input(x, hidden)).float()))
            else:
                c_b.append(conf_measures.get_measure(measure).from_logits(logits.flatten(0, 1)).view(final_top.shape))
        conf.append(torch.stack(c_b, -1).float().cpu())
        agree.append(torch.stack(a_b, -1).cpu())
    return ExitScores(list(model.exit_layer_numbers), torch.cat(conf), torch.cat(agree), torch.cat(tops))


@dataclass
class ForcedSteps:
    """The decode steps of given outputs teacher-forced (`forced_steps`): N steps, E exits in layer order."""

    exits: list[int]
    confidence: torch.Tensor  # [N, E] fp32: each exit's confidence at the step (the measure's)
    tokens: torch.Tensor  # [N, E] long: each exit's greedy token over its whole projection
    draft_tokens: torch.Tensor | None  # [N, E] long: over the draft vocabulary's rows alone (where one was given)
    final: torch.Tensor  # [N] long: the final head's greedy token
    target: torch.Tensor  # [N] long: the token the outputs have at the step


@torch.no_grad()
def forced_steps(
    model, prompts: list[list[int]], outputs: list[list[int]], measure: str, draft_vocab: torch.Tensor | None = None
) -> ForcedSteps:
    """The decode steps of `outputs` (per prompt, the tokens a decoding generated after it, the
    first made by the prompt's own pass and so no decode step) teacher-forced: the model runs once
    over each prompt and its output but the last token, and at step i (output[i - 1] fed, i >= 1)
    records each exit's confidence (`measure`) and greedy token, the final head's token and
    output[i]. An early-exit decode step given the same prefix sees these hidden states (K/V-correct
    decoding fills a skipped layer's K/V before anything reads it), so what an exit decision emits
    at each step follows from them (`step_agreement`): CALM's per-token consistency, what
    calibrated thresholds bound, on the decoded text itself. `draft_vocab`: token ids a leaving
    token may be chosen from instead (`Passes.draft_vocab`)."""
    m = conf_measures.get_measure(measure)
    vocab = model.config.real_vocab_size or model.config.vocab_size
    device = next(model.parameters()).device
    conf, toks, drafts, finals, targets, exits = [], [], [], [], [], list(model.exit_layer_numbers)
    for prompt, out in zip(prompts, outputs):
        if len(out) < 2:  # no decode step
            continue
        ids = torch.tensor([list(prompt) + list(out[:-1])], dtype=torch.long, device=device)
        lo = len(prompt)  # position lo - 1 made out[0]; positions lo .. made out[1:]
        h, rotary = model.embed_input(ids, None, None)
        h, exit_inputs = model.run_layers(h, rotary)  # exits evaluated here, not by the model
        final = ModelOutput()
        model.final_head(final, h[:, lo:])
        finals.append(final.logits[0, :, :vocab].argmax(-1).cpu())
        targets.append(torch.tensor(out[1:], dtype=torch.long))
        c_s, t_s, d_s = [], [], []
        for n, x in exit_inputs:
            head = model.exits[str(n)]
            hidden = head.hidden(x, rotary)[:, lo:]  # over every position: an exit block attends to them
            logits = head.project(hidden, model.tied_output_weight(), model.head_ops)[0, :, :vocab].float()  # (S, V)
            t_s.append(logits.argmax(-1).cpu())
            if draft_vocab is not None:
                rows = draft_vocab.to(logits.device)
                d_s.append(rows[logits.index_select(-1, rows).argmax(-1)].cpu())
            if m.needs_vocab:
                c = m.from_logits(logits)
            elif m.from_backbone is not None and head.probe_reads_backbone:
                c = m.from_backbone(head, x[0, lo:, None])
            else:
                c = m.from_hidden(head, hidden[0, :, None])
            c_s.append(c.float().cpu())
        conf.append(torch.stack(c_s, -1) if c_s else torch.zeros(len(out) - 1, 0))
        toks.append(torch.stack(t_s, -1) if t_s else torch.zeros(len(out) - 1, 0, dtype=torch.long))
        if draft_vocab is not None:
            drafts.append(torch.stack(d_s, -1) if d_s else torch.zeros(len(out) - 1, 0, dtype=torch.long))
    e = len(exits)
    return ForcedSteps(
        exits,
        torch.cat(conf) if conf else torch.zeros(0, e),
        torch.cat(toks) if toks else torch.zeros(0, e, dtype=torch.long),
        (torch.cat(drafts) if drafts else torch.zeros(0, e, dtype=torch.long)) if draft_vocab is not None else None,
        torch.cat(finals) if finals else torch.zeros(0, dtype=torch.long),
        torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long),
    )


def generation_scores(steps: ForcedSteps, lengths: list[int]) -> ExitScores:
    """`ExitScores` of forced decode steps (`forced_steps`), one chunk per answer: CALM's own
    setting, the thresholds calibrated on the decode steps of the model's answers rather than on
    text. `lengths`: each answer's decode steps in order (len(output) - 1, answers without one
    left out, as `forced_steps` leaves them), summing to the steps'. An exit agrees where its
    token is the answer's (what `step_agreement` counts; the final head's own steps agree), so a
    chunk's loss is the share of its answer's steps at which the early-exit decision would emit
    another token than full decoding given the same prefix. The answers are the i.i.d. units
    (prompts drawn from one pool), and the risk bounded is the mean over answers of that share."""
    lengths = [n for n in lengths if n > 0]
    if sum(lengths) != steps.target.numel():
        forced = steps.target.numel()
        raise ValueError(f"generation_scores: {sum(lengths)} decode steps in the lengths, {forced} forced")
    e, width = len(steps.exits), max(lengths, default=0)
    conf = torch.zeros(len(lengths), width, e)
    agree = torch.zeros(len(lengths), width, e, dtype=torch.bool)
    final = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    at = 0
    for i, n in enumerate(lengths):
        conf[i, :n] = steps.confidence[at : at + n]
        agree[i, :n] = steps.tokens[at : at + n] == steps.target[at : at + n, None]
        final[i, :n] = steps.target[at : at + n]  # full decoding's own tokens (`draft_vocabulary`)
        mask[i, :n] = True
        at += n
    return ExitScores(list(steps.exits), conf, agree, final, mask)


def step_agreement(steps: ForcedSteps, policy) -> tuple[float, float]:
    """(the share of `steps` at which `policy`'s exit decision emits the outputs' token, the share
    at which an exit fires): the first allowed exit whose confidence reaches its threshold gives its
    greedy token (over the draft vocabulary where `policy.vocab` is "draft"), else the final head
    does: the full model's own step, counted as agreeing (the forced pass's final head rounds
    differently from a decoding engine's kernels: in bf16 it differed from the CPU reference
    model's full decoding at 0.7% of its steps); a threshold >= 1.0 never fires (as in the
    engine). `policy`: an `ExitPolicy` (its `allowed`, `threshold_of` and `vocab`), its decisions
    taken as `exact` takes them. On full decoding's own outputs it is the per-token agreement with
    full decoding given the same prefix; free-running agreement also counts every token after the
    texts first part."""
    if steps.target.numel() == 0:
        return 1.0, 0.0
    if policy.vocab == "draft" and steps.draft_tokens is None:
        raise ValueError("step_agreement: the policy leaves onto the draft vocabulary; pass it to forced_steps")
    th = torch.tensor([policy.threshold_of(n) if n in policy.allowed else 1.0 for n in steps.exits])
    fire = (steps.confidence >= th) & (th < 1.0)  # (N, E)
    first = fire & (fire.cumsum(-1) == 1)
    tokens = steps.draft_tokens if policy.vocab == "draft" else steps.tokens
    left = fire.any(-1)
    kept = torch.where(left, (tokens * first).sum(-1) == steps.target, True)
    return float(kept.double().mean()), float(left.double().mean())


def draft_vocabulary(scores: ExitScores, vocab: int, coverage: float) -> dict | None:
    """The fewest tokens that make up `coverage` of the final head's top-1 tokens on the
    calibration text, most frequent first (ties by token id): {"tokens" (ascending ids),
    "coverage" (the share they make up), "target", "num_tokens" (counted)}. Self-speculative
    drafts project onto these rows of the exit's head alone: a draft the final head could keep
    is lost only where its token lies outside them (at most 1 - coverage of tokens, on text like
    this), and a draft's projection reads len(tokens) / vocab of the head's weights. None where
    that would be more than half the vocabulary (it would save too little to be worth a miss)."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"draft vocabulary coverage must be in (0, 1], got {coverage}")
    if scores.final is None:
        raise ValueError("draft_vocabulary needs the final head's tokens (teacher_forced_scores records them)")
    counts = torch.bincount(scores.tokens_of(scores.final), minlength=vocab)[:vocab]
    total = int(counts.sum())
    order = torch.sort(counts, descending=True, stable=True).indices  # ties: the lower id first
    covered = counts[order].cumsum(0)  # (V,) tokens covered by the k + 1 most frequent
    k = min(int(torch.searchsorted(covered, coverage * total - 1e-9)) + 1, vocab)
    if total == 0 or k > vocab // 2:
        return None
    tokens = sorted(order[:k].tolist())
    return {"tokens": tokens, "coverage": int(covered[k - 1]) / total, "target": coverage, "num_tokens": total}


def within_vocabulary(scores: ExitScores, tokens: list[int]) -> ExitScores:
    """`scores` with an exit counted as agreeing only where it agrees and the final head's token
    lies in `tokens`: a lower bound on the agreement of an exit that chooses from `tokens` alone
    (a leaving token or a draft over the draft vocabulary, `GenerationSettings.exit_vocabulary`).
    Where the exit's whole-vocabulary top-1 is the final head's and in `tokens`, the restricted
    top-1 is the same token; where the final head's lies outside, no restricted choice can agree;
    the one case it misses (the exit's top-1 outside `tokens` and its best inside them the final
    head's) can only add agreement. So a risk bounded on these scores bounds the restricted exits'."""
    if scores.final is None:
        raise ValueError("within_vocabulary needs the final head's tokens (teacher_forced_scores records them)")
    ids = torch.tensor(sorted(set(tokens)), dtype=scores.final.dtype, device=scores.final.device)
    inside = torch.isin(scores.final, ids)  # (C, L)
    return ExitScores(scores.exits, scores.confidence, scores.agree & inside[..., None], scores.final, scores.mask)


def exit_agreement(scores: ExitScores) -> dict[int, float]:
    """Per exit, the share of tokens whose top-1 is the final head's (each exit alone, all
    chunks): the acceptance a draft from it starts with in self-speculative decoding."""
    share = scores.tokens_of(scores.agree).float().mean(0)  # (E,)
    return {e: float(share[i]) for i, e in enumerate(scores.exits)}


def chunk_losses(scores: ExitScores, thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per chunk: share of tokens whose early-exit token differs from the final head's, and
    share of tokens that exit early. thresholds [E]; >= 1.0 never fires (as in the engine)."""
    fire = (scores.confidence >= thresholds) & (thresholds < 1.0)  # (C, L, E)
    first = fire & (fire.cumsum(-1) == 1)  # the first exit that fires decides
    wrong = (first & ~scores.agree).any(-1).float()  # (C, L)
    return scores.chunk_mean(wrong), scores.chunk_mean(fire.any(-1).float())


def threshold_path(fit: ExitScores | None, num_exits: int, kind: str, steps: int) -> torch.Tensor:
    """[steps, E] threshold vectors from conservative (row 0: all 1.0) to aggressive."""
    lambdas = torch.linspace(0.0, 1.0, steps)
    if kind == "shared":
        return (1.0 - lambdas)[:, None].expand(steps, num_exits).clone()
    if kind == "precision":
        return precision_path(fit, num_exits, lambdas.square())
    if kind != "quantile":
        raise ValueError(f"--path must be quantile, shared or precision, got {kind!r}")
    conf = fit.tokens_of(fit.confidence).reshape(-1, num_exits)  # (tokens, E)
    path = torch.quantile(conf, (1.0 - lambdas).clamp(0.0, 1.0), dim=0)  # (steps, E)
    path[0] = 1.0
    return path


def precision_path(fit: ExitScores, num_exits: int, risks: torch.Tensor) -> torch.Tensor:
    """[steps, E]: per exit and risk r, the confidence of the least confident token among the
    longest run of `fit`'s most confident tokens at that exit whose disagreement with the final
    head is <= r (1.0 where none is): non-increasing in r, so the path runs conservative to
    aggressive. Row 0 is all 1.0."""
    conf = fit.tokens_of(fit.confidence).reshape(-1, num_exits)  # (tokens, E)
    agree = fit.tokens_of(fit.agree).reshape(-1, num_exits)
    path = torch.ones(len(risks), num_exits)
    ranks = torch.arange(1, conf.shape[0] + 1, dtype=torch.float32)
    for e in range(num_exits):
        order = conf[:, e].argsort(descending=True, stable=True)
        wrong = (~agree[order, e]).float().cumsum(0) / ranks  # disagreement among the k most confident
        for j, r in enumerate(risks.tolist()):
            ok = (wrong <= r + 1e-12).nonzero()
            if ok.numel():
                path[j, e] = conf[order[ok.max()], e]
    path[0] = 1.0
    return path


def _h1(a: float, b: float) -> float:
    """Binary KL divergence kl(a || b)."""
    first = a * math.log(a / b) if a > 0 else 0.0
    return first + (1 - a) * math.log((1 - a) / (1 - b))


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space."""
    if k >= n:
        return 1.0
    if k < 0:
        return 0.0
    logs = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p) + (n - i) * math.log1p(-p)
        for i in range(k + 1)
    ]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(x - top) for x in logs))


def hoeffding_bentkus_p_value(risk_hat: float, n: int, delta: float) -> float:
    """LTT's p-value for H: R > delta from n i.i.d. losses in [0, 1] with mean risk_hat."""
    hoeffding = math.exp(-n * _h1(min(risk_hat, delta), delta))
    bentkus = math.e * binomial_cdf(math.ceil(n * risk_hat - 1e-9), n, delta)
    return min(1.0, hoeffding, bentkus)


def wsr_p_value(losses: torch.Tensor, delta: float, epsilon: float) -> float:
    """Waudby-Smith & Ramdas's betting p-value for H: R >= delta from i.i.d. losses in [0, 1],
    in their (random) order; LTT appendix B with RCPS's bets (Bates et al., arXiv 2101.02703).

    Wealth K_i = prod_{j <= i} (1 - nu_j (L_j - delta)) is a non-negative supermartingale under
    H when each bet nu_j in [0, 1] depends on L_1..L_{j-1} only, so p = 1 / max_i K_i is valid
    (Ville). The bets grow as the running variance shrinks: low-variance losses well below
    delta make the wealth grow fast, where Hoeffding-Bentkus assumes the worst variance."""
    x = losses.double().flatten()  # (n,)
    n = x.numel()
    i = torch.arange(1, n + 1, dtype=torch.float64)
    mu = (0.5 + x.cumsum(0)) / (i + 1)  # mu_hat_i after i losses
    var = (0.25 + ((x - mu) ** 2).cumsum(0)) / (i + 1)  # sigma_hat^2_i
    prev_var = torch.cat([torch.tensor([0.25], dtype=torch.float64), var[:-1]])  # sigma_hat^2_{i-1}
    nu = torch.sqrt(2 * math.log(1 / epsilon) / (n * prev_var)).clamp(max=1.0)
    log_wealth = torch.log1p(-nu * (x - delta)).cumsum(0)  # nu <= 1 keeps 1 - nu (L - delta) >= delta > 0
    return min(1.0, math.exp(-float(log_wealth.max())))


BOUNDS = {
    "hb": "Hoeffding-Bentkus",
    "wsr": "Waudby-Smith-Ramdas betting",
}


def p_value(bound: str, losses: torch.Tensor, delta: float, epsilon: float) -> float:
    """The p-value for H: R > delta from per-chunk losses [n] by `bound` (one of BOUNDS)."""
    if bound == "hb":
        return hoeffding_bentkus_p_value(float(losses.mean()), losses.numel(), delta)
    if bound == "wsr":
        return wsr_p_value(losses, delta, epsilon)
    raise ValueError(f"--bound must be one of {', '.join(BOUNDS)}, got {bound!r}")


@dataclass
class Calibration:
    """The chosen thresholds and what the calibration saw."""

    exits: list[int]
    thresholds: list[float]
    lambda_index: int  # 0: nothing may exit
    risk: float  # disagreement on the tested calibration chunks
    exit_share: float  # share of their tokens that exit early
    p_value: float
    num_test_chunks: int
    num_fit_chunks: int

    def as_dict(self) -> dict:
        d = asdict(self)
        d["thresholds"] = {str(e): t for e, t in zip(self.exits, self.thresholds)}
        return d


def fixed_sequence_test(
    scores: ExitScores, path: torch.Tensor, delta: float, epsilon: float, bound: str = "wsr"
) -> tuple[int, float]:
    """Index of the last path entry whose null (risk > delta) is rejected, and its p-value."""
    best, best_p = 0, 0.0
    for j in range(1, path.shape[0]):
        p = p_value(bound, chunk_losses(scores, path[j])[0], delta, epsilon)
        if p > epsilon:
            break
        best, best_p = j, p
    return best, best_p


def calibrate(
    scores: ExitScores, delta: float, epsilon: float, path: str = "quantile", steps: int = 101,
    fit_fraction: float = 0.3, seed: int = 0, bound: str = "wsr",
) -> Calibration:  # fmt: skip
    """Learn-Then-Test over `scores`' chunks: the quantile and precision paths are fit on a
    random `fit_fraction` of them and tested on the rest (the shared path uses them all)."""
    if not (0 < delta < 1 and 0 < epsilon < 1):
        raise ValueError(f"--delta and --epsilon must be in (0, 1), got {delta} and {epsilon}")
    c = scores.confidence.shape[0]
    order = torch.randperm(c, generator=torch.Generator().manual_seed(seed))
    fitted = path in ("quantile", "precision")
    num_fit = int(round(c * fit_fraction)) if fitted else 0
    if fitted and not 0 < num_fit < c:
        raise ValueError(f"--fit-fraction {fit_fraction} leaves no chunks to fit the path or to test it ({c} chunks)")
    fit, test = scores.select(order[:num_fit]), scores.select(order[num_fit:])
    thresholds = threshold_path(fit, len(scores.exits), path, steps)
    j, p = fixed_sequence_test(test, thresholds, delta, epsilon, bound)
    risk, share = chunk_losses(test, thresholds[j])
    return Calibration(
        scores.exits, thresholds[j].tolist(), j, float(risk.mean()), float(share.mean()), p, c - num_fit, num_fit
    )


def single_exit_ceilings(scores: ExitScores, exit_index: int, delta: float) -> tuple[float, float]:
    """Where the share of tokens leaving at one exit (the others off) is lost, without any bound:
    (oracle, ranked). Oracle: a perfect probe sends every agreeing token and delta of all tokens
    more; ranked: the most confident tokens by `scores` whose disagreement is <= delta of all."""
    conf = scores.tokens_of(scores.confidence[..., exit_index])  # (tokens,)
    agree = scores.tokens_of(scores.agree[..., exit_index])
    agree_share = float(agree.float().mean())
    oracle = min(1.0, agree_share + delta)
    wrong = (~agree[conf.argsort(descending=True, stable=True)]).float().cumsum(0) / conf.numel()  # (tokens,)
    ranked = float((wrong <= delta + 1e-12).nonzero().max() + 1) / conf.numel() if wrong[0] <= delta else 0.0
    return oracle, ranked


# ----- checking the guarantee over random splits (issue 12: "calibration holds") ---------


def exit_shares(scores: ExitScores, thresholds: torch.Tensor) -> list[float]:
    """Share of all tokens whose early-exit decision is made at each exit (the rest reach the
    final head); same rule as `chunk_losses`."""
    fire = (scores.confidence >= thresholds) & (thresholds < 1.0)  # (C, L, E)
    first = fire & (fire.cumsum(-1) == 1)
    return scores.tokens_of(first).float().mean(0).tolist()


@dataclass
class SplitResult:
    """One random calibration/test split: what calibration chose and what the test half saw."""

    thresholds: list[float]
    lambda_index: int
    test_risk: float  # realised disagreement with the final head on the test chunks' tokens
    exit_shares: list[float]  # share of test tokens leaving at each exit

    def violates(self, delta: float) -> bool:
        return self.test_risk > delta


@dataclass
class SplitCheck:
    """`check_splits`' result: the guarantee holds empirically when the share of splits whose
    realised disagreement exceeds delta is at most epsilon."""

    exits: list[int]
    delta: float
    epsilon: float
    test_fraction: float
    splits: list[SplitResult]

    @property
    def violations(self) -> int:
        return sum(s.violates(self.delta) for s in self.splits)

    @property
    def violation_share(self) -> float:
        return self.violations / len(self.splits)

    @property
    def holds(self) -> bool:
        return self.violation_share <= self.epsilon

    def as_dict(self) -> dict:
        risks = [s.test_risk for s in self.splits]
        return {
            "num_splits": len(self.splits), "test_fraction": self.test_fraction, "violations": self.violations,
            "violation_share": self.violation_share, "epsilon": self.epsilon, "delta": self.delta,
            "holds": self.holds, "mean_test_risk": sum(risks) / len(risks), "max_test_risk": max(risks),
            "mean_exit_share": sum(sum(s.exit_shares) for s in self.splits) / len(self.splits),
            "splits": [asdict(s) for s in self.splits],
        }  # fmt: skip


def check_splits(
    scores: ExitScores, delta: float, epsilon: float, num_splits: int, test_fraction: float = 0.5,
    path: str = "quantile", steps: int = 101, fit_fraction: float = 0.3, seed: int = 0, bound: str = "wsr",
) -> SplitCheck:  # fmt: skip
    """Calibrate on `num_splits` random calibration/test splits of the chunks (split i seeded
    by seed + i) and measure each choice's realised disagreement on its test chunks."""
    c = scores.confidence.shape[0]
    num_test = int(round(c * test_fraction))
    if num_splits < 1:
        raise ValueError(f"--check-splits must be >= 1, got {num_splits}")
    if not 0 < num_test < c:
        raise ValueError(f"test fraction {test_fraction} leaves no chunks to calibrate on or to test ({c} chunks)")
    results = []
    for i in range(num_splits):
        order = torch.randperm(c, generator=torch.Generator().manual_seed(seed + i))
        calib, test = scores.select(order[num_test:]), scores.select(order[:num_test])
        cal = calibrate(calib, delta, epsilon, path, steps, fit_fraction, seed + i, bound)
        thresholds = torch.tensor(cal.thresholds)
        risk, _ = chunk_losses(test, thresholds)
        results.append(SplitResult(cal.thresholds, cal.lambda_index, float(risk.mean()), exit_shares(test, thresholds)))
    return SplitCheck(list(scores.exits), delta, epsilon, test_fraction, results)
