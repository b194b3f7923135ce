#!/usr/bin/env python
"""Training tokens/s of our trainer against a plain PyTorch loop over `transformers`' Llama.

    python benchmarks/train_throughput.py                 # fp32, Llama-style 8 x 512, seq 256, batch 4
    python benchmarks/train_throughput.py --bf16 --steps 4 --rounds 3

Both train the same model in one process: same shapes (RMSNorm, SwiGLU, RoPE, no biases,
tied embeddings), same micro-batch and sequence length, same optimizer (AdamW, clip-grad 1.0),
same dtype (fp32, or bf16 autocast on fp32 weights for both). Ours runs through `Trainer`
(mock data, the full train_step: data, forward, backward, grad sync (a no-op here), clip,
step, LR schedule); the reference is the loop everybody writes around `LlamaForCausalLM`:
`loss = model(ids, labels=ids).loss; loss.backward(); clip; opt.step()`. Each timed round runs
`--steps` steps of every setting in turn (warm-up first), so a neighbour on a shared machine
slows them alike; each setting's best round counts. Then ours with 1 and 2 exits (norm + MLP
heads, tied to the embedding), which costs what their heads cost.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from decode_speed import cpu_model_name  # noqa: E402

from megatron.early_exit.arguments import parse_args  # noqa: E402
from megatron.early_exit.training.trainer import Trainer  # noqa: E402


def our_trainer(a, exits: list[int]) -> Trainer:
    argv = (
        f"--mock-data --tokenizer-type NullTokenizer --vocab-size {a.vocab} --num-layers {a.layers} "
        f"--hidden-size {a.hidden} --num-attention-heads {a.heads} --ffn-hidden-size {a.ffn} "
        f"--seq-length {a.seq} --max-position-embeddings {a.seq} --normalization RMSNorm --swiglu "
        f"--position-embedding-type rope --disable-bias-linear --micro-batch-size {a.batch} "
        f"--global-batch-size {a.batch} --train-iters 1000000 --lr 1e-4 --clip-grad 1.0 "
        f"--log-interval 1000000 --eval-interval 0 --seed 0"
    ).split()
    argv += ["--device", str(a.device)]
    if a.bf16:
        argv.append("--bf16")
    if exits:
        argv += ["--exit-layer-nums", *map(str, exits), "--exit-layer-weight", *["0.3"] * len(exits)]
        argv += ["--use-exit-norm", "--use-exit-mlp"]
    return Trainer(parse_args(argv))


class ReferenceLoop:
    """The plain loop over transformers' LlamaForCausalLM, same shapes as ours."""

    def __init__(self, a) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn, num_hidden_layers=a.layers,
            num_attention_heads=a.heads, num_key_value_heads=a.heads, max_position_embeddings=a.seq,
            tie_word_embeddings=True, attn_implementation="sdpa",
        )  # fmt: skip
        torch.manual_seed(0)
        self.model = LlamaForCausalLM(cfg).to(a.device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.01)
        self.autocast = torch.autocast(a.device.type, dtype=torch.bfloat16) if a.bf16 else nullcontext()
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=gen).to(a.device)

    def train_step(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        with self.autocast:
            loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return loss.detach().item()


def time_steps(runner, steps: int, device: torch.device) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        runner.train_step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


# Dense bf16 peak of common GPUs (TFLOP/s, no sparsity), for model FLOPs utilisation.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def peak_tflops(a) -> float | None:
    if a.peak_tflops:
        return a.peak_tflops
    if a.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(a.device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def flops_per_token(a) -> float:
    """Training FLOPs per token of the model without exits (PaLM's count): 6 x parameters in
    matrix products (layers and the tied head) + 12 x layers x hidden x sequence (attention)."""
    layer = 4 * a.hidden * a.hidden + 3 * a.hidden * a.ffn
    return 6 * (a.layers * layer + a.vocab * a.hidden) + 12 * a.layers * a.hidden * a.seq


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for both (weights stay fp32)")
    p.add_argument("--steps", type=int, default=3, help="steps per setting per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; each setting's best counts")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--peak-tflops", type=float, help="the device's peak for MFU (known GPUs are looked up)")
    a = p.parse_args()
    a.device = torch.device(a.device)
    if a.device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {a.device}: CUDA is not available on this machine")
    if min(a.steps, a.rounds, a.threads) < 1:
        p.error("--steps, --rounds and --threads must be >= 1")
    torch.set_num_threads(a.threads)
    runners = {
        "transformers LlamaForCausalLM loop": ReferenceLoop(a),
        "ours, no exits": our_trainer(a, []),
        f"ours, 1 exit ({a.layers // 2})": our_trainer(a, [a.layers // 2]),
        f"ours, 2 exits ({a.layers // 4}, {a.layers // 2})": our_trainer(a, [a.layers // 4, a.layers // 2]),
    }
    print(
        f"machine: {cpu_model_name()}, {os.cpu_count()} cores, {a.threads} threads, torch {torch.__version__}\n"
        f"model: Llama-style {a.layers} layers, hidden {a.hidden}, {a.heads} heads, FFN {a.ffn}, vocab {a.vocab}, "
        f"tied; batch {a.batch} x {a.seq} tokens, {'bf16 autocast' if a.bf16 else 'fp32'}, AdamW + clip 1.0"
    )
    for runner in runners.values():  # warm-up: allocator, oneDNN primitives, optimizer state
        time_steps(runner, 1, a.device)
    best = {name: float("inf") for name in runners}
    for _ in range(a.rounds):
        for name, runner in runners.items():
            best[name] = min(best[name], time_steps(runner, a.steps, a.device))
    tokens = a.batch * a.seq
    ref = best["transformers LlamaForCausalLM loop"]
    peak = peak_tflops(a)
    print(f"\n  {'setting':40s} {'ms/step':>9s} {'tokens/s':>9s} {'vs transformers':>16s} {'MFU':>6s}")
    for name, sec in best.items():
        mfu = f"{tokens / sec * flops_per_token(a) / (peak * 1e12):6.1%}" if peak else f"{'-':>6s}"
        print(f"  {name:40s} {1000 * sec:9.1f} {tokens / sec:9.0f} {ref / sec:15.2f}x {mfu}")


if __name__ == "__main__":
    main()
