"""The CUDA variants (run by `make gpu-check`; skipped where no GPU exists).

The project is developed and tested on CPUs; these prove the same code on a GPU: SDPA and the
model forward on CUDA equal the CPU, bf16 autocast training on CUDA learns, a one-process nccl
world trains under torchrun, and fp32 decoding on CUDA gives the CPU's greedy tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron.early_exit.config import ModelConfig
from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings
from megatron.early_exit.model import EarlyExitGPT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = (
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 128 --num-layers 4 --hidden-size 64 "
    "--num-attention-heads 4 --seq-length 64 --max-position-embeddings 64 --micro-batch-size 4 "
    "--global-batch-size 8 --train-iters 30 --lr 2e-3 --exit-layer-nums 1 2 --exit-layer-weight 0.5 0.5 "
    "--use-exit-norm --log-interval 10 --eval-interval 0 --normalization RMSNorm --swiglu "
    "--position-embedding-type rope --disable-bias-linear --device cuda"
).split()


def llama_model(seed: int = 0) -> EarlyExitGPT:
    cfg = ModelConfig(
        num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        vocab_size=128, max_position_embeddings=128, normalization="RMSNorm", swiglu=True,
        position_embedding_type="rope", add_bias_linear=False, exit_layer_nums=[1, 2, 3],
        use_exit_norm=True, use_exit_mlp=True,
    )  # fmt: skip
    model = EarlyExitGPT(cfg)
    model.init_weights(seed)
    return model.eval()


def test_forward_on_cuda_equals_cpu():
    model = llama_model()
    ids = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cpu = model(ids)
        gpu = model.to("cuda")(ids.to("cuda"))
    # fp32 on both; CUDA's SDPA and GEMM kernels reduce in another order (and may use TF32
    # where the user enabled it): round-off of ~1e-6 relative, far below 1e-4.
    torch.testing.assert_close(gpu.logits.cpu(), cpu.logits, rtol=1e-4, atol=1e-4)
    for n in cpu.exit_logits:
        torch.testing.assert_close(gpu.exit_logits[n].cpu(), cpu.exit_logits[n], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "settings",
    [
        dict(strategy="full"),
        dict(strategy="early_exit", early_exit_threshold=1.0),
        dict(strategy="early_exit", early_exit_threshold=0.0),
        dict(strategy="self_speculative", draft_exit_layer=2, num_draft_tokens=3),
    ],
    ids=["full", "ee_1.0", "ee_0.0", "self_spec"],
)
def test_fp32_decoding_on_cuda_equals_cpu_tokens(settings):
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12]]
    gen = GenerationSettings(max_new_tokens=12, ignore_eos=True, **settings)
    cpu = EarlyExitEngine(llama_model(), None).generate(prompts, gen)
    gpu = EarlyExitEngine(llama_model().to("cuda"), None).generate(prompts, gen)
    assert [r.tokens for r in gpu] == [r.tokens for r in cpu]
    assert [r.exit_layers for r in gpu] == [r.exit_layers for r in cpu]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def losses(path) -> list[float]:
    return [json.loads(line)["lm loss"] for line in open(path)]


def test_bf16_autocast_training_on_cuda_learns(tmp_path):
    log = tmp_path / "log.jsonl"
    run([sys.executable, "pretrain_early_exit_gpt.py", *TRAIN, "--bf16", "--log-jsonl", str(log)])
    values = losses(log)
    assert all(v == v and v < 1e4 for v in values)  # finite
    assert values[-1] < values[0] - 0.5  # the mock sequences are learnable


NCCL_WORLD = """
import sys, torch, torch.distributed as dist
from megatron.early_exit.arguments import parse_args
from megatron.early_exit.training.trainer import Trainer
torch.cuda.set_device(0)
dist.init_process_group("nccl")
assert dist.get_backend() == "nccl", dist.get_backend()
x = torch.ones(4, device="cuda")
dist.all_reduce(x)
assert x.sum().item() == 4.0
state = Trainer(parse_args(sys.argv[1:])).run()
print("backend", dist.get_backend(), "losses", state.history[0]["lm loss"], state.history[-1]["lm loss"])
dist.destroy_process_group()
"""


def test_one_process_nccl_world_trains(tmp_path):
    script = tmp_path / "nccl_world.py"
    script.write_text(NCCL_WORLD)
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", str(script), *TRAIN])
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("backend"))
    _, backend, _, first, last = line.split()
    assert backend == "nccl" and float(last) < float(first) - 0.5
