#!/usr/bin/env python
"""What a prompt's prefill is made of, how close its products run to this machine's peak, and the
ceiling it puts on every speedup over full decoding (early exit and self-speculation skip layers of
decode steps only: each call's prefill runs every layer in every setting).

    python benchmarks/prefill_bound.py --load runs/ee_aclsum/probes --bf16
    python benchmarks/prefill_bound.py --load runs/ee_aclsum/probes --num-examples 40 --repeats 3

The sweep's prompts (`tools/eval/ee_sweep.py`: the first aclsum test abstracts, its prompt format
and length cap), batch 1. Each prompt's prefill is timed with nothing counted (the total, median
over prompts and repeats) and, alternately, with the time inside each kind of call summed: the
products (oneDNN's `_linear_pointwise`, `F.linear`, `torch.matmul`, the native kernel's
`native.linear`: their FLOPs 2 x rows x in x out from the operands' shapes), layers in one native
call (`native.layer_step`, `layers_step`: where the kernel choice puts a prompt's products on the
native kernel, everything of the layer inside; their products' FLOPs counted alone), native
attention (`native.attend`), the rows made ready for a product (`native.prepared_rows`: RMSNorm,
SwiGLU), rotation (`native.rope_`), the final head (`native.head`); "rest" is the counted
prefill's time outside them (the interpreter, the cache's writes, tensor glue). Which calls a
process makes follows its kernel choices, timed at first use. The GFLOP/s are set against the
fastest of the products' kernels on one large product (1024 x 1024 x 4096, best of 5): this
machine's reachable peak in the dtype, so a share near 1 means the products are at the
arithmetic's limit.

Then full decoding's `generate` calls on the same prompts (greedy, the sweep's settings: 48 new
tokens at most, stop at a newline), each call's prefill share p (`GenerationResult.stats`): any
method that speeds decoding alone by s reaches 1 / (p + (1 - p) / s) over full decoding at best,
printed for a few s (the ceiling as s grows: 1 / p). Wall clock; take it on a quiet machine.
"""

import argparse
import collections
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools", "eval"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from native_ab import paired_arguments  # noqa: E402

from megatron.early_exit import load_checkpoint  # noqa: E402
from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings, native  # noqa: E402

PRODUCTS = "products"
LAYERS = "layers in one native call"


def product_flops(args, out) -> float:
    """2 x rows x in x out of a product's call: x = args[0]."""
    return 2.0 * args[0].numel() * out.shape[-1] if isinstance(out, torch.Tensor) and out.dim() else 0.0


def layer_flops(args, out) -> float:
    """The products' FLOPs of a `native.layer_step` / `layers_step` call: 2 x rows x the packed
    weights' elements (their QKV, projection and MLP products; each layer's weights as `layer_step`
    takes them: gain, qkv, proj, gain, fc1, fc2)."""
    x, layers = args[0], getattr(args[1], "layers", args[1])  # a `native.LayerRun`'s, or as given
    per_layer = [layers] if isinstance(layers[0], torch.Tensor) else [w for w, *_ in layers]
    rows = x.numel() // x.shape[-1]
    return 2.0 * rows * sum(w[i].numel() for w in per_layer for i in (1, 2, 4, 5))


# (owner, attribute, kind, FLOPs of a call or None): the calls a prefill makes, timed where they
# are looked up
COUNTED = (
    (torch.ops.mkldnn, "_linear_pointwise", PRODUCTS, product_flops),
    (F, "linear", PRODUCTS, product_flops),
    (torch, "matmul", PRODUCTS, product_flops),
    (native, "linear", PRODUCTS, product_flops),
    (native, "layer_step", LAYERS, layer_flops),
    (native, "layers_step", LAYERS, layer_flops),
    (native, "attend", "attention", None),
    (native, "prepared_rows", "norms and SwiGLU", None),
    (native, "rope_", "rotation", None),
    (native, "head", "final head", None),
)


class Counted:
    """The calls of `COUNTED` wrapped while on (a context): seconds, calls and FLOPs per kind."""

    def __init__(self) -> None:
        self.seconds: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()
        self.flops: collections.Counter = collections.Counter()
        self.saved = []

    def wrap(self, owner, name: str, kind: str, flops):
        func = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = func(*args, **kwargs)
            self.seconds[kind] += time.perf_counter() - start
            self.calls[kind] += 1
            if flops is not None and out is not None:
                self.flops[kind] += flops(args, out if isinstance(out, torch.Tensor) else out[0])
            return out

        return func, timed

    def __enter__(self):
        for owner, name, kind, flops in COUNTED:
            if hasattr(owner, name):
                func, timed = self.wrap(owner, name, kind, flops)
                self.saved.append((owner, name, func))
                setattr(owner, name, timed)
        return self

    def __exit__(self, *exc):
        for owner, name, func in reversed(self.saved):
            setattr(owner, name, func)
        self.saved.clear()


def peak_gflops(dtype: torch.dtype) -> tuple[float, str]:
    """The fastest of the products' kernels on one large product (1024 rows, 1024 in, 4096 out),
    best of 5: (GFLOP/s, kernel)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(1024, 1024, generator=g).to(dtype), torch.randn(4096, 1024, generator=g).to(dtype)
    packed = torch.ops.mkldnn._reorder_linear_weight(w)
    kernels = {
        "oneDNN packed": lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
        "F.linear": lambda: F.linear(x, w),
    }
    best = {}
    for name, f in kernels.items():
        f()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            f()
            times.append(time.perf_counter() - start)
        best[name] = 2.0 * 1024 * 1024 * 4096 / min(times) / 1e9
    name = max(best, key=best.get)
    return best[name], name


def time_prefills(engine, prompts: list[list[int]], repeats: int) -> tuple[list[float], Counted, list[float]]:
    """Each prompt's prefill, plain and counted alternately, `repeats` times: (plain seconds,
    the counted calls, counted seconds)."""
    counted, plain, with_counts = Counted(), [], []
    for _ in range(repeats):
        for q in prompts:
            for count in (False, True):
                state = engine.new_state(1, len(q) + 8)
                if count:
                    with counted:
                        start = time.perf_counter()
                        engine.prefill(state, {0: q})
                        with_counts.append(time.perf_counter() - start)
                else:
                    start = time.perf_counter()
                    engine.prefill(state, {0: q})
                    plain.append(time.perf_counter() - start)
    return plain, counted, with_counts


def prefill_share(engine, prompts: list[list[int]], max_new_tokens: int) -> tuple[float, float]:
    """Full decoding's generate calls on `prompts` (batch 1, greedy): (the prefill's share of the
    calls' time, tokens generated per call)."""
    settings = GenerationSettings(max_new_tokens=max_new_tokens, stop_strings=("\n",))
    total = prefill = tokens = 0.0
    for q in prompts:
        res = engine.generate([q], settings)[0]
        total += res.stats["elapsed_s"]
        prefill += res.stats["prefill_s"]
        tokens += len(res.tokens)
    return prefill / max(total, 1e-12), tokens / max(len(prompts), 1)


def main(argv=None) -> None:
    from ee_sweep import summarisation_task

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--load", required=True, help="a checkpoint of ours (e.g. runs/ee_aclsum/probes)")
    paired_arguments(p, repeats=2)  # each prompt's pair: plain and counted
    # the sweep's own prompts (prepared from the aclsum package) and torch's threads unless given
    p.set_defaults(data=None, threads=None)
    args = p.parse_args(argv)
    if args.num_examples < 1 or args.repeats < 1:
        p.error("--num-examples and --repeats must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model, tokenizer = load_checkpoint(args.load, dtype=dtype)
    engine = EarlyExitEngine(model, tokenizer)
    prompts, _ = summarisation_task(tokenizer, args.data, args.num_examples, args.max_prompt_chars)
    print(f"{args.load}: {len(prompts)} prompts, {statistics.mean(map(len, prompts)):.0f} tokens on average, "
          f"{'bf16' if args.bf16 else 'fp32'}, {torch.get_num_threads()} threads", flush=True)  # fmt: skip
    for q in prompts[:4]:  # first use: kernels chosen, weights copied
        engine.prefill(engine.new_state(1, len(q) + 8), {0: q})
    plain, counted, with_counts = time_prefills(engine, prompts, args.repeats)
    n = len(with_counts)
    total_ms = sum(with_counts) / n * 1e3
    print(f"prefill, median over prompts x repeats: {statistics.median(plain) * 1e3:.2f} ms "
          f"(counted: {statistics.median(with_counts) * 1e3:.2f} ms; mean counted {total_ms:.2f} ms)")  # fmt: skip
    print("  part                     calls    ms   share")
    inside = 0.0
    for kind in dict.fromkeys(k for _, _, k, _ in COUNTED):
        if counted.calls[kind]:
            ms = counted.seconds[kind] / n * 1e3
            inside += ms
            print(f"  {kind:<22} {counted.calls[kind] / n:6.1f} {ms:6.2f}  {ms / total_ms:6.1%}")
    print(f"  {'rest':<22} {'':>6} {total_ms - inside:6.2f}  {(total_ms - inside) / total_ms:6.1%}")
    peak = None
    for kind, what in ((PRODUCTS, "products"), (LAYERS, "layers in one call, their products' FLOPs alone")):
        if counted.flops[kind]:
            peak = peak or peak_gflops(dtype)
            rate = counted.flops[kind] / counted.seconds[kind] / 1e9
            print(f"{what}: {rate:.0f} GFLOP/s; one large product on {peak[1]}: {peak[0]:.0f} GFLOP/s "
                  f"({rate / peak[0]:.0%} of it)")  # fmt: skip
    share, tokens = prefill_share(engine, prompts, args.max_new_tokens)
    print(f"full decoding's generate calls: the prefill {share:.1%} of their time ({tokens:.1f} tokens a call)")
    ceilings = ", ".join(f"{s:g}x -> {1 / (share + (1 - share) / s):.2f}x" for s in (1.5, 2, 3, 4))
    print(f"  decoding alone sped up by s gives at most: {ceilings}; as s grows: {1 / max(share, 1e-12):.2f}x")


if __name__ == "__main__":
    main()
