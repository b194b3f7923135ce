#!/usr/bin/env python
"""Speed vs quality of early exit: sweep the confidence threshold on a summarisation task.

    python tools/eval/ee_sweep.py --load CKPT --output runs/sweep \
        --thresholds 1.0 0.9 0.8 0.6 0.4 0.2 0.0 --num-examples 20 --batch-size 1 --repeats 3

For each threshold it decodes the aclsum test abstracts (a summary of each paper's abstract)
as batches, and records: tokens/s and speedup over threshold 1.0 (= full decoding, since
1.0 never exits), the ideal speedup the row's exit distribution allows (the cost model,
`megatron/early_exit/inference/cost_model.py`, measured on this machine at this batch size
and dtype before the sweep; prefill counted in both) and the engine efficiency (achieved /
ideal: low ideal = weak exits, low efficiency = engine overhead), ROUGE-L F1 against the
reference summary and against the full model's output, token agreement with full decoding
(share of positions with the same token: free running, so every token after the texts first
part counts against it), step agreement (per decode step of full decoding, given its prefix:
the share at which the row's exit decisions emit full decoding's token, teacher-forced,
`calibration.step_agreement`: what calibrated thresholds bound), the average exit layer and the
share of tokens per exit, and decode_speedup: the speedup of decoding alone, after the prefill (the tokens after
each sequence's first over the seconds after its batch's prefill, `GenerationResult.stats`,
wall clock, paired as speedup is; an aclsum abstract's prefill is about a third of a
one-sentence summary's time, and the exits change decoding alone), and the shares of the row's
decode steps cost_aware's clock ran paused and free (`paused_share`, `free_share`:
`inference/exit_clock.py`; 0 where nothing is clocked). Writes `sweep.csv` and,
when matplotlib is installed, `speedup.png`,
`quality_vs_speedup.png` and `exit_histogram.png`; with --self-speculative also
`self_speculative.csv` (dynamic self-speculation: speed, acceptance, share of plain rounds), and
`oracle.json` where a row evaluates exits (`oracle_of`: what the exits' own tokens allow with
perfect decisions, at 100% agreement).
Every row (and self-speculation) is timed batch by batch, each batch right after full decoding
of the same batch, --repeats times: its speedup is the median of these paired ratios
(tokens_per_sec is its best run; --clock cpu times CPU seconds); every setting first decodes
one batch untimed. The measure defaults to learned where the exits have probes.
--exit-policy exact cost_aware gives rows for each policy (the `exit_policy` column).
--calibrated adds a row per policy at the checkpoint's calibrated per-exit thresholds
(tools/eval/calibrate_thresholds.py, the server's "threshold auto"; threshold "calibrated").
--explain decodes every row once more with each decode step timed and priced by the cost
model, and writes `explain.csv`: per step kind (how deep its deepest sequence went, and whether
it filled pending rows) the steps, measured and predicted ms per step, and the kind's share of
the row's efficiency gap (`explain_rows`).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from megatron.early_exit.inference import cost_model  # noqa: E402
from megatron.early_exit.inference.exit_clock import passes_by_mode  # noqa: E402
from megatron.early_exit.inference.settings import EXIT_VOCABULARIES  # noqa: E402

CALIBRATED = "calibrated"  # the threshold column of `--calibrated`'s row


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased whitespace tokens (longest common subsequence)."""
    a, b = candidate.lower().split(), reference.lower().split()
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def load_examples(path: str | None, n: int) -> list[dict]:
    if path is None:
        from prepare_aclsum_corpus import prepare_corpus

        out = tempfile.mkdtemp(prefix="aclsum_")
        prepare_corpus(out)
        path = os.path.join(out, "test_summarization.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"--data: no such file: {path} (make it with tools/prepare_aclsum_corpus.py)")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:n]


def prompt_text(tokenizer, text: str, kind: str = "abstract") -> str:
    """The one-sentence summary request for `text` (an abstract, or another `kind` of text such as
    a passage: `tools/make_distillation_corpus.py`), in the tokenizer's chat template where it
    has one, else as "Abstract: ...\\nSummary:"."""
    if getattr(tokenizer, "chat_template", None):
        import jinja2

        messages = [{"role": "user", "content": f"Summarize this {kind} in one sentence:\n{text}"}]
        return jinja2.Template(tokenizer.chat_template).render(messages=messages, add_generation_prompt=True)
    return f"{kind.capitalize()}: {text}\nSummary:"


def build_prompt(tokenizer, abstract: str, max_chars: int) -> list[int]:
    return tokenizer.tokenize(prompt_text(tokenizer, abstract[:max_chars]))


def summarisation_task(tokenizer, path: str | None, n: int, max_chars: int) -> tuple[list[list[int]], list[str]]:
    """The first n aclsum test abstracts as prompts, and their reference one-sentence summaries."""
    examples = load_examples(path, n)
    prompts = [build_prompt(tokenizer, ex["abstract"], max_chars) for ex in examples]
    references = [" ".join(ex[k] for k in ("challenge", "approach", "outcome") if ex.get(k)) for ex in examples]
    return prompts, references


def decode_all(engine, prompts: list[list[int]], batch_size: int, settings) -> tuple:
    """Decode `prompts` in batches of `batch_size` with one `GenerationSettings`.

    Returns (generated tokens per second of decoding, stripped texts, token lists, the exit
    layer of every generated token, the `GenerationResult`s)."""
    return summarise([decode_batch(engine, b, settings, time.perf_counter) for b in in_batches(prompts, batch_size)])


def in_batches(items: list, size: int) -> list[list]:
    """`items` in consecutive batches of `size` (the last may be shorter)."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def decode_batch(engine, prompts: list[list[int]], settings, clock) -> tuple:
    """(seconds by `clock`, `GenerationResult`s) of one `generate` call."""
    start = clock()
    res = engine.generate(prompts, settings)
    return clock() - start, res


def summarise(batches: list[tuple]) -> tuple:
    """`decode_all`'s output from its batches' (seconds, results)."""
    results = [r for _, res in batches for r in res]
    elapsed = sum(t for t, _ in batches)
    tokens = [r.tokens for r in results]
    texts = [r.text.strip() for r in results]
    layers = [x for r in results for x in r.exit_layers]
    return sum(map(len, tokens)) / elapsed, texts, tokens, layers, results


def decode_rate(batches: list[tuple]) -> float:
    """Decoding's own tokens/s over `decode_batch` outputs: the tokens after each sequence's first
    over the seconds after each batch's prefill (`GenerationResult.stats`, wall clock)."""
    from megatron.early_exit.inference.acceptance import decoded

    after = sum(decoded(res) for _, res in batches)
    return after / max(sum(res[0].stats["elapsed_s"] - res[0].stats["prefill_s"] for _, res in batches), 1e-9)


def shared_seconds(batches: list[tuple]) -> float:
    """The seconds of `decode_batch` outputs spent outside decoding (each call's prefill and the
    Python around its decode loop: what full decoding and early exit spend alike), for the ideal
    speedup's fixed part (`cost_model.ideal_speedup`'s prefill). Taken from the full runs of the
    row's own pairs, beside its measured speedup and right after its costs were retimed: measured
    once after every row (best of 2 one-token calls, the previous way), a host whose speed moved
    between the two had read the CPU reference model's efficiency at threshold 0.3 as 0.885 in one
    sweep and 1.162 in another (the prefill is ~45% of its full decoding's calls there)."""
    return sum(t - (res[0].stats["elapsed_s"] - res[0].stats["prefill_s"]) for t, res in batches)


def policy_terms(engine, settings, prompt: list[int]) -> tuple[list[int], bool]:
    """What the cost model prices of a row's exit policy: the exits it evaluates, and whether
    its measure needs the vocabulary projection."""
    from megatron.early_exit.inference.confidence import get_measure

    policy = engine.check(settings, [prompt])
    return [n for n in policy.allowed if policy.threshold_of(n) < 1.0], get_measure(policy.measure).needs_vocab


def ideal_of(engine, costs, results: list, batch_size: int, settings, prefill_s: float, full=None) -> float:
    """The ideal speedup of one row: its exit telemetry priced by the cost model, against full
    decoding's telemetry `full` (its results; None: the row's tokens decoded in full)."""
    evaluated, needs_vocab = policy_terms(engine, settings, results[0].prompt_tokens)
    batches, reference = in_batches(results, batch_size), None if full is None else in_batches(full, batch_size)
    return cost_model.ideal_speedup(batches, costs, evaluated, needs_vocab, prefill_s, reference)


def explain_rows(engine, prompts, args, timed: dict) -> list[dict]:
    """`--explain`: where each row's efficiency gap sits. Every batch is decoded once more, right
    after full decoding of the same batch, each decode step timed (`cost_model.StepClock`) and
    priced from its telemetry (`cost_model.explain`). `host` is full decoding's measured time
    over its predicted time (the machine's speed now against the cost model's measurement); a
    step kind's `excess_share` is its measured time less `host` times its predicted time, as a
    share of the row's measured decode time. The row's measured/predicted over `host` is about
    1 / efficiency; the kinds with the largest excess are what the cost model misses."""
    from megatron.early_exit.inference.cost_model import StepClock, explain

    full = timed[(args.exit_policy[0], 1.0)][0]
    out = []
    for (policy, thr), (settings, *_, costs) in timed.items():  # each row's own cost model (`timed_rows`)
        if thr == 1.0:
            continue
        evaluated, needs_vocab = policy_terms(engine, settings, prompts[0])
        runs, full_runs = [], []
        for batch in in_batches(prompts, args.batch_size):
            for setting, into in ((full, full_runs), (settings, runs)):
                with StepClock(engine) as clock:
                    results = engine.generate(batch, setting)
                into.append((results, clock.seconds))
        base = explain(full_runs, costs, (), True)
        host = sum(k.measured for k in base.values()) / max(sum(k.predicted for k in base.values()), 1e-12)
        kinds = explain(runs, costs, evaluated, needs_vocab)
        total = sum(k.measured for k in kinds.values())
        ratio = total / max(host * sum(k.predicted for k in kinds.values()), 1e-12)
        order = sorted(kinds, key=lambda kind: host * kinds[kind].predicted - kinds[kind].measured)
        rows = [{"exit_policy": policy, "threshold": thr, "kind": kind, "steps": kinds[kind].steps,
                 "measured_ms": round(1e3 * kinds[kind].measured / kinds[kind].steps, 3),
                 "predicted_ms": round(1e3 * host * kinds[kind].predicted / kinds[kind].steps, 3),
                 "excess_share": round((kinds[kind].measured - host * kinds[kind].predicted) / total, 4)}
                for kind in order]  # fmt: skip
        worst = ", ".join(f"{r['kind']} {100 * r['excess_share']:+.1f}%" for r in rows[:3])
        print(f"explain {policy} {thr}: host {host:.3f} x the cost model's full step; measured/predicted "
              f"{ratio:.3f} after it (~1/efficiency); largest excess: {worst}", flush=True)  # fmt: skip
        out += rows
    return out


def paired_runs(engine, prompts, args, settings, full) -> tuple:
    """`settings` decoded --repeats times over the prompts, each batch right after full decoding
    (`full`) of the same batch: (its best `decode_all`-style output, the median over repeats of
    its tokens/s over the full runs' interleaved with it, the same of decoding's own tokens/s
    after the prefill, `decode_rate`, the clock's shares, and the median over repeats of the
    seconds of the full runs spent outside decoding, `shared_seconds`). A ratio of
    neighbours seconds apart drifts far less than either figure on a machine whose speed changes
    over seconds, and no setting is always the first of a round."""
    import statistics

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    best, ratios, decode, modes, shared = None, [], [], [0, 0, 0], []
    for _ in range(args.repeats):
        pairs = []
        for batch in in_batches(prompts, args.batch_size):
            ref = decode_batch(engine, batch, full, clock)
            before = passes_by_mode(engine)
            pairs.append((ref, decode_batch(engine, batch, settings, clock)))
            modes = [m + b - a for m, a, b in zip(modes, before, passes_by_mode(engine))]
        ref, out = summarise([p[0] for p in pairs]), summarise([p[1] for p in pairs])
        ratios.append(out[0] / ref[0])
        decode.append(decode_rate([p[1] for p in pairs]) / decode_rate([p[0] for p in pairs]))
        shared.append(shared_seconds([p[0] for p in pairs]))
        best = out if best is None or out[0] > best[0] else best
    shares = {k: round(n / max(sum(modes), 1), 3) for k, n in zip(("paused_share", "free_share"), modes[::2])}
    return best, statistics.median(ratios), statistics.median(decode), shares, statistics.median(shared)


def timed_rows(engine, prompts, thresholds, args, costs, pool=None) -> dict:
    """(exit policy, threshold) -> (settings, best `decode_all` output, speedup: the median of
    its ratios to full decoding timed batch by batch beside it, the same after the prefill, the
    clock's shares: `paired_runs`; the cost model the row is priced by: `costs` retimed right
    before it, `cost_model.retime`, unless --no-retime or the row evaluates no exit; its layer and
    fixed cost fitted through the medians of every step timing so far, `pool`, a
    `cost_model.StepPool` of the first timing). Every setting first
    decodes the first batch once, untimed: kernel choices, packed weights and the exit policy's
    costs are made on first use, and would otherwise be timed in whichever row came first. The
    threshold-1.0 row is full decoding timed against itself: its speedup reads the noise."""
    from megatron.early_exit.inference import GenerationSettings
    from megatron.early_exit.inference.settings import calibrated_settings

    rows = {}
    for key in [(pol, thr) for pol in args.exit_policy for thr in thresholds]:
        rows[key] = GenerationSettings(strategy="early_exit", early_exit_threshold=key[1], measure=args.measure,
                                       max_new_tokens=args.max_new_tokens, stop_strings=("\n",),
                                       exit_policy=key[0], exit_vocabulary=args.exit_vocabulary)  # fmt: skip
    if args.calibrated:  # the checkpoint's per-exit thresholds, with the measure they were calibrated for
        record = getattr(engine.model, "calibrated_thresholds", None)
        for pol in args.exit_policy:
            rows[(pol, CALIBRATED)] = replace(
                rows[(pol, 1.0)], **calibrated_settings(record, f"--calibrated ({args.load})")
            )
    full = rows[(args.exit_policy[0], 1.0)]  # threshold 1.0 never evaluates an exit: full decoding
    for settings in rows.values():
        engine.generate(prompts[: args.batch_size], settings)
    timed = {}
    for key, settings in rows.items():
        mine = costs
        if args.retime and policy_terms(engine, settings, prompts[0])[0]:
            mine = cost_model.retime(engine, prompts[: args.batch_size], costs, args.measure, args.cost_steps, 5,
                                     args.exit_vocabulary, pool)  # fmt: skip
        timed[key] = (settings, *paired_runs(engine, prompts, args, settings, full), mine)
    return timed


def sweep(args) -> list[dict]:
    import torch

    from megatron.early_exit import load_checkpoint
    from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings
    from megatron.early_exit.inference.settings import calibrated_settings

    torch.manual_seed(0)
    model, tok = load_checkpoint(args.load, device=args.device, dtype=torch.bfloat16 if args.bf16 else None)
    engine = EarlyExitEngine(model, tok)
    if args.self_speculative and not engine.draft_exits() and not args.prompt_lookup:
        raise ValueError(f"--self-speculative: {args.load} has no exit to draft from; add --prompt-lookup N")
    if args.calibrated:  # before the cost model's minute of timing
        calibrated_settings(getattr(model, "calibrated_thresholds", None), f"--calibrated ({args.load})")
    prompts, references = summarisation_task(tok, args.data, args.num_examples, args.max_prompt_chars)
    thresholds = sorted(set(args.thresholds) | {1.0}, reverse=True)
    # Warm-up: first calls are slow, and the kernel choice times each bucket of rows (`kernels`) at its
    # first use: every batch's prefill once, so that no timed row pays it (a prompt past 64 tokens
    # first met in full decoding's first pair read the demo SmolLM2's "full against full" at 1.36x).
    for batch in in_batches(prompts, args.batch_size):
        engine.generate(batch, GenerationSettings(max_new_tokens=2))
    costs, measured = cost_model.measure_costs(engine, prompts[: args.batch_size], args.measure, args.cost_steps, 5,
                                        args.exit_vocabulary)  # fmt: skip
    print(
        f"cost model: a layer {1e3 * costs.layer:.3f} ms with its weights in the cache, "
        f"{1e3 * costs.streamed('layer'):.3f} from memory; final head {1e3 * costs.head:.3f} / "
        f"{1e3 * costs.streamed('head'):.3f}; fixed {1e3 * costs.fixed:.3f} ms a step "
        f"(last-level cache {costs.cache_bytes / 2**20:.0f} MiB"
        + (
            f"; a step's reads beyond {costs.hot_bytes / 2**20:.0f} MiB stream at "
            f"{costs.stream * 2**20 * 1e3:.4f} ms a MiB, fitted from the steps that stream"
            if costs.stream
            else ""
        )
        + "); host speed in each timing against the steps' (a full-depth step's time there over its time in "
        "the steps, divided out): " + ", ".join(f"{k} {v:.2f}" for k, v in costs.host.items()),
        flush=True,
    )
    timed = timed_rows(engine, prompts, thresholds, args, costs, cost_model.StepPool(measured))
    base = (args.exit_policy[0], 1.0)
    full_settings, (_, full_texts, full_tokens, _, full_results), *_ = timed[base]
    forced = {}  # (measure, exit vocabulary) -> full decoding's steps teacher-forced (`calibration.forced_steps`)
    rows = []
    for (policy, thr), (settings, out, speedup, decode, shares, prefill_s, priced) in timed.items():
        tps, texts, tokens, layers, results = out
        agree = [sum(a == b for a, b in zip(t, f)) / max(len(f), 1) for t, f in zip(tokens, full_tokens)]
        step_agree = step_agreement_of(engine, prompts, full_tokens, settings, forced)
        ideal = ideal_of(engine, priced, results, args.batch_size, settings, prefill_s, full_results)
        row = {
            "exit_policy": policy,
            "threshold": thr,
            "tokens_per_sec": round(tps, 2),
            "speedup": round(speedup, 3),
            "ideal_speedup": round(ideal, 3),
            "efficiency": round(speedup / ideal, 3),
            "decode_speedup": round(decode, 3),
            # the row's tokens decoded in full as the reference: differs from ideal_speedup where a
            # batch's sequences end at different steps (batch > 1), not at batch 1
            "ideal_same_lengths": round(ideal_of(engine, priced, results, args.batch_size, settings, prefill_s), 3),
            "rougeL_reference": round(100 * sum(map(rouge_l, texts, references)) / len(texts), 2),
            "rougeL_vs_full": round(100 * sum(map(rouge_l, texts, full_texts)) / len(texts), 2),
            "token_agreement": round(sum(agree) / len(agree), 4),
            "step_agreement": round(step_agree, 4),
            "average_exit_layer": round(sum(layers) / len(layers), 3),
            "exit_share": json.dumps({n: round(layers.count(n) / len(layers), 4) for n in sorted(set(layers))}),
            **shares,
            # what the row was priced by: a layer and the fixed cost of a step, and the host's speed
            # against the sweep's first timing (`cost_model.retime`; 1.0 where it was not retimed)
            "layer_ms": round(1e3 * priced.layer, 4),
            "fixed_ms": round(1e3 * priced.fixed, 4),
            "host_speed": round(priced.host.get("retimed", 1.0), 3),
        }
        rows.append(row)
        print(" | ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    oracle = oracle_of(engine, prompts, args, timed, full_tokens, forced)
    if oracle is not None:
        print("oracle: " + " | ".join(f"{k} {v}" for k, v in oracle.items()), flush=True)
        os.makedirs(args.output, exist_ok=True)
        with open(os.path.join(args.output, "oracle.json"), "w") as f:
            json.dump(oracle, f, indent=1)
    if args.explain:
        write_csv(explain_rows(engine, prompts, args, timed), args.output, "explain.csv")
    if args.self_speculative:  # its own file: not threshold rows
        ways = {"on": [True], "off": [False], "both": [True, False]}[args.draft_alternatives]
        spec = []
        ref = (full_settings, full_tokens, full_results, forced)
        if engine.draft_exits():  # a model without exits drafts from the context alone (--prompt-lookup)
            spec = [speculative_row(engine, prompts, references, args, *ref, w) for w in ways]
        if args.prompt_lookup:  # the context as a draft source too: not early exit, a row of its own
            for w in ways:
                spec.append(speculative_row(engine, prompts, references, args, *ref, w, args.prompt_lookup))
        write_speculative(spec, args.output)
    return rows


def step_agreement_of(engine, prompts, full_tokens: list, settings, forced: dict) -> float:
    """The row's per-step agreement with full decoding (`calibration.step_agreement`): at each of
    full decoding's decode steps, given its prefix, whether the row's exit decisions (its
    thresholds and measure, taken as `exact` takes them) emit its token. `forced`: the teacher-forced
    steps per measure, made on first use (one pass of the model over each prompt and its output)."""
    from megatron.early_exit.inference.calibration import step_agreement

    policy = engine.check(settings, prompts[:1])
    if not policy.allowed or all(policy.threshold_of(n) >= 1.0 for n in policy.allowed):
        return 1.0  # no exit can fire: full decoding's own steps
    return step_agreement(forced_for(engine, prompts, full_tokens, policy, forced), policy)[0]


def forced_for(engine, prompts, full_tokens: list, policy, forced: dict):
    """Full decoding's decode steps teacher-forced with `policy`'s measure, and onto the draft
    vocabulary where its leaving tokens are chosen from it (`calibration.forced_steps`), kept in
    `forced` by (measure, exit vocabulary): one pass of the model over each prompt and its output."""
    from megatron.early_exit.inference.calibration import forced_steps

    key = (policy.measure, policy.vocab)
    if key not in forced:
        drafts = engine.passes.draft_vocab if policy.vocab == "draft" else None
        forced[key] = forced_steps(engine.model, prompts, full_tokens, policy.measure, drafts)
    return forced[key]


def oracle_of(engine, prompts, args, timed: dict, full_tokens: list, forced: dict) -> dict | None:
    """What the exits' own tokens allow, beside what the rows' decisions make of them: at each of
    full decoding's decode steps (teacher-forced, `calibration.forced_steps`) the shallowest exit
    whose greedy token is full decoding's, else the final head, priced by the cost model as the
    first row that evaluates exits is (its checks, full decoding's prefill): every token full
    decoding's (agreement 1.0) at `oracle_ideal_speedup` (`oracle_ideal_decode_speedup`: decoding
    alone, no prefill, beside the rows' `decode_speedup`). A row's ideal far below it at the same
    agreement: its decisions (probes, thresholds) are the bound, not the exits. Also each exit's
    agreement with full decoding's token over those steps. None where no row evaluates an exit."""
    rows = [(key, v) for key, v in timed.items() if policy_terms(engine, v[0], prompts[0])[0]]
    if not rows:
        return None
    (_, (settings, *_, priced)) = rows[0]
    policy = engine.check(settings, prompts[:1])
    steps = forced_for(engine, prompts, full_tokens, policy, forced)
    tokens = steps.draft_tokens if policy.vocab == "draft" else steps.tokens
    final = engine.config.num_layers
    allowed = [i for i, n in enumerate(steps.exits) if n in policy.allowed]
    full_results = timed[(args.exit_policy[0], 1.0)][1][4]
    results, at = [], 0
    for r in full_results:  # step i of a sequence: its token i (the first is the prefill's)
        layers = [final]
        for i in range(at, at + max(len(r.tokens) - 1, 0)):
            layers.append(next((steps.exits[e] for e in allowed if tokens[i, e] == steps.target[i]), final))
        at += max(len(r.tokens) - 1, 0)
        results.append(replace(r, exit_layers=layers))
    prefill_s = timed[(args.exit_policy[0], 1.0)][5]
    ideal = ideal_of(engine, priced, results, args.batch_size, settings, prefill_s, full_results)
    layers = [n for r in results for n in r.exit_layers[1:]]
    shares = {n: round(layers.count(n) / max(len(layers), 1), 4) for n in sorted(set(layers))}
    decoding = ideal_of(engine, priced, results, args.batch_size, settings, 0.0, full_results)
    return {
        "oracle_ideal_speedup": round(ideal, 3),
        "oracle_ideal_decode_speedup": round(decoding, 3),
        "oracle_exit_share": json.dumps(shares),
        "exit_agreement": json.dumps({
            steps.exits[e]: round(float((tokens[:, e] == steps.target).double().mean()), 4) for e in allowed
        }),
        "priced_as": f"{policy.measure} checks at exits {[steps.exits[e] for e in allowed]}",
    }  # fmt: skip


def warm_sizes(batch_size: int) -> list[int]:
    """Batch sizes whose first rounds time self-speculation's draft costs at every bucket a batch of
    `batch_size` shrinks through: batch_size, then the powers of two below it, largest first."""
    return [batch_size] + [1 << k for k in reversed(range(max(batch_size - 1, 0).bit_length())) if 1 << k < batch_size]


def speculative_row(
    engine, prompts, references, args, full, full_tokens: list, full_results: list, forced: dict,
    alternatives: bool = False, lookup: int = 0,
) -> dict:  # fmt: skip
    """Dynamic self-speculation (draft exit and length "auto") on the same prompts: lossless, so
    its quality is the full model's; speed (paired with full decoding, `paired_runs`),
    acceptance, how often it decoded plainly and how many alternative drafts it kept. `lookup`:
    drafts from the context too (`prompt_lookup_max`; "draft_exits" counts its rounds as exit 0).
    At batch 1 also what its rounds and its exits are worth (`speculative_ideal`)."""
    from megatron.early_exit.inference import GenerationSettings

    s = GenerationSettings(
        strategy="self_speculative", max_new_tokens=args.max_new_tokens, stop_strings=("\n",),
        draft_alternatives=alternatives, prompt_lookup_max=lookup,
    )  # fmt: skip
    # Its draft costs are timed on first use at each batch bucket (`self_speculative.batch_bucket`:
    # a batch shrinks as its sequences stop), ~1 s each: once per bucket here, not in the figure.
    for size in warm_sizes(args.batch_size):
        engine.generate(prompts[:size], s)
    (tps, texts, tokens, _, results), speedup, decode, *_ = paired_runs(engine, prompts, args, s, full)
    rounds = [r.stats["draft_lengths"] for r in results]
    exits: dict = {}
    for r in results:
        for n, k in r.stats["draft_exits"].items():
            exits[n] = exits.get(n, 0) + k
    drafted = sum(r.stats["drafted"] for r in results)
    ref = (full_tokens, full_results, forced)
    worth = {} if alternatives else speculative_ideal(engine, prompts, args, results, ref, (speedup, decode), lookup)
    return {
        "setting": "self_speculative auto"
        + (", alternatives" if alternatives else "")
        + (f", prompt lookup {lookup} (not early exit)" if lookup else ""),
        "tokens_per_sec": round(tps, 2),
        "speedup": round(speedup, 3),
        "decode_speedup": round(decode, 3),
        "rougeL_reference": round(100 * sum(map(rouge_l, texts, references)) / len(texts), 2),
        "identical_to_full": tokens == full_tokens,
        "acceptance_rate": round(sum(r.stats["accepted"] for r in results) / max(drafted, 1), 4),
        "plain_share": round(sum(x.get(0, 0) for x in rounds) / max(sum(sum(x.values()) for x in rounds), 1), 4),
        "draft_exits": json.dumps(dict(sorted(exits.items()))),
        "alternatives_kept": sum(r.stats.get("alternatives_kept", 0) for r in results),
        "draft_costs": json.dumps(draft_costs_of(engine, args.batch_size, lookup > 0)),
        **worth,
    }


def speculative_ideal(engine, prompts, args, results: list, ref: tuple, achieved: tuple, lookup: int = 0) -> dict:
    """A self-speculative row's cost model, at batch 1 (each round one sequence's): its rounds
    priced by the draft costs the controller used (`draft_costs.rounds_units`: `ideal_speedup`,
    `ideal_decode_speedup`, and the achieved over them: `efficiency`, `decode_efficiency`, what the
    engine adds beyond the timed costs) and the least those costs allow along full decoding's
    tokens where each round knew its drafts' fate (`draft_costs.oracle_units`, each exit's tokens
    teacher-forced along full decoding's, `calibration.forced_steps`: `oracle_ideal_speedup`,
    `oracle_ideal_decode_speedup`; the rounds' ideal far below it: the controller's choices are the
    bound, not the exits). Whole calls: full decoding's prefill share of its calls kept
    (`draft_costs.with_prefill`). `ref`: full decoding's (tokens, results, `forced` steps kept by
    `forced_for`); `achieved`: the row's (speedup, decode_speedup). Empty at batch > 1 (a batch's
    rounds are shared by its sequences) and with alternative drafts (their rows are not priced)."""
    from megatron.early_exit.inference.calibration import forced_steps
    from megatron.early_exit.inference.strategies.draft_control import MAX_DRAFT
    from megatron.early_exit.inference.strategies.draft_costs import forced_units, rounds_units, with_prefill
    from megatron.early_exit.inference.strategies.self_speculative import batch_bucket, draft_costs_for

    if args.batch_size != 1:
        return {}
    (full_tokens, full_results, forced), (speedup, decode) = ref, achieved
    costs = draft_costs_for(engine, batch_bucket(1), 1, lookup > 0)  # as the run priced its rounds
    decoded = lambda rs: sum(max(len(r.tokens) - 1, 0) for r in rs)  # noqa: E731  (the first: the prefill's)
    calls = max(sum(r.stats["elapsed_s"] for r in full_results), 1e-12)
    prefill = sum(r.stats["prefill_s"] for r in full_results) / calls
    ideal = decoded(results) / max(rounds_units(results, costs), 1e-12)  # full decoding: a token a unit
    out = {
        "ideal_speedup": round(with_prefill(ideal, prefill), 3),
        "efficiency": round(speedup / with_prefill(ideal, prefill), 3),
        "ideal_decode_speedup": round(ideal, 3),
        "decode_efficiency": round(decode / ideal, 3),
    }
    exits = [n for n in engine.draft_exits() if n in costs.draft]
    if not exits:
        return out
    # the exits' greedy tokens as drafts take them (onto the draft vocabulary where the engine drafts
    # onto one): any measure's forced steps hold them, so a row's (`forced_for`) serves where it has
    # the same vocabulary, and one pass is made otherwise
    drafts = engine.passes.draft_vocab
    steps = next((s for s in forced.values() if (s.draft_tokens is None) == (drafts is None)), None)
    if steps is None:
        steps = forced[("drafts", drafts is not None)] = forced_steps(
            engine.model, prompts, full_tokens, "max_prob", drafts
        )
    units = forced_units(steps, [len(t) for t in full_tokens], exits, costs, MAX_DRAFT)
    oracle = decoded(full_results) / max(units, 1e-12)
    out["oracle_ideal_speedup"] = round(with_prefill(oracle, prefill), 3)
    out["oracle_ideal_decode_speedup"] = round(oracle, 3)
    return out


def draft_costs_of(engine, batch_size: int, lookup: bool = False) -> dict:
    """The controller's costs per exit (units of a plain step: a draft, a verified row, a round's
    base, an alternative's row and a verify pass's fixed cost with alternatives), as it priced
    this run's rounds (`strategies/self_speculative.draft_costs_for`)."""
    from megatron.early_exit.inference.strategies.self_speculative import batch_bucket, draft_costs_for

    c = draft_costs_for(engine, batch_bucket(batch_size), 1, lookup)  # measured during the run: the cached costs
    return {
        n: [round(x, 3) for x in (c.draft[n], c.row[n], c.base.get(n, 1.0), c.alt_row(n), c.alt_base.get(n, 0.0))]
        for n in c.draft
    }


def write_csv(rows: list[dict], out: str, name: str) -> None:
    if not rows:
        return
    os.makedirs(out, exist_ok=True)
    fields = list(dict.fromkeys(k for row in rows for k in row))  # rows may lack some (an empty cell)
    with open(os.path.join(out, name), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def write_speculative(rows: list[dict], out: str) -> None:
    write_csv(rows, out, "self_speculative.csv")
    for row in rows:
        print(" | ".join(f"{k} {v}" for k, v in row.items()), flush=True)


def write_outputs(rows: list[dict], out: str, num_layers_hint: str) -> None:
    write_csv(rows, out, "sweep.csv")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: wrote sweep.csv only (pip install matplotlib for plots)")
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for policy in dict.fromkeys(r["exit_policy"] for r in rows):  # one line per exit policy
        mine = [r for r in rows if r["exit_policy"] == policy and r["threshold"] != CALIBRATED]
        ax.plot([r["threshold"] for r in mine], [r["speedup"] for r in mine], marker="o", label=policy)
    ax.set_xlabel("confidence threshold")
    ax.set_ylabel("speedup over full decoding")
    ax.legend(title="exit policy", fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "speedup.png"), dpi=120)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["speedup"] for r in rows], [r["rougeL_reference"] for r in rows], marker="o", label="vs reference")
    ax.plot([r["speedup"] for r in rows], [r["rougeL_vs_full"] for r in rows], marker="s", label="vs full model")
    ax.set_xlabel("speedup")
    ax.set_ylabel("ROUGE-L F1")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "quality_vs_speedup.png"), dpi=120)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    width = 0.8 / len(rows)
    for k, r in enumerate(rows):
        share = {int(n): v for n, v in json.loads(r["exit_share"]).items()}
        ax.bar([n + k * width for n in share], list(share.values()), width=width, label=f"{r['threshold']}")
    ax.set_xlabel(f"exit layer ({num_layers_hint})")
    ax.set_ylabel("share of tokens")
    ax.legend(title="threshold", fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "exit_histogram.png"), dpi=120)
    print(f"wrote {out}/sweep.csv and 3 plots")


def build_parser() -> argparse.ArgumentParser:
    """The sweep's flags (`--measure`'s choices: the measures registered so far, plugins' included)."""
    from megatron.early_exit.inference import measure_names

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True)
    p.add_argument("--data", help="test_summarization.jsonl (default: prepared from the aclsum package)")
    p.add_argument("--output", default="runs/ee_sweep")
    p.add_argument("--thresholds", type=float, nargs="+", default=[1.0, 0.9, 0.8, 0.6, 0.4, 0.2, 0.0])
    p.add_argument("--calibrated", action="store_true",
                   help="also a row (threshold 'calibrated') at the checkpoint's calibrated per-exit thresholds "
                        "(tools/eval/calibrate_thresholds.py; the server's 'threshold auto')")  # fmt: skip
    p.add_argument("--plugin", action="append", default=[], help="import a module that registers measures")
    p.add_argument("--measure", choices=measure_names(),
                   help="exit measure (default: learned where the exits have probes, else max_prob)")  # fmt: skip
    p.add_argument("--exit-policy", nargs="+", choices=("exact", "cost_aware"), default=["cost_aware"],
                   help="rows for each exit policy (cost_aware: tokens leave only where that saves time at the batch "
                   "size; exact: every allowed exit for every token)")  # fmt: skip
    p.add_argument("--exit-vocabulary", choices=EXIT_VOCABULARIES, default="auto",
                   help="what a leaving token is chosen from (auto: the checkpoint's draft vocabulary where it "
                   "records one and the measure is learned; GenerationSettings.exit_vocabulary)")  # fmt: skip
    p.add_argument("--num-examples", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--max-prompt-chars", type=int, default=1200)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of each row, each paired with a full-decoding run; the median ratio counts")  # fmt: skip
    p.add_argument("--cost-steps", type=int, default=16, help="decode steps per cost-model timing")
    p.add_argument("--no-retime", dest="retime", action="store_false",
                   help="price every row by the cost model timed once at the start (default: its step timings "
                   "taken again right before each row that evaluates an exit, a few seconds each, and the row "
                   "priced at the host's speed then: cost_model.retime)")  # fmt: skip
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="what times the rows: the wall clock, or this process's CPU seconds (all its threads), "
                   "for a machine whose speed other tenants change")  # fmt: skip
    p.add_argument("--explain", action="store_true",
                   help="also decode every row once more with each decode step timed and priced: where its "
                   "efficiency gap sits, by step kind (explain.csv)")  # fmt: skip
    p.add_argument(
        "--self-speculative",
        action="store_true",
        help="also dynamic self-speculation (draft exit/length auto): self_speculative.csv",
    )
    p.add_argument("--draft-alternatives", choices=("on", "off", "both"), default="off",
                   help="with alternative drafts, without (the default), or both, side by side")  # fmt: skip
    p.add_argument("--prompt-lookup", type=int, default=0, metavar="N",
                   help="with --self-speculative, also a row drafting from the context too (n-grams up to N; "
                   "not early exit: reported apart)")  # fmt: skip
    return p


def main(argv=None) -> None:
    from megatron.early_exit.inference.plugins import load_plugins_from_argv

    try:
        load_plugins_from_argv(argv)  # plugins may register measures
    except ValueError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    p = build_parser()
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.repeats < 1 or args.cost_steps < 1:
        p.error("--batch-size, --repeats and --cost-steps must be >= 1")
    if args.prompt_lookup < 0 or (args.prompt_lookup and not args.self_speculative):
        p.error("--prompt-lookup must be >= 0 and needs --self-speculative")
    if any(not 0.0 <= t <= 1.0 for t in args.thresholds):
        p.error("--thresholds must lie in [0, 1]")
    try:
        rows = sweep(args)
    except ValueError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    write_outputs(rows, args.output, "final head = last")


if __name__ == "__main__":
    main()
