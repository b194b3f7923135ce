#!/usr/bin/env python
"""Decode speed of early exit and self-speculative decoding vs full decoding, side by side.

    python benchmarks/decode_speed.py                         # random SmolLM2-135M-shaped model, fp32 and bf16
    python benchmarks/decode_speed.py --load runs/demo/checkpoints --dtypes bf16

For each dtype and batch size it prints full decoding's tokens/s, then for every other
setting: tokens/s and its ratio to full, the share of tokens that left at an exit, the
average exit layer, the share of generated tokens equal to full greedy decoding's (free
running: after a first difference the texts usually part, so this is strict), the share of
decode time spent in exit heads (from one more run with `profile` on, which times every exit
check with the device synchronised around it on the general path: the timed rounds run
without it, so with the uniform step's checks), and for self-speculative decoding the
acceptance rate.

The built-in model (30 layers, hidden 576, 9 heads, 3 KV groups, FFN 1536, vocabulary
49152, tied embeddings, norm+MLP exits at 8/15/22 with confidence probes) has random
weights, so its numbers show costs, not a trained model's behaviour: no max_prob exit
reaches a real threshold (rows at 0.9 / 0.5 show what checking exits that do not fire
costs), threshold 0.0 shows the ceiling (every token leaves at the first exit), the random
learned probe at 0.5 fires for most tokens and decides without any vocabulary projection
for the exits that stay, and self-speculative acceptance is meaningless (with tied random weights
every head mostly repeats the input token, so drafts agree). Each early_exit row runs once per
--exit-policies: exact evaluates every exit for every token, cost_aware only where leaving
saves time at the batch size. Measure a trained checkpoint
for real speedups.

Tokens/s are per wall second (what a user waits for; take them on a quiet machine). On a
machine other processes load, `--clock cpu --threads 1` counts tokens per CPU second of this
process instead (whole `generate` calls): wall-clock figures there measure the load
(a batch-16 run of 51 CPU seconds took 10 minutes of wall time here; in two such runs settings
under which no token left ran at 0.64x to 1.29x full decoding by the wall clock, 0.93x to 1.06x
by CPU time, and CPU time is still noisy by a few percent); pass `--threads 1` so that CPU time is work,
not threads spinning. Besides each setting's best round (tokens/s, "vs full"), the "paired vs full"
column gives the median [min, max] over the --repeats rounds of its ratio to full decoding in the
same round (full runs right before the others in every round): steadier than the best round on a
loaded machine; use --repeats 10 or more. A second full-decoding row, "full again (control)",
runs right after the first: its paired ratio is what neighbours in time differ by with nothing
changed. Each slot gets its own prompt (a window STRIDE tokens further into the
text; `--same-prompt` for one prompt in every slot, under which all slots fire together).

`--clock-modes` runs each cost_aware row three more times, each on an engine of its own whose exit
clock (`inference/exit_clock.py`) holds every decode step in one mode (`exit_clock.FixedMode`):
"[paused]" (full decoding's passes), "[on]" (the decider's verdicts alone) and "[free]" (every firing
row leaves): what the clock chooses among, measured whole, beside what its windows made of them
(CPU reference, learned 0.8, batch 4, 128 tokens: paused 1.00-1.02x, on 0.94-0.98x, free 0.79-0.84x).
At batch 1 the cost_aware row itself takes exact's decisions where its checks are native learned
ones (`Passes.solo_policy`); the held modes there are what the clock would choose among.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings, summarize  # noqa: E402
from megatron.early_exit.inference.exit_clock import FREE, ON, PAUSED, FixedMode, passes_by_mode  # noqa: E402
from megatron.early_exit.inference.exit_decision import decider_of  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TEXT = (
    "In this paper we propose a new method for early exit in large language models and show that it "
    "reduces the cost of decoding. We train exits jointly with the backbone on a summarization corpus. "
    "The results show that most tokens can leave after a few layers without changing the output. "
    "Large language models are expensive at inference time because every token runs every layer. "
    "A pipeline-parallel schedule fills the bubbles with partial passes that feed the exit losses."
)
STRIDE = 7  # slot b's prompt starts STRIDE * b tokens into the text: distinct prompts, distinct exits


def smollm2_shaped(probe_input: str = "exit"):
    from megatron.early_exit.config import ModelConfig
    from megatron.early_exit.model import EarlyExitGPT

    cfg = ModelConfig(
        num_layers=30, hidden_size=576, num_attention_heads=9, num_query_groups=3, ffn_hidden_size=1536,
        vocab_size=49152, max_position_embeddings=8192, normalization="RMSNorm", swiglu=True,
        position_embedding_type="rope", rotary_base=100000.0, add_bias_linear=False, exit_layer_nums=[8, 15, 22],
        use_exit_norm=True, use_exit_mlp=True, use_exit_confidence_head=True, exit_confidence_input=probe_input,
    )  # fmt: skip
    model = EarlyExitGPT(cfg)
    model.init_weights(0)
    return model, None


def load(args):
    if args.load:
        from megatron.early_exit import load_checkpoint

        return load_checkpoint(args.load)
    return smollm2_shaped()


def warm_up(engine, prompts, settings) -> None:
    """One short untimed run: first calls pay for weight packing, allocation and caches. A
    self-speculative setting's at its own length: its rounds meet row counts (a verify pass of
    every sequence's drafts) whose kernels are chosen by timing on first use, which in a timed
    round read as that round at 0.10x full decoding."""
    short = settings.strategy != "self_speculative"
    engine.generate(prompts, GenerationSettings(**{**settings.__dict__, "max_new_tokens": 8}) if short else settings)


def timed_alternating(
    engine,
    prompts,
    runs: list[tuple[str, GenerationSettings]],
    repeats: int,
    clock: str = "wall",
    warm: bool = True,
    engines: dict | None = None,
) -> dict:
    """Every setting warmed up (`warm=False`: the caller has already run each one), then
    `repeats` rounds that each run every setting once, in turn.

    Alternating the settings inside each round means a neighbour that loads the machine for a
    while slows all of them alike, so the ratios stay honest; the best round of each counts.
    `clock` "cpu": tokens per CPU second of this process (whole `generate` calls, prefill
    included), which waiting for a core that other processes hold does not inflate; "wall": the
    engine's own tokens/s. Returns {name: (results, summary)}: the best round's, its summary's
    "rounds" holding every round's tokens/s (for ratios paired by round: `paired_ratios`).
    `engines`: run name -> the engine that runs it (the others: `engine`).
    """
    engines = engines or {}
    if warm:
        for name, settings in runs:
            warm_up(engines.get(name, engine), prompts, settings)
    best: dict = {}
    rates: dict = {name: [] for name, _ in runs}
    modes: dict = {name: [0, 0, 0] for name, _ in runs}
    for _ in range(repeats):
        for name, settings in runs:
            e = engines.get(name, engine)
            before = passes_by_mode(e)
            start = time.process_time()
            res = e.generate(prompts, settings)
            cpu = time.process_time() - start
            modes[name] = [a + c - b for a, b, c in zip(modes[name], before, passes_by_mode(e))]
            s = summarize(res, engine.num_layers)
            if clock == "cpu":
                s["tokens_per_sec"] = s["tokens"] / max(cpu, 1e-9)
            rates[name].append(s["tokens_per_sec"])
            if name not in best or s["tokens_per_sec"] > best[name][1]["tokens_per_sec"]:
                best[name] = (res, s)
    for name, (_, s) in best.items():
        s["rounds"] = rates[name]
        s["paused_share"], _, s["free_share"] = (n / max(sum(modes[name]), 1) for n in modes[name])
    return best


def paired_ratios(summary: dict, base: dict) -> str:
    """Median [min, max] over rounds of a setting's tokens/s over the base setting's in the same round."""
    r = [a / b for a, b in zip(summary["rounds"], base["rounds"])]
    return f"{statistics.median(r):.2f}x [{min(r):.2f}, {max(r):.2f}]"


def settings_to_run(args, config) -> list[tuple[str, dict]]:
    measures = [("max_prob", t) for t in args.thresholds]
    if config.use_exit_confidence_head:
        measures += [("learned", t) for t in args.learned_thresholds]
    runs = [
        (
            f"early_exit {m} @ {t:g} {pol}",
            dict(strategy="early_exit", early_exit_threshold=t, measure=m, exit_policy=pol),
        )
        for m, t in measures
        for pol in args.exit_policies
    ]
    if args.early_exit_only:
        return runs
    runs += [
        (f"self_speculative exit {d} k={args.draft}", dict(strategy="self_speculative", draft_exit_layer=d))
        for d in config.exit_layer_nums[-2:]
    ]
    auto = dict(strategy="self_speculative", draft_exit_layer="auto", num_draft_tokens="auto")
    return runs + [("self_speculative auto", auto)]  # the controller picks exit and length each round


def bench_batch(engine, tok, batch: int, args) -> None:
    vocab = engine.vocab
    if tok is not None:  # real text where there is a tokenizer: confidence depends on it
        text = tok.tokenize(TEXT) * (2 + STRIDE * batch // len(tok.tokenize(TEXT)))
        prompts = [text[STRIDE * b : STRIDE * b + args.prompt_len] for b in range(batch)]
    else:
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, vocab, (batch, args.prompt_len), generator=gen).tolist()
    if args.same_prompt:  # every slot decodes the first prompt (the benchmark's old setting)
        prompts = [prompts[0]] * batch
    # timed unprofiled: `profile` times each exit check on the general path (`Passes.check_exit`), so it
    # turns the uniform step's checks off (`uniform_check`), and early exit ran 0.91-0.94x full decoding
    # at batch 4 where nothing left; the exit time column comes from one profiled run of its own
    common = dict(max_new_tokens=args.new_tokens, ignore_eos=True, num_draft_tokens=args.draft)
    runs = [("full", GenerationSettings(strategy="full", **common))]
    # full decoding once more, right after: its paired ratio is this machine's noise between neighbours
    runs += [("full again (control)", GenerationSettings(strategy="full", **common))]
    runs += [(name, GenerationSettings(**{**common, **kw})) for name, kw in settings_to_run(args, engine.config)]
    engines = {}
    if args.clock_modes:  # each cost_aware row again with its clock held in one mode, on an engine of its own
        for name, settings in [r for r in runs if r[1].exit_policy == "cost_aware" and r[1].strategy == "early_exit"]:
            at = runs.index((name, settings)) + 1
            for label, mode in (("paused", PAUSED), ("on", ON), ("free", FREE)):
                forced = engines[f"{name} [{label}]"] = EarlyExitEngine(engine.model, tok)
                decider_of(forced.passes).clock = FixedMode(mode)
                forced.passes.solo_exact = False  # batch 1 too: the held mode, not exact's decisions
                runs.insert(at, (f"{name} [{label}]", settings))
                at += 1
    measured = timed_alternating(engine, prompts, runs, args.repeats, args.clock, engines=engines)
    for name, settings in runs:  # the share of decoding spent in exit checks: one profiled run each
        profiled = engines.get(name, engine).generate(prompts, replace(settings, profile=True))
        measured[name][1]["exit_time_share"] = summarize(profiled, engine.num_layers).get("exit_time_share", 0.0)
    full, fs = measured["full"]
    rounds = f"best of {args.repeats} alternating rounds, {args.clock} clock; paired: per-round ratios"
    print(f"\n  batch {batch}: full decoding {fs['tokens_per_sec']:.1f} tokens/s ({rounds})")
    head = f"  {'setting':50s} {'tokens/s':>9s} {'vs full':>8s} {'exited':>7s} {'avg exit':>9s}"
    modes = f"{'paused':>7s} {'free':>5s}"
    print(head + f" {'= full':>7s} {'exit time':>10s} {modes} {'accept':>7s}  {'paired vs full':19s}  exits")
    for name, _ in runs[1:]:
        res, s = measured[name]
        same = sum(a == b for r, f in zip(res, full) for a, b in zip(r.tokens, f.tokens)) / max(fs["tokens"], 1)
        share = ", ".join(f"{n}:{v:.0%}" for n, v in s["exit_share"].items())
        accept = f"{s['acceptance_rate']:7.0%}" if "acceptance_rate" in s else f"{'':7s}"
        print(
            f"  {name:50s} {s['tokens_per_sec']:9.1f} {s['tokens_per_sec'] / fs['tokens_per_sec']:7.2f}x "
            f"{s['early_exit_share']:7.0%} {s['average_exit_layer']:9.2f} {same:7.0%} "
            f"{s.get('exit_time_share', 0.0):10.1%} {s['paused_share']:7.0%} {s['free_share']:5.0%} {accept}  "
            f"{paired_ratios(s, fs):19s}  {share}"
        )


def cpu_model_name() -> str:
    """lscpu's "Model name" (what kind of CPU the figures come from), else platform's guess."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", help="a checkpoint (default: the random SmolLM2-shaped model)")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.5, 0.0])
    p.add_argument("--learned-thresholds", type=float, nargs="+", default=[0.9, 0.5])
    p.add_argument("--exit-policies", nargs="+", choices=("exact", "cost_aware"), default=["exact", "cost_aware"],
                   help="early_exit rows for each exit policy")  # fmt: skip
    p.add_argument("--early-exit-only", action="store_true", help="no self_speculative rows")
    p.add_argument("--draft", type=int, default=4, help="self_speculative: tokens drafted per round")
    p.add_argument("--repeats", type=int, default=3, help="alternating timed rounds: each setting's best, and the "
                   "median [min, max] of its per-round ratios to full")  # fmt: skip
    p.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="wall",
        help="tokens per wall second (default: what a user waits for; take it on a quiet machine) or "
        "per CPU second of this process (a loaded machine's waits do not count; use with --threads 1, "
        "since CPU time counts every thread)",
    )
    p.add_argument("--same-prompt", action="store_true", help="the same prompt in every slot (default: distinct)")
    p.add_argument(
        "--clock-modes", action="store_true",
        help="each cost_aware row again with the exit clock held paused, on and free (each on an engine of "
        "its own): what each of the clock's modes decodes at alone, against which the clock's choice reads",
    )  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    base_model, tok = load(args)
    c = base_model.config
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model_name()
    print(
        f"machine: {where} ({device.type}), {os.cpu_count()} CPU cores, {args.threads} threads, "
        f"torch {torch.__version__}\n"
        f"model: {'random SmolLM2-135M shape' if not args.load else args.load}: {c.num_layers} layers, "
        f"hidden {c.hidden_size}, vocab {c.vocab_size}, exits {c.exit_layer_nums}\n"
        f"settings: prompt {args.prompt_len} tokens ({'the same' if args.same_prompt else 'distinct'} in every slot), "
        f"{args.new_tokens} new tokens, greedy, EOS ignored, {args.clock} clock"
    )
    for name in args.dtypes:
        model = copy.deepcopy(base_model).to(device=device, dtype=DTYPES[name]).eval()
        print(f"\n== {name}")
        engine = EarlyExitEngine(model, tok)
        for batch in args.batch:
            bench_batch(engine, tok, batch, args)


if __name__ == "__main__":
    main()
