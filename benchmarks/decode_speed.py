#!/usr/bin/env python
"""Decode speed of early exit vs full decoding, side by side in one run.

    python benchmarks/decode_speed.py --load runs/demo/checkpoints          # a trained checkpoint
    python benchmarks/decode_speed.py --random-smollm2-shape --bf16         # SmolLM2-135M shape, random weights

For each strategy it prints tokens/s, the ratio to full decoding, the share of tokens that
left at each exit, the average exit layer, and for early exit the share of positions where its generated
tokens equal full greedy decoding's (free-running: after the first difference the two texts
usually part, so this is a strict measure). A random model's exits rarely reach a threshold; measure a
trained one for speedups.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings  # noqa: E402


def load(args):
    if args.load:
        from megatron.early_exit import load_checkpoint

        return load_checkpoint(args.load, dtype=torch.bfloat16 if args.bf16 else None)
    from megatron.early_exit.config import ModelConfig
    from megatron.early_exit.model import EarlyExitGPT

    cfg = ModelConfig(num_layers=30, hidden_size=576, num_attention_heads=9, num_query_groups=3, ffn_hidden_size=1536,
                      vocab_size=49152, max_position_embeddings=2048, normalization="RMSNorm", swiglu=True,
                      position_embedding_type="rope", add_bias_linear=False, exit_layer_nums=[8, 15, 22],
                      use_exit_norm=True, use_exit_mlp=True)  # fmt: skip
    model = EarlyExitGPT(cfg)
    model.init_weights(0)
    return model.to(torch.bfloat16 if args.bf16 else torch.float32).eval(), None


def timed(engine, prompts, settings):
    engine.generate(prompts, GenerationSettings(**{**settings.__dict__, "max_new_tokens": 2}))  # warm-up
    start = time.perf_counter()
    res = engine.generate(prompts, settings)
    elapsed = time.perf_counter() - start
    return res, sum(len(r.tokens) for r in res) / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load")
    p.add_argument("--random-smollm2-shape", action="store_true")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.7, 0.5, 0.3])
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    if not args.load and not args.random_smollm2_shape:
        p.error("give --load DIR or --random-smollm2-shape")
    torch.set_num_threads(args.threads)
    model, tok = load(args)
    c = model.config
    engine = EarlyExitEngine(model, tok)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{'bf16' if args.bf16 else 'fp32'}; model: {c.num_layers} layers, hidden {c.hidden_size}, "
        f"vocab {c.vocab_size}, exits {c.exit_layer_nums}; prompt {args.prompt_len}, {args.new_tokens} new tokens"
    )
    g = torch.Generator().manual_seed(0)
    vocab = c.real_vocab_size or c.vocab_size
    for batch in args.batch:
        prompts = [torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(batch)]
        if tok is not None:  # real text where there is a tokenizer: confidence depends on it
            text = "In this paper we propose a new method for the task and show that it improves the results of"
            prompts = [tok.tokenize(text)[: args.prompt_len] for _ in range(batch)]
        base = GenerationSettings(strategy="full", max_new_tokens=args.new_tokens)
        full, full_tps = timed(engine, prompts, base)
        print(f"\nbatch {batch}: full {full_tps:.1f} tokens/s")
        print(f"{'strategy':28s} {'tokens/s':>9s} {'speedup':>8s} {'avg exit':>9s} {'same as full':>13s}  exits")
        for thr in args.thresholds:
            s = GenerationSettings(strategy="early_exit", early_exit_threshold=thr, max_new_tokens=args.new_tokens)
            res, tps = timed(engine, prompts, s)
            same = [sum(a == b for a, b in zip(r.tokens, f.tokens)) / len(f.tokens) for r, f in zip(res, full)]
            layers = [x for r in res for x in r.exit_layers]
            share = ", ".join(f"{n}:{layers.count(n) / len(layers):.0%}" for n in sorted(set(layers)))
            print(
                f"{'early_exit @ ' + str(thr):28s} {tps:9.1f} {tps / full_tps:8.2f}x {sum(layers) / len(layers):9.2f} "
                f"{sum(same) / len(same):13.1%}  {share}"
            )
        for draft in c.exit_layer_nums[-2:]:
            s = GenerationSettings(strategy="self_speculative", max_new_tokens=args.new_tokens, draft_exit_layer=draft)
            res, tps = timed(engine, prompts, s)
            assert [r.tokens for r in res] == [f.tokens for f in full], "self-speculative must equal full greedy"
            print(
                f"{'self_speculative @ exit ' + str(draft):28s} {tps:9.1f} {tps / full_tps:8.2f}x "
                f"{'':9s} {'100.0%':>13s}  acceptance {res[0].stats['acceptance_rate']:.0%}"
            )


if __name__ == "__main__":
    main()
