#!/usr/bin/env python
"""The cost model of early-exit decoding against the clock (`inference/cost_model.py`).

    python benchmarks/cost_model.py                              # random SmolLM2-135M-shaped model, fp32, batch 1
    python benchmarks/cost_model.py --dtype bf16 --batch 4
    python benchmarks/cost_model.py --load runs/demo/checkpoints --measure max_prob

Prints the measured costs (per layer fitted and timed alone, fixed per step, final head, each
exit's checks, a layer that fills pending rows and each further row), with the uniform decode
fast path off (exact path) and on side by side (`--no-exact`: on only); what an exit check
called alone costs as a share of one layer (learned probe vs max_prob; a probe reading
the exit's hidden state includes the exit's norm and MLP, one reading the backbone
(`--probe-input backbone`, the default for the built-in model) only its own norm, and both are
printed), and what a learned check that does not fire adds to a decode step as the step runs it
(`cost_model.check_in_step`: replayed steps with every exit's check evaluated at a threshold no
score reaches, under exact and cost_aware, against full decoding's, with the median's standard
error: --check-rounds); then predicted vs measured time per token for full decoding and for
"every token leaves at exit k" (early_exit, exit_layers=(k,), threshold 0.0) for each exit: the model fits
`layer` and `fixed` through these, so their ratio checks that step time is linear in the
layers run with the timed heads and checks on top (target within 10%). Last, a run that mixes
exits and pending-state fill (threshold --mixed-threshold, all exits, the `exact` policy), priced
from its own exit telemetry: a check the fit did not see (`exact`: every run decides alike; under
`cost_aware` the exit clock's windows explore, a paused one running full-depth passes, so the run
whose exits were priced need not be one that was timed: the CPU reference's learned 0.5 read
"exits 12:100%" priced against 3:94% timed, a ratio of 2.25); and its speedup over full decoding predicted and
measured with full decoding timed beside it in the same rounds (in bf16 on the AVX2 EPYC the
mixed run's absolute check read 0.706 / 1.076 / 0.863 in three runs, timed apart from the fit's
full decoding as the host's speed moved). Every piece that reads weights (a layer, the final
head, an exit's projection) is also timed with its weights in memory, and the model follows
which weights each step finds in the last-level cache (`cost_model.WeightCache`; EE_CACHE_BYTES=0
turns that off, to compare).

Every timing warms up, alternates the settings it compares and keeps the best of --repeats.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.decode_speed import DTYPES, cpu_model_name, smollm2_shaped  # noqa: E402
from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings  # noqa: E402
from megatron.early_exit.inference import cost_model as cm  # noqa: E402
from megatron.early_exit.inference.confidence import get_measure  # noqa: E402


def print_fast_vs_exact(exact: cm.DecodeCosts, fast: cm.DecodeCosts) -> None:
    """The step's fixed cost and the per-layer cost with the uniform decode fast path off and on."""
    ms = 1e3
    print(f"\n  {'(ms per decode step)':24s} {'exact path':>11s} {'fast path':>10s} {'fast/exact':>11s}")
    for name in ("fixed", "layer", "layer_direct", "head"):
        a, b = getattr(exact, name), getattr(fast, name)
        ratio = f"{b / a:11.3f}" if a > 0 else f"{'-':>11s}"
        print(f"  {name:24s} {a * ms:11.3f} {b * ms:10.3f} {ratio}")
    full_a, full_b = cm.predicted_step(exact, "full", True), cm.predicted_step(fast, "full", True)
    print(f"  {'full step (predicted)':24s} {full_a * ms:11.3f} {full_b * ms:10.3f} {full_b / full_a:11.3f}")


def print_costs(c: cm.DecodeCosts) -> None:
    ms = 1e3
    print(
        f"\ncosts per decode step of batch {c.batch} (ms): layer {c.layer * ms:.3f} fitted (weights in the cache), "
        f"{c.layer_direct * ms:.3f} alone | fixed {c.fixed * ms:.3f} | final head {c.head * ms:.3f} | "
        f"pending layer {c.pend * ms:.4f} (a filling pass {c.pend_pass * ms:.4f} once), "
        f"each further row per layer {c.row * ms:.4f}; a layer filling k rows: "
        + ", ".join(f"{k} {t * ms:.4f}" for k, t in c.fill_rows)
    )
    if c.cache_bytes > 0:  # the weights' cache regime (`cost_model.WeightCache`)
        cold = ", ".join(
            f"{piece} +{c.cold.get(piece, 0.0) * ms:.3f} ({c.reads[piece][1] / 2**20:.1f} MiB)" for piece in c.reads
        )
        print(f"  last-level cache {c.cache_bytes / 2**20:.0f} MiB; weights read from memory cost: {cold}")
    if c.stream:  # the deeper steps above the line through the shallow exits' (`cost_model.fit_steps`)
        print(
            f"  a step's reads beyond {c.hot_bytes / 2**20:.0f} MiB (what the cache keeps between steps, fitted) "
            f"stream from memory: +{c.stream * 2**20 * ms:.4f} ms per MiB (fitted from the steps above the line "
            "through the shallower exits': full decoding's, and any exit's whose reads stream)"
        )
    if c.host:  # each timing's host speed against the steps' (`cost_model.ReferenceStep`), divided out
        print("  host speed against the steps' timing: " + ", ".join(f"{k} {v:.3f}" for k, v in c.host.items()))
    print(
        f"  {'exit':>5s} {'depth':>6s} {'probe':>8s} {'max_prob':>9s} {'project':>8s} {'draft':>7s}  "
        "a check called alone, as a share of one layer (fitted / alone)"
    )
    if c.draft:  # `GenerationSettings.exit_vocabulary`: what the timed runs' leaving tokens were chosen from
        print(f"  (draft: the projection onto the draft vocabulary alone; the timed runs' leavers used "
              f"{'it' if c.leave_vocab == 'draft' else 'the whole vocabulary'})")  # fmt: skip

    def share(t: float) -> str:
        return f"{t / c.layer:.1%} / {t / c.layer_direct:.1%}"

    for n in c.depth:
        probe = c.probe.get(n)
        learned = f"learned {share(probe)}, " if probe is not None else ""
        if n in c.fire_hidden:  # the probe reads the backbone: also show it reading the exit's hidden state
            learned = f"learned on backbone {share(probe)}, on exit hidden {share(c.probe_exit[n])}, "
        p_ms = f"{probe * ms:8.3f}" if probe is not None else f"{'-':>8s}"
        d_ms = f"{c.draft[n] * ms:7.3f}" if n in c.draft else f"{'-':>7s}"
        print(
            f"  {n:5d} {c.depth[n]:6d} {p_ms} {c.vocab[n] * ms:9.3f} {c.project[n] * ms:8.3f} {d_ms}  "
            f"{learned}max_prob {share(c.vocab[n])}"
        )
    for mode, t in c.check_step.items():  # `cost_model.check_in_step`: the step's own cost of a check
        e = c.check_step_error[mode]
        print(
            f"  a learned check that does not fire, in a decode step ({mode}): {t * 1e6:.1f} +- {e * 1e6:.1f} us "
            f"an exit, {share(t)} of a layer (target <= 5%)"
        )


def check_against_clock(engine, prompts, costs: cm.DecodeCosts, measured: dict, measure) -> None:
    batch = len(prompts)
    print(f"\n  {'setting':10s} {'predicted':>10s} {'measured':>10s} {'ratio':>7s}  (ms per token)")
    for name, s in cm.exit_settings(engine, measure).items():
        needs_vocab = get_measure(engine.check(s, prompts).measure).needs_vocab
        pred, real = cm.predicted_step(costs, name, needs_vocab) / batch, measured[name] / batch
        flag = "" if abs(pred / real - 1) <= 0.10 else "  (outside 10%)"
        print(f"  {name:10s} {pred * 1e3:10.3f} {real * 1e3:10.3f} {pred / real:7.3f}{flag}")


def check_mixed_run(engine, prompts, costs: cm.DecodeCosts, args) -> None:
    """A run the fit did not see: exits mixed, pending rows filled later."""
    s = GenerationSettings(
        strategy="early_exit", early_exit_threshold=args.mixed_threshold, measure=args.measure, exit_policy="exact"
    )  # every run decides alike (cost_aware's clock explores: the priced run might not be one timed)
    # full decoding timed beside it, in the same alternating rounds: the speedup each side
    # reads does not move with the host's speed between the fit and this check
    times = cm.step_times(engine, prompts, {"full": GenerationSettings(), "mixed": s}, args.steps, args.repeats)
    real = times["mixed"]
    long = engine.generate(prompts, GenerationSettings(**{**s.__dict__, "max_new_tokens": 1 + args.steps}))
    policy = engine.check(s, prompts)
    needs_vocab = get_measure(policy.measure).needs_vocab
    pred = cm.predict(long, costs, policy.allowed, needs_vocab) / args.steps
    layers = [x for r in long for x in r.exit_layers[1:]]
    share = ", ".join(f"{n}:{layers.count(n) / len(layers):.0%}" for n in sorted(set(layers)))
    print(
        f"  mixed @ {args.mixed_threshold:g} ({policy.measure}, exact; exits {share}): "
        f"predicted {pred / len(prompts) * 1e3:.3f}, measured {real / len(prompts) * 1e3:.3f} ms per token, "
        f"ratio {pred / real:.3f}; ideal speedup {cm.ideal_speedup([long], costs, policy.allowed, needs_vocab):.2f}x"
    )
    full_pred = cm.predicted_step(costs, "full", needs_vocab)
    print(
        f"  its speedup over full decoding timed beside it: predicted {full_pred / pred:.3f}x, "
        f"measured {times['full'] / real:.3f}x (full {times['full'] / len(prompts) * 1e3:.3f} ms per token now)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", help="a checkpoint (default: the random SmolLM2-shaped model)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per setting")
    p.add_argument("--repeats", type=int, default=5, help="alternating rounds; the best counts")
    p.add_argument("--measure", help="exit measure (default: learned where the exits have probes, else max_prob)")
    p.add_argument("--mixed-threshold", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--probe-input", choices=["exit", "backbone"], default="backbone",
        help="what the built-in model's probes read (backbone: both inputs' check costs are printed)",
    )  # fmt: skip
    p.add_argument("--no-exact", action="store_true", help="skip timing the exact path (fast path off) to compare")
    p.add_argument(
        "--check-rounds", type=int, default=2000,
        help="rounds of replayed steps timing a check that does not fire in a step (0: not timed; ~1 ms of "
        "spread per SmolLM2 step leaves ~10 us of error at 1,000)",
    )  # fmt: skip
    args = p.parse_args()
    if args.repeats < 1 or args.steps < 1 or args.batch < 1 or args.check_rounds < 0:
        p.error("--repeats, --steps and --batch must be >= 1, --check-rounds >= 0")
    torch.set_num_threads(args.threads)
    if args.load:
        from megatron.early_exit import load_checkpoint

        model, tok = load_checkpoint(args.load)
    else:
        model, tok = smollm2_shaped(args.probe_input)
    model = model.to(device=args.device, dtype=DTYPES[args.dtype]).eval()
    engine = EarlyExitEngine(model, tok)
    c = model.config
    print(
        f"machine: {cpu_model_name()}, {os.cpu_count()} CPU cores, {args.threads} threads, torch {torch.__version__}\n"
        f"model: {args.load or 'random SmolLM2-135M shape'}: {c.num_layers} layers, hidden {c.hidden_size}, "
        f"vocab {c.vocab_size}, exits {c.exit_layer_nums}; {args.dtype}, batch {args.batch}, prompt {args.prompt_len}, "
        f"{args.steps} steps, best of {args.repeats} alternating rounds"
    )
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, engine.vocab, (args.prompt_len,), generator=gen).tolist() for _ in range(args.batch)]
    if not args.no_exact:
        engine.passes.fast = False
        exact, _ = cm.measure_costs(engine, prompts, args.measure, args.steps, args.repeats)
        engine.passes.fast = True
    costs, measured = cm.measure_costs(
        engine, prompts, args.measure, args.steps, args.repeats, check_rounds=args.check_rounds
    )
    if not args.no_exact:
        print_fast_vs_exact(exact, costs)
    print_costs(costs)
    check_against_clock(engine, prompts, costs, measured, args.measure)
    if c.exit_layer_nums:
        check_mixed_run(engine, prompts, costs, args)


if __name__ == "__main__":
    main()
