#!/usr/bin/env python
"""Cost of a non-firing learned exit check as a share of one decoder layer, batch 1, one thread,
CPU time (`--threads N --clock wall`: as decoding runs, N threads, the wall clock): the fused
check (`inference/fused_check.py`) against the probe modules' path.

    python benchmarks/probe_cost.py CKPT [CKPT ...] [--dtype fp32 bf16] [--rounds 30] [--inner 50]
    python benchmarks/probe_cost.py          # a random SmolLM2-shaped model, linear probes on the backbone
    python benchmarks/probe_cost.py --builtin smollm2 cpu-ref-mlp cpu-ref-linear   # random models of both shapes

Per checkpoint and dtype, with the decoder's own cost probes (`exit_decision.cost_probes`:
"layer/1" = one layer's decode step for one row; "probe/1" = the learned check of the first
exit without a block as a decode step runs it, no row firing: the fused check, in one call where
the probe reads an RMSNorm (`inference/uniform_check.py`), or its norm and probe), timed on two
engines over the same model, one with `fused_checks` off (the module path: the norm, the probe,
a sigmoid); also the bare probe module on a random row and the
vocabulary check (max_prob). Alternating rounds, best of R, each call repeated N times; CPU time
(`time.process_time`), so a loaded machine's figures stay comparable.

"in a step": what the check adds where decoding runs it, between the layer before the exit and
the one after, in a uniform decode step (`Passes.decode_layer`, lean layers): "layer pair" runs
the two layers, "pair + check exact/cost_aware" the two with the check between (as
`Passes.run_uniform` runs it under that exit policy, no row firing), so the difference includes
what the next layer takes from the check (an RMSNorm probe's `lean.scaled_rows`), what each
call costs right after a layer has streamed its weights through the caches, and where the layer
runs in one native call, the probe run in that call (`uniform_check.layer_probe`). Each "pair + check"
call is timed right after a pair (`cost_model.paired_ratios`, median of rounds x inner: a difference
of ~5% of the pair drowns in best-of timings); the ratio less one, times the pair's best time, is
printed as a share of one layer (half the pair): the issue's "a non-firing check costs <= 5% of a layer".
"exact, own call" is exact with the probe in a call of its own after the layer, side by side.

"in decoding": what the checks add to whole decode steps as decoding runs them (`cost_model.
replayed_step`: one step replayed from a saved state, so every call computes the same step):
full-depth steps evaluating every probed exit under the policy (a threshold no probe reaches)
against full-depth steps evaluating none, in alternating blocks of 8 (`in_decoding`), the median
difference over rounds x inner / 8 pairs of blocks, divided by the exits checked: one check, with
what the step's own Python around it costs right after a layer and the run of layers it breaks
into two native calls (`Passes.decode_layers`), as a share of one layer ("layer" above, timed alone).

"in the run": what a probe adds where decoding runs it, alone: every layer of a step in one native
call (`Passes.decode_layers`) with the probed exits' native probes on the way (none stopping the
run) against the same call without them, single calls alternating, the median of rounds x inner
paired differences per probe, as a share of one layer of that run (a 200-token context). The
in-decoding difference of a few microseconds drowns in the noise of whole steps of milliseconds
(it read -8.7% and 13% of a layer on the same checkpoint in two runs).
"""

import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.early_exit import load_checkpoint  # noqa: E402
from megatron.early_exit.inference import EarlyExitEngine  # noqa: E402
from megatron.early_exit.inference.cost_model import best_times, paired_ratios, replayed_step, tick  # noqa: E402
from megatron.early_exit.inference.exit_decision import cost_probes  # noqa: E402
from megatron.early_exit.inference.passes import ExitPolicy, Rows, StepOutput  # noqa: E402
from megatron.early_exit.inference.uniform_check import layer_probe, uniform_checks  # noqa: E402

NEVER = 1.0 - 1e-9  # a threshold (< 1, so the check runs) that no probe's sigmoid reaches in fp32

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# exact with the probe in the layer's call where it goes there, cost_aware, and exact with the
# probe in a call of its own (`uniform_check.layer_probe` off): what running it in the layer saves
MODES = ("exact", "cost_aware", "exact, own call")


def timed(fns: dict, rounds: int, inner: int, clock=time.process_time) -> dict:
    """Each function's best time per call: best of `rounds` alternating rounds of `inner` calls."""
    batched = {k: (lambda f=f: [f() for _ in range(inner)]) for k, f in fns.items()}
    return {k: t / inner for k, t in best_times(batched, torch.device("cpu"), rounds, clock).items()}


def in_a_step(engine, n: int, dtype: torch.dtype) -> dict:
    """The layer before exit n and the one after in a uniform decode step, without and with the
    exit's learned check between them (exact and cost_aware; a threshold no confidence reaches)."""
    p, h, prompt = engine.passes, engine.model.config.hidden_size, list(range(1, 17))
    state = engine.new_state(1, len(prompt) + 2)
    engine.prefill(state, {0: prompt})
    index, rotary = p.uniform_layout(state, [0], [len(prompt)])
    x0, d = torch.randn(1, 1, h, generator=torch.Generator().manual_seed(0)).to(dtype), p.depth(n)

    never = {m: ExitPolicy(allowed=(n,), threshold=NEVER, measure="learned", mode=m) for m in ("exact", "cost_aware")}
    by_depth = {m: p.exits_by_depth(policy) for m, policy in never.items()}

    # each policy's checks, looked up here: a decode step finds its policy's by identity (the last
    # one used), which two policies alternating in one state would miss every call (a hash, ~5 us)
    made = {m: uniform_checks(p, state, policy, by_depth[m]) for m, policy in never.items()}

    def pair(mode: str | None, own_call: bool = False):
        with engine.packed:  # the products' kernels as decoding runs them
            checks = probe = None
            if mode is not None:  # as `Passes.run_uniform` checks
                policy, checks = never[mode], made[mode]
                # the probe in the layer's own call where it goes there (`own_call`: never, as before)
                probe = None if own_call else layer_probe(checks, [n], 1)
            x = p.decode_layer(state, d - 1, x0, rotary, index, probe)  # rewrites the same position's K/V each call
            rows, out = Rows([0], [len(prompt)], [1], x), StepOutput()  # a step makes these with or without exits
            if mode is not None:
                check = checks[n]
                fired = check(state, rows, out) if check else p.check_exit(state, n, rows, {0}, policy, out)
                if fired:
                    raise SystemExit(f"exit {n}'s probe reached threshold {NEVER}: the check is meant not to fire")
            return p.decode_layer(state, d, x, rotary, index)

    checks = {f"pair + check {m}": lambda m=m: pair(m) for m in MODES[:2]}
    checks[f"pair + check {MODES[2]}"] = lambda: pair("exact", own_call=True)
    return {"layer pair": lambda: pair(None), **checks}


def in_decoding(engine, exits: tuple[int, ...], pairs: int, block: int = 8) -> dict[str, float]:
    """Seconds one non-firing check adds to a decode step (batch 1, 16-token prompt), under the
    exact and the cost_aware policy: full-depth steps checking `exits` against steps checking
    none, replayed (`cost_model.replayed_step`), in alternating blocks of `block` steps (a run of
    decoding checks every step: single steps alternating with full ones would find the probes'
    weights evicted every time), each block's median step after its first; the median of `pairs`
    paired differences, over len(exits)."""
    prompts, full = [list(range(1, 17))], ExitPolicy()
    plain = replayed_step(engine, prompts, full, full)
    steps = {
        m: replayed_step(engine, prompts, full, ExitPolicy(allowed=exits, threshold=NEVER, measure="learned", mode=m))
        for m in MODES[:2]
    }

    def timed(step) -> float:
        times = []
        for _ in range(block):
            start = tick(engine.device)
            out = step()
            times.append(tick(engine.device) - start)
            if any(layer in exits for layer in out.exit_layer.values()):
                raise SystemExit(f"a probe reached threshold {NEVER}: the checks are meant not to fire")
        return statistics.median(times[1:])

    out = {}
    for m, step in steps.items():
        plain(), step()  # warm-up
        diffs = [timed(step) - timed(plain) for _ in range(max(pairs // block, 3))]
        out[m] = statistics.median(diffs) / len(exits)
    return out


def in_the_run(engine, exits: tuple[int, ...], pairs: int) -> tuple[float, float] | None:
    """(seconds one non-firing probe adds to a decode step's run of layers, one layer's time in
    that run), batch 1, a 200-token context: every layer of the step in one native call
    (`Passes.decode_layers`, as `Passes.run_uniform` runs it where each exit's check rides on the
    way) with the exits' native probes on the way (bound +inf: none stops the run) against the same
    call with none; single calls alternating, the median of `pairs` paired differences over
    len(exits). The probe's own cost where decoding runs it, without the step's other work (its
    noise drowned the in-decoding difference of a few microseconds in a step of several
    milliseconds). None where the probes are not native (no native kernel here) or the layers do
    not run in one call."""
    p = engine.passes
    context = min(200, engine.model.config.max_position_embeddings - 2)
    state = engine.new_state(1, context + 2)
    with engine.packed:
        engine.prefill(state, {0: [(7 * j) % engine.vocab for j in range(context)]})
    index, rotary = p.uniform_layout(state, [0], [context])
    probes = {}
    for n in exits:
        folded = p.folded_probe(state, p.exit_head(state, n))
        if folded is None or folded.native is None:
            return None
        probes[p.depth(n)] = (folded.native, math.inf)
    x = torch.randn(1, 1, engine.model.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(p.dtype)

    def run(on: dict) -> float:
        p.scaled = None
        start = tick(engine.device)
        _, reached = p.decode_layers(state, 0, p.num_layers, x, rotary, index, on)  # rewrites one position's K/V
        took = tick(engine.device) - start
        if reached != p.num_layers:
            raise SystemExit("the layers did not run through: the probes are meant not to stop them")
        return took

    with engine.packed:
        if p.layer_run(state, 0, p.num_layers) is None:
            return None
        for _ in range(20):  # warm-up
            run({}), run(probes)
        plain, diffs = [], []
        for _ in range(pairs):
            base = run({})
            diffs.append(run(probes) - base)
            plain.append(base)
    return statistics.median(diffs) / len(exits), statistics.median(plain) / p.num_layers


def builtin(name: str):
    """A random model: "smollm2" the SmolLM2 shape of the cost model's benchmark, linear probes on
    the backbone; "cpu-ref-mlp" / "cpu-ref-linear" the CPU reference model's shape
    (`examples/ee_training/cpu_pretrain_aclsum.sh`: 12 layers, hidden 384, 6 heads, norm-only exits
    at 3 and 6 read by probes 384-128-1 / 384-1)."""
    from benchmarks.decode_speed import smollm2_shaped
    from megatron.early_exit.config import ModelConfig
    from megatron.early_exit.model import EarlyExitGPT

    if name == "smollm2":
        return smollm2_shaped("backbone")
    cfg = ModelConfig(
        num_layers=12, hidden_size=384, num_attention_heads=6, ffn_hidden_size=1024, vocab_size=8000,
        max_position_embeddings=256, normalization="RMSNorm", swiglu=True, position_embedding_type="rope",
        add_bias_linear=False, exit_layer_nums=[3, 6], use_exit_norm=True, use_exit_confidence_head=True,
        exit_confidence_hidden_size=128 if name == "cpu-ref-mlp" else 0,
    )  # fmt: skip
    model = EarlyExitGPT(cfg)
    model.init_weights(0)
    return model, None


BUILTINS = ("smollm2", "cpu-ref-mlp", "cpu-ref-linear")


def calls(path: str, dtype: torch.dtype) -> tuple[dict, dict, EarlyExitEngine, tuple[int, ...]]:
    """The timed calls of one checkpoint (or "builtin:NAME": a random model) in one dtype: the
    pieces, the layer pair with and without the check (`in_a_step`: in their own alternation), an
    engine over the model and its exits with probes (`in_decoding`)."""
    model, tok = builtin(path[8:]) if path.startswith("builtin:") else load_checkpoint(path)
    model = model.to(dtype=dtype).eval()
    fused, plain = EarlyExitEngine(model, tok).passes, EarlyExitEngine(model, tok).passes
    plain.fused_checks = False
    probes, plain_probes = cost_probes(fused, 1), cost_probes(plain, 1)
    if "probe/1" not in probes:
        raise SystemExit(f"{path}: no exit without a block has a confidence probe")
    probed = tuple(n for n in fused.exits if model.exits[str(n)].confidence is not None and n not in fused.block_slots)
    n = probed[0]
    head, x = model.exits[str(n)], torch.randn(1, 1, model.config.hidden_size, dtype=dtype)
    return (
        {
            "layer": probes["layer/1"],
            "check fused": probes["probe/1"],
            "check plain": plain_probes["probe/1"],
            "probe module": lambda: head.confidence_logit(x),
            "vocab check": probes["vocab/1"],
        },
        in_a_step(EarlyExitEngine(model, tok), n, dtype),
        EarlyExitEngine(model, tok),
        probed,
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoints", nargs="*", help="checkpoint directories whose exits carry confidence probes "
                   "(none: a random SmolLM2-shaped model)")  # fmt: skip
    p.add_argument("--builtin", nargs="+", choices=BUILTINS, default=[],
                   help="random models of these shapes (besides the checkpoints)")  # fmt: skip
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--rounds", type=int, default=30, help="alternating rounds (best counts)")
    p.add_argument("--inner", type=int, default=50, help="calls per round")
    p.add_argument("--threads", type=int, default=1, help="torch threads (decoding's own: the machine's cores)")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="CPU seconds of the process (comparable on a loaded machine; one thread: another "
                        "thread's spinning counts too) or the wall clock")  # fmt: skip
    return p.parse_args(argv)


@torch.no_grad()
def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for name in args.dtype:
        builtins = [f"builtin:{b}" for b in args.builtin]
        for path in args.checkpoints + builtins or ["builtin:smollm2"]:
            with torch.no_grad():
                pieces, step, engine, probed = calls(path, DTYPES[name])
                t = timed(pieces, args.rounds, args.inner, clock)
                pair = step.pop("layer pair")
                t["layer pair"] = timed({"layer pair": pair}, args.rounds, args.inner, clock)["layer pair"]
                # each "pair + check" over the pair run just before it, median of rounds x inner
                ratio = paired_ratios(step, pair, torch.device("cpu"), args.rounds * args.inner, clock)
                decoding = in_decoding(engine, probed, args.rounds * args.inner)
                run = in_the_run(engine, probed, args.rounds * args.inner)
            print(f"{path} {name}, {args.threads} thread(s), {args.clock} clock: layer {t['layer'] * 1e6:.1f} us")
            for k, v in t.items():
                print(f"  {k:22s} {v * 1e6:8.1f} us  {v / t['layer'] * 100:6.2f}% of a layer")
            print(f"  fused / plain check: {t['check fused'] / t['check plain']:.3f}")
            one = t["layer pair"] / 2
            for mode in MODES:
                e = (ratio[f"pair + check {mode}"] - 1) * t["layer pair"]
                print(f"  in a step, {mode}: the check adds {e * 1e6:.1f} us = {e / one:.1%} of a layer "
                      f"({one * 1e6:.1f} us in the pair; median of paired ratios)")  # fmt: skip
            if run is not None:
                print(f"  in the run: a probe adds {run[0] * 1e6:.1f} us = {run[0] / run[1]:.1%} of a layer there "
                      f"({run[1] * 1e6:.1f} us; every layer of a step in one native call, the probes of exits "
                      f"{list(probed)} on the way against none, per probe)")  # fmt: skip
            for mode, e in decoding.items():
                print(f"  in decoding, {mode}: a check adds {e * 1e6:.1f} us = {e / t['layer']:.1%} of a layer "
                      f"(full-depth steps checking exits {list(probed)} against checking none, per exit)")  # fmt: skip


if __name__ == "__main__":
    main()
