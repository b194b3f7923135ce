#!/usr/bin/env python
"""Self-speculative drafting policies replayed along full decoding's own tokens: what each would
gain at a set of round costs, without the clock's noise.

    python benchmarks/draft_policy.py --load runs/ee_aclsum/tuned --num-examples 40
    python benchmarks/draft_policy.py --load runs/ee_tuning_smollm2/tuned --num-examples 20 --costs parameters

Full decoding summarises --num-examples aclsum abstracts (the sweep's prompts); the model then
reads each prompt and its summary once (teacher-forced), which gives, at every generated
position, each exit's greedy token's agreement with the final head's and its max-probability
(over the whole vocabulary: a draft vocabulary's renormalised one is a little higher). Since
every kept token is the final head's, a self-speculative run visits exactly these positions, so
a round's outcome follows from them: drafts up to the first disagreement are kept, plus the
final head's token.

Each policy is replayed at the same costs (`DraftCosts`, in plain decode steps): the engine's
controller (`draft_control.DraftController`, warm-started from the checkpoint's calibration
record where it has agreement) with its early stop and without it (the geometric plan's g), and
fixed (exit, g) pairs. A round costs g * draft[n] + base[n] + g * row[n]; a plain round 1, and
--observe-cost more where it reads an exit's token on the way (`Plan.observe`: a plain round's,
or a shallower exit's on a drafting round's first step; "plain rounds obs.": the former alone,
"observing none": neither). --passes replays the prompts that many times in a row with one controller,
as an engine's controller learns across calls; --orders replays them from that many starting
prompts, each with a fresh controller (where a run of rejections leaves the controller depends
on the order the text comes in), and prints the mean rate with its range. The
costs are timed rounds at batch 1 (`draft_costs.measure_draft_costs`, --costs measured, the
default) or the config's weight counts (--costs parameters). Printed per policy: tokens per
unit of time (the speedup over full decoding the policy would reach at these costs, nothing
else counted), tokens and drafts per round, share of plain rounds.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, os.path.join(ROOT, "tools", "eval"))

from megatron.early_exit import load_checkpoint  # noqa: E402
from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings  # noqa: E402
from megatron.early_exit.inference.calibration import teacher_forced_scores  # noqa: E402
from megatron.early_exit.inference.lookup import LOOKUP, confidences, propose  # noqa: E402
from megatron.early_exit.inference.strategies import self_speculative as ss  # noqa: E402
from megatron.early_exit.inference.strategies.draft_control import MARGIN, MAX_DRAFT, DraftController  # noqa: E402
from megatron.early_exit.inference.strategies.draft_costs import measure_draft_costs  # noqa: E402


def trajectories(engine, model, prompts: list[list[int]], new_tokens: int) -> list[tuple[list, list, list, list]]:
    """Per prompt: (agree, conf, prompt, summary): agree and conf [position][exit] along full
    decoding's greedy summary (its tokens: what drafts from the context are checked against)."""
    out = []
    for prompt, r in zip(prompts, engine.generate(prompts, GenerationSettings("full", max_new_tokens=new_tokens))):
        if not r.tokens:
            continue
        scores = teacher_forced_scores(model, torch.tensor([prompt + r.tokens]), "max_prob", 1)
        span = slice(len(prompt) - 1, len(prompt) - 1 + len(r.tokens))  # rows predicting the summary
        out.append((scores.agree[0, span].tolist(), scores.confidence[0, span].tolist(), prompt, r.tokens))
    return out


def replay(
    paths, exits: list[int], costs, choose, observe_cost: float = 0.0, passes: int = 1, excess: float = 1.0
) -> dict:
    """Run `choose(agree, conf, i, path) -> (exit, drafts, learn, observed)` round by round along
    every path (`passes` times over); `choose` returns the exit and how many drafts it made (0: a
    plain round, the exit it observed or None; from the context, `LOOKUP`: the drafted tokens
    themselves, checked against the summary), what learns from the round (exit, confidences,
    agreed), and whether a drafting round read another exit's token on its first draft step
    (`Plan.observe`: --observe-cost). `excess`: a drafting round costs that many times what `costs`
    say (--loop-excess)."""
    tokens = time = rounds = drafted = plain = 0.0
    for path in paths * passes:
        agree, conf, _, summary = path
        i = 0
        while i < len(agree):
            n, g, learn, observed = choose(agree, conf, i, path)
            rounds += 1
            if not g:
                time += 1.0 + (observe_cost if n is not None else 0.0)
                tokens, plain, i = tokens + 1, plain + 1, i + 1
                continue
            ok = 0
            if n == LOOKUP:
                while ok < len(g) and g[ok] == summary[i + ok]:
                    ok += 1
                g, confs = len(g), None
            else:
                e = exits.index(n)
                while ok < g and agree[i + ok][e]:
                    ok += 1
                confs = [conf[i + j][e] for j in range(g)]
            time += costs.round_time(n, g) * excess + (observe_cost if observed else 0.0)
            tokens, drafted, i = tokens + ok + 1, drafted + g, i + ok + 1
            if learn is not None:
                learn(n, confs, ok)
    return {"rate": tokens / time, "tokens/round": tokens / rounds, "drafts/round": drafted / rounds,
            "plain": plain / rounds}  # fmt: skip


def controller_policy(
    exits: list[int], costs, agreement, stop_early: bool, observe: str = "all", margin=MARGIN, lookup: int = 0
):
    """The engine's controller; `observe`: "all" (as it decodes), "plain" (plain rounds alone: a
    drafting round reads no shallower exit, as before it did) or "none" (as before plain rounds
    observed); `margin`: its `DraftController.margin` (0: plans drafted on their estimates alone);
    `lookup`: drafts from the context too, n-grams up to that long (`prompt_lookup_max`)."""
    ctl = DraftController(costs, stop_early=stop_early, agreement=agreement, margin=margin)
    lengths = list(range(1, MAX_DRAFT + 1))

    def look(n, agree, conf, i) -> None:  # exit n's token at position i read on the way: one observation
        e = exits.index(n)
        ctl.update(n, [([conf[i][e]], int(agree[i][e]))])

    def choose(agree, conf, i, path):
        if lookup:
            return with_context(agree, conf, i, path)
        return from_exits(agree, conf, i, ctl.plan(exits, lengths))

    def with_context(agree, conf, i, path):
        """As `SelfSpeculative.plan` / `lookup_drafts` / `run_plan` with `prompt_lookup_max`."""
        summary = path[3]
        toks, k = propose(path[2] + summary[:i], lookup, min(MAX_DRAFT, len(summary) - i - 1))
        c = confidences(k, lookup, len(toks))
        plan = ctl.plan(exits, lengths, lookup=[c])
        if plan.exit != LOOKUP:
            if toks:  # the proposal's first token, observed free
                ctl.update(LOOKUP, [(c[:1], int(toks[0] == summary[i]))])
            return from_exits(agree, conf, i, plan)
        j = 1
        while j < len(toks) and ctl.keep_drafting(plan, c[:j], c[j]):
            j += 1
        return LOOKUP, toks[:j], lambda m, _, ok: ctl.update(m, [(c[:j], ok)]), False

    def from_exits(agree, conf, i, plan):
        n = plan.observe if observe == "all" or (observe == "plain" and plan.exit is None) else None
        if plan.exit is None:
            if n is not None:
                look(n, agree, conf, i)
            return n, 0, None, False
        e, confs = exits.index(plan.exit), []
        for j in range(min(plan.cap, len(agree) - i - 1)):  # room for the final head's token
            confs.append(conf[i + j][e])
            if not ctl.keep_drafting(plan, confs):
                break
        if n is not None and confs:  # learnt after the verify pass, before the draft exit (`run_plan`)
            look(n, agree, conf, i)
        return plan.exit, len(confs), lambda m, c, ok: ctl.update(m, [(c, ok)]), n is not None and bool(confs)

    return choose


def fixed_policy(exit_layer: int, g: int):
    return lambda agree, conf, i, path: (exit_layer, min(g, len(agree) - i - 1), None, False)


def context_policy(lookup: int, g: int):
    """Drafts from the context wherever it proposes, up to g (HF's prompt lookup), else a plain round."""

    def choose(agree, conf, i, path):
        toks, _ = propose(path[2] + path[3][:i], lookup, min(g, len(agree) - i - 1))
        return (LOOKUP, toks, None, False) if toks else (None, 0, None, False)

    return choose


def main(argv=None) -> None:
    from ee_sweep import summarisation_task

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True)
    p.add_argument("--data", help="test_summarization.jsonl (default: prepared from the aclsum package)")
    p.add_argument("--num-examples", type=int, default=40)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--costs", choices=("measured", "parameters"), default="measured")
    p.add_argument("--bf16", action="store_true", help="decode and time in bf16")
    p.add_argument(
        "--observe-cost",
        type=float,
        default=0.025,
        help="what reading an exit's token costs a round, in plain steps (the draft check: "
        "~0.02-0.03 on the CPU reference model)",
    )
    p.add_argument("--passes", type=int, default=1, help="replay the prompts this many times with one controller")
    p.add_argument("--prompt-lookup", type=int, default=0, metavar="N",
                   help="also replay drafts from the context (n-grams up to N; not early exit): with the "
                   "controller, and alone (HF's prompt lookup: wherever it proposes, up to g)")  # fmt: skip
    p.add_argument("--loop-excess", type=float, default=1.0,
                   help="charge drafting rounds this many times their timed cost, the policies planning at the "
                   "timed cost (in the decode loop they ran 1.04-1.11x it)")  # fmt: skip
    p.add_argument(
        "--orders",
        type=int,
        default=1,
        help="replay from this many starting prompts (rotations of their order), each with a fresh "
        "controller; printed: the mean rate, its min and max",
    )
    args = p.parse_args(argv)

    model, tokenizer = load_checkpoint(args.load)
    if args.bf16:
        model = model.to(torch.bfloat16)
    engine = EarlyExitEngine(model)
    exits = engine.draft_exits()
    if not exits:
        raise SystemExit(f"--load: {args.load} has no exit below the last layer to draft from")
    prompts, _ = summarisation_task(tokenizer, args.data, args.num_examples, 1200)
    context = max(map(len, prompts))
    lookup = args.prompt_lookup > 0
    if args.costs == "measured":
        costs = measure_draft_costs(engine, 1, context, lookup=lookup)[0]
    else:
        costs = ss.weight_count_costs(engine, lookup)
    parts = [
        f"exit {n}: draft {costs.draft[n]:.3f} row {costs.row[n]:.3f} base {costs.base.get(n, 1.0):.3f}" for n in exits
    ]
    if lookup:
        parts.append(f"context: row {costs.row[LOOKUP]:.3f} base {costs.base.get(LOOKUP, 1.0):.3f}")
    print(f"costs ({args.costs}, plain decode steps): " + ", ".join(parts))
    paths = trajectories(engine, model, prompts, args.max_new_tokens)
    agree = torch.tensor([a for path, *_ in paths for a in path], dtype=torch.float).mean(0).tolist()
    print(f"{sum(len(a) for a, *_ in paths)} positions; agreement " + ", ".join(
        f"exit {n} {a:.1%}" for n, a in zip(exits, agree)))  # fmt: skip
    agreement = ss.calibrated_agreement(engine)
    policies = {  # name -> a fresh policy (the controllers learn as they go)
        "controller, early stop": lambda: controller_policy(exits, costs, agreement, True),
        "controller, geometric g": lambda: controller_policy(exits, costs, agreement, False),
        "controller, plain rounds obs.": lambda: controller_policy(exits, costs, agreement, True, observe="plain"),
        "controller, observing none": lambda: controller_policy(exits, costs, agreement, True, observe="none"),
        "controller, no margin": lambda: controller_policy(exits, costs, agreement, True, margin=0.0),
    }
    for n in exits:
        for g in (1, 2, 3, 4):
            policies[f"fixed exit {n}, g {g}"] = lambda n=n, g=g: fixed_policy(n, g)
    if lookup:  # not early exit: the context as a draft source, with the exits and alone
        k = args.prompt_lookup
        policies[f"controller + context {k}"] = lambda: controller_policy(exits, costs, agreement, True, lookup=k)
        for g in (4, 8):
            policies[f"context {k} alone, g {g}"] = lambda g=g: context_policy(k, g)
    starts = [k * len(paths) // args.orders for k in range(args.orders)]
    orders = [paths[k:] + paths[:k] for k in starts]
    head = ("policy", "rate", "min", "max", "tokens/round", "drafts/round", "plain")
    print(f"{head[0]:28s} {head[1]:>6s} {head[2]:>6s} {head[3]:>6s} {head[4]:>13s} {head[5]:>13s} {head[6]:>6s}")
    for name, make in policies.items():
        runs = [
            replay(order, exits, costs, make(), args.observe_cost, args.passes, args.loop_excess) for order in orders
        ]
        mean = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
        low, high = min(r["rate"] for r in runs), max(r["rate"] for r in runs)
        print(
            f"{name:28s} {mean['rate']:6.3f} {low:6.3f} {high:6.3f} {mean['tokens/round']:13.2f} "
            f"{mean['drafts/round']:13.2f} {mean['plain']:6.1%}"
        )


if __name__ == "__main__":
    main()
